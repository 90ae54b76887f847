"""`geoseg evaluate`: a model's predictions against labels, through the same tiled graph as predict.

The class map comes from `build_segmentation` (no second inference code). Labels become a dask
array with the same chunks; every chunk pair gives a 256 x 256 confusion over class ids and the
chunks' matrices are summed by a tree reduction, so memory stays bounded for any scene size.
Pixels count where the image is valid and the labels hold a class (not nodata, not ignored).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import dask
import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

from geoseg.bands import match_bands
from geoseg.errors import ConfigError, InputError
from geoseg.graph import build_segmentation
from geoseg.infer import PRECISIONS, InferenceSettings
from geoseg.io.sources import RasterStack, open_stack
from geoseg.model.card import CARD_NAME, ModelCard
from geoseg.model.store import open_model
from geoseg.numerics import resolve_current
from geoseg.runtime import ModelRef
from geoseg.tiling import Box, TilingPlan, plan_for
from geoseg.training.chips import region_box
from geoseg.training.labels import LabelSource, open_labels, read_labels
from geoseg.training.metrics import ID_SPACE, Metrics, confusion_ids, restrict_confusion

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class EvaluateOptions:
    """How to run the model and read the labels; the region is a bbox (image CRS) or a pixel window."""

    chunk_size: int | None = None
    halo: int | None = None
    exact: bool = False  # halo = receptive field: same class map as one pass over the scene
    tile_size: int | None = None
    precision: str = "auto"
    batch_size: int = 2
    device: str = "auto"
    label_field: str | None = None
    ignore: tuple[int, ...] = ()
    reproject_labels: bool = False
    bbox: tuple[float, float, float, float] | None = None
    window: tuple[int, int, int, int] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ignore", tuple(int(v) for v in self.ignore))
        if self.precision not in ("auto", *PRECISIONS):
            raise ConfigError(f"--precision must be one of auto, {', '.join(PRECISIONS)}, not {self.precision!r}")


@dataclass(frozen=True, eq=False)
class EvaluationJob:
    """Inputs checked and the graph built; nothing computed yet."""

    images: tuple[str, ...]
    model_dir: str
    labels_path: str
    stack: RasterStack
    card: ModelCard
    digest: str
    labels: LabelSource
    plan: TilingPlan
    region: Box
    confusion: da.Array  # lazy 256 x 256 counts (label id x predicted id)
    options: EvaluateOptions


@dataclass(frozen=True, eq=False)
class Evaluation:
    """The result: metrics over the region plus what was evaluated."""

    metrics: Metrics
    job: EvaluationJob
    seconds: float

    def _repr_html_(self) -> str:
        return self.metrics._repr_html_()

    def __str__(self) -> str:
        return self.metrics.table(confusion=False)

    def to_dict(self) -> dict[str, Any]:
        j = self.job
        return {
            "model": os.path.abspath(j.model_dir),
            "model_digest": j.digest,
            "images": [os.path.abspath(p) for p in j.images],
            "labels": os.path.abspath(j.labels_path),
            "label_source": j.labels.describe(),
            "region": {"rows": [j.region.y0, j.region.y1], "cols": [j.region.x0, j.region.x1]},
            "plan": j.plan.describe(),
            "precision": j.options.precision,
            "seconds": round(self.seconds, 3),
            "miou_definition": "mean of the per-class IoU over classes present in the labels or the predictions",
            **self.metrics.to_dict(),
        }


def labels_array(source: LabelSource, plan: TilingPlan) -> da.Array:
    """The labels as a lazy uint8 array (255 = no label) with the plan's chunks, read chunk by chunk.

    The source (which can hold many polygons) is one node of the graph, shipped once per worker.
    """
    token = tokenize(source, plan)
    src_name, name = f"geoseg-label-source-{token}", f"geoseg-labels-{token}"
    reads = {(name, ch.iy, ch.ix): (read_labels, src_name, ch.core) for ch in plan}
    graph = HighLevelGraph(
        {src_name: MaterializedLayer({src_name: source}), name: MaterializedLayer(reads)},
        {src_name: set(), name: {src_name}},
    )
    return da.Array(graph, name, plan.chunks, dtype=np.uint8)


def _block_confusion(pred: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return confusion_ids(labels, pred)[None, None]


def confusion_array(class_id: da.Array, labels: da.Array) -> da.Array:
    """Lazy 256 x 256 pixel counts of (label id, predicted id): one per chunk pair, summed.

    Pixels where either is 255 (image nodata, no label) are left out.
    """
    if class_id.chunks != labels.chunks:
        raise ValueError(f"predictions and labels must have the same chunks, got {class_id.chunks} and {labels.chunks}")
    parts = da.blockwise(
        _block_confusion, "ijkl", class_id, "ij", labels, "ij",
        new_axes={"k": ID_SPACE, "l": ID_SPACE}, adjust_chunks={"i": 1, "j": 1}, dtype=np.int64,
        meta=np.empty((0, 0, 0, 0), np.int64),
    )  # fmt: skip
    return parts.sum(axis=(0, 1), dtype=np.int64)


def plan_evaluation(
    images: Sequence[str | os.PathLike],
    model_dir: str | os.PathLike,
    labels: str | os.PathLike,
    options: EvaluateOptions = EvaluateOptions(),
    *,
    resolve: bool = True,
) -> EvaluationJob:
    """Check inputs, model and labels and build the graph. Computes nothing, writes nothing.

    The precision is decided on the current distributed client's workers (here without one);
    ``resolve=False`` only checks (fp32 graph).
    """
    images = tuple(map(str, images))
    stack = open_stack(images)
    opened = open_model(model_dir)
    card = opened.card
    stack = match_bands(stack, card, str(model_dir))
    image_name = stack.paths[0] if len(stack.paths) == 1 else f"the image ({stack.paths[0]}, ...)"
    source = open_labels(
        labels,
        stack.grid,
        field=options.label_field,
        classes=card.classes,
        classes_from=str(Path(model_dir) / CARD_NAME),
        ignore=options.ignore,
        reproject=options.reproject_labels,
        image=image_name,
    )
    h, w = stack.shape
    region = region_box(stack.grid, options.bbox, options.window) or Box(0, h, 0, w)
    plan = plan_for(card, stack.shape, chunk_size=options.chunk_size, halo=options.halo, exact=options.exact,
                    tile_size=options.tile_size)
    digest = opened.digest
    ref = ModelRef(opened.location, digest, options.device)
    precision = resolve_current(options.precision, options.device, options.exact).precision if resolve else "fp32"
    options = replace(options, precision=precision)
    seg = build_segmentation(stack, plan, ref, InferenceSettings(precision, options.batch_size))
    ys, xs = slice(region.y0, region.y1), slice(region.x0, region.x1)
    confusion = confusion_array(seg.class_id[ys, xs], labels_array(source, plan)[ys, xs])
    return EvaluationJob(images, str(model_dir), str(labels), stack, card, digest, source, plan, region, confusion, options)


def run_evaluation(job: EvaluationJob) -> Evaluation:
    """Compute the confusion on the active dask scheduler (a distributed Client if one is current)."""
    t0 = time.perf_counter()
    (cm_ids,) = dask.compute(job.confusion)
    cm, unknown = restrict_confusion(np.asarray(cm_ids), job.card.class_ids)
    if unknown:
        listed = ", ".join(f"{k} ({v} px)" for k, v in sorted(unknown.items()))
        raise InputError(
            f"{job.labels_path}: labels hold class id(s) {listed} that the model in {job.model_dir} does not know "
            f"(its classes: {', '.join(str(i) for i in job.card.class_ids)}); pass --ignore-index to leave them out"
        )
    if cm.sum() == 0:
        raise InputError(
            f"{job.labels_path}: no pixel where both the labels and the image are valid in the evaluated region; "
            "check that the labels cover the image (and the region)"
        )
    metrics = Metrics(job.card.class_ids, tuple(c.name for c in job.card.classes), cm)
    seconds = time.perf_counter() - t0
    log.info("evaluated %d labelled pixels in %.1f s: mIoU %.4f", metrics.pixels, seconds, metrics.miou)
    return Evaluation(metrics, job, seconds)


def evaluate(
    images: Sequence[str | os.PathLike],
    model_dir: str | os.PathLike,
    labels: str | os.PathLike,
    options: EvaluateOptions = EvaluateOptions(),
) -> Evaluation:
    """Per-class IoU, precision, recall, F1, mIoU, accuracy and confusion of a model on labelled imagery."""
    return run_evaluation(plan_evaluation(images, model_dir, labels, options))
