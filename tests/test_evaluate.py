"""`geoseg evaluate`: the tiled predict graph against labels, checked against plain numpy."""

from __future__ import annotations

import json

import dask
import dask.array as da
import numpy as np
import pytest
import rasterio
from click.testing import CliRunner

from _scenes import LABEL_NODATA, trained_model, write_polygons, write_tif
from geoseg.errors import GridMismatchError, InputError
from geoseg.evaluation import EvaluateOptions, confusion_array, evaluate, plan_evaluation
from geoseg.infer import InferenceSettings, segment_array
from geoseg.model.store import load_model
from geoseg.training.metrics import Metrics


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    return trained_model(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(trained):
    """The whole-scene class map from one forward pass, from files read with plain rasterio."""
    scene, model_dir, _, _ = trained
    data, valid, band_valid = [], np.ones(scene.truth.shape, bool), []
    for p in scene.bands:
        with rasterio.open(p) as ds:
            a = ds.read(1)
            valid &= a != ds.nodata
            band_valid.append(a != ds.nodata)
            data.append(a.astype(np.float32))
    bundle = load_model(model_dir)
    pred, _ = segment_array(bundle.net, bundle.card, np.stack(data), np.stack(band_valid), InferenceSettings(), bundle.companion)
    with rasterio.open(scene.labels) as ds:
        labels = ds.read(1)
    return pred, labels, bundle.card


def numpy_scores(pred: np.ndarray, labels: np.ndarray, ids) -> dict:
    """An independent computation: loops over classes, no shared code with geoseg.training.metrics."""
    keep = (pred != 255) & (labels != LABEL_NODATA)
    p, t = pred[keep], labels[keep]
    cm = np.array([[np.sum((t == a) & (p == b)) for b in ids] for a in ids])
    out = {"confusion": cm, "iou": [], "precision": [], "recall": [], "f1": []}
    for c in ids:
        tp, fp, fn = np.sum((t == c) & (p == c)), np.sum((t != c) & (p == c)), np.sum((t == c) & (p != c))
        with np.errstate(divide="ignore", invalid="ignore"):  # undefined scores are NaN, as in geoseg
            out["iou"].append(tp / (tp + fp + fn))
            out["precision"].append(tp / (tp + fp))
            out["recall"].append(tp / (tp + fn))
            out["f1"].append(2 * tp / (2 * tp + fp + fn))
    out["miou"] = float(np.mean(out["iou"]))
    out["accuracy"] = float(np.mean(p == t))
    out["pixels"] = int(keep.sum())
    return out


def _check(metrics, expect) -> None:
    np.testing.assert_array_equal(metrics.confusion, expect["confusion"])
    for k in ("iou", "precision", "recall", "f1"):
        np.testing.assert_allclose(getattr(metrics, k), expect[k], rtol=1e-12)
    assert metrics.miou == pytest.approx(expect["miou"], rel=1e-12)
    assert metrics.overall_accuracy == pytest.approx(expect["accuracy"], rel=1e-12)
    assert metrics.pixels == expect["pixels"]


def test_evaluate_equals_an_independent_numpy_computation(trained, reference):
    scene, model_dir, _, _ = trained
    pred, labels, card = reference
    # exact: the halo covers the receptive field, so the tiled map equals the one-pass map
    with dask.config.set(scheduler="threads"):
        result = evaluate(scene.bands, model_dir, scene.labels, EvaluateOptions(exact=True, chunk_size=64))
    assert len(result.job.plan) == 9  # 192 px in 64 px chunks: the sum runs over many chunks
    _check(result.metrics, numpy_scores(pred, labels, card.class_ids))
    assert result.metrics.miou > 0.85
    d = result.to_dict()
    assert d["miou"] == pytest.approx(result.metrics.miou, abs=1e-6) and len(d["classes"]) == 3
    assert d["confusion"]["class_ids"] == [2, 5, 9]
    # a notebook shows how many labelled pixels were scored, not only the scored count
    assert f"{result.labelled_pixels} labelled" in result._repr_html_() and f"{result.labelled_pixels} labelled" in repr(result)
    assert repr(result).endswith(str(result))


def test_evaluate_a_region_and_ignore_a_class(trained, reference):
    scene, model_dir, _, _ = trained
    pred, labels, card = reference
    with dask.config.set(scheduler="threads"):
        result = evaluate(scene.bands, model_dir, scene.labels,
                          EvaluateOptions(exact=True, chunk_size=64, window=(100, 30, 92, 120), ignore=(5,)))  # fmt: skip
    sub_pred, sub_lab = pred[30:150, 100:192].copy(), labels[30:150, 100:192].copy()
    sub_lab[sub_lab == 5] = LABEL_NODATA
    expect = numpy_scores(sub_pred, sub_lab, card.class_ids)
    np.testing.assert_array_equal(result.metrics.confusion, expect["confusion"])
    assert result.metrics.label_pixels[1] == 0  # class 5 left out of the labels
    # the region scored is the labels' extent within the window (its last columns hold only nodata and class 5)
    (rows,), (cols,) = np.nonzero((sub_lab != LABEL_NODATA).any(1)), np.nonzero((sub_lab != LABEL_NODATA).any(0))
    assert result.to_dict()["region"] == {"rows": [30 + rows[0], 30 + rows[-1] + 1], "cols": [100 + cols[0], 100 + cols[-1] + 1]}
    assert result.to_dict()["region"]["cols"] != [100, 192]


def test_an_ignored_class_is_out_of_the_scores(trained, reference, tmp_path):
    """--ignore-index on a class of the model: its pixels leave the labels and the class leaves the mean (undefined,
    not an IoU of 0 wherever the model predicts it); the pixels it is predicted on still count as the true class's
    misses."""
    scene, model_dir, _, _ = trained
    pred, labels, card = reference
    relabelled = labels.copy()
    relabelled[labels == 5] = 9  # the model's class 5 pixels are now labelled 9: misses of 9, predictions of 5
    with rasterio.open(scene.labels) as ds:
        profile = ds.profile
    with rasterio.open(tmp_path / "labels.tif", "w", **profile) as ds:
        ds.write(relabelled, 1)
    with dask.config.set(scheduler="threads"):
        result = evaluate(scene.bands, model_dir, tmp_path / "labels.tif", EvaluateOptions(exact=True, chunk_size=64, ignore=(5,)))
    expect = numpy_scores(pred, relabelled, card.class_ids)
    m = result.metrics
    np.testing.assert_array_equal(m.confusion, expect["confusion"])
    assert m.label_pixels[1] == 0 and m.predicted_pixels[1] > 1000 and expect["iou"][1] == 0
    assert np.isnan(m.iou[1]) and np.isnan(m.precision[1]) and np.isfinite(m.iou[[0, 2]]).all()
    np.testing.assert_allclose(m.iou[[0, 2]], np.asarray(expect["iou"])[[0, 2]], rtol=1e-12)
    assert m.recall[2] == pytest.approx(expect["recall"][2], rel=1e-12) and m.recall[2] < 0.9  # class 9 misses counted
    assert m.miou == pytest.approx(np.mean(np.asarray(expect["iou"])[[0, 2]]), rel=1e-12)
    d = result.to_dict()
    assert d["ignored"] == [5] and d["classes"][1]["iou"] is None
    assert Metrics.from_dict(d).miou == pytest.approx(m.miou, rel=1e-12)


def test_vector_labels_by_class_name(trained, reference, tmp_path):
    scene, model_dir, _, _ = trained
    pred, _, card = reference
    polys = write_polygons(tmp_path / "check.gpkg", [((40, 80, 40, 90), "Urban"), ((120, 160, 20, 60), "water")])
    with dask.config.set(scheduler="threads"):
        result = evaluate(scene.bands, model_dir, polys, EvaluateOptions(exact=True, chunk_size=64))
    lab = np.zeros_like(pred)
    lab[40:80, 40:90], lab[120:160, 20:60] = 9, 2
    np.testing.assert_array_equal(result.metrics.confusion, numpy_scores(pred, lab, card.class_ids)["confusion"])


def test_confusion_array_sums_chunk_matrices():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 4, (70, 90)).astype(np.uint8)
    lab = rng.integers(0, 4, (70, 90)).astype(np.uint8)
    pred[:5] = 255
    lab[:, :3] = 255
    cm = confusion_array(da.from_array(pred, chunks=(16, 32)), da.from_array(lab, chunks=(16, 32)))
    assert cm.shape == (256, 256)
    got = cm.compute(scheduler="sync")
    keep = (pred != 255) & (lab != 255)
    expect = np.zeros((256, 256), np.int64)
    np.add.at(expect, (lab[keep], pred[keep]), 1)
    np.testing.assert_array_equal(got, expect)


