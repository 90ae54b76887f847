"""The field's other methods through the same pipeline: threshold (fixed, Otsu on the cluster),
k-means (dask-ml), a per-pixel LightGBM classifier, and halo-aware post-processing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner

from conftest import write_raster
from geoseg.infer import InferenceSettings, segment_array
from geoseg.io.sources import open_stack, read_bands
from geoseg.io.zarr_store import open_prediction
from geoseg.methods.features import spectral_index
from geoseg.model.card import ModelCard
from geoseg.model.store import load_model
from geoseg.pipeline import PredictOptions, predict
from geoseg.tiling import Box, plan_for

ROLES = "blue,green,red,nir"
# reflectance-like signatures (blue, green, red, nir) of water, forest, bare soil
SIGNATURES = np.array([[600, 900, 500, 200], [300, 600, 300, 2600], [1400, 1600, 1800, 2200]], float)
NAMES = ("water", "forest", "bare")


def make_scene(tmp: Path, h: int = 200, w: int = 260, seed: int = 0):
    """Blobs of three land covers with noise; band 4 (nir) missing in a strip; a nodata corner."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 3, size=(h // 16 + 2, w // 16 + 2))
    labels = np.kron(coarse, np.ones((16, 16), int))[:h, :w]
    image = SIGNATURES[labels].transpose(2, 0, 1) + rng.normal(0, 150, size=(4, h, w))
    image = np.clip(image, 1, 65535).astype(np.uint16)
    image[3, 150:170, :] = 0  # one band missing: the trees classify from the others
    image[:, :20, :30] = 0  # every band missing: nodata
    img = write_raster(tmp / "scene.tif", image, nodata=0)
    lab = write_raster(tmp / "labels.tif", (labels + 1).astype(np.uint8), nodata=0)
    classes = tmp / "classes.yaml"
    classes.write_text("".join(f"- {{id: {i + 1}, name: {n}}}\n" for i, n in enumerate(NAMES)))
    return img, lab, classes, labels + 1


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return make_scene(tmp_path_factory.mktemp("methods-scene"))


def cli(*args):
    from geoseg.cli.main import cli as group

    return CliRunner().invoke(group, [str(a) for a in args], catch_exceptions=False)


def train(scene, out, *extra):
    img, lab, classes, _ = scene
    networks = () if "--method" in extra else ("--members", 1)  # the other methods refuse the networks' options
    r = cli("-q", "train", img, "--labels", lab, "--classes", classes, "--out", out, "--band-roles", ROLES, *networks, *extra)
    assert r.exit_code == 0, r.output
    return ModelCard.read(Path(out) / "model.json")


def one_pass(model_dir, img, params=()):
    bundle = load_model(model_dir)
    stack = open_stack([img])
    data, bv = read_bands(stack, Box(0, stack.shape[0], 0, stack.shape[1]).window)
    return segment_array(bundle.net, bundle.card, data, bv, InferenceSettings(params=tuple(params)))


def tiled(client, model_dir, img, out, chunk=64):
    record = predict([img], model_dir, out, PredictOptions(chunk_size=chunk, cog=False, vectors=False), client=client)
    assert record["chunks"]["chunks"] > 4
    return open_prediction(Path(out) / "prediction.zarr")["class_id"].values


@pytest.fixture(scope="module")
def pixel_model(scene, tmp_path_factory):
    """A pixel model of the scene, trained on labels with 10% of the pixels given a random class: as real labels,
    they stop LightGBM early (78 rounds; clean labels of this easy scene take 210, and took 600 before the
    stopping rule's minimum improvement)."""
    img, _, classes, truth = scene
    d = tmp_path_factory.mktemp("pixel")
    rng = np.random.default_rng(1)
    noisy = truth.copy()
    flip = rng.random(truth.shape) < 0.1
    noisy[flip] = rng.integers(1, 4, flip.sum())
    lab = write_raster(d / "labels.tif", noisy.astype(np.uint8), nodata=0)
    return d / "model", train((img, lab, classes, truth), d / "model", "--method", "pixel", "--val-fraction", "0.25",
                              "--block-size", "48")


