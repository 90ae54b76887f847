"""`geoseg evaluate --model A --model B`: models side by side on the same pixels, checked against numpy."""

from __future__ import annotations

import csv
import json
import os

import dask
import numpy as np
import pytest
import rasterio
from click.testing import CliRunner

from _scenes import LABEL_NODATA, class_map, write_tif
from geoseg.evaluation import EvaluateOptions, common_confusions, compare, evaluate
from geoseg.infer import InferenceSettings, segment_array
from geoseg.model.card import BandInfo, ClassInfo, Normalization
from geoseg.model.store import init_model, load_model

H = W = 224
SIG = {2: (300.0, 900.0, 200.0, 50.0), 5: (900.0, 400.0, 700.0, 300.0), 9: (1500.0, 100.0, 400.0, 900.0)}
IDS = (2, 5, 9, 11)
OPTS = EvaluateOptions(exact=True, chunk_size=56)  # exact: the tiled maps equal one forward pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Four described bands (the fourth with nodata of its own), labels 2, 5, 9 and 11, and two random
    models: A reads bands 1-3 and knows 2, 5, 9; B reads all four and knows 2, 5, 9, 11."""
    root = tmp_path_factory.mktemp("compare")
    truth = class_map(H, W, seed=4)
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:H, :W]
    valid = (yy + xx) >= 30
    bands, data = [], []
    for b in range(4):
        img = np.zeros((H, W), np.float32)
        for cid, sig in SIG.items():
            m = truth == cid
            img[m] = sig[b] + rng.normal(0, 80, m.sum())
        ok = valid & ~((b == 3) & (yy < 70) & (xx > 140))  # band 4: nodata in a block A does not read
        img[~ok] = -9999.0
        data.append(img)
        bands.append(write_tif(root / f"b{b + 1}.tif", img, nodata=-9999.0, descriptions=[f"b{b + 1}"]))
    labels = truth.copy()
    labels[150:190, 20:90] = 11  # a class only B knows
    labels[:, W - 10 :] = LABEL_NODATA
    lpath = write_tif(root / "labels.tif", labels, nodata=LABEL_NODATA)
    names = {2: "water", 5: "forest", 9: "urban", 11: "wetland"}
    models = {}
    for key, nb, ids, depth, seed in (("A", 3, IDS[:3], 3, 1), ("B", 4, IDS, 3, 2)):
        stack = np.stack(data[:nb])
        good = stack[:, stack.min(axis=0) > -9999]
        models[key] = root / f"model_{key}"
        init_model(models[key], n_bands=nb, encoder_depth=depth, seed=seed, tile_size=64,
                   bands=[BandInfo(name=f"b{i + 1}", description=f"b{i + 1}") for i in range(nb)],
                   classes=[ClassInfo(id=i, name=names[i]) for i in ids],
                   normalization=Normalization(mean=tuple(map(float, good.mean(axis=1))),
                                               std=tuple(map(float, good.std(axis=1)))))  # fmt: skip
    return bands, lpath, models


def one_pass(bands, model_dir) -> np.ndarray:
    """The model's whole-scene class map in one forward pass, from the bands it reads (plain rasterio)."""
    bundle = load_model(model_dir)
    arrays, valid = [], np.ones((H, W), bool)
    for p in bands[: bundle.card.n_bands]:
        with rasterio.open(p) as ds:
            a = ds.read(1)
            valid &= a != ds.nodata
            arrays.append(a)
    pred, _ = segment_array(bundle.net, bundle.card, np.stack(arrays), valid, InferenceSettings(), bundle.companion)
    return pred


def numpy_table(preds: dict, labels: np.ndarray) -> tuple[dict, int]:
    """Per model IoU per class (NaN where undefined), mIoU and OA on the pixels every model predicts."""
    common = labels != LABEL_NODATA
    for p in preds.values():
        common &= p != 255
    t = labels[common]
    out = {}
    for key, pred in preds.items():
        p = pred[common]
        iou = []
        for c in IDS:
            tp, union = np.sum((t == c) & (p == c)), np.sum((t == c) | (p == c))
            iou.append(tp / union if union else np.nan)
        out[key] = {"iou": iou, "miou": float(np.nanmean(iou)), "oa": float(np.mean(p == t)),
                    "coverage": float(np.sum((pred != 255) & (labels != LABEL_NODATA)) / np.sum(labels != LABEL_NODATA))}  # fmt: skip
    return out, int(common.sum())


