"""Segmentation metrics from a confusion matrix: pure numpy, no files, no torch.

Rows of a confusion matrix are the labels (truth), columns the predictions. IoU, precision,
recall and F1 of a class whose denominator is zero are NaN (undefined, not 0), and the mean
IoU is the mean over the classes with a defined IoU (present in the labels or the predictions),
as mmsegmentation and torchmetrics compute it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

ID_SPACE = 256  # class ids 0-254 plus 255 (nodata): a confusion over ids is 256 x 256
NO_CLASS = 255


def confusion_ids(labels: np.ndarray, preds: np.ndarray) -> np.ndarray:
    """256 x 256 pixel counts of (label id, predicted id) where neither is 255 (nodata)."""
    lab = np.asarray(labels, np.uint8).ravel()
    pred = np.asarray(preds, np.uint8).ravel()
    keep = (lab != NO_CLASS) & (pred != NO_CLASS)
    codes = lab[keep].astype(np.int64) * ID_SPACE + pred[keep]
    return np.bincount(codes, minlength=ID_SPACE * ID_SPACE).reshape(ID_SPACE, ID_SPACE)


def confusion_indices(target: np.ndarray, pred: np.ndarray, n_classes: int, ignore: int = NO_CLASS) -> np.ndarray:
    """``n x n`` pixel counts of (target index, predicted index), pixels with target ``ignore`` left out, and
    pixels with no prediction (an index out of range: a threshold's index has no value where its band is missing)."""
    t = np.asarray(target).ravel().astype(np.int64)
    p = np.asarray(pred).ravel().astype(np.int64)
    keep = (t != ignore) & (t >= 0) & (t < n_classes) & (p >= 0) & (p < n_classes)
    return np.bincount(t[keep] * n_classes + p[keep], minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def restrict_confusion(cm_ids: np.ndarray, class_ids: Sequence[int]) -> tuple[np.ndarray, dict[int, int]]:
    """The ``n x n`` confusion of ``class_ids`` (in that order) from a 256 x 256 one over ids.

    Also returns the pixel counts of label ids outside ``class_ids`` (pixels a model with these
    classes cannot get right), which the caller must report rather than silently drop.
    """
    ids = np.asarray(class_ids, np.intp)
    cm = cm_ids[np.ix_(ids, ids)].astype(np.int64)
    rows = cm_ids[:NO_CLASS].sum(axis=1)
    unknown = {int(i): int(rows[i]) for i in np.nonzero(rows)[0] if int(i) not in set(class_ids)}
    return cm, unknown


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1), np.nan)


