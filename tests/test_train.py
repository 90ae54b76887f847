"""`geoseg train`: learning, the card it writes, the spatial split, normalisation, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from click.testing import CliRunner
from safetensors.torch import load_file

from _scenes import ORIGIN, RES, make_scene, trained_model, write_polygons, write_tif
from geoseg.errors import ConfigError, OutputExistsError
from geoseg.infer import normalize
from geoseg.model.store import load_model
from geoseg.tiling import Box
from geoseg.training import TrainConfig, TrainInputs, prepare, train, working_dir
from geoseg.training.checkpoint import STATE_NAME, saved_states


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    return trained_model(tmp_path_factory)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return make_scene(tmp_path_factory.mktemp("scene"), h=128, w=128, seed=4)


def cli(*args: str):
    from geoseg.cli.main import cli as group

    return CliRunner().invoke(group, [str(a) for a in args], catch_exceptions=False)


# -- learning and the card -------------------------------------------------------------------


def test_training_separates_the_classes_within_a_small_budget(trained):
    scene, model_dir, result, seconds = trained
    tr = result.card.training
    best = max(r["val_miou"] for r in tr["history"])
    assert best >= 0.9, tr["history"]
    assert tr["metrics"]["miou"] == pytest.approx(best, abs=1e-6)  # the kept weights are the best epoch's
    assert seconds < 180  # fixed work (6 x 8 batches of 8 chips of 64 px): ~6 s on an idle 2-core machine
    assert 1 <= tr["epochs_run"] <= 6 and len(tr["history"]) == tr["epochs_run"]
    assert {"loss", "val_loss", "val_miou", "val_accuracy", "lr", "seconds"} <= set(tr["history"][0])
    assert not working_dir(model_dir).exists()  # checkpoints are gone once the model is written


def test_card_keeps_class_ids_names_and_bands(trained):
    scene, model_dir, result, _ = trained
    bundle = load_model(model_dir)
    card = bundle.card
    assert [(c.id, c.name, c.color) for c in card.classes] == [
        (2, "water", "#2b83ba"), (5, "forest", "#1a9641"), (9, "urban", "#d7191c")
    ]  # fmt: skip
    assert [b.file for b in card.bands] == ["band_1.tif", "band_2.tif", "band_3.tif"]
    assert [b.name for b in card.bands] == ["blue", "band_2", "band_3"]
    assert card.bands[0].description == "blue" and card.bands[1].description is None
    assert all(b.resolution_m == RES for b in card.bands)
    assert card.encoder_depth == 3 and card.stride == 8 and card.tile_size == 128
    # the default U-Net's last decoder block reads the input pixels too (geoseg.model.network.add_input_skip)
    assert card.arch_params == {"input_skip": True} and "input skip" in card.network
    last = bundle.net.decoder.blocks[-1]
    assert last.conv1[0].in_channels == bundle.net.decoder.blocks[-2].conv2[0].out_channels + card.n_inputs
    assert card.training["labels"]["file"] == "labels.tif" and card.training["classes_from"] == "classes.yaml"


def test_normalisation_is_computed_from_training_imagery_and_round_trips(trained):
    scene, model_dir, result, _ = trained
    card = load_model(model_dir).card
    split = card.training["split"]
    # the region is the labels' extent: the label strip of nodata on the right is left out
    y0, y1, x0, x1 = card.training["region"]
    assert (y0, y1, x0, x1) == (0, scene.valid.shape[0], 0, scene.valid.shape[1] - 8)
    not_val = np.zeros(scene.valid.shape, bool)
    not_val[y0:y1, x0:x1] = True
    for y0, y1, x0, x1 in split["val"]["boxes"]:
        not_val[y0:y1, x0:x1] = False
    pix = scene.image[:, scene.valid & not_val].astype(np.float64)
    assert card.training["normalization_pixels"] == pix.shape[1]
    np.testing.assert_allclose(card.normalization.mean, pix.mean(axis=1), rtol=1e-9)
    np.testing.assert_allclose(card.normalization.std, pix.std(axis=1), rtol=1e-9)
    # predict applies exactly what training applied: (x - mean) / std, 0 where nodata
    x = normalize(scene.image, scene.valid, card)
    mean, std = np.array(card.normalization.mean), np.array(card.normalization.std)
    expect = ((scene.image - mean[:, None, None].astype(np.float32)) / std[:, None, None].astype(np.float32))
    expect[:, ~scene.valid] = 0
    np.testing.assert_array_equal(x, expect)


def test_spatial_split_has_no_overlap(trained):
    scene = trained[0]
    config = TrainConfig(encoder_depth=3, chip_size=32, block_size=48, val_fraction=0.3, seed=3)
    prep = prepare(TrainInputs(scene.bands, scene.labels), config, stride=8)
    split = prep.split
    assert split.val.any() and split.train.any() and not (split.val & split.train).any()
    train_px = np.zeros(scene.valid.shape, bool)
    for y, x in prep.candidates:
        box_splits = split.overlaps(Box(y, y + 32, x, x + 32))
        assert box_splits == {"train"}
        train_px[y : y + 32, x : x + 32] = True
    val_px = np.zeros(scene.valid.shape, bool)
    for b in prep.val_boxes:
        assert split.overlaps(b) == {"val"}
        val_px[b.y0 : b.y1, b.x0 : b.x1] = True
    assert train_px.any() and val_px.any()
    assert not (train_px & val_px).any()
    d = split.describe(prep.survey, [c.id for c in prep.classes])
    assert d["val"]["blocks"] == len(prep.val_boxes) and d["train"]["labelled_pixels"] > 0
    # classes come from the label values when nothing names them
    assert [c.id for c in prep.classes] == [2, 5, 9] and prep.classes[0].name == "class_2"


def test_windowed_survey_equals_the_in_memory_one(trained):
    scene = trained[0]
    config = TrainConfig(encoder_depth=3, chip_size=32, block_size=32)
    a = prepare(TrainInputs(scene.bands, scene.labels), config, 8)
    b = prepare(TrainInputs(scene.bands, scene.labels), config, 8, cache_bytes=0)
    assert a.survey.cache is not None and b.survey.cache is None
    assert a.normalization == b.normalization
    assert np.array_equal(a.candidates, b.candidates)
    box = a.val_boxes[0]
    xa, ta = a.reader().read(box)
    xb, tb = b.reader().read(box)
    assert np.array_equal(xa, xb) and np.array_equal(ta, tb)


def test_bands_of_a_multiband_file(trained, tmp_path):
    from geoseg.io.sources import open_stack
    from geoseg.training.loop import band_infos

    scene = trained[0]
    path = write_tif(tmp_path / "stack.tif", scene.image, descriptions=["blue", "", "nir"])
    infos = band_infos(open_stack([path]))
    assert [(b.name, b.description, b.file) for b in infos] == [
        ("blue", "blue", "stack.tif"), ("stack_b2", None, "stack.tif"), ("nir", "nir", "stack.tif")
    ]  # fmt: skip
    prep = prepare(TrainInputs([path], scene.labels), TrainConfig(encoder_depth=3, chip_size=32, block_size=32), 8)
    assert prep.stack.count == 3 and len(prep.candidates) > 0


def test_vector_labels_with_names_train_on_the_classes_file(trained, tmp_path):
    scene = trained[0]
    polys = write_polygons(tmp_path / "p.gpkg", [((0, 60, 40, 100), "urban"), ((100, 180, 60, 120), "Water")])
    prep = prepare(TrainInputs(scene.bands, str(polys), classes_file=str(scene.classes)),
                   TrainConfig(encoder_depth=3, chip_size=32, block_size=32), 8)  # fmt: skip
    assert [c.id for c in prep.classes] == [2, 5, 9]
    counts = prep.survey.id_counts
    assert counts[9] == 60 * 60 and counts[2] > 0 and counts[5] == 0


def test_vector_labels_with_a_background_class(trained, tmp_path):
    """--background: valid pixels no polygon covers take that class (building footprints on land)."""
    scene = trained[0]
    polys = write_polygons(tmp_path / "b.gpkg", [((0, 60, 40, 100), "building"), ((100, 180, 60, 120), "building")])
    prep = prepare(TrainInputs(scene.bands, str(polys), background=0), TrainConfig(encoder_depth=3, chip_size=32, block_size=32), 8)
    assert [(c.id, c.name) for c in prep.classes] == [(0, "background"), (1, "building")]
    counts = prep.survey.id_counts
    valid = prep.survey.valid_pixels.sum()
    assert counts[1] == 60 * 60 + 80 * 60 and counts[0] == valid - counts[1]
    without = prepare(TrainInputs(scene.bands, str(polys)), TrainConfig(encoder_depth=3, chip_size=32, block_size=32), 8)
    assert without.survey.id_counts[0] == 0 and [c.name for c in without.classes] == ["building"]
    r = cli("train", *scene.bands, "--labels", scene.labels, "--background", "0", "--out", tmp_path / "m", "--members", 1)
    assert r.exit_code == 2 and "--background is for vector labels" in r.output


def test_region_restricts_training(trained):
    scene = trained[0]
    prep = prepare(TrainInputs(scene.bands, scene.labels, window=(0, 0, 96, 192)),
                   TrainConfig(encoder_depth=3, chip_size=32, block_size=32), 8)  # fmt: skip
    assert (prep.region.x0, prep.region.x1) == (0, 96)
    assert (prep.candidates[:, 1] + 32 <= 96).all()
    bbox = (ORIGIN[0] + 96 * RES, ORIGIN[1] - 192 * RES, ORIGIN[0] + 192 * RES, ORIGIN[1])
    prep = prepare(TrainInputs(scene.bands, scene.labels, bbox=bbox), TrainConfig(encoder_depth=3, chip_size=32), 8)
    # cut to the labels' extent within it: the scene's last 8 columns have no label
    assert (prep.region.y0, prep.region.y1, prep.region.x0, prep.region.x1) == (0, 192, 96, 184)


def test_labels_on_a_part_of_a_large_scene_train_as_on_that_part_alone(tmp_path):
    """Labels on 192 px of a 1024 px scene whose other imagery is unlike it: region, split, normalisation and
    chips are those of the labelled part (the whole scene was surveyed, and normalised over: the same labels
    made another model in a larger scene). A window of the big scene without labels is not read: its file is
    corrupt here. A labelled patch smaller than a chip trains as a scene of its size would (small chips)."""
    from conftest import blob_scene, write_raster

    image, labels = blob_scene(192, 192, 3, seed=1)
    m, (y, x) = TINY["chip_size"], (320, 448)
    big = np.full((3, 1024, 1024), 60000, np.uint16)
    big[:, y : y + 192, x : x + 192] = image
    big_labels = np.full((1024, 1024), 255, np.uint8)
    big_labels[y : y + 192, x : x + 192] = labels
    write_raster(tmp_path / "big.tif", big)
    write_raster(tmp_path / "big_labels.tif", big_labels, nodata=255)
    crop = Box(y - m, y + 192 + m, x - m, x + 192 + m)
    sl = (slice(crop.y0, crop.y1), slice(crop.x0, crop.x1))
    shifted = Affine.translation(500000.0 + crop.x0 * 10.0, 4000000.0 - crop.y0 * 10.0) * Affine.scale(10.0, -10.0)
    write_raster(tmp_path / "small.tif", big[(slice(None), *sl)], transform=shifted)
    write_raster(tmp_path / "small_labels.tif", big_labels[sl], nodata=255, transform=shifted)
    config = TrainConfig(**TINY)
    a = prepare(TrainInputs([str(tmp_path / "small.tif")], str(tmp_path / "small_labels.tif")), config, 8)
    b = prepare(TrainInputs([str(tmp_path / "big.tif")], str(tmp_path / "big_labels.tif")), config, 8)
    assert (b.region.y0, b.region.x0, b.region.shape) == (y, x, a.region.shape) == (y, x, (192, 192))
    assert a.normalization == b.normalization and a.normalization_pixels == b.normalization_pixels
    assert np.array_equal(a.split.val, b.split.val)
    assert np.array_equal(a.candidates + [crop.y0, crop.x0], b.candidates)
    # a far window's imagery unreadable (its tiles zeroed in the file): the survey never reads it
    far = Box(0, 256, 0, 256)
    with rasterio.open(tmp_path / "big.tif") as ds:
        offset, size = (int(ds.get_tag_item(f"BLOCK_{k}_0_0", "TIFF", bidx=1)) for k in ("OFFSET", "SIZE"))
    with open(tmp_path / "big.tif", "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * size)
    with pytest.raises(Exception):
        from geoseg.io.sources import open_stack, read_window

        read_window(open_stack([str(tmp_path / "big.tif")]), far.window)
    c = prepare(TrainInputs([str(tmp_path / "big.tif")], str(tmp_path / "big_labels.tif")), config, 8, cache_bytes=0)
    assert c.normalization == b.normalization
    # many small blocks read with the files kept open (GDAL keeps its decoded tiles): the same values; closed after
    from geoseg.io import sources

    stack = sources.open_stack([str(tmp_path / "small.tif")])
    blocks = [Box(y, y + 32, x, x + 32) for y in range(0, 128, 32) for x in range(0, 128, 32)]
    alone = [sources.read_bands(stack, b.window) for b in blocks]
    with sources.files_kept_open():
        held = sources._HELD.get()
        kept = [sources.read_bands(stack, b.window) for b in blocks]
        assert len(held) == 1
    assert all(ds.closed for ds in held.values()) and sources._HELD.get() is None
    for (d0, v0), (d1, v1) in zip(alone, kept):
        assert np.array_equal(d0, d1) and np.array_equal(v0, v1)
    patch = np.full((1024, 1024), 255, np.uint8)
    patch[330:426, 460:556] = labels[10:106, 12:108]
    write_raster(tmp_path / "patch.tif", patch, nodata=255)
    small_patch = prepare(TrainInputs([str(tmp_path / "big.tif")], str(tmp_path / "patch.tif")), TrainConfig(), 32, cache_bytes=0)
    assert small_patch.region == Box(330, 426, 460, 556) and small_patch.split.val.any() and len(small_patch.candidates)
    with pytest.warns(UserWarning, match="reaches past the scene"):  # a window cut to the scene says so
        prepare(TrainInputs([str(tmp_path / "small.tif")], str(tmp_path / "small_labels.tif"), window=(-10, 0, 100, 100)),
                config, 8)


# -- checkpoints and resume ------------------------------------------------------------------

TINY = dict(encoder_depth=3, epochs=3, chip_size=32, batch_size=2, steps_per_epoch=2, block_size=64, seed=0, members=1)


class Stop(Exception):
    pass


def stop_after(epoch: int):
    def progress(record):
        if record["epoch"] == epoch:
            raise Stop

    return progress


def _checkpoint(work: Path) -> tuple[dict, dict]:
    state = json.loads((work / STATE_NAME).read_text())
    tensors = load_file(str(work / state["checkpoint"]))
    tensors.update({f"best/{k}": v for k, v in load_file(str(work / state["best_checkpoint"])).items()})
    return state, tensors


def test_resume_continues_from_the_saved_epoch_with_the_same_result(scene, tmp_path):
    inputs = TrainInputs(scene.bands, scene.labels)
    config = TrainConfig(**TINY)
    # A: uninterrupted up to the end of epoch 2
    with pytest.raises(Stop):
        train(inputs, tmp_path / "a", config, progress=stop_after(2))
    # B: interrupted after epoch 1, resumed, stopped after epoch 2
    with pytest.raises(Stop):
        train(inputs, tmp_path / "b", config, progress=stop_after(1))
    work_b = working_dir(tmp_path / "b")
    # weights as safetensors, the rest JSON: no pickle anywhere
    assert sorted(p.name for p in work_b.iterdir()) == ["best-0001.safetensors", "epoch-0001.safetensors", STATE_NAME]
    assert not (tmp_path / "b").exists()
    with pytest.raises(Stop):
        train(inputs, tmp_path / "b", config, resume=True, progress=stop_after(2))
    state_a, tensors_a = _checkpoint(working_dir(tmp_path / "a"))
    state_b, tensors_b = _checkpoint(work_b)
    assert state_a["epoch"] == state_b["epoch"] == 2 and state_b["step"] == 4
    assert tensors_a.keys() == tensors_b.keys()
    assert any(k.startswith("optim/") for k in tensors_a) and any(k.startswith("best/") for k in tensors_a)
    for k in tensors_a:
        assert torch.equal(tensors_a[k], tensors_b[k]), k
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(state_a["history"]) == strip(state_b["history"])

    # Resume B to the end through the CLI, with the options the library run used.
    r = cli("train", *scene.bands, "--labels", scene.labels, "--out", tmp_path / "b", "--encoder-depth", 3,
            "--epochs", 3, "--chip-size", 32, "--batch-size", 2, "--steps-per-epoch", 2, "--block-size", 64,
            "--seed", 0, "--members", 1, "--resume")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "epoch   3/3" in r.output and "epoch   1/3" not in r.output
    card = load_model(tmp_path / "b").card
    assert [h["epoch"] for h in card.training["history"]] == [1, 2, 3]
    assert not work_b.exists()


def test_resume_refuses_other_options_and_nothing_to_resume(scene, tmp_path):
    inputs = TrainInputs(scene.bands, scene.labels)
    with pytest.raises(Stop):
        train(inputs, tmp_path / "m", TrainConfig(**TINY), progress=stop_after(1))
    with pytest.raises(ConfigError, match="lr"):
        train(inputs, tmp_path / "m", TrainConfig(**dict(TINY, lr=0.5)), resume=True)
    with pytest.raises(OutputExistsError, match="--resume"):
        train(inputs, tmp_path / "m", TrainConfig(**TINY))
    with pytest.raises(ConfigError, match="nothing|no interrupted"):
        train(inputs, tmp_path / "other", TrainConfig(**TINY), resume=True)
    # a run of smp's plain U-Net (--no-input-skip, or begun before the input skip was the default: its fingerprint
    # has no input_skip either) resumed with the defaults says how to resume it
    with pytest.raises(Stop):
        train(inputs, tmp_path / "plain", TrainConfig(**dict(TINY, input_skip=False)), progress=stop_after(1))
    with pytest.raises(ConfigError, match="add --no-input-skip"):
        train(inputs, tmp_path / "plain", TrainConfig(**TINY), resume=True)
    with pytest.raises(ConfigError, match="lr") as err:
        train(inputs, tmp_path / "plain", TrainConfig(**dict(TINY, lr=0.5, input_skip=False)), resume=True)
    assert "input-skip" not in str(err.value)


def test_resume_checks_the_files_and_may_replace_what_the_run_would(scene, tmp_path, monkeypatch):
    """A label file edited at the same path (classes swapped) resumed silently: the fingerprint held its path only.
    A run begun with --overwrite over a model could never be resumed (--resume alone: "--out not empty"). A run cut
    while writing its first epoch (tensors, no state.json) was refused both with and without --resume."""
    import shutil

    import rasterio

    labels = tmp_path / "labels.tif"
    shutil.copy(scene.labels, labels)
    inputs = TrainInputs(scene.bands, str(labels))
    out = tmp_path / "m"
    out.mkdir()
    (out / "model.json").write_text("{}")  # an earlier model, replaced with --overwrite
    with pytest.raises(Stop):
        train(inputs, out, TrainConfig(**TINY), overwrite=True, progress=stop_after(1))
    with rasterio.open(labels, "r+") as ds:  # classes 1 and 2 swapped, same size
        a = ds.read(1)
        ds.write(np.where(a == 1, 2, np.where(a == 2, 1, a)), 1)
    with pytest.raises(ConfigError, match="files"):
        train(inputs, out, TrainConfig(**TINY), resume=True)
    shutil.copy(scene.labels, labels)
    inputs = TrainInputs(scene.bands, str(labels))
    with pytest.raises(Stop):  # a new run over the same folder (the edited labels' checkpoints go)
        train(inputs, out, TrainConfig(**TINY), overwrite=True, progress=stop_after(1))
    # into the folder the run was told to replace; without the companion, chosen after training (it was refused)
    result = train(inputs, out, TrainConfig(**dict(TINY, ensemble=False)), resume=True)
    assert [h["epoch"] for h in result.card.training["history"]] == [1, 2, 3]
    assert load_model(out).card.n_classes == result.card.n_classes
    # a model put into --out after the interruption is not replaced by the resumption
    with pytest.raises(Stop):
        train(inputs, out, TrainConfig(**TINY), overwrite=True, progress=stop_after(1))
    (out / "model.json").write_text((out / "model.json").read_text() + " ")
    with pytest.raises(ConfigError, match="replaces"):
        train(inputs, out, TrainConfig(**TINY), resume=True)
    # tensors without their state.json: nothing to resume, so the same command starts again
    work = working_dir(tmp_path / "h")
    work.mkdir()
    (work / "epoch-0001.safetensors").write_bytes(b"cut short")
    train(inputs, tmp_path / "h", TrainConfig(**dict(TINY, epochs=1)))
    assert (tmp_path / "h" / "model.json").is_file() and not work.exists()
    monkeypatch.chdir(tmp_path / "h")
    assert working_dir(".") == tmp_path / "h.training"  # "." has a name ("has an empty name" was a traceback)
    # --out . (or above the current directory): the model directory is replaced as a whole, so it was emptied
    (tmp_path / "h" / "keep.txt").write_text("mine")
    r = cli("train", *scene.bands, "--labels", scene.labels, "--out", ".", "--overwrite", "--epochs", 1)
    assert r.exit_code == 2 and "is the current directory or above it" in r.output, r.output
    with pytest.raises(ConfigError, match="current directory"):
        train(inputs, ".", TrainConfig(**dict(TINY, epochs=1)), overwrite=True)
    assert (tmp_path / "h" / "keep.txt").read_text() == "mine"


def test_sigterm_saves_and_says_how_to_resume(scene, tmp_path):
    """A batch scheduler's SIGTERM (time limit, preemption) killed the run without a word; it is now taken as Ctrl-C:
    the finished epoch is kept and the message says how to go on (--resume in place of --overwrite, which it refuses
    beside --resume)."""
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "m"
    args = [sys.executable, "-m", "geoseg", "train", *scene.bands, "--labels", scene.labels, "--out", out, "--encoder-depth", 3,
            "--epochs", 50, "--chip-size", 32, "--batch-size", 2, "--steps-per-epoch", 2, "--members", 1, "--no-ensemble",
            "--tta", "none", "--val-fraction", "0.3"]
    with open(tmp_path / "err.txt", "w") as errfile:  # a file, not a pipe no one reads while waiting for the epoch
        proc = subprocess.Popen([str(a) for a in [*args, "--overwrite"]], stdout=subprocess.PIPE, stderr=errfile, text=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        for line in proc.stdout:
            if "epoch   1/50" in line:
                break
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    err = (tmp_path / "err.txt").read_text()
    assert proc.returncode == 143, err  # SIGTERM's status, as a shell reports a process it ended
    assert "--resume in place of --overwrite" in err and "Traceback" not in err
    assert saved_states(working_dir(out))[0] is not None and not out.exists()


def test_no_validation_blocks_refuses_what_only_they_serve(scene, tmp_path):
    r = cli("train", *scene.bands, "--labels", scene.labels, "--out", tmp_path / "m", "--background", 0, "--ignore-index", 0)
    assert r.exit_code == 2 and "give one of them" in r.output, r.output  # the background trained as a class it ignored
    r = cli("train", *scene.bands, "--labels", scene.labels, "--out", tmp_path / "m", "--val-fraction", 0, "--patience", 2)
    assert r.exit_code == 2 and "--patience does not apply to --val-fraction 0" in r.output, r.output
    assert not (tmp_path / "m").exists()


def test_a_run_begun_with_indices_on_stored_values_does_not_resume_on_physical_ones(tmp_path):
    """Bands stored with a GDAL scale and offset and index channels: a run interrupted under the code that computed
    the indices on stored values (its saved fingerprint has no index_units) is refused, not mixed."""
    import rasterio

    from conftest import blob_scene, write_raster

    image, labels = blob_scene(128, 128, 2, seed=5)
    img = write_raster(tmp_path / "dn.tif", image)
    with rasterio.open(img, "r+") as ds:
        ds.scales, ds.offsets = (2.75e-5, 2.75e-5), (-0.2, -0.2)
    lab = write_raster(tmp_path / "labels.tif", labels, nodata=255)
    inputs, roles = TrainInputs((str(img),), str(lab)), {"band_roles": ["red", "nir"]}
    with pytest.raises(Stop):
        train(inputs, tmp_path / "m", TrainConfig(**TINY), progress=stop_after(1), card_update=roles)
    state_path = working_dir(tmp_path / "m") / STATE_NAME
    state = json.loads(state_path.read_text())
    assert state["fingerprint"]["index_units"] == "physical" and state["fingerprint"]["index_channels"] == ["ndvi"]
    del state["fingerprint"]["index_units"]  # as the code before wrote it
    state_path.write_text(json.dumps(state))
    with pytest.raises(ConfigError, match="index_units"):
        train(inputs, tmp_path / "m", TrainConfig(**TINY), resume=True, card_update=roles)


def test_existing_model_directory_is_not_overwritten(scene, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "model.json").write_text("{}")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        train(TrainInputs(scene.bands, scene.labels), out, TrainConfig(**TINY))
    assert (out / "model.json").read_text() == "{}"


# -- bad input through the CLI: a clear error naming the file, non-zero exit, nothing written --


def _bad_inputs(scene, tmp: Path) -> dict[str, tuple[list, str]]:
    shifted = write_tif(tmp / "shifted.tif", np.full((128, 128), 2, np.uint8),
                        transform_=Affine(RES, 0, ORIGIN[0] + 50, 0, -RES, ORIGIN[1]))  # fmt: skip
    empty = write_tif(tmp / "empty.tif", np.zeros((128, 128), np.uint8), nodata=0)
    lava = write_polygons(tmp / "lava.gpkg", [((0, 20, 0, 20), "lava"), ((30, 40, 0, 20), "water")])
    other_grid = write_tif(tmp / "band_x.tif", np.ones((130, 128), np.uint16))
    bands = [str(b) for b in scene.bands]
    return {
        "labels on another grid": ([*bands, "--labels", shifted], str(shifted)),
        "unknown class name": ([*bands, "--labels", lava, "--classes", scene.classes], str(lava)),
        "no valid label pixel": ([*bands, "--labels", empty], str(empty)),
        "images of mixed grids": ([bands[0], other_grid, "--labels", scene.labels], str(other_grid)),
        "missing image": ([bands[0], tmp / "missing.tif", "--labels", scene.labels], "missing.tif"),
        "missing labels": ([*bands, "--labels", tmp / "nolabels.tif"], "nolabels.tif"),
        "missing classes file": ([*bands, "--labels", scene.labels, "--classes", tmp / "c.yaml"], "c.yaml"),
    }


@pytest.mark.parametrize("case", ["labels on another grid", "unknown class name", "no valid label pixel",
                                  "images of mixed grids", "missing image", "missing labels", "missing classes file"])  # fmt: skip
def test_bad_input_is_a_clear_error_and_writes_nothing(scene, tmp_path, case):
    args, named = _bad_inputs(scene, tmp_path)[case]
    out = tmp_path / "out" / "model"
    r = cli("train", *args, "--out", out, "--encoder-depth", 3, "--epochs", 1, "--chip-size", 32, "--members", 1)
    assert r.exit_code != 0
    assert "geoseg: error:" in r.output and named in r.output, r.output
    assert "Traceback" not in r.output
    assert not out.exists() and not working_dir(out).exists() and not (tmp_path / "out").exists()


def test_bad_options_are_refused():
    with pytest.raises(ConfigError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ConfigError, match="val_fraction"):
        TrainConfig(val_fraction=1.5)
    with pytest.raises(ConfigError, match="input_skip is for arch 'unet'"):
        TrainConfig(arch="fpn", input_skip=True)
    # the input skip by default where the arch is a U-Net; asked off, the card's arch_params stay smp's
    assert TrainConfig().resolved().arch_params() == {"input_skip": True}
    assert TrainConfig(arch="fpn").resolved().input_skip is False
    assert TrainConfig(input_skip=False).resolved().arch_params() == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_mixed_precision(scene, tmp_path):
    result = train(TrainInputs(scene.bands, scene.labels), tmp_path / "m", TrainConfig(**dict(TINY, epochs=1)), device="cuda")
    assert result.card.training["device"].startswith("cuda")
    assert result.card.training["precision"] in ("bf16-mixed", "fp16-mixed")


# -- several networks (seed ensemble) ----------------------------------------------------------


def test_members_model_is_the_mean_of_networks_of_consecutive_seeds(scene, tmp_path, monkeypatch):
    from geoseg.infer import InferenceSettings, _logits
    from geoseg.model import tiled
    from geoseg.model.members import MemberMean

    inputs = TrainInputs(scene.bands, scene.labels)
    quick = dict(TINY, ensemble=False)
    one = train(inputs, tmp_path / "one", TrainConfig(**quick), card_update={"tta": "none"})
    two = train(inputs, tmp_path / "two", TrainConfig(**dict(quick, members=2)), card_update={"tta": "none"})
    assert one.card.members == 1 and two.card.members == 2
    assert [m["member"] for m in two.card.training["members"]] == [0, 1]
    assert [h["member"] for h in two.history] == [0, 0, 0, 1, 1, 1]
    assert two.card.training["metrics"]["pixels"] > 0  # validation of the members' mean
    assert not working_dir(tmp_path / "two").exists()
    text = repr(two)  # what a notebook or a console shows: a summary, not the dataclass's pages
    assert len(text) < 600 and "history=" not in text and f"{two.card.training['metrics']['miou']:.3f}" in text
    assert f"{two.card.training['epochs_run']} epochs" in text
    assert str(tmp_path / "two") in two._repr_html_()

    plain = load_model(tmp_path / "one", optimize=False).net
    both = load_model(tmp_path / "two", optimize=False).net
    assert isinstance(both, MemberMean) and len(both.members) == 2
    # member 0 is the one-network run (same seed; training is deterministic on the CPU), member 1 another
    first, second = both.members[0].state_dict(), both.members[1].state_dict()
    for k, v in plain.state_dict().items():
        assert torch.equal(v, first[k]), k
    assert any(not torch.equal(first[k], second[k]) for k in first if first[k].is_floating_point())

    # what predict runs (rewritten networks, stage by stage on a large window) is the mean of the members' logits
    x = normalize(np.stack([np.full((96, 104), 500.0 * (b + 1), np.float32) for b in range(3)])
                  + np.random.default_rng(0).normal(0, 300, (3, 96, 104)).astype(np.float32),
                  np.ones((96, 104), bool), two.card)[None]  # fmt: skip
    with torch.no_grad():
        t = torch.from_numpy(x)
        ref = ((both.members[0](t) + both.members[1](t)) / 2).numpy()
    run = load_model(tmp_path / "two").net
    monkeypatch.setattr(tiled, "MIN_WINDOW", 64 * 64)
    got = _logits(run, x, two.card.stride, InferenceSettings()).float().numpy()
    assert all(m.__dict__.get("_geoseg_tiled") is not None for m in run.members)  # each member ran stage by stage
    assert np.abs(got - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())
    assert not np.allclose(ref, both.members[0](t).detach().numpy(), atol=1e-3)  # the mean, not one member


def test_members_resume_skips_finished_networks_with_the_same_result(scene, tmp_path):
    inputs = TrainInputs(scene.bands, scene.labels)
    config = TrainConfig(**dict(TINY, members=2, ensemble=False))
    a = train(inputs, tmp_path / "a", config, card_update={"tta": "none"})
    seen = []

    def stop_in_second(record):
        seen.append((record["member"], record["epoch"]))
        if record["member"] == 1 and record["epoch"] == 2:
            raise Stop

    with pytest.raises(Stop):
        train(inputs, tmp_path / "b", config, progress=stop_in_second, card_update={"tta": "none"})
    work = working_dir(tmp_path / "b")
    top, parts = saved_states(work)  # network 0 finished (3 epochs), network 1 saved after its epoch 2
    assert top is None and [json.loads(p.read_text())["epoch"] for p in parts] == [3, 2]
    for other in (1, 3):  # another number of networks is another run: refused before anything trains
        with pytest.raises(ConfigError, match="members"):
            train(inputs, tmp_path / "b", TrainConfig(**dict(TINY, members=other, ensemble=False)), resume=True,
                  progress=lambda r: pytest.fail("trained"), card_update={"tta": "none"})  # fmt: skip
    resumed = []
    b = train(inputs, tmp_path / "b", config, resume=True, progress=lambda r: resumed.append((r["member"], r["epoch"])),
              card_update={"tta": "none"})  # fmt: skip
    assert resumed == [(1, 3)]  # member 0 was finished, member 1 continues after its epoch 2
    wa, wb = load_file(str(tmp_path / "a" / "weights.safetensors")), load_file(str(tmp_path / "b" / "weights.safetensors"))
    assert wa.keys() == wb.keys() and any(k.startswith("members.1.") for k in wa)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(a.history) == strip(b.history)


def test_the_summary_says_when_validation_scored_a_sample_of_its_blocks():
    """Validation blocks beyond val_max_pixels are sampled; the summary said every held-out block was scored."""
    from geoseg.cli.train import _held_out

    assert _held_out({"split": {"val": {"blocks": 305}}, "validation_blocks_used": 61}) == \
        "61 of 305 held-out blocks, a seeded sample"
    assert _held_out({"split": {"val": {"blocks": 4}}, "validation_blocks_used": 4}) == "4 held-out blocks"
    assert _held_out({"split": {"val": {"blocks": 4}}}) == "4 held-out blocks"  # cards from before the record