@pytest.fixture(scope="module")
def expected(setup):
    bands, lpath, models = setup
    with rasterio.open(lpath) as ds:
        labels = ds.read(1)
    preds = {k: one_pass(bands, m) for k, m in models.items()}
    assert (preds["A"] != preds["B"]).mean() > 0.05  # two different models
    assert ((preds["A"] != 255) != (preds["B"] != 255)).sum() > 1000  # and different coverage
    return numpy_table(preds, labels)


def test_compare_equals_numpy_on_the_common_pixels(setup, expected):
    bands, lpath, models = setup
    want, pixels = expected
    with dask.config.set(scheduler="threads"):
        result = compare(bands, [models["A"], models["B"]], lpath, OPTS)
    assert [m.name for m in result.models] == ["model_A", "model_B"]
    assert result.class_ids == IDS and result.pixels == pixels
    for key, m in zip("AB", result.models):
        assert m.metrics.pixels == pixels
        np.testing.assert_allclose(m.metrics.iou, want[key]["iou"], rtol=1e-12)
        assert m.metrics.miou == pytest.approx(want[key]["miou"], rel=1e-12)
        assert m.metrics.overall_accuracy == pytest.approx(want[key]["oa"], rel=1e-12)
        assert m.coverage == pytest.approx(want[key]["coverage"], rel=1e-12)
    assert result.models[0].metrics.iou[3] == 0  # A lacks class 11: its labelled pixels are A's errors
    assert result.models[0].coverage > result.models[1].coverage
    text = result.table()
    assert "wetland" in text and "0.000*" in text and "coverage" in text
    assert "<table>" in result._repr_html_()


def test_cli_two_models_write_json_and_csv_that_agree(setup, expected, tmp_path, client):
    from geoseg.cli.main import cli

    bands, lpath, models = setup
    want, pixels = expected
    report, table = tmp_path / "cmp.json", tmp_path / "cmp.csv"
    args = ["evaluate", *map(str, bands), "--model", str(models["A"]), "--model", str(models["B"]),
            "--name", "small", "--name", "deep", "--labels", str(lpath), "--json", str(report), "--csv", str(table),
            "--exact", "--chunk-size", "112", "--scheduler", client.scheduler.address]  # fmt: skip
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "small" in r.output and "deep" in r.output and "mIoU" in r.output and f"{pixels} common pixels" in r.output
    d = json.loads(report.read_text())
    assert d["pixels"] == pixels and [c["id"] for c in d["classes"]] == list(IDS)
    rows = list(csv.DictReader(table.open()))
    assert [row["model"] for row in rows] == [m["name"] for m in d["models"]] == ["small", "deep"]
    for key, m, row in zip("AB", d["models"], rows):
        assert m["pixels"] == int(row["pixels"]) == pixels
        assert m["miou"] == pytest.approx(want[key]["miou"], abs=1e-6) == pytest.approx(float(row["mIoU"]), abs=1e-6)
        assert m["overall_accuracy"] == pytest.approx(float(row["OA"]), abs=1e-6)
        assert m["coverage"] == pytest.approx(float(row["coverage"]), abs=1e-6)
        for c, expect in zip(m["classes"], want[key]["iou"]):
            cell = row[c["name"]]
            if np.isnan(expect):
                assert c["iou"] is None and cell == ""
            else:
                assert c["iou"] == pytest.approx(expect, abs=1e-6) == pytest.approx(float(cell), abs=1e-6)
    # outputs are kept unless --overwrite
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert r.exit_code != 0 and "--overwrite" in r.output