def test_unknown_label_ids_and_empty_labels_are_clear_errors(trained, tmp_path):
    scene, model_dir, _, _ = trained
    with rasterio.open(scene.labels) as ds:
        lab = ds.read(1)
    lab7 = lab.copy()
    lab7[50:60, 50:60] = 7  # on valid imagery: label ids under image nodata do not count
    bad = write_tif(tmp_path / "seven.tif", lab7, nodata=LABEL_NODATA)
    with dask.config.set(scheduler="threads"), pytest.raises(InputError, match="--ignore-index") as exc:
        evaluate(scene.bands, model_dir, bad, EvaluateOptions(chunk_size=96))
    assert str(bad) in str(exc.value) and "7" in str(exc.value)
    with dask.config.set(scheduler="threads"):
        ok = evaluate(scene.bands, model_dir, bad, EvaluateOptions(chunk_size=96, ignore=(7,)))
    assert ok.metrics.pixels > 0
    empty = write_tif(tmp_path / "empty.tif", np.zeros_like(lab), nodata=LABEL_NODATA)
    with dask.config.set(scheduler="threads"), pytest.raises(InputError, match="no pixel") as exc:
        evaluate(scene.bands, model_dir, empty, EvaluateOptions(chunk_size=96))
    assert str(empty) in str(exc.value)


