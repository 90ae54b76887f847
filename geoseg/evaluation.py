"""`geoseg evaluate`: a model's predictions against labels, through the same tiled graph as predict.

The class map comes from `build_segmentation` (no second inference code). Labels become a dask
array with the same chunks; every chunk pair gives a 256 x 256 confusion over class ids and the
chunks' matrices are summed by a tree reduction, so memory stays bounded for any scene size.
Pixels count where the image is valid and the labels hold a class (not nodata, not ignored).

`compare` scores several models side by side on the same pixels: those where the labels hold a
class and every model predicts one. Each model is planned with its own card (bands, stride,
halo, and its own default chunk size unless --chunk-size sets one); their class maps are
rechunked to one grid of chunks; one chunk gives one confusion per model over its common pixels, and
one dask compute segments the image once per model.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
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
from geoseg.io import storage
from geoseg.io.sources import RasterStack, open_stack
from geoseg.model.card import CARD_NAME, ClassInfo, ModelCard
from geoseg.model.store import open_model
from geoseg.numerics import resolve_current
from geoseg.runtime import ModelRef
from geoseg.tiling import Box, TilingPlan, plan_for
from geoseg.training.chips import labelled_extent, region_box, scan_extent
from geoseg.training.labels import LabelSource, VectorLabels, open_labels, read_labels
from geoseg.training.metrics import ID_SPACE, NO_CLASS, Metrics, confusion_ids, restrict_confusion

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
    tta: str | None = None  # test-time augmentation: None = as each card says, "none" or "d4"
    postprocess: Any = None  # a PostProcess in place of each card's (None: the card's), as geoseg predict takes it
    label_field: str | None = None
    label_layer: str | None = None  # vector labels: the layer of a file that holds several
    ignore: tuple[int, ...] = ()
    reproject_labels: bool = False
    background: int | None = None  # vector labels: class of valid pixels no feature covers
    bbox: tuple[float, float, float, float] | None = None
    window: tuple[int, int, int, int] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ignore", tuple(int(v) for v in self.ignore))
        if self.background is not None and self.background in self.ignore:
            # the labels would fill every pixel no feature covers with it and score them (as geoseg train refuses it)
            raise ConfigError(f"--background {self.background} labels the valid pixels no feature covers, and "
                              f"--ignore-index {self.background} leaves that class out: give one of them")
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
    labelled: da.Array | None = None  # lazy count of the region's pixels where the labels hold a class


@dataclass(frozen=True, eq=False)
class Evaluation:
    """The result: metrics over the region plus what was evaluated."""

    metrics: Metrics
    job: EvaluationJob
    seconds: float
    labelled_pixels: int | None = None  # pixels where the labels hold a class, image valid or not (coverage)

    def _scored(self) -> str:
        cov = self.coverage
        of = "" if cov is None else (f" of {self.labelled_pixels} labelled ({100 * cov:.1f}%; the model gives "
                                     "the rest no class: image nodata)")
        return f"{os.path.basename(os.path.normpath(self.job.model_dir))} scored on {self.metrics.pixels} pixels{of}"

    def _repr_html_(self) -> str:
        from html import escape

        return f"<div><small>{escape(self._scored())}</small>{self.metrics._repr_html_()}</div>"

    def __str__(self) -> str:
        return self.metrics.table(confusion=False)

    def __repr__(self) -> str:
        return f"geoseg Evaluation: {self._scored()}\n{self}"

    def to_dict(self) -> dict[str, Any]:
        j = self.job
        return {
            "model": storage.absolute(j.model_dir),
            "model_digest": j.digest,
            "images": [storage.absolute(p) for p in j.images],
            "labels": storage.absolute(j.labels_path),
            "label_source": j.labels.describe(),
            "region": {"rows": [j.region.y0, j.region.y1], "cols": [j.region.x0, j.region.x1]},
            "plan": j.plan.describe(),
            "precision": j.options.precision,
            # how the class map was made: a report from --mmu 40 read as one without
            "tta": (j.options.tta or j.card.tta) if j.card.method == "smp" else "none",
            "postprocess": j.card.postprocess.model_dump(),
            "seconds": round(self.seconds, 3),
            "miou_definition": "mean of the per-class IoU over classes present in the labels or the predictions",
            # the labelled pixels the model gives no class (image nodata, an index with no value) are not scored
            "labelled_pixels": self.labelled_pixels,
            "coverage": self.coverage,
            **self.metrics.to_dict(),
        }

    @property
    def coverage(self) -> float | None:
        """The share of the labelled pixels the model gives a class (the scored ones)."""
        return self.metrics.pixels / self.labelled_pixels if self.labelled_pixels else None


def _postprocessed(card: ModelCard, options: "EvaluateOptions", model_dir: Any) -> ModelCard:
    """``card`` with the options' post-processing in place of its own (checked against its classes)."""
    return card if options.postprocess is None else card.with_postprocess(options.postprocess, f"{model_dir}: --mmu")


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