def test_a_truncated_lightgbm_file_is_refused_before_it_can_crash_a_worker(pixel_model, scene, tmp_path):
    """LightGBM read a truncated text model until the process died (exit 139; predict then blamed memory)."""
    import shutil

    out, _ = pixel_model
    broken = tmp_path / "model"
    shutil.copytree(out, broken)
    text = (broken / "model.lgb.txt").read_bytes()
    (broken / "model.lgb.txt").write_bytes(text[: len(text) // 2])
    r = cli("predict", scene[0], "--model", broken, "--out", tmp_path / "out")
    assert r.exit_code == 2 and "model.lgb.txt: LightGBM model is truncated" in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_brightness_of_a_pixel_with_no_band_is_nan_without_a_warning():
    """A pixel where every band is missing (nodata as NaN) has no brightness; numpy's "Mean of empty slice"
    reached the user's console from feature_stack (pyproject turns geoseg's RuntimeWarnings into errors)."""
    import warnings

    from geoseg.methods.features import brightness

    x = np.array([[[1.0, np.nan]], [[3.0, np.nan]]], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = brightness(x)
    assert b[0, 0] == 2.0 and np.isnan(b[0, 1])
    rng = np.random.default_rng(0)  # and bit for bit numpy's nanmean, scaled or not
    x = rng.normal(100, 30, (6, 64, 64)).astype(np.float32)
    x[rng.random(x.shape) < 0.3] = np.nan
    scale = rng.uniform(1, 50, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for sc in (None, scale):
            want = np.nanmean(x if sc is None else x / np.asarray(sc, np.float32)[:, None, None], axis=0)
            assert np.array_equal(brightness(x, sc), want, equal_nan=True)


def _forest_inputs(booster, n: int, seed: int) -> np.ndarray:
    """Feature rows that reach every kind of split: values on the thresholds and a float32 step either side,
    NaNs, zeros and tiny values (LightGBM's zero-as-missing), and everything in between."""
    rng = np.random.default_rng(seed)
    thresholds: dict[int, list[float]] = {}

    def walk(node):
        if "leaf_value" not in node:
            thresholds.setdefault(node["split_feature"], []).append(node["threshold"])
            walk(node["left_child"])
            walk(node["right_child"])

    for tree in booster.dump_model()["tree_info"]:
        walk(tree["tree_structure"])
    X = rng.normal(0, 2, (n, booster.num_feature())).astype(np.float32)
    for f, ts in thresholds.items():
        with np.errstate(over="ignore"):  # LightGBM's 1e300 thresholds: inf
            t = np.asarray(rng.choice(ts, n), np.float32)
        step = rng.integers(-1, 2, n).astype(np.float32)
        on = rng.random(n) < 0.5
        X[on, f] = np.nextafter(t[on], t[on] + step[on])
    X[rng.random(X.shape) < 0.05] = np.nan
    X[rng.random(X.shape) < 0.03] = 0.0
    X[rng.random(X.shape) < 0.01] = 1e-38
    X[rng.random(X.shape) < 0.01] = -1e-35
    return X


def test_the_companion_s_trees_as_tensors_equal_lightgbm(pixel_model):
    """On a GPU worker the network's LightGBM companion runs as tensors (geoseg.methods.forest): the same
    probabilities as LightGBM's predict, on a geoseg pixel model and on one with every missing-value kind."""
    import lightgbm as lgb
    import torch

    from geoseg.methods.forest import TorchForest
    from geoseg.model.store import lightgbm_booster

    out, _ = pixel_model
    rng = np.random.default_rng(3)
    X = rng.normal(size=(3000, 5))
    X[rng.random(X.shape) < 0.2] = np.nan
    X[rng.random(X.shape) < 0.2] = 0.0
    y = (np.nan_to_num(X[:, 0]) > 0).astype(int) + (np.isnan(X[:, 1])) + (X[:, 2] == 0)
    kinds = {}
    for zero in (False, True):  # zero_as_missing: splits of missing type Zero; else NaN (and None)
        b = lgb.train({"objective": "multiclass", "num_class": 4, "verbose": -1, "zero_as_missing": zero, "num_leaves": 7,
                       "min_data_in_leaf": 5}, lgb.Dataset(X, y), num_boost_round=15)
        kinds[zero] = b
    types = {int(t) for b in kinds.values() for line in b.model_to_string().split("decision_type=")[1:]
             for t in line.split("\n")[0].split()}
    assert {4, 8} <= {t & 12 for t in types}  # splits of missing type Zero (4) and NaN (8) are both in there
    for booster in (lightgbm_booster(out / "model.lgb.txt"), *kinds.values()):
        rows = _forest_inputs(booster, 1500, seed=booster.num_trees())
        want = booster.predict(rows, num_threads=1)
        got = TorchForest(booster, "cpu", batch_elements=1 << 20).predict(rows)  # several batches
        assert got.shape == want.shape and np.abs(got - want).max() < 1e-12
        assert np.array_equal(got.argmax(1), want.argmax(1))
        raw = TorchForest(booster).raw_scores(torch.from_numpy(rows[:200])).numpy()
        np.testing.assert_allclose(raw, booster.predict(rows[:200], raw_score=True), rtol=0, atol=1e-12)


def _ops_ran(fn, *args):
    """``fn(*args)`` and how many times torch's profiler saw each (op or kernel name, device type) run in it."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        out = fn(*args)
    return out, {(e.key, str(e.device_type).split(".")[-1]): e.count for e in prof.key_averages()}


def test_a_companion_s_features_on_its_device_equal_numpy_s(scene, pixel_model):
    """On a GPU worker the companion's features are computed with torch beside its trees (device_features): bit for
    bit numpy's and scipy's, the 5 x 5 statistics of flat windows too (``**`` within a float32 step: each library's
    pow); LightGBM's probabilities from them."""
    import torch

    from geoseg.methods import device_features
    from geoseg.methods.features import feature_stack, nan_bands
    from geoseg.methods.forest import TorchForest
    from geoseg.methods.pixel import predict_pixels

    rng = np.random.default_rng(5)
    x = rng.normal(800, 300, (4, 96, 80)).astype(np.float32)
    x[:, 10:40, 10:40] = 500.0  # flat: a standard deviation of 0 from sums that cancel
    x[3, 50:60] = np.nan  # nir missing: NaN indices
    x[:, :6, :6] = np.nan  # nothing: NaN everywhere, texture too where the window holds no value
    x[1, 70:, 70:] = -x[0, 70:, 70:]  # a + b == 0: the difference index is 0
    roles = ("blue", "green", "red", "nir")
    feats = ("band:0", "band:3", "brightness", "ndvi", "ndwi", "expr:(nir - red) / (nir + red + 0.5) * 2", "expr:green ** 0.5 - 2 ** (nir / 1000)",
             "expr:3", "mean:brightness", "std:brightness", "std:ndvi", "mean:expr:nir / (red - red)")
    units = ((0.0001, -0.1), (0.0001, -0.1), (1.0, 0.0), (0.0002, 0.0))
    for scale, un in ((None, None), ([300.0, 200.0, 250.0, 400.0], units)):
        want = feature_stack(x, roles, feats, scale, un)
        got = device_features.feature_stack(torch.from_numpy(x), roles, feats, scale, un).numpy()
        for i, f in enumerate(feats):
            assert np.array_equal(np.isnan(got[i]), np.isnan(want[i])), f
            if "**" in f:  # each library's own pow: within a float32 step of the terms (a difference of two powers
                # keeps their absolute error, not its relative one; measured on AVX-512: 2.4e-7 off at 0.36, terms ~28)
                step = np.finfo(np.float32).eps * np.nanmax(np.abs(want[i]))
                np.testing.assert_allclose(got[i], want[i], rtol=2.5e-7, atol=2 * step, err_msg=f)
            else:
                assert np.array_equal(got[i], want[i], equal_nan=True), f"{f}: {np.count_nonzero(got[i] != want[i])} px differ"
    # the pixel model's trees on the scene (a window of it: on a CPU the tensor forest is slow), as LightGBM has them
    img, _, _, _ = scene
    out, card = pixel_model
    stack = open_stack([img])
    data, bv = read_bands(stack, Box(0, 200, 24, 32).window)  # the strip without nir, the nodata corner's edge
    data = nan_bands(data, bv)
    valid = bv.any(axis=0)
    booster = load_model(out).net.booster
    features = card.method_params["features"]
    want = predict_pixels(booster, card, features, data, valid)
    got, ops = _ops_ran(predict_pixels, TorchForest(booster, "cpu"), card, features, data, valid)
    assert ("aten::constant_pad_nd", "CPU") in ops and ("aten::bmm", "CPU") in ops  # features and trees as tensors
    assert np.abs(got - want).max() < 1e-6 and np.array_equal(got.argmax(0), want.argmax(0))
    assert np.count_nonzero(got.sum(0)) == np.count_nonzero(valid) < valid.size


@pytest.mark.gpu
def test_a_network_s_companion_runs_on_its_gpu(scene, pixel_model, tmp_path):
    """Loaded on a CUDA device, a network's companion is the tensor forest on that device, and agrees with LightGBM."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from geoseg.methods.forest import TorchForest

    out = tmp_path / "unet"
    card = train(scene, out, "--epochs", "2", "--chip-size", "32", "--block-size", "32", "--encoder-depth", "3",
                 "--steps-per-epoch", "4", "--no-ensemble")
    px_out, px_card = pixel_model  # its trees as the network's companion (same scene, bands and classes)
    (out / "pixel.lgb.txt").write_bytes((px_out / "model.lgb.txt").read_bytes())
    ens = {"method": "pixel", "file": "pixel.lgb.txt", "features": list(px_card.method_params["features"]), "weight": 0.5}
    params = {**card.method_params, "ensemble": ens, "files": ["pixel.lgb.txt"]}
    (out / "model.json").write_text(ModelCard.model_validate({**card.model_dump(), "method_params": params}).to_json())
    on_gpu, on_cpu = load_model(out, device="cuda"), load_model(out)
    assert isinstance(on_gpu.companion, TorchForest) and on_gpu.companion.device.type == "cuda"
    rows = _forest_inputs(on_cpu.companion, 100_000, seed=0)
    assert np.abs(on_gpu.companion.predict(rows) - on_cpu.companion.predict(rows, num_threads=1)).max() < 1e-9
    # the features too are computed there: the whole scene's companion probabilities as a CPU worker has them
    from geoseg.methods.features import nan_bands
    from geoseg.methods.pixel import predict_pixels

    stack = open_stack([scene[0]])
    data, bv = read_bands(stack, Box(0, stack.shape[0], 0, stack.shape[1]).window)
    data, valid = nan_bands(data, bv), bv.any(axis=0)
    want = predict_pixels(on_cpu.companion, on_cpu.card, ens["features"], data, valid)
    got, ops = _ops_ran(predict_pixels, on_gpu.companion, on_gpu.card, ens["features"], data, valid)
    # on the GPU: its kernels ran at least once per line of the window (the 5 x 5 sums run along each line)
    assert sum(n for (_, dev), n in ops.items() if dev == "CUDA") >= sum(valid.shape), sorted(ops)
    assert np.abs(got - want).max() < 1e-5 and np.mean(got.argmax(0) == want.argmax(0)) > 0.9999
    # the pixel method on a GPU worker runs there too, and classifies as on a CPU
    pixel_gpu = load_model(px_out, device="cuda")
    assert isinstance(pixel_gpu.net.booster, TorchForest) and pixel_gpu.net.booster.device.type == "cuda"
    on_gpu_map, _ = segment_array(pixel_gpu.net, pixel_gpu.card, *read_bands(stack, Box(0, 200, 0, 260).window),
                                  InferenceSettings())
    assert np.array_equal(on_gpu_map, one_pass(px_out, scene[0])[0])


def test_pixel_method_card_and_safe_format(pixel_model):
    out, card = pixel_model
    assert card.method == "pixel" and card.missing_bands == "fill"
    assert [b.role for b in card.bands] == ROLES.split(",")
    assert {"ndvi", "ndwi", "mean:brightness", "std:brightness"} <= set(card.method_params["features"])
    # the pixel method's context: the 5 x 5 mean of every band and index, the spread of every index (a network's
    # companion keeps the few: richer, it scored lower in the mix on NC)
    from geoseg.methods.features import default_features

    context = {"mean:band:0", "mean:band:3", "mean:ndvi", "mean:ndwi", "std:ndvi", "std:ndwi"}
    assert context <= set(card.method_params["features"]) and len(card.method_params["features"]) == 16
    assert not context - {"std:ndvi"} & set(default_features(card.band_roles, 4))
    text = (out / "model.lgb.txt").read_text()  # LightGBM's text model: no pickle anywhere
    assert text.startswith("tree") and "num_class=3" in text
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.lgb.txt"]
    assert card.training["metrics"]["miou"] > 0.8  # validation blocks, scored when fitted


def test_pixel_method_through_the_cluster_equals_one_pass(client, scene, pixel_model, tmp_path):
    img, _, _, truth = scene
    out, card = pixel_model
    got = tiled(client, out, img, tmp_path / "out")
    ref, _ = one_pass(out, img)
    assert np.array_equal(got, ref)
    valid = got != 255
    assert not valid[:20, :30].any()  # every band missing: nodata
    assert valid[150:170, 30:].all()  # nir missing: still classified (missing values handled by the trees)
    assert np.mean(got[valid] == truth[valid]) > 0.9


def test_threshold_otsu_on_the_cluster_equals_skimage(client, scene, tmp_path):
    from skimage.filters import threshold_otsu

    from geoseg.methods.threshold import otsu_on_cluster

    img, _, _, truth = scene
    card = train(scene, tmp_path / "th", "--method", "threshold", "--index", "ndwi")
    assert card.method_params["index"] == "ndwi" and card.method_params["threshold"] == "otsu"
    assert card.class_ids[[c.name for c in card.classes].index("water")] == card.method_params["above"]
    stack = open_stack([img])
    data, bv = read_bands(stack, Box(0, 200, 0, 260).window)
    x = data.astype(np.float32)
    x[~bv] = np.nan
    ndwi = spectral_index(x, card.band_roles, "ndwi")
    expected = threshold_otsu(ndwi[np.isfinite(ndwi)])
    plan = plan_for(card, stack.shape, chunk_size=64)
    assert otsu_on_cluster(card, stack, plan, client) == pytest.approx(float(expected), abs=0, rel=1e-7)
    got = tiled(client, tmp_path / "th", img, tmp_path / "out")
    ref, _ = one_pass(tmp_path / "th", img, [("threshold", float(expected))])
    assert np.array_equal(got, ref)
    # no network: bf16 (asked for, or 'auto' on a bf16 CPU) was recorded, keyed the chunks (a --resume on another CPU
    # recomputed them) and warned of a slowdown on CPUs without it, for a map computed in fp32 all along
    import warnings

    from geoseg.numerics import SlowPrecisionWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowPrecisionWarning)
        rec = predict([img], tmp_path / "th", tmp_path / "bf16", PredictOptions(chunk_size=64, precision="bf16", cog=False,
                                                                              vectors=False), client=client)
    assert rec["parameters"]["precision"] == "fp32", rec["numerics"]
    assert rec["numerics"]["reason"] == "asked for bf16; a threshold model has no network and computes in fp32"
    assert np.array_equal(open_prediction(tmp_path / "bf16" / "prediction.zarr")["class_id"].values, got)
    water = card.method_params["above"]
    v = got != 255
    assert np.mean((got == water)[v & (truth == 1)]) > 0.95 and np.mean((got == water)[v & (truth != 1)]) < 0.05
    assert not (got[150:170] != 255).any()  # ndwi needs nir: no value where it is missing
    from geoseg.errors import ConfigError
    from geoseg.pipeline import plan_job

    with pytest.raises(ConfigError, match="--tta d4 augments a network's passes, and this is a threshold model"):
        plan_job([img], tmp_path / "th", tmp_path / "tta", PredictOptions(tta="d4"))
    from geoseg.evaluation import EvaluateOptions, plan_evaluation

    with pytest.raises(ConfigError, match="--tta d4 augments a network's passes"):  # evaluate scored it without, silently
        plan_evaluation([img], tmp_path / "th", scene[1], EvaluateOptions(tta="d4"), resolve=False)
    from geoseg.evaluation import plan_comparison

    with pytest.raises(ConfigError, match="none of these models is a network"):  # beside a network, d4 is the network's
        plan_comparison([img], [tmp_path / "th", tmp_path / "th"], scene[1], EvaluateOptions(tta="d4"), resolve=False)
    from geoseg import api

    ds = api.predict(api.open_scene(img, chunks=64), tmp_path / "th")  # the scene's threshold, said where the map is
    assert ds.attrs["geoseg_threshold"] == pytest.approx(float(expected), rel=1e-7)


def test_a_minimum_mapping_unit_names_classes_the_model_has(scene, pixel_model, tmp_path):
    """--mmu 9=4 on classes 1-3 did nothing (and grew the halo); 2=4,2=40 kept the last silently. Refused before any
    training, with or without a classes file; a stored card that holds one (made before) loads without it."""
    img, lab, classes, _ = scene
    for mmu, extra, says in (("9=4", ["--classes", str(classes)], "--mmu names class id(s) [9], which the model does not have"),
                             ("9=4", ["--epochs", "1"], "--mmu names class id(s) [9], which the model does not have"),
                             ("2=4,2=40", [], "class id(s) [2] given more than once")):
        method = ["--method", "pixel"] if "--epochs" not in extra else ["--chip-size", "32", "--steps-per-epoch", "1"]
        r = CliRunner().invoke(__import__("geoseg.cli.main", fromlist=["cli"]).cli,
                               ["train", str(img), "--labels", str(lab), "--out", str(tmp_path / "m"), *method, *extra,
                                "--mmu", mmu])
        assert r.exit_code == 2 and says in r.output and "epoch" not in r.output, r.output
        assert not (tmp_path / "m").exists() and not (tmp_path / "m.training").exists()
    _, card = pixel_model
    with pytest.warns(UserWarning, match=r"units for class id\(s\) \[9\] are dropped"):
        old = ModelCard.model_validate({**card.model_dump(), "postprocess": {"class_min_pixels": {9: 4, 2: 20}}})
    assert old.postprocess.class_min_pixels == {2: 20}
    assert "global_reach" not in json.loads(card.to_json())  # older geoseg still reads a card that is not global


def test_options_of_another_method_are_refused_before_training(scene, tmp_path):
    """--tta d4 on a threshold model was dropped (and predict refuses TTA there); --index on the networks too."""
    img, lab, classes, _ = scene
    for method, extra, says in ((["--method", "threshold"], ["--tta", "d4", "--epochs", "3"],
                                 "--tta, --epochs do not apply to --method threshold"),
                                (["--method", "pixel"], ["--clusters", "6"], "--clusters does not apply to --method pixel"),
                                ([], ["--index", "ndwi", "--members", "1"], "--index does not apply to --method smp"),
                                # the methods sample pixels in 64 px blocks: a chip size changed nothing
                                (["--method", "kmeans"], ["--chip-size", "32"], "--chip-size does not apply to --method kmeans"),
                                # a fixed value means something for one index: the first the roles allowed was taken silently
                                (["--method", "threshold", "--band-roles", ROLES], ["--threshold", "0.3"],
                                 "threshold 0.3: a fixed value means something for one index only; name the index (--index"),
                                (["--method", "threshold", "--band-roles", ROLES], ["--index", "expr:" + "-" * 3000 + "nir"],
                                 "at most 500")):
        r = cli("train", img, "--labels", lab, "--classes", classes, "--out", tmp_path / "m", *method, *extra)
        assert r.exit_code == 2 and says in r.output, r.output
        assert not (tmp_path / "m").exists()


def test_threshold_needs_roles_or_index(scene, tmp_path):
    img, lab, classes, _ = scene
    r = CliRunner().invoke(__import__("geoseg.cli.main", fromlist=["cli"]).cli,
                           ["train", str(img), "--labels", str(lab), "--out", str(tmp_path / "m"), "--method", "threshold"])
    assert r.exit_code == 2 and "--band-roles" in r.output
    assert not (tmp_path / "m").exists()


def test_kmeans_is_reproducible_and_mapped_to_classes(client, scene, tmp_path):
    img, _, _, truth = scene
    a = train(scene, tmp_path / "a", "--method", "kmeans", "--clusters", "6", "--seed", "3")
    train(scene, tmp_path / "b", "--method", "kmeans", "--clusters", "6", "--seed", "3")
    assert (tmp_path / "a" / "weights.safetensors").read_bytes() == (tmp_path / "b" / "weights.safetensors").read_bytes()
    assert len(a.method_params["cluster_class"]) == 6 and set(a.method_params["cluster_class"]) <= {1, 2, 3}
    got = tiled(client, tmp_path / "a", img, tmp_path / "out")
    ref, _ = one_pass(tmp_path / "b", img)
    assert np.array_equal(got, ref)
    valid = got != 255
    assert np.mean(got[valid] == truth[valid]) > 0.85


def with_postprocess(model_dir: Path, card: ModelCard, out: Path, pp: dict) -> Path:
    """A copy of a model whose card asks for post-processing ``pp``."""
    out.mkdir()
    for f in model_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    (out / "model.json").write_text(ModelCard.model_validate({**card.model_dump(), "postprocess": pp}).to_json())
    return out


def test_postprocessing_is_seamless_across_chunks(client, scene, pixel_model, tmp_path):
    img, _, _, _ = scene
    out, card = pixel_model
    noisy = with_postprocess(out, card, tmp_path / "pp",
                             {"majority_radius": 1, "min_pixels": 0, "class_min_pixels": {1: 40, 2: 12, 3: 12}, "connectivity": 4})
    from geoseg import api

    ref, _ = one_pass(noisy, img)
    for chunk in (48, 96):
        got = tiled(client, noisy, img, tmp_path / f"out{chunk}", chunk=chunk)
        assert np.array_equal(got, ref), f"chunk {chunk}: {np.count_nonzero(got != ref)} pixels differ"
    # the lazy Python API sieves in each chunk's window grown by 2 x mmu - 1 (here nearly the whole scene: 9 chunks'
    # windows, not the 30 of 48 px chunks, keep the test quick), and agrees
    lazy = api.predict(api.open_scene(img, chunks=96), noisy, chunk_size=96)["class_id"].values
    assert np.array_equal(lazy, ref), f"API: {np.count_nonzero(lazy != ref)} pixels differ"
    raw, _ = one_pass(out, img)
    assert np.count_nonzero(raw != ref) > 0  # the post-processing changed the map


def test_a_large_mmu_is_sieved_across_chunks_without_growing_the_halo(client, scene, pixel_model, tmp_path):
    """--mmu beyond a chunk: the model's halo stays its own, the sieve runs over the whole map after the segment
    stage (joined across chunks) and equals the card's sieve of one pass; cut short between its passes and chunk
    writes, it is taken up again and gives the same map."""
    from geoseg.pipeline import plan_job, run_segmentation
    from geoseg.pipeline.sieve import RAW_ARRAY, SIEVED, decide_store, sieve_store, sieve_task

    img, _, _, _ = scene
    out, card = pixel_model
    big = with_postprocess(out, card, tmp_path / "mmu",
                           {"majority_radius": 1, "min_pixels": 300, "class_min_pixels": {2: 12}, "connectivity": 8})
    ref, _ = one_pass(big, img)
    raw, _ = one_pass(out, img)
    assert np.count_nonzero(raw != ref) > 0
    record = predict([img], big, tmp_path / "o", PredictOptions(chunk_size=48, cog=False, vectors=False), client=client)
    got = open_prediction(tmp_path / "o" / "prediction.zarr")
    assert np.array_equal(got["class_id"].values, ref), f"{np.count_nonzero(got['class_id'].values != ref)} px differ"
    assert RAW_ARRAY not in got and not (tmp_path / "o" / "prediction.zarr" / RAW_ARRAY).exists()
    assert record["parameters"]["halo"] == plan_for(load_model(out).card, (200, 260), chunk_size=48).halo + 1  # + majority
    assert record["parameters"]["postprocess"]["sieve"] == "joined across chunks" and "sieve_s" in record["timings"]
    assert record["parameters"]["postprocess"]["pixels_changed"] > 0  # the workers left the sieve to this stage
    # cut short: the decisions saved, two chunks sieved, a third written without its marker
    job = plan_job([img], big, tmp_path / "cut", PredictOptions(chunk_size=48, cog=False, vectors=False))
    store = str(tmp_path / "cut.zarr")
    run_segmentation(job, client, store)
    from geoseg.pipeline import chunk_key, prepare_cluster

    numerics = prepare_cluster(client, job)
    key = chunk_key(job.key, numerics.precision, numerics.device)
    decided = decide_store(client, store, job.plan, job.card.postprocess, key)
    for iy, ix in ((0, 0), (1, 2), (2, 1)):
        client.submit(sieve_task, store, job.plan, iy, ix, job.card.postprocess, decided[(iy, ix)], key, pure=False).result()
    (Path(store) / SIEVED / "2_1").unlink()  # its data written, its marker not
    done = sieve_store(client, store, job.plan, job.card.postprocess, key)
    assert done["chunks_reused"] == 2 and done["chunks_sieved"] == job.plan.grid_shape[0] * job.plan.grid_shape[1] - 2
    again = open_prediction(store)["class_id"].values
    assert np.array_equal(again, ref), f"{np.count_nonzero(again != ref)} px differ"


def test_predict_replaces_the_cards_post_processing(client, scene, pixel_model, tmp_path):
    """--majority / --mmu / --no-postprocess at predict time, in place of the card's: through the cluster, the
    Python API and the job key (a resumed job with another mmu reuses nothing)."""
    from geoseg import api
    from geoseg.errors import ConfigError
    from geoseg.model.card import PostProcess
    from geoseg.pipeline import plan_job

    img, _, _, _ = scene
    out, card = pixel_model
    carded = with_postprocess(out, card, tmp_path / "pp", {"majority_radius": 2, "min_pixels": 30})
    other = with_postprocess(out, card, tmp_path / "other", {"min_pixels": 200, "connectivity": 8})
    raw, _ = one_pass(out, img)
    ref, _ = one_pass(other, img)
    assert np.count_nonzero(ref != raw) and np.count_nonzero(ref != one_pass(carded, img)[0])
    for pp, want in ((PostProcess(), raw), (PostProcess(min_pixels=200, connectivity=8), ref)):
        o = tmp_path / f"o{pp.min_pixels}"
        record = predict([img], carded, o, PredictOptions(chunk_size=64, cog=False, vectors=False, postprocess=pp), client=client)
        got = open_prediction(o / "prediction.zarr")["class_id"].values
        assert np.array_equal(got, want), f"{pp}: {np.count_nonzero(got != want)} px differ"
        assert record["parameters"]["postprocess"] is None if not pp.active else record["parameters"]["postprocess"]["from"] == "options"
        # 128 px chunks: a window grown by 2 x 200 - 1 px is the whole scene, 6 times (20 times with 64 px chunks)
        lazy = api.predict(api.open_scene(img, chunks=128), carded, chunk_size=128, postprocess=pp.model_dump())
        assert np.array_equal(lazy["class_id"].values, want)
    # beyond what a window can sieve: geoseg predict joins it across chunks; the lazy API says so
    from geoseg.vector.sieve import sieve

    huge = PostProcess(min_pixels=3000)  # past the windows' 2048; regions as large remain (the largest: 3328 px)
    predict([img], carded, tmp_path / "huge", PredictOptions(chunk_size=64, cog=False, vectors=False, postprocess=huge),
            client=client)
    got = open_prediction(tmp_path / "huge" / "prediction.zarr")["class_id"].values
    assert np.array_equal(got, sieve(raw, 255, 3000)) and np.count_nonzero(got != raw)
    with pytest.raises(ConfigError, match="an mmu of 3000 px is sieved here in windows"):
        api.predict(api.open_scene(img, chunks=64), carded, postprocess=huge.model_dump())
    keys = {plan_job([img], carded, tmp_path / "k", PredictOptions(postprocess=p)).key
            for p in (None, PostProcess(min_pixels=200), PostProcess(min_pixels=201))}
    assert len(keys) == 3
    # the card's post-processing, without a sieve: the job key of geoseg before 2026-12-04 (finished outputs reused)
    from geoseg.pipeline.plan import _postprocess_key

    assert _postprocess_key(PredictOptions(), sieve=False) == {}
    # never a store sieved in windows, nor by the rule before 2026-12-05 (small neighbours voted: {"sieve": "joined"})
    assert _postprocess_key(PredictOptions(), sieve=True) == {"sieve": "joined, large neighbours"}
    assert PredictOptions(postprocess={"min_pixels": 9}).postprocess == PostProcess(min_pixels=9)  # the API's dicts
    with pytest.raises(ConfigError, match=r"--mmu \(or a job's inference.mmu\) names class id\(s\) \[9\]"):
        plan_job([img], carded, tmp_path / "k", PredictOptions(postprocess=PostProcess(class_min_pixels={9: 4})))
    r = CliRunner().invoke(__import__("geoseg.cli.main", fromlist=["cli"]).cli,
                           ["predict", str(img), "--model", str(carded), "--out", str(tmp_path / "c"), "--no-postprocess",
                            "--mmu", "4", "--scheduler", "tcp://127.0.0.1:1"])
    assert r.exit_code == 2 and "--no-postprocess goes without" in r.output


def test_evaluate_scores_the_post_processing_asked_for(client, scene, pixel_model, tmp_path):
    """geoseg evaluate --majority / --mmu / --no-postprocess: the same post-processing as predict, in place of each
    card's, for one model and side by side."""
    from geoseg.evaluation import EvaluateOptions, compare, evaluate
    from geoseg.model.card import PostProcess

    img, lab, _, _ = scene
    out, card = pixel_model
    carded = with_postprocess(out, card, tmp_path / "pp", {"majority_radius": 2, "min_pixels": 60})
    opts = EvaluateOptions(chunk_size=128)  # 6 chunks: each window grown by 2 x mmu - 1 px is about the whole scene
    raw = evaluate([img], out, lab, opts).metrics
    cleaned = evaluate([img], carded, lab, opts).metrics
    off = evaluate([img], carded, lab, EvaluateOptions(chunk_size=128, postprocess=PostProcess())).metrics
    np.testing.assert_array_equal(off.confusion, raw.confusion)
    assert not np.array_equal(cleaned.confusion, raw.confusion)
    again = evaluate([img], out, lab, EvaluateOptions(chunk_size=128, postprocess=PostProcess(majority_radius=2, min_pixels=60)))
    np.testing.assert_array_equal(again.metrics.confusion, cleaned.confusion)
    side = compare([img], [out, carded], lab, EvaluateOptions(chunk_size=128, postprocess=PostProcess()), client=client)
    np.testing.assert_array_equal(side.models[0].metrics.confusion, side.models[1].metrics.confusion)


def test_band_roles_are_checked(scene, tmp_path):
    img, lab, classes, _ = scene
    r = CliRunner().invoke(__import__("geoseg.cli.main", fromlist=["cli"]).cli,
                           ["train", str(img), "--labels", str(lab), "--out", str(tmp_path / "m"), "--method", "pixel",
                            "--band-roles", "blue,green,red"])
    assert r.exit_code == 2 and "4 band(s)" in r.output


def test_network_with_index_channels_and_companion_through_the_cluster(client, scene, tmp_path):
    """An smp model with band roles: indices as extra inputs, a LightGBM companion when it helps,
    a band missing classified from the others; --exact tiling equals one pass with all of it."""
    img, _, _, truth = scene
    out = tmp_path / "unet"
    card = train(scene, out, "--epochs", "3", "--chip-size", "32", "--block-size", "32", "--encoder-depth", "3",
                 "--steps-per-epoch", "8")
    assert card.index_channels == ("ndvi", "ndwi") and card.n_inputs == 6
    assert card.missing_bands == "fill"
    ens = card.method_params.get("ensemble")
    tr = card.training
    assert ens is not None or tr["ensemble"].startswith("not kept")
    if ens is not None:
        assert (out / "pixel.lgb.txt").read_text().startswith("tree") and ens["weight"] in (0.5, 0.75)
    record = predict([img], out, tmp_path / "o", PredictOptions(chunk_size=64, exact=True, cog=False, vectors=False), client=client)
    got = open_prediction(tmp_path / "o" / "prediction.zarr")["class_id"].values
    bundle = load_model(out)
    stack = open_stack([img])
    data, bv = read_bands(stack, Box(0, 200, 0, 260).window)
    ref, _ = segment_array(bundle.net, bundle.card, data, bv, InferenceSettings(), bundle.companion)
    assert np.count_nonzero(got != ref) <= 1e-4 * got.size
    assert (got[150:170, 30:] != 255).all()  # nir missing: classified (band at its mean, trees route it)
    assert record["model"]["method"] == "smp"
    # how the network is built, as the card says it: in run.json, the STAC item and `geoseg info`
    assert record["model"]["arch_params"] == card.arch_params == {"input_skip": True}
    item = json.loads((tmp_path / "o" / "item.json").read_text())
    assert item["properties"]["geoseg:model"]["arch_params"] == {"input_skip": True}
    assert json.loads(cli("info", out, "--json").output)[0]["arch_params"] == {"input_skip": True}


def test_the_companion_is_kept_unless_the_mix_clearly_loses_on_validation():
    """The network keeps the majority of the mix (0.5 or 0.75, the better on validation; ties: 0.75), and the
    companion is dropped only where that mix scores more than MAX_LOSS below the network alone."""
    from geoseg.training.ensemble import MAX_LOSS, kept_weight

    assert kept_weight({0.0: 0.2, 0.25: 0.3, 0.5: 0.37, 0.75: 0.33, 1.0: 0.30}) == 0.5
    assert kept_weight({0.0: 0.4, 0.25: 0.4, 0.5: 0.33, 0.75: 0.338, 1.0: 0.340}) == 0.75  # a small loss: kept
    assert kept_weight({0.5: 0.35, 0.75: 0.35, 1.0: 0.30}) == 0.75
    assert kept_weight({0.5: 0.30, 0.75: 0.30, 1.0: 0.30 + 2 * MAX_LOSS}) == 1.0
    assert kept_weight({1.0: 0.30}) == 1.0  # no companion scored


def test_predict_command_with_a_pixel_model_makes_every_output(scene, pixel_model, tmp_path):
    """`geoseg predict --model DIR` needs nothing else for another method: COG, polygons, STAC, run.json."""
    import pyogrio

    img, _, _, _ = scene
    out, card = pixel_model
    r = cli("-q", "predict", img, "--model", out, "--out", tmp_path / "o", "--chunk-size", "128")
    assert r.exit_code == 0, r.output
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert run["model"]["method"] == "pixel"
    with rasterio.open(tmp_path / "o" / "classes.tif") as ds:
        cog = ds.read(1)
        assert ds.nodata == 255 and ds.crs.to_epsg() == 32617
    ref, _ = one_pass(out, img)
    assert np.array_equal(cog, ref)
    polygons = pyogrio.read_dataframe(tmp_path / "o" / "landuse.gpkg", layer="landuse")
    assert set(polygons["class_name"]) == set(NAMES)


def test_test_time_augmentation_tiled_equals_one_pass(client, random_model, scene_path, tmp_path):
    """d4 (8 flips/rotations) pads before it turns: --exact tiling still equals one pass, also at the scene's edges."""
    card = ModelCard.read(random_model / "model.json")
    d4 = tmp_path / "d4"
    d4.mkdir()
    (d4 / "weights.safetensors").write_bytes((random_model / "weights.safetensors").read_bytes())
    (d4 / "model.json").write_text(ModelCard.model_validate({**card.model_dump(), "tta": "d4"}).to_json())
    predict([scene_path], d4, tmp_path / "o", PredictOptions(chunk_size=128, exact=True, cog=False, vectors=False), client=client)
    got = open_prediction(tmp_path / "o" / "prediction.zarr")["class_id"].values
    ref, _ = one_pass(d4, scene_path)
    plain, _ = one_pass(random_model, scene_path)
    assert np.count_nonzero(got != ref) <= 1e-5 * got.size
    assert np.count_nonzero(ref != plain) > 0  # the augmentation changes the map
    predict([scene_path], d4, tmp_path / "o2", PredictOptions(chunk_size=128, exact=True, cog=False, vectors=False, tta="none"),
            client=client)
    off = open_prediction(tmp_path / "o2" / "prediction.zarr")["class_id"].values
    assert np.count_nonzero(off != plain) <= 1e-5 * got.size  # --tta none overrides the card


def test_cards_name_only_files_beside_them_and_expressions_only_arithmetic(pixel_model, tmp_path):
    """A card fetched from anywhere never points outside its directory; index expressions are arithmetic only."""
    from geoseg.errors import ConfigError, ModelError
    from geoseg.methods.features import check_expression
    from geoseg.model.store import check_model_dir

    out, card = pixel_model
    for bad in ("../x.txt", "/etc/passwd", "sub/x.txt", ".."):
        d = tmp_path / f"m{abs(hash(bad))}"
        d.mkdir()
        (d / "model.lgb.txt").write_bytes((out / "model.lgb.txt").read_bytes())
        doc = json.loads(card.to_json())
        doc["method_params"]["files"] = [bad]
        (d / "model.json").write_text(json.dumps(doc))
        with pytest.raises(ModelError, match="plain file name"):
            check_model_dir(d)
    for bad in ("__import__('os')", "nir.real", "'a' + nir", "nir * True", "foo + nir"):
        with pytest.raises(ConfigError):
            check_expression(bad)
    check_expression("(nir - red) / (nir + red + 0.5)")


@pytest.mark.parametrize("method", ["pixel", "kmeans"])
def test_a_band_missing_where_training_never_saw_it_missing_alone(method, tmp_path):
    """Trained on a scene where no band is ever missing alone, applied where one is (a stripe): the trees,
    which had learnt no direction for a missing value, took it as 0 (accuracy there 0.35 at confidence
    0.99), and k-means put it at the sample mean (water never found). Both now classify it from the
    bands it has."""
    from geoseg.sample import make_sample

    make_sample(tmp_path / "scene", size=192, bands=4, n_classes=5, seed=0)
    img, lab, classes = (tmp_path / "scene" / n for n in ("image.tif", "labels.tif", "classes.yaml"))
    with rasterio.open(lab) as src:
        labels = src.read(1)
    with rasterio.open(img) as src:
        profile, data = src.profile, src.read()
    data[3, :, 100:140] = 0  # nir missing over a stripe of columns
    striped = tmp_path / "striped.tif"
    with rasterio.open(striped, "w", **profile) as dst:
        dst.write(data)
    stripe = (slice(None), slice(100, 140))
    out = tmp_path / method
    r = cli("-q", "train", img, "--labels", lab, "--classes", classes, "--out", out, "--band-roles", ROLES, "--method", method,
            "--seed", "3")
    assert r.exit_code == 0, r.output
    whole, _ = one_pass(out, img)
    got, _ = one_pass(out, striped)
    ok = (labels[stripe] != 255) & (whole[stripe] != 255)
    assert (got[stripe][ok] != 255).all()  # classified from the bands it has
    base = np.mean(whole[stripe][ok] == labels[stripe][ok])
    acc = np.mean(got[stripe][ok] == labels[stripe][ok])
    # before: pixel 0.35 (confidence 0.99), kmeans 0.51, against 0.78-1.0 with every band
    assert acc > 0.75 and acc > base - 0.1, f"{method}: {acc:.3f} in the stripe, {base:.3f} with every band"
    if method == "pixel":  # a clean scene: the trees stop once the validation loss stops improving (it crept on to 600)
        from geoseg.methods.pixel import EARLY_STOP, MAX_ROUNDS, MIN_DELTA

        fit = ModelCard.read(out / "model.json").training["fit"]
        assert fit["rounds"] < MAX_ROUNDS / 2 and fit["early_stopping"] == {"patience": EARLY_STOP, "min_delta": MIN_DELTA}  # in the card


def test_labels_of_one_class(scene, tmp_path):
    """Labels that hold one class (building polygons without --background): the network trains without
    a companion (LightGBM cannot fit one class), and --method pixel says what to do."""
    img, lab, classes, labels = scene
    one = write_raster(tmp_path / "one.tif", np.where(labels == 2, 3, 0).astype(np.uint8), nodata=0)
    r = CliRunner().invoke(__import__("geoseg.cli.main", fromlist=["cli"]).cli,
                           ["train", str(img), "--labels", str(one), "--out", str(tmp_path / "px"), "--method", "pixel"])
    assert r.exit_code != 0 and "one class only" in r.output and "--background" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "px").exists()
    for method in ("kmeans", "threshold", "pixel"):  # they wrote a model of one class everywhere, validated at mIoU 1.0
        # (a classes file lists more classes than the labels hold)
        r = cli("train", img, "--labels", one, "--out", tmp_path / method, "--method", method, "--band-roles", ROLES,
                "--classes", classes)
        assert r.exit_code == 2 and "one class only" in r.output, r.output
        assert not (tmp_path / method).exists()
    # an image with no valid pixel blamed the labels
    blank = write_raster(tmp_path / "blank.tif", np.zeros((4, *labels.shape), np.uint16), nodata=0)
    r = cli("train", blank, "--labels", lab, "--out", tmp_path / "b", "--method", "kmeans")
    assert r.exit_code == 2 and "blank.tif: no valid pixel" in r.output, r.output
    # a stack of band files, the second nodata over the region: that one is named (the first was blamed)
    with rasterio.open(img) as ds:
        first = write_raster(tmp_path / "first.tif", ds.read([1, 2, 3]), nodata=0)
    second = write_raster(tmp_path / "second.tif", np.zeros((1, *labels.shape), np.uint16), nodata=0)
    r = cli("train", first, second, "--labels", lab, "--out", tmp_path / "b2", "--method", "kmeans")
    assert r.exit_code == 2 and "second.tif: no valid pixel" in r.output and "band(s) 4 " in r.output, r.output
    assert "first.tif" not in r.output
    r = cli("-q", "train", img, "--labels", one, "--out", tmp_path / "net", "--members", 1, "--epochs", 1, "--chip-size", 32,
            "--steps-per-epoch", 2, "--batch-size", 2, "--encoder-depth", 3)
    assert r.exit_code == 0, r.output
    card = ModelCard.read(tmp_path / "net" / "model.json")
    assert [c.id for c in card.classes] == [3] and card.method_params.get("ensemble") is None


def test_a_run_stopped_before_its_first_epoch_does_not_block_the_next(scene, tmp_path):
    """Interrupted before any checkpoint: the working folder holds nothing to resume, so the same
    command starts again (it used to ask for --resume, which then said there was nothing to resume)."""
    img, lab, classes, _ = scene
    out = tmp_path / "net"
    (tmp_path / "net.training").mkdir()  # what a run leaves when it is stopped during its first epoch
    r = cli("-q", "train", img, "--labels", lab, "--classes", classes, "--out", out, "--members", 1, "--epochs", 1,
            "--chip-size", 32, "--steps-per-epoch", 2, "--batch-size", 2, "--encoder-depth", 3, "--no-ensemble")
    assert r.exit_code == 0, r.output
    assert (out / "model.json").is_file() and not (tmp_path / "net.training").exists()


def test_per_pixel_methods_train_from_sparse_point_labels(scene, tmp_path, caplog):
    """Labels as scattered single pixels (field survey points, a few per 64 px block): the per-pixel methods
    learn from the pixels, so they train (the network's chips need labelled areas, and said so for them too);
    the trees classify the scene well from 300 points."""
    img, _, classes, labels = scene
    rng = np.random.default_rng(11)
    ys, xs = rng.integers(20, labels.shape[0], 300), rng.integers(30, labels.shape[1], 300)
    sparse = np.zeros_like(labels, dtype=np.uint8)
    sparse[ys, xs] = labels[ys, xs]
    assert (sparse > 0).mean() < 0.01  # under a chip's minimum share (1%) everywhere on average
    pts = write_raster(tmp_path / "points.tif", sparse, nodata=0)
    out = tmp_path / "px"
    r = cli("-q", "train", img, "--labels", pts, "--classes", classes, "--out", out, "--band-roles", ROLES, "--method", "pixel")
    assert r.exit_code == 0, r.output
    card = ModelCard.read(out / "model.json")
    assert card.method == "pixel"
    pred, _ = one_pass(out, img)
    scored = pred != 255
    assert scored.mean() > 0.8 and (pred[scored] == labels[scored]).mean() > 0.8
    r = cli("-q", "train", img, "--labels", pts, "--classes", classes, "--out", tmp_path / "km", "--band-roles", ROLES,
            "--method", "kmeans", "--clusters", "6", "--seed", "3")  # clusters named by the points under them
    assert r.exit_code == 0, r.output
    assert set(ModelCard.read(tmp_path / "km" / "model.json").method_params["cluster_class"]) <= {1, 2, 3}
    # clusters no point falls in were named after the most frequent class without a word
    r = cli("train", img, "--labels", pts, "--classes", classes, "--out", tmp_path / "km60", "--band-roles", ROLES,
            "--method", "kmeans", "--clusters", "40", "--seed", "3")
    assert r.exit_code == 0, r.output
    n = ModelCard.read(tmp_path / "km60" / "model.json").training["fit"]["unlabelled_clusters"]
    assert n > 0 and f"{n} of 40 clusters hold no labelled pixel" in caplog.text


def test_threshold_picks_its_class_by_whole_names_and_the_pixels(scene, tmp_path):
    """The class above an NDWI threshold is the one named water, not "non-water"; above NDVI "street trees",
    not a "street" (which holds "tree"); a name the pixels contradict gives way to the class of highest mean."""
    from geoseg.methods.fit import names_target

    assert names_target("Open water", ("water",)) and names_target("street trees", ("tree",))
    assert not names_target("non-water", ("water",)) and not names_target("street", ("tree",))
    assert not names_target("no water", ("water",)) and not names_target("waterfront", ("water",))
    img, lab, _, truth = scene
    # the scene's pixels are water, forest, bare (truth 1, 2, 3); each case names classes and says which id
    # holds which pixels. The last: "water" names the forest pixels, and the data wins (water pixels go above)
    cases = ((("wet land", "non-water", "water"), {1: 3, 2: 1, 3: 2}, "ndwi", 3),
             (("lake", "street", "street trees"), {1: 1, 2: 3, 3: 2}, "ndvi", 3),
             (("water", "forest", "bare"), {1: 1, 2: 2, 3: 3}, "ndwi", 1),
             (("bare", "water", "rock"), {1: 1, 2: 2, 3: 3}, "ndwi", 1))
    for names, order, index, want in cases:
        relabelled = np.vectorize(lambda v: order[int(v)])(truth).astype(np.uint8)
        labels = write_raster(tmp_path / f"labels-{index}-{names[1]}.tif", relabelled, nodata=0)
        classes = tmp_path / f"classes-{index}-{names[1]}.yaml"
        classes.write_text("".join(f"- {{id: {i + 1}, name: {n}}}\n" for i, n in enumerate(names)))
        out = tmp_path / f"th-{index}-{names[1]}"
        r = cli("-q", "train", img, "--labels", labels, "--classes", classes, "--out", out, "--band-roles", ROLES,
                "--method", "threshold", "--index", index)
        assert r.exit_code == 0, r.output
        card = ModelCard.read(out / "model.json")
        assert card.method_params["above"] == want, (names, index, card.method_params)
        assert card.training["metrics"]["miou"] > 0.3


def test_indices_are_computed_on_physical_values(tmp_path):
    """The same reflectance stored as float and as DN with GDAL's scale and offset (Landsat Collection 2:
    2.75e-5, -0.2) gives the same NDVI and the same map with a fixed literature threshold; a validation block
    whose index has no value where one band is missing is scored, not a crash. Cards written before keep
    computing on stored values."""
    rng = np.random.default_rng(0)
    n = 96
    veg = np.broadcast_to(((np.arange(n) // 8) % 2 == 0)[None, :], (n, n))
    red = np.where(veg, 0.08, 0.20) + rng.normal(0, 0.003, (n, n))
    nir = np.where(veg, 0.25, 0.27) + rng.normal(0, 0.003, (n, n))  # NDVI 0.51 (vegetation) and 0.15 (soil)
    scale, offset = 2.75e-5, -0.2
    dn = np.round((np.stack([red, nir]) - offset) / scale).astype(np.uint16)
    dn[1, :, 40:46] = 0  # nir missing here only (nodata 0)
    refl = np.stack([red, nir]).astype(np.float32)
    refl[1, :, 40:46] = np.nan
    stored = write_raster(tmp_path / "dn.tif", dn, nodata=0)
    with rasterio.open(stored, "r+") as ds:
        ds.scales, ds.offsets = (scale, scale), (offset, offset)
    physical = write_raster(tmp_path / "refl.tif", refl, nodata=float("nan"))
    labels = write_raster(tmp_path / "labels.tif", np.where(veg, 2, 1).astype(np.uint8), nodata=0)
    classes = tmp_path / "classes.yaml"
    classes.write_text("- {id: 1, name: soil}\n- {id: 2, name: vegetation}\n")
    maps = []
    for img in (stored, physical):
        out = tmp_path / f"m-{Path(img).stem}"
        r = cli("-q", "train", img, "--labels", labels, "--classes", classes, "--out", out, "--band-roles", "red,nir",
                "--method", "threshold", "--index", "ndvi", "--threshold", "0.3", "--block-size", 32)
        assert r.exit_code == 0, r.output
        card = ModelCard.read(out / "model.json")
        assert card.index_units == "physical" and card.training["metrics"]["miou"] == 1.0
        cls, _ = one_pass(out, img, [("threshold", 0.3)])
        maps.append(cls)
    assert np.array_equal(maps[0], maps[1])
    assert np.array_equal(maps[0][:, :40] == 2, veg[:, :40]) and (maps[0][:, 40:46] == 255).all()
    old = card.model_copy(update={"index_units": "stored", "bands": tuple(b.model_copy(update={"scale": scale, "offset": offset})
                                                                           for b in card.bands)})
    assert old.index_band_units is None  # cards written before: the indices they were trained on, from stored values
    assert card.model_copy(update={"bands": old.bands}).index_band_units == ((scale, offset), (scale, offset))


def test_otsu_is_not_thrown_by_a_few_slightly_negative_reflectances(client, tmp_path):
    """Reflectance stored with an offset (Sentinel-2 L2A: DN * 1e-4 - 0.1) is slightly negative over some dark
    water pixels; where green + nir is near 0 their NDWI was +-1e5, and five such pixels of 9,216 took the
    scene's Otsu threshold with them (every pixel water). Normalized differences are held to [-1, 1]."""
    rng = np.random.default_rng(1)
    n = 96
    water = np.broadcast_to(((np.arange(n) // 12) % 2 == 0)[None, :], (n, n))
    green = np.where(water, 0.06, 0.08) + rng.normal(0, 0.004, (n, n))
    nir = np.where(water, 0.02, 0.30) + rng.normal(0, 0.004, (n, n))  # NDWI 0.5 (water) and -0.58 (land)
    dn = np.round((np.stack([green, nir]) + 0.1) / 1e-4).astype(np.uint16)
    for k, (y, x) in enumerate([(5, 5), (5, 90), (90, 5), (90, 90), (48, 3)]):
        dn[:, y, x] = (1050, 951 - k)  # green 0.005, nir -0.0049: NDWI ~ 100
    img = write_raster(tmp_path / "s2.tif", dn, nodata=0)
    with rasterio.open(img, "r+") as ds:
        ds.scales, ds.offsets = (1e-4, 1e-4), (-0.1, -0.1)
    labels = write_raster(tmp_path / "labels.tif", np.where(water, 2, 1).astype(np.uint8), nodata=0)
    classes = tmp_path / "classes.yaml"
    classes.write_text("- {id: 1, name: land}\n- {id: 2, name: water}\n")
    out = tmp_path / "m"
    r = cli("-q", "train", img, "--labels", labels, "--classes", classes, "--out", out, "--band-roles", "green,nir",
            "--method", "threshold", "--index", "ndwi", "--threshold", "otsu", "--block-size", 32)
    assert r.exit_code == 0, r.output
    predict([img], out, tmp_path / "out", PredictOptions(chunk_size=48, cog=False, vectors=False), client=client)
    got = open_prediction(tmp_path / "out" / "prediction.zarr")["class_id"].values
    assert np.mean((got == 2) == water) > 0.99, f"{np.mean(got == 2):.3f} of the scene water"
