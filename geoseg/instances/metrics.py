"""Object-level scores: precision, recall and F1 of objects matched at IoU > 0.5, and panoptic quality.

At IoU > 0.5 a predicted object matches at most one true object and the reverse (Kirillov et al.,
Panoptic Segmentation, 2019), so matching needs no assignment step. PQ = sum of matched IoUs /
(TP + FP/2 + FN/2) = SQ (mean matched IoU) x RQ (F1).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np


def object_scores(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None, iou: float = 0.5) -> dict[str, Any]:
    """Scores of instance-id maps ``pred`` and ``truth`` (0 = no object) on the ``valid`` pixels."""
    if iou < 0.5:
        raise ValueError("object matching needs IoU >= 0.5 (above it a match is unique)")
    p, t = np.asarray(pred, np.int64).ravel(), np.asarray(truth, np.int64).ravel()
    if valid is not None:
        v = np.asarray(valid, bool).ravel()
        p, t = p[v], t[v]
    pids, pinv = np.unique(p, return_inverse=True)
    tids, tinv = np.unique(t, return_inverse=True)
    parea, tarea = np.bincount(pinv), np.bincount(tinv)
    both = (p > 0) & (t > 0)
    pair, inter = np.unique(pinv[both] * len(tids) + tinv[both], return_counts=True)
    pi, ti = pair // len(tids), pair % len(tids)
    ious = inter / (parea[pi] + tarea[ti] - inter)
    hit = ious > iou
    n_pred, n_true = int((pids > 0).sum()), int((tids > 0).sum())
    tp = int(hit.sum())
    fp, fn = n_pred - tp, n_true - tp
    sum_iou = float(ious[hit].sum())
    precision = tp / n_pred if n_pred else float("nan")
    recall = tp / n_true if n_true else float("nan")
    f1 = 2 * tp / (n_pred + n_true) if n_pred + n_true else float("nan")
    denom = tp + 0.5 * fp + 0.5 * fn
    return {"true_objects": n_true, "predicted_objects": n_pred, "tp": tp, "fp": fp, "fn": fn,
            "precision": precision, "recall": recall, "f1": f1,
            "sq": sum_iou / tp if tp else float("nan"), "pq": sum_iou / denom if denom else float("nan")}


def per_class(pred: np.ndarray, pred_class: Mapping[int, int], truth: np.ndarray, truth_class: Mapping[int, int],
              valid: np.ndarray | None = None) -> dict[int, dict[str, Any]]:
    """``object_scores`` for each class (objects of other classes count as none)."""
    out = {}
    for c in sorted(set(pred_class.values()) | set(truth_class.values())):
        pk = np.array([i for i, k in pred_class.items() if k == c], np.int64)
        tk = np.array([i for i, k in truth_class.items() if k == c], np.int64)
        out[c] = object_scores(np.where(np.isin(pred, pk), pred, 0), np.where(np.isin(truth, tk), truth, 0), valid)
    return out


def score_prediction(out_dir: str, labels: str, *, bbox: Any = None, window: Any = None, field: str | None = None
                     ) -> dict[str, Any]:
    """Object scores of a finished instance prediction (OUT of ``geoseg predict``) against polygons
    or an instance-id raster, over a region (default: the whole scene), overall and per class."""
    import json
    from pathlib import Path

    import pyogrio
    import zarr

    from geoseg.errors import InputError
    from geoseg.instances.outputs import OBJECTS_LAYER, OBJECTS_NAME
    from geoseg.instances.train import instance_targets
    from geoseg.io.zarr_store import CLASSES_ATTR
    from geoseg.model.card import NODATA_CLASS
    from geoseg.tiling import Box
    from geoseg.training.chips import region_box

    out = Path(out_dir)
    store = out / "prediction.zarr"
    if not (out / "run.json").is_file() or not store.is_dir():
        raise InputError(f"{out_dir}: not a finished prediction (no run.json); run geoseg predict with an instance model first")
    try:
        group = zarr.open_group(str(store), mode="r")
        g = json.loads((out / "run.json").read_text())["grid"]
    except Exception as exc:  # noqa: BLE001  (an emptied store, a run.json of another tool)
        raise InputError(f"{out_dir}: prediction.zarr or run.json is unreadable ({type(exc).__name__}: {exc}); run geoseg predict "
                         "again into a new --out") from None
    if "instance_id" not in group:
        raise InputError(f"{out_dir}: holds a class map, not objects; predict with an instance model (geoseg train --task instance)")
    from affine import Affine
    from odc.geo.geobox import GeoBox

    grid = GeoBox(tuple(g["shape"]), Affine(*g["transform"]), g["crs"])
    h, w = grid.shape
    box = region_box(grid, bbox, window) or Box(0, h, 0, w)
    sl = (slice(box.y0, box.y1), slice(box.x0, box.x1))
    pred = group["instance_id"][sl]
    valid = group["class_id"][sl] != NODATA_CLASS
    from geoseg.training.labels import is_vector

    if field is not None and not is_vector(labels):
        raise InputError(f"{labels}: --label-field is for polygon labels; an instance-id raster holds one class of objects: "
                         "drop --label-field")
    truth, lab, classes = instance_targets(labels, grid, box, field)
    if not (truth > 0).any():
        where = (f"no true object in the region scored (rows {box.y0}-{box.y1}, cols {box.x0}-{box.x1} of the prediction, CRS "
                 f"{grid.crs}, bounds {tuple(round(b, 3) for b in grid.boundingbox)})")
        if bbox is None and window is None:  # the whole scene: the labels' CRS or extent is wrong, not a score of 0
            raise InputError(f"{labels}: {where}; check the labels' CRS and extent")
        import logging

        logging.getLogger(__name__).warning("%s: %s; every predicted object there counts as false", labels, where)
    if (out / OBJECTS_NAME).is_file():
        objs = pyogrio.read_dataframe(out / OBJECTS_NAME, layer=OBJECTS_LAYER, read_geometry=False,
                                      columns=["instance_id", "class_id", "class_name"])
    else:  # predicted with --no-vectors: each object's class is the class map's on its pixels
        import pandas as pd

        cls = group["class_id"][sl]
        ids, first = np.unique(pred, return_index=True)
        keep = ids > 0
        names_of = {int(c["id"]): str(c["name"]) for c in group.attrs.get(CLASSES_ATTR, [])}
        class_ids = cls.ravel()[first[keep]].astype(int)
        objs = pd.DataFrame({"instance_id": ids[keep].astype(int), "class_id": class_ids,
                             "class_name": [names_of.get(int(c), f"class_{c}") for c in class_ids]})
    report = {"region": [box.y0, box.y1, box.x0, box.x1], "all": object_scores(pred, truth, valid)}
    if field is None:  # the labels name no class (one "object" class): nothing to score per class
        return report
    # classes matched by name (the labels' values and the model's class names); labels whose field holds class ids
    # (read as class_<id>) by id
    numeric = all(c.name == f"class_{c.id}" for c in classes[1:])
    if numeric:
        pred_class = dict(zip(objs["instance_id"].astype(int), objs["class_id"].astype(int)))
        truth_class = {i: classes[int(lab[i])].id for i in range(1, len(lab))}
        names = {**dict(zip(objs["class_id"].astype(int), objs["class_name"].astype(str))), **{c.id: c.name for c in classes}}
    else:  # names matched ignoring case, as geoseg evaluate matches label names with the model's
        model_names = {str(c["name"]).casefold(): str(c["name"]) for c in group.attrs.get(CLASSES_ATTR, [])}
        model_names.update({str(n).casefold(): str(n) for n in objs["class_name"]})
        unknown = sorted({c.name for c in classes[1:] if c.name.casefold() not in model_names})
        if unknown:  # scored (every such object a miss), and said
            import logging

            logging.getLogger(__name__).warning(
                "%s: field %r holds %s, which the model has no class for (its classes: %s); those objects count as missed",
                labels, field, ", ".join(map(repr, unknown)), ", ".join(sorted(set(model_names.values()))))
        pred_class = {int(i): str(n).casefold() for i, n in zip(objs["instance_id"], objs["class_name"])}
        truth_class = {i: classes[int(lab[i])].name.casefold() for i in range(1, len(lab))}
        names = {**{c.name.casefold(): c.name for c in classes[1:]}, **model_names}
    if len(set(truth_class.values()) | set(pred_class.values())) > 1:
        report["classes"] = {str(names.get(c, c)): s for c, s in per_class(pred, pred_class, truth, truth_class, valid).items()}
    return report
