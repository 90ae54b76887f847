"""Confusion matrices and the scores derived from them (pure numpy)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from geoseg.training.metrics import Metrics, confusion_ids, confusion_indices, restrict_confusion


def test_confusion_ids_leaves_out_nodata_on_either_side():
    labels = np.array([[1, 1, 2, 255], [2, 7, 1, 1]], np.uint8)
    preds = np.array([[1, 2, 2, 1], [255, 7, 1, 2]], np.uint8)
    cm = confusion_ids(labels, preds)
    assert cm.shape == (256, 256)
    assert cm.sum() == 6  # one pixel without a label, one without a prediction
    assert cm[1, 1] == 2 and cm[1, 2] == 2 and cm[2, 2] == 1 and cm[7, 7] == 1
    assert cm[255].sum() == 0 and cm[:, 255].sum() == 0


def test_confusion_indices_ignores_target_255():
    t = np.array([0, 1, 1, 255, 2])
    p = np.array([0, 1, 0, 2, 2])
    cm = confusion_indices(t, p, 3)
    assert cm.tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]


def test_scores_match_hand_computation():
    # rows labels, columns predictions
    cm = np.array([[50, 10, 0], [5, 30, 5], [0, 0, 0]])
    m = Metrics((1, 4, 9), ("a", "b", "c"), cm)
    # class a: tp 50, fn 10, fp 5
    assert m.iou[0] == pytest.approx(50 / 65)
    assert m.precision[0] == pytest.approx(50 / 55)
    assert m.recall[0] == pytest.approx(50 / 60)
    assert m.f1[0] == pytest.approx(100 / 115)
    # class b: tp 30, fn 10, fp 10
    assert m.iou[1] == pytest.approx(30 / 50)
    # class c: never labelled, predicted 5 times: IoU 0 and precision 0, recall undefined
    assert m.iou[2] == 0.0 and m.precision[2] == 0.0 and math.isnan(m.recall[2])
    assert m.miou == pytest.approx((50 / 65 + 30 / 50 + 0) / 3)
    assert m.overall_accuracy == pytest.approx(80 / 100)
    assert m.label_pixels.tolist() == [60, 40, 0] and m.predicted_pixels.tolist() == [55, 40, 5]


def test_absent_class_is_left_out_of_the_mean():
    cm = np.array([[8, 2, 0], [0, 10, 0], [0, 0, 0]])
    m = Metrics((0, 1, 2), ("a", "b", "c"), cm)
    assert math.isnan(m.iou[2]) and math.isnan(m.precision[2]) and math.isnan(m.f1[2])
    assert m.miou == pytest.approx((8 / 10 + 10 / 12) / 2)


def test_restrict_confusion_reports_unknown_label_ids():
    cm = np.zeros((256, 256), np.int64)
    cm[1, 1], cm[1, 3], cm[3, 3], cm[8, 1] = 5, 2, 4, 7
    small, unknown = restrict_confusion(cm, (1, 3))
    assert small.tolist() == [[5, 2], [0, 4]]
    assert unknown == {8: 7}


def test_dict_round_trip_and_json_nulls():
    m = Metrics((1, 2), ("x", "y"), np.array([[3, 1], [0, 0]]))
    d = m.to_dict()
    text = json.dumps(d)  # NaN must not leak into JSON
    assert "NaN" not in text
    assert d["classes"][1]["recall"] is None and d["classes"][1]["iou"] == 0.0
    back = Metrics.from_dict(json.loads(text))
    assert back.class_ids == (1, 2) and back.class_names == ("x", "y")
    assert np.array_equal(back.confusion, m.confusion)


def test_table_lists_every_class_and_the_confusion():
    m = Metrics((2, 5), ("water", "forest"), np.array([[7, 1], [2, 9]]))
    t = m.table()
    assert "water" in t and "forest" in t and "mIoU" in t and "confusion" in t
    assert "confusion" not in m.table(confusion=False)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError):
        Metrics((1, 2, 3), ("a", "b", "c"), np.zeros((2, 2)))