def test_labels_on_another_grid_fail_before_anything_runs(trained, tmp_path):
    scene, model_dir, _, _ = trained
    other = write_tif(tmp_path / "other.tif", np.ones((50, 50), np.uint8), crs="EPSG:32618")
    with pytest.raises(GridMismatchError, match="other.tif"):
        plan_evaluation(scene.bands, model_dir, other)


def test_band_list_must_match_the_card(trained):
    scene, model_dir, _, _ = trained
    with pytest.raises(InputError, match="order"):
        plan_evaluation([scene.bands[1], scene.bands[0], scene.bands[2]], model_dir, scene.labels)
    with pytest.raises(InputError, match="expects 3"):
        plan_evaluation(scene.bands[:2], model_dir, scene.labels)


def test_cli_prints_a_table_and_writes_json(trained, reference, tmp_path, client):
    from geoseg.cli.main import cli

    scene, model_dir, _, _ = trained
    pred, labels, card = reference
    report = tmp_path / "report.json"
    args = ["evaluate", *map(str, scene.bands), "--model", str(model_dir), "--labels", str(scene.labels),
            "--json", str(report), "--exact", "--chunk-size", "64", "--scheduler", client.scheduler.address]  # fmt: skip
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "water" in r.output and "mIoU" in r.output and "confusion" in r.output
    d = json.loads(report.read_text())
    expect = numpy_scores(pred, labels, card.class_ids)
    assert d["confusion"]["matrix"] == expect["confusion"].tolist()
    assert [c["iou"] for c in d["classes"]] == pytest.approx(expect["iou"], abs=1e-6)
    assert d["miou"] == pytest.approx(expect["miou"], abs=1e-6)
    # an existing report is kept unless --overwrite
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert r.exit_code != 0 and "--overwrite" in r.output
    # with --overwrite, a run that fails leaves no report: not the earlier one, which would look like its own
    missing = [a if a != str(scene.labels) else str(tmp_path / "missing.gpkg") for a in args]
    r = CliRunner().invoke(cli, [*missing, "--overwrite"], catch_exceptions=False)
    assert r.exit_code != 0 and "missing.gpkg" in r.output and not report.exists()


def test_cli_bad_input_writes_no_report(trained, tmp_path):
    from geoseg.cli.main import cli

    scene, model_dir, _, _ = trained
    report = tmp_path / "report.json"
    r = CliRunner().invoke(cli, ["evaluate", *map(str, scene.bands), "--model", str(model_dir), "--labels",
                                 str(tmp_path / "missing.gpkg"), "--json", str(report)], catch_exceptions=False)  # fmt: skip
    assert r.exit_code != 0 and "missing.gpkg" in r.output
    assert not report.exists()