@dataclass(frozen=True, eq=False)
class Metrics:
    """Per-class and overall scores of one confusion matrix (rows labels, columns predictions)."""

    class_ids: tuple[int, ...]
    class_names: tuple[str, ...]
    confusion: np.ndarray
    # classes left out on purpose (``--ignore-index``): their scores are undefined and out of the mean; pixels
    # predicted as one of them where the labels hold another class still count as that class's misses
    ignored: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.class_ids)
        if self.confusion.shape != (n, n) or len(self.class_names) != n:
            raise ValueError(f"confusion of shape {self.confusion.shape} does not match {n} classes")

    @property
    def tp(self) -> np.ndarray:
        return np.diag(self.confusion).astype(np.int64)

    @property
    def label_pixels(self) -> np.ndarray:
        """Pixels of each class in the labels (the support)."""
        return self.confusion.sum(axis=1).astype(np.int64)

    @property
    def predicted_pixels(self) -> np.ndarray:
        return self.confusion.sum(axis=0).astype(np.int64)

    @property
    def pixels(self) -> int:
        return int(self.confusion.sum())

    def _defined(self, scores: np.ndarray) -> np.ndarray:
        if self.ignored:
            scores[np.isin(np.asarray(self.class_ids), self.ignored)] = np.nan
        return scores

    @property
    def iou(self) -> np.ndarray:
        return self._defined(_ratio(self.tp, self.label_pixels + self.predicted_pixels - self.tp))

    @property
    def precision(self) -> np.ndarray:
        return self._defined(_ratio(self.tp, self.predicted_pixels))

    @property
    def recall(self) -> np.ndarray:
        return self._defined(_ratio(self.tp, self.label_pixels))

    @property
    def f1(self) -> np.ndarray:
        return self._defined(_ratio(2 * self.tp, self.label_pixels + self.predicted_pixels))

    @property
    def miou(self) -> float:
        iou = self.iou
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else math.nan

    @property
    def overall_accuracy(self) -> float:
        return float(self.tp.sum() / self.pixels) if self.pixels else math.nan

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready scores; undefined values are ``None``."""

        def num(v: float) -> float | None:
            return None if not np.isfinite(v) else round(float(v), 6)

        classes = [
            {
                "id": cid,
                "name": name,
                "iou": num(self.iou[i]),
                "precision": num(self.precision[i]),
                "recall": num(self.recall[i]),
                "f1": num(self.f1[i]),
                "label_pixels": int(self.label_pixels[i]),
                "predicted_pixels": int(self.predicted_pixels[i]),
            }
            for i, (cid, name) in enumerate(zip(self.class_ids, self.class_names))
        ]
        return {
            **({"ignored": list(self.ignored)} if self.ignored else {}),
            "miou": num(self.miou),
            "overall_accuracy": num(self.overall_accuracy),
            "pixels": self.pixels,
            "classes": classes,
            "confusion": {
                "rows": "labels",
                "columns": "predictions",
                "class_ids": list(self.class_ids),
                "matrix": self.confusion.astype(np.int64).tolist(),
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Metrics":
        c = d["confusion"]
        names = [k["name"] for k in d["classes"]]
        return cls(tuple(c["class_ids"]), tuple(names), np.asarray(c["matrix"], np.int64), tuple(d.get("ignored", ())))

    def table(self, confusion: bool = True) -> str:
        """A plain-text table for the terminal: per-class scores, then the confusion matrix."""

        def f(v: float) -> str:
            return "    -" if not np.isfinite(v) else f"{v:5.3f}"

        width = max([4] + [len(n) for n in self.class_names])
        lines = [f"{'id':>3}  {'class':<{width}}  {'IoU':>5}  {'prec':>5}  {'recall':>6}  {'F1':>5}  {'label px':>10}  {'pred px':>10}"]
        for i, (cid, name) in enumerate(zip(self.class_ids, self.class_names)):
            lines.append(
                f"{cid:>3}  {name:<{width}}  {f(self.iou[i])}  {f(self.precision[i])}  {f(self.recall[i]):>6}  "
                f"{f(self.f1[i])}  {self.label_pixels[i]:>10}  {self.predicted_pixels[i]:>10}"
            )
        lines.append(f"mIoU {f(self.miou)}   overall accuracy {f(self.overall_accuracy)}   pixels {self.pixels}")
        if confusion:
            cw = max(6, len(str(int(self.confusion.max(initial=0)))) + 1)
            lines.append("")
            lines.append("confusion (rows: labels, columns: predictions)")
            lines.append(" " * 5 + "".join(f"{cid:>{cw}}" for cid in self.class_ids))
            for cid, row in zip(self.class_ids, self.confusion):
                lines.append(f"{cid:>5}" + "".join(f"{int(v):>{cw}}" for v in row))
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def __str__(self) -> str:
        return self.table(confusion=False)

    def _repr_html_(self) -> str:
        """Per-class scores as an HTML table (Jupyter)."""
        from html import escape

        def f(v: float) -> str:
            return "-" if not np.isfinite(v) else f"{v:.3f}"

        rows = "".join(
            f"<tr><td>{cid}</td><td>{escape(name)}</td><td>{f(self.iou[i])}</td><td>{f(self.precision[i])}</td>"
            f"<td>{f(self.recall[i])}</td><td>{f(self.f1[i])}</td><td>{self.label_pixels[i]}</td></tr>"
            for i, (cid, name) in enumerate(zip(self.class_ids, self.class_names)))
        return (f"<div><b>mIoU {f(self.miou)}</b> &middot; overall accuracy {f(self.overall_accuracy)} &middot; "
                f"{self.pixels} pixels<table><tr><th>id</th><th>class</th><th>IoU</th><th>precision</th><th>recall</th>"
                f"<th>F1</th><th>label px</th></tr>{rows}</table></div>")