def test_cli_one_model_keeps_the_single_model_report(setup, tmp_path, client):
    from geoseg.cli.main import cli

    bands, lpath, models = setup
    one = EvaluateOptions(exact=True, chunk_size=112, ignore=(11,))  # A does not know 11
    report, table = tmp_path / "one.json", tmp_path / "one.csv"
    args = ["evaluate", *map(str, bands[:3]), "--model", str(models["A"]), "--labels", str(lpath), "--json", str(report),
            "--ignore-index", "11", "--exact", "--chunk-size", "112", "--scheduler", client.scheduler.address]  # fmt: skip
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    with dask.config.set(scheduler="threads"):
        ev = evaluate(bands[:3], models["A"], lpath, one)
    g = ev.job.region  # the labels' extent (class 11 ignored: not the last columns)
    assert (g.y0, g.y1, g.x0) == (0, H, 0) and g.x1 < W
    assert r.output == (f"{models['A']} on rows {g.y0}-{g.y1}, cols {g.x0}-{g.x1} ({ev.metrics.pixels} labelled pixels the model gives a class, "
                        f"{100 * ev.coverage:.1f}% of the labelled ones):\n"
                        f"{ev.metrics.table()}\nreport written to {report}\n")  # fmt: skip
    d, old = json.loads(report.read_text()), ev.to_dict()
    assert d.keys() == old.keys() and "models" not in d
    # the report says what it scored: the labelled pixels the model left out, how the map was made
    assert d["labelled_pixels"] > d["pixels"] and d["coverage"] == pytest.approx(d["pixels"] / d["labelled_pixels"])
    from geoseg.model.card import ModelCard

    card = ModelCard.read(models["A"] / "model.json")
    assert d["tta"] == card.tta and d["postprocess"] == card.postprocess.model_dump()
    # --overwrite with --json on an input deleted it before anything ran
    r = CliRunner().invoke(cli, ["evaluate", *map(str, bands[:3]), "--model", str(models["A"]), "--labels", str(lpath),
                                 "--json", str(lpath), "--overwrite"], catch_exceptions=False)
    assert r.exit_code == 2 and "would replace an input" in r.output and os.path.isfile(lpath), r.output
    assert {k: v for k, v in d.items() if k != "seconds"} == {k: v for k, v in old.items() if k != "seconds"}
    # --csv with one model: the same one-row table as a comparison of that model alone
    r = CliRunner().invoke(cli, [*args, "--overwrite", "--csv", str(table)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    (row,) = list(csv.DictReader(table.open()))
    assert row["model"] == "model_A" and float(row["mIoU"]) == pytest.approx(ev.metrics.miou, abs=1e-6)
    assert int(row["pixels"]) == ev.metrics.pixels and 0 < float(row["coverage"]) < 1
    with dask.config.set(scheduler="threads"):
        alone = compare(bands[:3], [models["A"]], lpath, one)
    assert alone.models[0].coverage == pytest.approx(float(row["coverage"]), abs=1e-6)
    np.testing.assert_array_equal(alone.models[0].metrics.confusion, ev.metrics.confusion)


def test_common_confusions_rechunk_and_keep_only_pixels_every_model_predicts():
    import dask.array as da

    rng = np.random.default_rng(0)
    lab = rng.integers(0, 4, (70, 90)).astype(np.uint8)
    p1, p2 = (rng.integers(0, 4, (70, 90)).astype(np.uint8) for _ in range(2))
    lab[:, :3], p1[:5], p2[60:, 50:] = 255, 255, 255
    cms, cover = common_confusions([da.from_array(p1, chunks=(16, 32)), da.from_array(p2, chunks=(24, 40))],
                                   da.from_array(lab, chunks=(16, 32)))  # fmt: skip
    cms, cover = dask.compute(cms, cover, scheduler="sync")
    keep = (lab != 255) & (p1 != 255) & (p2 != 255)
    for got, p in zip(cms, (p1, p2)):
        expect = np.zeros((256, 256), np.int64)
        np.add.at(expect, (lab[keep], p[keep]), 1)
        np.testing.assert_array_equal(got, expect)
    labelled = lab != 255
    assert cover.tolist() == [labelled.sum(), (labelled & (p1 != 255)).sum(), (labelled & (p2 != 255)).sum()]


def test_names_and_band_mismatch_are_clear_errors(setup):
    from geoseg.errors import ConfigError, InputError

    bands, lpath, models = setup
    with pytest.raises(ConfigError, match="--name"):
        compare(bands, [models["A"], models["B"]], lpath, OPTS, names=["x"])
    with pytest.raises(InputError, match="model_B"):  # three bands fit A, not B
        compare(bands[:3], [models["A"], models["B"]], lpath, OPTS)


def test_models_that_number_one_class_differently_are_refused(setup, tmp_path):
    """Names numbered per label file (no --classes): 'forest' is 5 in A but 2 in C; one table would score C's
    correct pixels as errors."""
    from geoseg.errors import ConfigError

    bands, lpath, models = setup
    init_model(tmp_path / "model_C", n_bands=3, encoder_depth=3, seed=3, tile_size=64,
               bands=[BandInfo(name=f"b{i + 1}", description=f"b{i + 1}") for i in range(3)],
               classes=[ClassInfo(id=1, name="Water"), ClassInfo(id=2, name="forest")])
    with pytest.raises(ConfigError, match=r"class 'Water' is id 2 in .*model_A but id 1 in .*model_C.*--classes"):
        compare(bands, [models["A"], tmp_path / "model_C"], lpath, OPTS)