def test_labels_on_a_part_of_the_scene_score_only_the_chunks_there(trained, reference, tmp_path):
    """The scored region is the labels' extent, and of its chunks only those holding labels run: a label raster
    with classes on rows 70-120, cols 130-180 runs 1 of 9 chunks (counted where they ran); patches in two far
    corners run 2 (the region is then the whole scene); polygons in those corners as well. Each scores the same as
    the whole scene would."""
    from dask.callbacks import Callback

    scene, model_dir, _, _ = trained
    pred, labels, card = reference
    with rasterio.open(scene.labels) as ds:
        profile = ds.profile

    class Infers(Callback):
        def __init__(self):
            super().__init__()
            self.ran = set()

        def _posttask(self, key, result, dsk, state, id):
            if isinstance(key, tuple) and "geoseg-infer-" in str(key[0]):  # fused with its read and slice, or not
                self.ran.add(key)

    def scored(part, name):
        if isinstance(part, np.ndarray):
            with rasterio.open(tmp_path / name, "w", **profile) as ds:
                ds.write(part, 1)
        counted = Infers()
        with dask.config.set(scheduler="threads"), counted:
            result = evaluate(scene.bands, model_dir, str(tmp_path / name), EvaluateOptions(exact=True, chunk_size=64))
        return result, len(counted.ran)

    part = np.full(labels.shape, LABEL_NODATA, labels.dtype)
    part[70:120, 130:180] = labels[70:120, 130:180]
    result, ran = scored(part, "part.tif")
    assert result.to_dict()["region"] == {"rows": [70, 120], "cols": [130, 180]}
    assert ran == 1  # of 9 chunks (64 px): only the one holding rows 64-128, cols 128-192
    _check(result.metrics, numpy_scores(pred, part, card.class_ids))
    corners = np.full(labels.shape, LABEL_NODATA, labels.dtype)
    corners[5:30, 10:40], corners[150:190, 140:185] = labels[5:30, 10:40], labels[150:190, 140:185]
    result, ran = scored(corners, "corners.tif")
    (rows,), (cols,) = np.nonzero((corners != LABEL_NODATA).any(1)), np.nonzero((corners != LABEL_NODATA).any(0))
    assert result.to_dict()["region"] == {"rows": [rows[0], rows[-1] + 1], "cols": [cols[0], cols[-1] + 1]}
    assert rows[-1] - rows[0] > 150 and cols[-1] - cols[0] > 150 and ran == 2  # corner to corner, 2 of 9 chunks run
    _check(result.metrics, numpy_scores(pred, corners, card.class_ids))
    assert result.labelled_pixels == (corners != LABEL_NODATA).sum()
    write_polygons(tmp_path / "corners.gpkg", [((5, 30, 10, 40), "Urban"), ((150, 190, 140, 185), "water")])
    result, ran = scored(None, "corners.gpkg")
    lab = np.full(labels.shape, LABEL_NODATA, labels.dtype)
    lab[5:30, 10:40], lab[150:190, 140:185] = 9, 2
    assert ran == 2 and result.labelled_pixels == (lab != LABEL_NODATA).sum()
    # a polygon half a pixel past a window: nothing to score there, said as such
    write_polygons(tmp_path / "past.gpkg", [((10, 20, 100.5, 110), "water")])
    with pytest.raises(InputError, match="no pixel where both"), dask.config.set(scheduler="threads"):
        evaluate(scene.bands, model_dir, str(tmp_path / "past.gpkg"), EvaluateOptions(chunk_size=64, window=(0, 0, 100, 100)))
    np.testing.assert_array_equal(result.metrics.confusion, numpy_scores(pred, lab, card.class_ids)["confusion"])


def test_background_and_ignore_index_of_one_class_are_refused(tmp_path):
    """--background B fills every pixel no feature covers with B, so --ignore-index B cannot leave B out: its
    pixels were scored (in OA, and as false positives of whatever a model predicts there). Refused, as by train."""
    from geoseg.cli.main import cli
    from geoseg.errors import ConfigError

    with pytest.raises(ConfigError, match="--background 0 .* --ignore-index 0"):
        EvaluateOptions(background=0, ignore=(0,))
    assert EvaluateOptions(background=0, ignore=(3,)).background == 0
    r = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "image.tif"), "--model", str(tmp_path / "m"), "--labels",
                                 str(tmp_path / "l.gpkg"), "--background", "0", "--ignore-index", "0"])
    assert r.exit_code == 2 and "--background 0" in r.output and "--ignore-index 0" in r.output