def _summed(parts: da.Array, blocks: Sequence[tuple[int, int]] | None) -> da.Array:
    """The sum over the first two (block) axes of per-block ``parts``, of the ``blocks`` listed only (None: all);
    the others are culled from the graph, their chunks never read or run."""
    if blocks is not None:
        parts = da.concatenate([parts.blocks[i, j] for i, j in blocks], axis=0)
    return parts.sum(axis=(0, 1), dtype=np.int64)


def confusion_array(class_id: da.Array, labels: da.Array, blocks: Sequence[tuple[int, int]] | None = None) -> da.Array:
    """Lazy 256 x 256 pixel counts of (label id, predicted id): one per chunk pair, summed (over ``blocks``
    only, where given: those that hold labels).

    Pixels where either is 255 (image nodata, no label) are left out.
    """
    if class_id.chunks != labels.chunks:
        raise ValueError(f"predictions and labels must have the same chunks, got {class_id.chunks} and {labels.chunks}")
    parts = da.blockwise(
        _block_confusion, "ijkl", class_id, "ij", labels, "ij",
        new_axes={"k": ID_SPACE, "l": ID_SPACE}, adjust_chunks={"i": 1, "j": 1}, dtype=np.int64,
        meta=np.empty((0, 0, 0, 0), np.int64),
    )  # fmt: skip
    return _summed(parts, blocks)


def _block_labelled(labels: np.ndarray) -> np.ndarray:
    return np.asarray([[(labels != NO_CLASS).sum(dtype=np.int64)]])


def labelled_count(labels: da.Array, blocks: Sequence[tuple[int, int]] | None = None) -> da.Array:
    """Lazy count of the pixels where ``labels`` hold a class (over ``blocks`` only, where given)."""
    parts = labels.map_blocks(_block_labelled, chunks=((1,) * labels.numblocks[0], (1,) * labels.numblocks[1]),
                              dtype=np.int64)
    return _summed(parts, blocks)


def _check_semantic(card: ModelCard, model_dir: str) -> None:
    if card.finds_objects:
        raise ConfigError(f"{model_dir} finds objects ({card.method} model), which geoseg evaluate does not "
                          "score; run geoseg predict with it, then geoseg evaluate-objects on its output")


