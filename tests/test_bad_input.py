"""Bad input: one clear line naming the file, a non-zero exit, nothing written that looks complete.

Each of these fails while the job is planned, before any cluster starts.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner

from geoseg.cli.main import cli

from conftest import blob_scene, write_raster


def run(*args):
    result = CliRunner().invoke(cli, list(map(str, args)))
    return result.exit_code, result.output


def assert_refused(code, output, names, out_dir):
    assert code != 0
    line = output.strip().splitlines()[-1]
    assert line.startswith("geoseg: error:"), output
    assert str(names) in line, line
    assert "Traceback" not in output
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_missing_input(random_model, tmp_path):
    code, out = run("predict", tmp_path / "nope.tif", "--model", random_model, "--out", tmp_path / "out")
    assert_refused(code, out, tmp_path / "nope.tif", tmp_path / "out")
    assert "no such file" in out


@pytest.mark.parametrize("command, flag, value", [("predict", "--batch-size", "0"), ("predict", "--chunk-size", "-64"),
                                                   ("predict", "--halo", "-1"), ("evaluate", "--tile-size", "0"),
                                                   ("train", "--threshold", "abc"), ("train", "--threshold", "nan"),
                                                   ("train", "--mmu", "20000000"), ("train", "--mmu", "1=20000000")])
def test_out_of_range_options_are_usage_errors_before_anything_runs(random_model, scene_path, tmp_path, command, flag, value):
    out = tmp_path / "out"
    args = {"predict": ["--model", random_model, "--out", out], "evaluate": ["--model", random_model, "--labels", scene_path],
            "train": ["--labels", scene_path, "--out", out, "--method", "threshold"]}[command]
    code, output = run(command, scene_path, *args, flag, value)
    assert code == 2 and f"Invalid value for '{flag}'" in output, output
    assert "Traceback" not in output and not out.exists()


def test_options_that_would_be_dropped_are_refused(random_model, scene_path, tmp_path):
    """--workers beside --scheduler, --overwrite with --resume, instance options on a semantic model and a bad
    --min-area were accepted and dropped (or checked after a cluster started)."""
    out = tmp_path / "out"
    nowhere = "tcp://127.0.0.1:1"  # a cluster that is never reached: every refusal comes first
    for args, says in (
            (["predict", scene_path, "--model", random_model, "--out", out, "--scheduler", nowhere, "--workers", 2],
             "--workers sizes the embedded local cluster"),
            (["evaluate", scene_path, "--model", random_model, "--labels", scene_path, "--scheduler", nowhere, "--workers", 2],
             "--workers sizes the embedded local cluster"),
            (["predict", scene_path, "--model", random_model, "--out", out, "--overwrite", "--resume"], "give one of them"),
            (["train", scene_path, "--labels", scene_path, "--out", out, "--overwrite", "--resume"], "give one of them"),
            (["predict", scene_path, "--model", random_model, "--out", out, "--score-threshold", 0.5, "--nms-iou", 0.3,
              "--scheduler", nowhere], "--score-threshold, --nms-iou (objects: in a job file) are for models that find objects"),
            (["vectorize", write_raster(tmp_path / "classes.tif", np.ones((1, 32, 32), np.uint8)), "--out", tmp_path / "p.gpkg",
              "--min-area", "5furlongs", "--scheduler", nowhere], "5furlongs")):
        code, output = run(*args)
        assert code == 2 and says in output, output
        assert "Traceback" not in output and not out.exists() and "127.0.0.1:1" not in output.replace(nowhere, "", 1)


def test_an_output_that_cannot_be_created_is_refused_before_any_work(random_model, scene_path, tmp_path):
    """An output under a file (a typo'd path): one line naming it, before a cluster starts or a model runs."""
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file where a folder would go")
    out = blocker / "out"
    code, output = run("predict", scene_path, "--model", random_model, "--out", out)
    assert_refused(code, output, out, out)
    assert "is a file, not a directory" in output and "cluster" not in output
    code, output = run("evaluate", scene_path, "--model", random_model, "--labels", scene_path, "--json", out / "r.json")
    assert_refused(code, output, out / "r.json", out)
    code, output = run("vectorize", scene_path, "--out", out / "l.gpkg")
    assert_refused(code, output, out / "l.gpkg", out)


def test_not_a_raster(random_model, tmp_path):
    bad = tmp_path / "notes.tif"
    bad.write_text("this is not a GeoTIFF")
    code, out = run("predict", bad, "--model", random_model, "--out", tmp_path / "out")
    assert_refused(code, out, bad, tmp_path / "out")


def test_raster_without_crs(random_model, tmp_path):
    image, _ = blob_scene(64, 64, 4, seed=0)
    path = tmp_path / "nocrs.tif"
    with rasterio.open(path, "w", driver="GTiff", width=64, height=64, count=4, dtype="uint16") as ds:
        ds.write(image)
    code, out = run("predict", path, "--model", random_model, "--out", tmp_path / "out")
    assert_refused(code, out, path, tmp_path / "out")
    assert "no CRS" in out


def test_band_count_mismatch(random_model, tmp_path):
    image, _ = blob_scene(64, 64, 3, seed=0)
    path = write_raster(tmp_path / "three.tif", image)
    code, out = run("predict", path, "--model", random_model, "--out", tmp_path / "out")
    assert_refused(code, out, path, tmp_path / "out")
    assert "expects 4" in out


def test_mixed_grids(random_model, tmp_path):
    a = write_raster(tmp_path / "a.tif", blob_scene(64, 64, 2, seed=0)[0])
    b = write_raster(tmp_path / "b.tif", blob_scene(64, 80, 2, seed=0)[0])
    code, out = run("predict", a, b, "--model", random_model, "--out", tmp_path / "out")
    assert_refused(code, out, b, tmp_path / "out")
    assert "64 x 80 pixels against 64 x 64" in out


def test_band_grids_differ_by_what_they_differ_by_not_by_rounding(tmp_path):
    """Band files a rounding apart (origin 1e-7 m, pixel size 1e-11 relative) are one grid; a 0.3 px shift
    or another pixel size is refused, naming which; a raster placed by RPCs only is told to orthorectify."""
    from affine import Affine

    from geoseg.errors import GridMismatchError, InputError
    from geoseg.io.sources import open_stack

    one = np.ones((1, 16, 16), np.uint8)
    a = write_raster(tmp_path / "a.tif", one, transform=Affine(10, 0, 500000, 0, -10, 4000000), block=16)
    for name, t in (("rounded", Affine(10, 0, 500000.0000001, 0, -10, 4000000)), ("res", Affine(10.0000000001, 0, 500000, 0, -10.0000000001, 4000000))):
        assert open_stack([a, write_raster(tmp_path / f"{name}.tif", one, transform=t, block=16)]).count == 2
    for name, t, said in (("shift", Affine(10, 0, 500003, 0, -10, 4000000), r"origin \+0\.3 px across, \+0 px down"),
                          ("coarse", Affine(20, 0, 500000, 0, -20, 4000000), "pixel size 20 x -20 against 10 x -10"),
                          ("south-up", Affine(10, 0, 500000, 0, 10, 4000000 - 160), "pixel size 10 x 10 against 10 x -10")):
        with pytest.raises(GridMismatchError, match=said):
            open_stack([a, write_raster(tmp_path / f"{name}.tif", one, transform=t, block=16)])
    from rasterio.rpc import RPC

    rpc = RPC(height_off=0, height_scale=100, lat_off=35, lat_scale=0.1, line_den_coeff=[1] + [0] * 19, line_num_coeff=[0, 0, -1] + [0] * 17,
              line_off=8, line_scale=8, long_off=15, long_scale=0.1, samp_den_coeff=[1] + [0] * 19, samp_num_coeff=[0, 1] + [0] * 18,
              samp_off=8, samp_scale=8)
    placed = tmp_path / "rpc.tif"
    with rasterio.open(placed, "w", driver="GTiff", width=16, height=16, count=1, dtype="uint8", rpcs=rpc) as ds:
        ds.write(one)
    with pytest.raises(InputError, match="RPCs.*gdalwarp -rpc"):
        open_stack([str(placed)])


@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage"])
def test_broken_weights(random_model, scene_path, tmp_path, damage):
    model = tmp_path / "model"
    shutil.copytree(random_model, model)
    weights = model / "weights.safetensors"
    if damage == "missing":
        weights.unlink()
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        weights.write_bytes(b"\x00" * 64)
    code, out = run("predict", scene_path, "--model", model, "--out", tmp_path / "out")
    assert_refused(code, out, weights, tmp_path / "out")


@pytest.mark.parametrize("damage", ["nan", "int", "other-network"])
def test_weights_that_would_give_a_wrong_map_are_refused_naming_the_tensor(random_model, scene_path, tmp_path, damage):
    """NaN weights labelled every pixel class 0 (exit 0); integer weights were cast silently; weights of another
    network said only 'Error(s) in loading state_dict'."""
    import torch
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(random_model, model)
    weights = model / "weights.safetensors"
    state = load_file(str(weights))
    name = next(k for k in state if k.endswith("segmentation_head.0.weight"))
    if damage == "nan":
        state[name][0, 0, 0, 0] = float("nan")
    elif damage == "int":
        state[name] = (state[name] * 100).to(torch.int32)
    else:
        state[name] = torch.zeros((state[name].shape[0] + 1, *state[name].shape[1:]))
    save_file(state, str(weights))
    from geoseg.errors import ModelError
    from geoseg.model.store import load_model

    with pytest.raises(ModelError, match={"nan": rf"tensor {name} holds NaN", "int": rf"tensor {name} holds int32",
                                          "other-network": rf"size mismatch for {name}"}[damage]):
        load_model(model)


def test_a_nan_normalisation_and_a_card_from_a_newer_geoseg_are_refused(random_model, tmp_path):
    import json

    from geoseg.errors import ModelError
    from geoseg.model.store import check_model_dir

    model = tmp_path / "model"
    shutil.copytree(random_model, model)
    card = json.loads((model / "model.json").read_text())
    card["normalization"]["std"][0] = float("nan")
    (model / "model.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="must be finite"):
        check_model_dir(model)
    card["normalization"]["std"][0] = 1.0
    card["schema_version"] = 2
    (model / "model.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="newer geoseg"):
        check_model_dir(model)
    (model / "model.json").write_bytes(b"\xff\xfe not utf-8")
    code, out = run("model", "show", model)
    assert code == 2 and "cannot be read as a model card" in out and "Traceback" not in out
    (model / "model.json").unlink()
    code, out = run("info", model)
    assert code == 2 and "model card not found" in out


def test_corrupt_card(random_model, scene_path, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(random_model, model)
    (model / "model.json").write_text('{"schema_version": 1, "arch": "unet"')
    code, out = run("predict", scene_path, "--model", model, "--out", tmp_path / "out")
    assert_refused(code, out, model / "model.json", tmp_path / "out")


def test_output_directory_with_other_files(random_model, scene_path, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "thesis.docx").write_text("precious")
    code, out = run("predict", scene_path, "--model", random_model, "--out", out_dir)
    assert code != 0 and str(out_dir) in out and "thesis.docx" in out
    assert sorted(p.name for p in out_dir.iterdir()) == ["thesis.docx"]


def test_finished_output_needs_overwrite(client, random_model, scene_path, tmp_path):
    from geoseg.pipeline import PredictOptions, predict

    out_dir = tmp_path / "out"
    predict([scene_path], random_model, out_dir, PredictOptions(chunk_size=256, cog=False, vectors=False), client=client)
    before = (out_dir / "run.json").read_text()
    code, out = run("predict", scene_path, "--model", random_model, "--out", out_dir)
    assert code != 0 and "--overwrite" in out and str(out_dir) in out
    assert (out_dir / "run.json").read_text() == before
    record = predict([scene_path], random_model, out_dir, PredictOptions(chunk_size=128, overwrite=True, cog=False, vectors=False), client=client)
    assert record["parameters"]["chunk_size"] == 128


def test_interrupted_output_is_not_finished(client, random_model, scene_path, tmp_path):
    """A run that dies mid-way leaves only *.partial names, never prediction.zarr or run.json."""
    from geoseg.pipeline import PredictOptions, plan_job, run_segmentation

    job = plan_job([scene_path], random_model, tmp_path / "out", PredictOptions(chunk_size=128, resume=True))
    (tmp_path / "out").mkdir()
    store = tmp_path / "out" / "prediction.zarr.partial"
    run_segmentation(job, client, store)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["prediction.zarr.partial"]
    # Resuming the same job reuses every finished chunk and publishes the result.
    from geoseg.pipeline import run_job

    record = run_job(job, client)
    assert record["chunks"]["reused"] == record["chunks"]["chunks"] and record["chunks"]["computed"] == 0
    assert (tmp_path / "out" / "prediction.zarr").is_dir() and (tmp_path / "out" / "run.json").is_file()


def test_file_damaged_after_planning_is_a_clear_error_from_the_workers(client, random_model, tmp_path):
    """A read failure on a worker reaches the client as geoseg's InputError naming the file."""
    from geoseg.errors import InputError
    from geoseg.pipeline import PredictOptions, plan_job, run_job

    path = write_raster(tmp_path / "scene.tif", blob_scene(512, 512, 4, seed=0)[0], nodata=0, block=128)
    job = plan_job([path], random_model, tmp_path / "out", PredictOptions(chunk_size=128))
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    with pytest.raises(InputError, match="read failed") as info:
        run_job(job, client)
    assert str(path) in str(info.value)
    assert not (tmp_path / "out" / "run.json").exists() and not (tmp_path / "out" / "prediction.zarr").exists()


def test_gdal_subdataset_names_open_and_gcp_rasters_are_told_to_warp(tmp_path):
    """A subdataset name GDAL opens is an input, not a missing file; a missing file behind one is named
    as missing; a raster placed by ground control points is told to be warped (not to be given a CRS)."""
    import numpy as np
    from rasterio.control import GroundControlPoint

    from geoseg.errors import InputError, InputNotFoundError
    from geoseg.io.sources import open_stack

    tif = write_raster(tmp_path / "plain.tif", np.ones((1, 16, 16), np.uint8), block=16)
    assert open_stack([f"GTIFF_DIR:1:{tif}"]).shape == (16, 16)
    with pytest.raises(InputNotFoundError, match="no such file"):
        open_stack([f"GTIFF_DIR:1:{tmp_path / 'nope.tif'}"])
    gcps = [GroundControlPoint(row=r, col=c, x=500000 + 10 * c, y=4000000 - 10 * r) for r, c in ((0, 0), (0, 16), (16, 0), (16, 16))]
    placed = tmp_path / "gcps.tif"
    with rasterio.open(placed, "w", driver="GTiff", width=16, height=16, count=1, dtype="uint8") as ds:
        ds.gcps = (gcps, rasterio.crs.CRS.from_epsg(32617))
        ds.write(np.ones((1, 16, 16), np.uint8))
    with pytest.raises(InputError, match="ground control points.*gdalwarp"):
        open_stack([str(placed)])


def test_a_malformed_dask_config_file_is_named_not_a_traceback(tmp_path):
    """dask reads its YAML config files when first imported (by the command group): a broken one is one clear
    error naming the file, exit 2, in a fresh process as a user runs it."""
    import os
    import subprocess
    import sys

    cfg = tmp_path / "dask"
    cfg.mkdir()
    (cfg / "workers.yaml").write_text("distributed:\n  worker: [unclosed\n")
    env = {**os.environ, "DASK_CONFIG": str(cfg)}
    out = subprocess.run([sys.executable, "-m", "geoseg", "info", "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-1500:]
    assert "Traceback" not in out.stderr and str(cfg / "workers.yaml") in out.stderr and "Fix or remove" in out.stderr


def test_bands_stored_with_another_scale_or_offset_than_the_model_was_trained_on(tmp_path, random_model, scene_path):
    """A model reads bands as stored: the card records GDAL's scale and offset of its training bands, and a scene
    that stores them otherwise (DN with scale 1e-4 against reflectance) is refused, naming the file and band."""
    import numpy as np

    from geoseg.bands import match_bands
    from geoseg.errors import InputError
    from geoseg.io.sources import open_stack
    from geoseg.model.store import read_card
    from geoseg.training.loop import band_infos

    image, _ = blob_scene(64, 64, 2, seed=1)
    plain = write_raster(tmp_path / "plain.tif", image)
    scaled = write_raster(tmp_path / "scaled.tif", image)
    with rasterio.open(scaled, "r+") as ds:
        ds.scales, ds.offsets = (1e-4, 1e-4), (-0.1, -0.1)
    trained_on = open_stack([scaled])
    card = read_card(random_model).model_copy(update={"bands": tuple(band_infos(trained_on))[:2]})
    assert [(b.scale, b.offset) for b in card.bands] == [(1e-4, -0.1)] * 2
    assert match_bands(open_stack([scaled]), card, "m").count == 2  # stored as in training: fine
    with pytest.raises(InputError, match=r"plain.tif: band 1 holds values with scale 1 and offset 0, but m was trained "
                                         r"on band 1 stored with scale 0.0001 and offset -0.1.*gdal_translate -unscale"):
        match_bands(open_stack([plain]), card, "m")
    # a card that recorded no scale (older models) is not checked
    unknown = card.model_copy(update={"bands": tuple(b.model_copy(update={"scale": None, "offset": None}) for b in card.bands)})
    assert match_bands(open_stack([plain]), unknown, "m").count == 2


def test_training_options_and_a_classes_file_that_is_no_text_are_one_line_errors(scene_path, tmp_path):
    out = tmp_path / "out"
    code, output = run("train", scene_path, "--labels", scene_path, "--out", out, "--weight-decay", "-1")
    assert_refused(code, output, "weight_decay=-1.0", out)
    code, output = run("train", scene_path, "--labels", scene_path, "--out", out, "--classes", scene_path)
    assert_refused(code, output, scene_path, out)
    assert "not a text file" in output


def test_a_scene_of_one_chip_trains_with_the_defaults(tmp_path):
    """128 px: the default chip (128) and block (256) leave one block, which no split can cut; the chips shrink
    until blocks of two chips cut the region into four."""
    image, labels = blob_scene(128, 128, 3, seed=4)
    img = write_raster(tmp_path / "small.tif", image)
    lab = write_raster(tmp_path / "labels.tif", labels, nodata=255)
    code, output = run("-q", "train", img, "--labels", lab, "--out", tmp_path / "m", "--epochs", 1, "--members", 1,
                       "--steps-per-epoch", 1, "--no-ensemble")
    assert code == 0, output
    from geoseg.model.card import ModelCard

    card = ModelCard.read(tmp_path / "m" / "model.json")
    assert card.training["config"]["chip_size"] <= 32 and card.training["metrics"]["pixels"] > 0


def test_masks_gdal_does_not_apply_are_read_and_unreadable_bands_refused(tmp_path):
    """An alpha band in a 5-band file (gdalwarp -dstalpha of RGBN: GDAL reports no mask) and a VRT band's own
    mask band mask their pixels as GDAL's per-dataset masks do; complex bands and a VRT whose source is missing
    are refused when opened, naming the file, not after the cluster started."""
    from rasterio.crs import CRS
    from rasterio.enums import ColorInterp
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    from geoseg.errors import InputError, InputNotFoundError
    from geoseg.io.sources import open_stack, read_window

    t = from_origin(500000, 4000000, 10, 10)
    rng = np.random.default_rng(0)
    data = rng.integers(1, 200, (4, 32, 32)).astype(np.uint8)
    alpha = np.full((32, 32), 255, np.uint8)
    alpha[:, :10] = 0
    rgbn = tmp_path / "rgbn_alpha.tif"
    with rasterio.open(rgbn, "w", driver="GTiff", width=32, height=32, count=5, dtype="uint8", crs="EPSG:32633", transform=t,
                       photometric="MINISBLACK") as ds:
        ds.write(data, [1, 2, 3, 4])
        ds.write(alpha, 5)
        ds.colorinterp = [ColorInterp.gray] + [ColorInterp.undefined] * 3 + [ColorInterp.alpha]
    stack = open_stack([str(rgbn)])
    assert stack.count == 4
    _, valid = read_window(stack, Window(0, 0, 32, 32))
    assert (valid == (alpha > 0)).all()

    write_raster(tmp_path / "values.tif", data[:1], crs="EPSG:32633", transform=t, block=16)
    mask = np.full((1, 32, 32), 255, np.uint8)
    mask[:, 20:] = 0
    write_raster(tmp_path / "mask.tif", mask, crs="EPSG:32633", transform=t, block=16)

    def vrt(name, source):
        (tmp_path / name).write_text(f"""<VRTDataset rasterXSize="32" rasterYSize="32"><SRS>{CRS.from_epsg(32633).to_wkt()}</SRS>
<GeoTransform>500000, 10, 0, 4000000, 0, -10</GeoTransform><VRTRasterBand dataType="Byte" band="1">
<SimpleSource><SourceFilename relativeToVRT="1">{source}</SourceFilename><SourceBand>1</SourceBand></SimpleSource>
<MaskBand><VRTRasterBand dataType="Byte"><SimpleSource><SourceFilename relativeToVRT="1">mask.tif</SourceFilename>
<SourceBand>1</SourceBand></SimpleSource></VRTRasterBand></MaskBand></VRTRasterBand></VRTDataset>""")
        return str(tmp_path / name)

    _, valid = read_window(open_stack([vrt("masked.vrt", "values.tif")]), Window(0, 0, 32, 32))
    assert (valid == (mask[0] > 0)).all()
    assert open_stack([vrt("subdataset.vrt", f"GTIFF_DIR:1:{tmp_path / 'values.tif'}")]).count == 1  # a source GDAL names
    with pytest.raises(InputNotFoundError, match=r"gone\.vrt: refers to .*nothing\.tif, which does not exist"):
        open_stack([vrt("gone.vrt", "nothing.tif")])
    cplx = tmp_path / "complex.tif"
    with rasterio.open(cplx, "w", driver="GTiff", width=8, height=8, count=1, dtype="complex64", crs="EPSG:32633", transform=t) as ds:
        ds.write(np.ones((1, 8, 8), np.complex64))
    with pytest.raises(InputError, match="complex.tif: complex bands .*amplitude"):
        open_stack([str(cplx)])


def test_model_init_refuses_numbers_out_of_range_and_options_of_the_other_method(tmp_path):
    for args, says in ((["--bands", "4", "--classes", "300"], "Invalid value for '--classes'"),
                       (["--bands", "-3", "--classes", "2"], "Invalid value for '--bands'"),
                       (["--bands", "4", "--classes", "5", "--classes-file", __file__], "not both"),
                       (["--bands", "4", "--classes", "5", "--sam-type", "tiny"], "--sam-type does not apply to --method smp"),
                       (["--method", "sam", "--classes", "5"], "--classes does not apply to --method sam")):
        code, output = run("model", "init", tmp_path / "m", *args)
        assert code == 2 and says in output, output
        assert "Traceback" not in output and not (tmp_path / "m").exists()


def test_verbosity_flags_reach_every_command(tmp_path):
    """-v alone changed nothing; -q left model init's and vectorize's lines."""
    import logging

    code, output = run("-q", "model", "init", tmp_path / "m", "--bands", 2, "--classes", 2, "--encoder-depth", 3)
    assert code == 0 and output == ""
    code, output = run("-q", "sample-data", tmp_path / "d", "--size", 64, "--bands", 2)
    assert code == 0 and output == ""
    code, output = run("-q", "vectorize", tmp_path / "d" / "labels.tif", "--out", tmp_path / "p.gpkg", "--workers", 1)
    assert code == 0 and output == "" and (tmp_path / "p.gpkg").exists()
    before = logging.getLogger("geoseg").level
    try:
        assert run("-v", "info", tmp_path / "m")[0] == 0
        assert logging.getLogger("geoseg").level == logging.DEBUG and logging.getLogger("distributed").level == logging.INFO
    finally:
        logging.getLogger("geoseg").setLevel(before)
        logging.getLogger("distributed").setLevel(logging.WARNING)


def test_a_web_server_without_range_requests_is_named_and_not_downloaded_to_check_it(scene_path, tmp_path):
    """Python's http.server answers no Range: GDAL cannot read a raster in place there, and the message says so
    (it said "give a GeoTIFF" of a GeoTIFF). Checking that the file exists asks its headers, not the file."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    shutil.copy(scene_path, tmp_path / "scene.tif")
    asked: list[tuple[str, str | None]] = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def do_GET(self):
            asked.append(("GET", self.headers.get("Range")))
            super().do_GET()

        def do_HEAD(self):
            asked.append(("HEAD", None))
            super().do_HEAD()

    class Server(ThreadingHTTPServer):
        # server_close joins the handler threads: one still sending the file GDAL stopped reading printed its
        # BrokenPipe traceback into the next test's captured output; a client that hangs up is no error here
        daemon_threads = False

        def handle_error(self, request, client_address):
            import sys

            if not isinstance(sys.exc_info()[1], ConnectionError):
                super().handle_error(request, client_address)

    server = Server(("127.0.0.1", 0), functools.partial(Handler, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code, out = run("info", f"http://127.0.0.1:{server.server_port}/scene.tif")
    finally:
        server.shutdown()
        server.server_close()
    assert code != 0 and "range requests" in out and "scene.tif" in out and "give a GeoTIFF" not in out, out
    assert asked[0] == ("HEAD", None)  # the existence check: fsspec's exists() GETs the whole file


def test_info_tells_a_presigned_url_a_stac_collection_and_a_plain_folder_apart(tmp_path):
    import json

    from geoseg.cli.info import _kind

    # the suffix of the URL's path, not of its query: no probe for run.json under "scene.tif?X-Amz-Signature=..."
    assert _kind("https://example.invalid/scene.tif?X-Amz-Signature=abc&X-Amz-Expires=60") == "raster"
    (tmp_path / "items.json").write_text(json.dumps({"type": "FeatureCollection", "stac_version": "1.0.0", "features": []}))
    code, out = run("info", tmp_path / "items.json")
    assert code != 0 and "STAC FeatureCollection, not an item" in out
    (tmp_path / "folder").mkdir()
    code, out = run("info", tmp_path / "folder")
    assert code != 0 and "a model directory (model.json)" in out and "Traceback" not in out