def scored_region(source: LabelSource, grid: Any, plan: TilingPlan, options: EvaluateOptions
                  ) -> tuple[Box, list[tuple[int, int]] | None]:
    """The region scored and the blocks of it to score. The region: the labels' extent within the scene,
    ``--bbox`` or ``--window`` (the whole of it with a background class, or where no label lies: the error
    then says so). The blocks (of the region's slice of ``plan``'s chunks): those whose chunk holds a label (None: all)
    (for polygons, a feature's bounds). Only those chunks are read and run: labels on a small part of a large
    scene, or scattered over it, cost the chunks they lie on. Found in one pass; a label raster is read window
    by window, never whole."""
    h, w = (int(v) for v in grid.shape)
    region = region_box(grid, options.bbox, options.window) or Box(0, h, 0, w)
    cores = [(ch, b) for ch in plan if (b := ch.core.intersect(region)) is not None]
    if isinstance(source, VectorLabels):
        extent = labelled_extent(source, region)
        keep = [ch for ch, b in cores if extent is not None and (cut := b.intersect(extent)) is not None
                and (source.background is not None or source.hits(cut).any())]
    else:
        extent, held = scan_extent(lambda win: read_labels(source, win) != NO_CLASS, region, [b for _, b in cores])
        keep = [ch for (ch, _), labelled in zip(cores, held) if labelled]
    if extent is None or not keep:  # no label: every chunk, and the error says there is nothing to score
        extent, keep = region, [ch for ch, _ in cores]
    first = (extent.y0 // plan.chunk_size, extent.x0 // plan.chunk_size)  # the slice's block (0, 0)
    blocks = [(ch.iy - first[0], ch.ix - first[1]) for ch in keep if ch.core.intersect(extent) is not None]
    every = sum(ch.core.intersect(extent) is not None for ch, _ in cores)
    return extent, (None if len(blocks) == every else blocks)  # None: all of them (labels everywhere)


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
    _check_semantic(card, str(model_dir))
    stack = match_bands(stack, card, str(model_dir))
    image_name = stack.paths[0] if len(stack.paths) == 1 else f"the image ({stack.paths[0]}, ...)"
    source = open_labels(
        labels,
        stack.grid,
        field=options.label_field,
        layer=options.label_layer,
        classes=card.classes,
        classes_from=str(Path(model_dir) / CARD_NAME),
        ignore=options.ignore,
        reproject=options.reproject_labels,
        background=options.background,
        image=image_name,
    )
    if options.tta == "d4" and card.method != "smp":  # as predict refuses it (it was scored without, silently)
        raise ConfigError(f"{model_dir}: --tta d4 augments a network's passes, and this is a {card.method} model; drop --tta")
    card = _postprocessed(card, options, model_dir)
    plan = plan_for(card, stack.shape, chunk_size=options.chunk_size, halo=options.halo, exact=options.exact,
                    tile_size=options.tile_size)
    region, blocks = scored_region(source, stack.grid, plan, options)
    digest = opened.digest
    ref = ModelRef(opened.location, digest, options.device)
    from geoseg.cluster import model_resources
    from geoseg.methods import current_client, scene_settings

    resources = model_resources(card.method, None, current_client())  # the GPU workers of an embedded cluster
    precision = (resolve_current(options.precision, options.device, options.exact, resources, method=card.method).precision
                 if resolve else "fp32")
    options = replace(options, precision=precision)
    base = InferenceSettings(precision, options.batch_size, tta=options.tta, postprocess=card.postprocess)
    settings = scene_settings(card, stack, plan, base) if resolve else base
    seg = build_segmentation(stack, plan, ref, settings, resources)
    ys, xs = slice(region.y0, region.y1), slice(region.x0, region.x1)
    lab = labels_array(source, plan)[ys, xs]
    confusion = confusion_array(seg.class_id[ys, xs], lab, blocks)
    labelled = labelled_count(lab, blocks)
    return EvaluationJob(images, str(model_dir), str(labels), stack, card, digest, source, plan, region, confusion, options,
                         labelled)  # fmt: skip


def run_evaluation(job: EvaluationJob) -> Evaluation:
    """Compute the confusion on the active dask scheduler (a distributed Client if one is current)."""
    t0 = time.perf_counter()
    if job.labelled is not None:
        cm_ids, labelled = dask.compute(job.confusion, job.labelled)
        labelled = int(labelled)
    else:
        (cm_ids,), labelled = dask.compute(job.confusion), None
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
    metrics = Metrics(job.card.class_ids, tuple(c.name for c in job.card.classes), cm, job.options.ignore)
    seconds = time.perf_counter() - t0
    log.info("evaluated %d labelled pixels in %.1f s: mIoU %.4f", metrics.pixels, seconds, metrics.miou)
    return Evaluation(metrics, job, seconds, labelled)


def evaluate(
    images: Sequence[str | os.PathLike],
    model_dir: str | os.PathLike,
    labels: str | os.PathLike,
    options: EvaluateOptions = EvaluateOptions(),
) -> Evaluation:
    """Per-class IoU, precision, recall, F1, mIoU, accuracy and confusion of a model on labelled imagery."""
    return run_evaluation(plan_evaluation(images, model_dir, labels, options))


# ---------------------------------------------------------------------------------------------- side by side

COMMON_PIXELS = "pixels of the region where the labels hold a class and every compared model predicts one"
UNION_CLASSES = (
    "the union of the models' classes (by id); a class missing from a model's card counts as never predicted "
    "by it: IoU 0 where the labels hold it (those pixels are errors of that model), undefined otherwise"
)
MIOU = "mean of the per-class IoU over classes present in the labels or the predictions"


@dataclass(frozen=True, eq=False)
class ComparisonJob:
    """Several models planned on the same images, labels and chunks; nothing computed yet."""

    images: tuple[str, ...]
    model_dirs: tuple[str, ...]
    names: tuple[str, ...]
    labels_path: str
    cards: tuple[ModelCard, ...]
    digests: tuple[str, ...]
    plans: tuple[TilingPlan, ...]
    labels: LabelSource
    region: Box
    classes: tuple[ClassInfo, ...]  # the union over the models, in order of first appearance
    confusions: da.Array  # lazy (models, 256, 256): label id x predicted id on the common pixels
    coverage: da.Array  # lazy (1 + models,): labelled pixels, then those each model predicts a class for
    options: EvaluateOptions


@dataclass(frozen=True, eq=False)
class ModelScores:
    """One model's scores on the common pixels, over the union of classes."""

    name: str
    model_dir: str
    digest: str
    class_ids: tuple[int, ...]  # its card's classes
    plan: TilingPlan
    metrics: Metrics
    predicted_pixels: int  # labelled pixels it predicts a class for (anywhere in the region)
    labelled_pixels: int

    @property
    def coverage(self) -> float:
        """Share of the labelled pixels this model predicts a class for."""
        return self.predicted_pixels / self.labelled_pixels if self.labelled_pixels else math.nan


def _num(v: float, digits: int = 6) -> float | None:
    return None if v is None or not np.isfinite(v) else round(float(v), digits)


@dataclass(frozen=True, eq=False)
class Comparison:
    """Models side by side: per-class IoU, mIoU and overall accuracy on the same pixels, plus coverage."""

    models: tuple[ModelScores, ...]
    classes: tuple[ClassInfo, ...]
    pixels: int  # common pixels
    labelled_pixels: int
    images: tuple[str, ...]
    labels_path: str
    label_source: Any
    region: Box
    precision: str
    seconds: float

    @classmethod
    def from_evaluation(cls, ev: Evaluation, name: str | None = None) -> "Comparison":
        """One model's evaluation as a one-row comparison (its own pixels are the common ones)."""
        j = ev.job
        labelled = ev.labelled_pixels if ev.labelled_pixels is not None else ev.metrics.pixels
        scores = ModelScores(name or _model_names([j.model_dir])[0], j.model_dir, j.digest, j.card.class_ids, j.plan,
                             ev.metrics, ev.metrics.pixels, labelled)  # fmt: skip
        return cls((scores,), tuple(j.card.classes), ev.metrics.pixels, labelled, j.images, j.labels_path,
                   j.labels.describe(), j.region, j.options.precision, ev.seconds)  # fmt: skip

    @property
    def class_ids(self) -> tuple[int, ...]:
        return tuple(c.id for c in self.classes)

    def _columns(self) -> list[str]:
        names = [c.name for c in self.classes]
        taken = {"model", "mIoU", "OA", "coverage", "pixels", "path"}
        return [n if names.count(n) == 1 and n not in taken else f"{n} ({c.id})" for n, c in zip(names, self.classes)]

    def rows(self) -> list[dict[str, Any]]:
        """One dict per model: name, per-class IoU (NaN where undefined), mIoU, OA, coverage, pixels."""
        out = []
        for m in self.models:
            row: dict[str, Any] = {"model": m.name}
            row.update(zip(self._columns(), (float(v) for v in m.metrics.iou)))
            row.update(mIoU=m.metrics.miou, OA=m.metrics.overall_accuracy, coverage=m.coverage, pixels=m.metrics.pixels)
            out.append(row)
        return out

    def table(self) -> str:
        """A plain-text table: models as rows; class IoUs, mIoU, OA and coverage as columns."""

        def f(v: float) -> str:
            return "-" if not np.isfinite(v) else f"{v:.3f}"

        cols = self._columns()
        lacks = [[cid not in m.class_ids for cid in self.class_ids] for m in self.models]
        cells = [[f(v) + ("*" if lack else "") for v, lack in zip(m.metrics.iou, ls)]
                 + [f(m.metrics.miou), f(m.metrics.overall_accuracy), f"{100 * m.coverage:.1f}%"]
                 for m, ls in zip(self.models, lacks)]  # fmt: skip
        head = [*cols, "mIoU", "OA", "coverage"]
        widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(head)]
        nw = max(5, *(len(m.name) for m in self.models))
        lines = [f"{'model':<{nw}}  " + "  ".join(f"{h:>{w}}" for h, w in zip(head, widths))]
        lines += [f"{m.name:<{nw}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(r, widths)) for m, r in zip(self.models, cells)]
        share = 100 * self.pixels / self.labelled_pixels if self.labelled_pixels else math.nan
        lines.append(f"IoU, mIoU and OA on {self.pixels} common pixels ({share:.1f}% of {self.labelled_pixels} labelled): "
                     "the labels hold a class and every model predicts one")  # fmt: skip
        lines.append("coverage: share of the labelled pixels a model predicts a class for")
        if any(any(ls) for ls in lacks):
            lines.append("* not a class of this model: IoU 0 where the labels hold it, counted in its mIoU")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def _repr_html_(self) -> str:
        from html import escape

        def f(v: float) -> str:
            return "-" if not np.isfinite(v) else f"{v:.3f}"

        head = "".join(f"<th>{escape(c)}</th>" for c in [*self._columns(), "mIoU", "OA", "coverage"])
        body = "".join(
            f"<tr><th>{escape(m.name)}</th>"
            + "".join(f"<td>{f(v)}{'*' if cid not in m.class_ids else ''}</td>" for v, cid in zip(m.metrics.iou, self.class_ids))
            + f"<td><b>{f(m.metrics.miou)}</b></td><td>{f(m.metrics.overall_accuracy)}</td><td>{100 * m.coverage:.1f}%</td></tr>"
            for m in self.models
        )
        return (f"<div>{self.pixels} common pixels (labels hold a class and every model predicts one) of "
                f"{self.labelled_pixels} labelled<table><tr><th>model</th>{head}</tr>{body}</table></div>")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        r = self.region
        return {
            "images": [storage.absolute(p) for p in self.images],
            "labels": storage.absolute(self.labels_path),
            "label_source": self.label_source,
            "region": {"rows": [r.y0, r.y1], "cols": [r.x0, r.x1]},
            "precision": self.precision,
            "seconds": round(self.seconds, 3),
            "pixels": self.pixels,
            "labelled_pixels": self.labelled_pixels,
            "pixels_definition": COMMON_PIXELS,
            "classes_definition": UNION_CLASSES,
            "miou_definition": MIOU,
            "classes": [{"id": c.id, "name": c.name} for c in self.classes],
            "models": [
                {
                    "name": m.name,
                    "model": storage.absolute(m.model_dir),
                    "model_digest": m.digest,
                    "model_class_ids": list(m.class_ids),
                    "plan": m.plan.describe(),
                    "coverage": _num(m.coverage),
                    "predicted_pixels": m.predicted_pixels,
                    **m.metrics.to_dict(),
                }
                for m in self.models
            ],
        }

    def to_csv(self, path: str | os.PathLike) -> Path:
        """The table as CSV (one row per model; undefined IoU is an empty cell), written atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        rows = self.rows()
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow([*rows[0].keys(), "path"])
            for row, m in zip(rows, self.models):
                w.writerow([v if isinstance(v, (str, int)) else ("" if not np.isfinite(v) else f"{v:.6f}") for v in row.values()]
                           + [storage.absolute(m.model_dir)])  # fmt: skip
        os.replace(tmp, path)
        return path


def _model_names(model_dirs: Sequence[str], names: Sequence[str] | None = None) -> tuple[str, ...]:
    """``names`` if given, else the directory names; the paths as given where those collide."""
    if names:
        names = tuple(map(str, names))
        if len(names) != len(model_dirs):
            raise ConfigError(f"{len(names)} --name for {len(model_dirs)} --model; give one name per model or none")
        if len(set(names)) != len(names):
            raise ConfigError(f"--name values must differ, got {', '.join(names)}")
        return names
    out = [Path(os.path.abspath(m)).name for m in model_dirs]
    if len(set(out)) != len(out):
        out = [os.path.normpath(m) for m in model_dirs]
    seen: dict[str, int] = {}
    for i, n in enumerate(out):  # the same model twice
        seen[n] = seen.get(n, 0) + 1
        if seen[n] > 1:
            out[i] = f"{n}#{seen[n]}"
    return tuple(out)


def _union_classes(cards: Sequence[ModelCard], model_dirs: Sequence[str]) -> tuple[ClassInfo, ...]:
    union: dict[int, tuple[ClassInfo, str]] = {}
    by_name: dict[str, tuple[int, str]] = {}
    for card, m in zip(cards, model_dirs):
        for c in card.classes:
            first = by_name.setdefault(c.name.casefold(), (c.id, m))
            if first[0] != c.id:  # one class under two ids: the models' predictions are not on one id scale
                raise ConfigError(
                    f"class {c.name!r} is id {first[0]} in {first[1]} but id {c.id} in {m}: the models number their "
                    "classes differently, so one table cannot score them; train them with one classes file (--classes)")
            if c.id not in union:
                union[c.id] = (c, m)
            elif union[c.id][0].name.casefold() != c.name.casefold():
                log.warning("class id %d is %r in %s but %r in %s; the table calls it %r",
                            c.id, union[c.id][0].name, union[c.id][1], c.name, m, union[c.id][0].name)  # fmt: skip
    return tuple(c for c, _ in union.values())


def _block_common(labels: np.ndarray, *preds: np.ndarray) -> np.ndarray:
    """Per model, the (label id, predicted id) counts over the pixels every model predicts a class for."""
    common = labels != NO_CLASS
    for p in preds:
        common &= p != NO_CLASS
    lab = np.where(common, labels, NO_CLASS)
    return np.stack([confusion_ids(lab, p) for p in preds])[None, None]


def _block_coverage(labels: np.ndarray, *preds: np.ndarray) -> np.ndarray:
    """Labelled pixels, then those each model predicts a class for."""
    lab = labels != NO_CLASS
    counts = [int(lab.sum())] + [int((lab & (p != NO_CLASS)).sum()) for p in preds]
    return np.asarray(counts, np.int64)[None, None]


def common_confusions(class_ids: Sequence[da.Array], labels: da.Array, blocks: Sequence[tuple[int, int]] | None = None
                      ) -> tuple[da.Array, da.Array]:
    """Lazy ((models, 256, 256) confusions on the common pixels, (1 + models,) coverage counts).

    The class maps are rechunked to the labels' chunks where they differ; each chunk gives one
    confusion per model and the chunks' results (of ``blocks`` only, where given) are summed by a tree reduction.
    """
    maps = [c if c.chunks == labels.chunks else c.rechunk(labels.chunks) for c in class_ids]
    n = len(maps)
    args = [a for m in maps for a in (m, "ij")]
    parts = da.blockwise(
        _block_common, "ijmkl", labels, "ij", *args,
        new_axes={"m": n, "k": ID_SPACE, "l": ID_SPACE}, adjust_chunks={"i": 1, "j": 1}, dtype=np.int64,
        meta=np.empty((0, 0, 0, 0, 0), np.int64),
    )  # fmt: skip
    cover = da.blockwise(
        _block_coverage, "ijm", labels, "ij", *args,
        new_axes={"m": n + 1}, adjust_chunks={"i": 1, "j": 1}, dtype=np.int64, meta=np.empty((0, 0, 0), np.int64),
    )  # fmt: skip
    return _summed(parts, blocks), _summed(cover, blocks)


def plan_comparison(
    images: Sequence[str | os.PathLike],
    models: Sequence[str | os.PathLike],
    labels: str | os.PathLike,
    options: EvaluateOptions = EvaluateOptions(),
    *,
    names: Sequence[str] | None = None,
    resolve: bool = True,
) -> ComparisonJob:
    """Check inputs, every model and the labels and build one graph. Computes nothing, writes nothing.

    The image list must fit every model (the bands each card names, as for predict); every model
    is planned with its own card (and the chunk size --chunk-size gives, else its own default).
    """
    images = tuple(map(str, images))
    model_dirs = tuple(map(str, models))
    if not model_dirs:
        raise ConfigError("no model to evaluate; give --model at least once")
    names = _model_names(model_dirs, names)
    base = open_stack(images)
    opened = [open_model(m) for m in model_dirs]
    cards = tuple(o.card for o in opened)
    for card, m in zip(cards, model_dirs):
        _check_semantic(card, m)
    stacks = [match_bands(base, card, m) for card, m in zip(cards, model_dirs)]
    classes = _union_classes(cards, model_dirs)
    image_name = base.paths[0] if len(base.paths) == 1 else f"the image ({base.paths[0]}, ...)"
    source = open_labels(
        labels,
        base.grid,
        field=options.label_field,
        layer=options.label_layer,
        classes=classes,
        classes_from=" and ".join(str(Path(m) / CARD_NAME) for m in model_dirs),
        ignore=options.ignore,
        reproject=options.reproject_labels,
        background=options.background,
        image=image_name,
    )
    if options.tta == "d4" and all(card.method != "smp" for card in cards):
        raise ConfigError("--tta d4 augments a network's passes, and none of these models is a network; drop --tta")
    # side by side: d4 for the networks among them (as each runs in geoseg predict --tta d4), the others as they are
    cards = tuple(_postprocessed(card, options, m) for card, m in zip(cards, model_dirs))
    plans = tuple(plan_for(card, base.shape, chunk_size=options.chunk_size, halo=options.halo, exact=options.exact,
                           tile_size=options.tile_size) for card in cards)  # fmt: skip
    region, blocks = scored_region(source, base.grid, plans[0], options)  # the labels' chunks: the first plan's
    from geoseg.cluster import model_resources
    from geoseg.methods import current_client, scene_settings

    client = current_client()
    resources = [model_resources(card.method, None, client) for card in cards]  # the GPU workers of an embedded cluster
    # the networks' precision where there is one among them (the other methods compute in fp32 whatever it is)
    method = "smp" if any(card.method == "smp" for card in cards) else cards[0].method
    precision = resolve_current(options.precision, options.device, options.exact,
                                next((r for r in resources if r), None), method=method).precision if resolve else "fp32"
    options = replace(options, precision=precision)
    ys, xs = slice(region.y0, region.y1), slice(region.x0, region.x1)
    settings = [InferenceSettings(precision, options.batch_size, tta=options.tta, postprocess=card.postprocess) for card in cards]
    maps = [build_segmentation(stack, plan, ModelRef(o.location, o.digest, options.device),
                               scene_settings(card, stack, plan, s) if resolve else s, res).class_id[ys, xs]
            for stack, plan, o, card, res, s in zip(stacks, plans, opened, cards, resources, settings)]  # fmt: skip
    confusions, coverage = common_confusions(maps, labels_array(source, plans[0])[ys, xs], blocks)
    return ComparisonJob(images, model_dirs, names, str(labels), cards, tuple(o.digest for o in opened), plans, source,
                         region, classes, confusions, coverage, options)  # fmt: skip


def run_comparison(job: ComparisonJob) -> Comparison:
    """Compute every model's confusion in one dask compute on the active scheduler."""
    t0 = time.perf_counter()
    cms, counts = dask.compute(job.confusions, job.coverage)
    cms, counts = np.asarray(cms), np.asarray(counts)
    ids = tuple(c.id for c in job.classes)
    cm0, unknown = restrict_confusion(cms[0], ids)
    if unknown:
        listed = ", ".join(f"{k} ({v} px)" for k, v in sorted(unknown.items()))
        raise InputError(
            f"{job.labels_path}: labels hold class id(s) {listed} that none of the models know "
            f"(their classes: {', '.join(str(i) for i in ids)}); pass --ignore-index to leave them out"
        )
    if cm0.sum() == 0:
        raise InputError(
            f"{job.labels_path}: no pixel where the labels hold a class and every model predicts one in the evaluated "
            "region; check that the labels cover the image (and the region) and the models' bands"
        )
    names = tuple(c.name for c in job.classes)
    labelled = int(counts[0])
    scores = tuple(
        ModelScores(name, m, digest, card.class_ids, plan, Metrics(ids, names, restrict_confusion(cm, ids)[0],
                                                                   job.options.ignore), int(pred), labelled)
        for name, m, digest, card, plan, cm, pred in zip(job.names, job.model_dirs, job.digests, job.cards, job.plans,
                                                         cms, counts[1:])
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    log.info("compared %d models on %d common pixels in %.1f s", len(scores), scores[0].metrics.pixels, seconds)
    return Comparison(scores, job.classes, scores[0].metrics.pixels, labelled, job.images, job.labels_path,
                      job.labels.describe(), job.region, job.options.precision, seconds)  # fmt: skip


def compare(
    images: Sequence[str | os.PathLike],
    models: Sequence[str | os.PathLike],
    labels: str | os.PathLike,
    options: EvaluateOptions = EvaluateOptions(),
    *,
    names: Sequence[str] | None = None,
    client: Any = None,
) -> Comparison:
    """Several models side by side on labelled imagery, scored on the same pixels (see `Comparison`).

    Runs on ``client`` if given, else on the current distributed client or dask's threaded scheduler.
    """
    with client.as_current() if client is not None else contextlib.nullcontext():
        return run_comparison(plan_comparison(images, models, labels, options, names=names))
