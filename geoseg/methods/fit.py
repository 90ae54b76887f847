"""`geoseg train --method threshold|kmeans|pixel`: fit a per-pixel method on the same inputs,
spatial split and labels the networks use, score it on the validation blocks, write its model
directory (card + LightGBM text model or safetensors; nothing pickled) atomically."""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from geoseg.errors import ConfigError, InputError, OutputExistsError
from geoseg.io.sources import files_kept_open
from geoseg.model.store import write_model_dir
from geoseg.methods.features import (
    available_indices,
    band_units,
    check_expression,
    default_features,
    feature_radius,
    guess_roles,
    parse_roles,
)
from geoseg.methods.sampling import sample_blocks
from geoseg.model.card import NODATA_CLASS, PIXEL_WEIGHTS_NAME, WEIGHTS_NAME, BandInfo, ClassInfo, ModelCard, PostProcess
from geoseg.tiling import Box
from geoseg.training.chips import class_lut
from geoseg.training.labels import read_labels
from geoseg.training.loop import TrainConfig, TrainInputs, TrainResult, band_infos, prepare
from geoseg.training.metrics import Metrics, confusion_indices

MAX_TRAIN_PIXELS = 2_000_000
KMEANS_SAMPLE = 200_000
# the share of training pixels the trees also see with one band missing: LightGBM learns a direction for missing
# values only where its training rows had some, and otherwise takes NaN as 0 (measured: a band missing over a stripe
# of a scene that never had one missing alone, accuracy there 1.00 -> 0.35 at confidence 0.99; 0.05: 0.995, fit 3.5 ->
# 3.75 s; 0.2: 0.99, 5.5 s)
BAND_DROPOUT = 0.05
# the index a threshold uses when none is named: the first of these the band roles allow
INDEX_PREFERENCE = ("mndwi", "ndwi", "ndvi", "ndbi")
log = logging.getLogger(__name__)

NEGATIONS = ("non", "not", "no", "without")
TARGET_WORDS = {"mndwi": "water", "ndwi": "water", "ndvi": ("forest", "vegetation", "tree"), "ndbi": ("developed", "built", "urban")}


def band_roles_for(stack, roles: str | Sequence[str] | None) -> tuple[str | None, ...]:
    if roles:
        return parse_roles(roles, stack.count)
    return guess_roles([b.description for b in stack.bands])


def _with_roles(bands: list[BandInfo], roles: Sequence[str | None]) -> tuple[BandInfo, ...]:
    return tuple(b.model_copy(update={"role": r}) for b, r in zip(bands, roles))


def fit_pixel_on_split(prep, roles: Sequence[str | None], features: Sequence[str], seed: int) -> tuple[Any, dict[str, Any]] | None:
    """LightGBM on the labelled pixels of the training blocks, stopped early on the validation blocks
    (None when the training blocks hold no labelled pixel or the model has one class)."""
    from geoseg.methods import pixel

    if len(prep.classes) < 2:  # nothing to tell apart (LightGBM refuses a one-class multiclass fit)
        return None
    lut = class_lut(prep.classes)
    rng = np.random.default_rng([seed, 0x9E0])
    scale = prep.normalization.std

    def targets(box: Box) -> np.ndarray:
        return lut[read_labels(prep.labels, box)]

    X, y = sample_blocks(prep.stack, prep.split.boxes("train"), roles, features, scale, targets, MAX_TRAIN_PIXELS, rng,
                         band_dropout=BAND_DROPOUT)
    if not len(y):
        return None
    Xv, yv = sample_blocks(prep.stack, list(prep.val_boxes), roles, features, scale, targets, MAX_TRAIN_PIXELS // 4, rng)
    return pixel.fit(X, y, Xv, yv, len(prep.classes), seed)


def _validate(predictor, card: ModelCard, prep, boxes: Sequence[Box], lut: np.ndarray, params: dict[str, Any]) -> Metrics | None:
    """The method's scores on the validation blocks (the same blocks a network is validated on)."""
    from geoseg.io.sources import read_bands
    from geoseg.methods.features import feature_radius as _r
    from geoseg.methods.features import nan_bands

    if not boxes:
        return None
    n = card.n_classes
    cm = np.zeros((n, n), np.int64)
    h, w = prep.stack.shape
    r = _r(card.method_params.get("features", ()))
    for box in boxes:
        outer = box.grow(r, (h, w))
        data, bv = read_bands(prep.stack, outer.window)
        valid = bv.any(0) if card.missing_bands == "fill" else bv.all(0)
        p = predictor.probabilities(nan_bands(data, bv), valid, params)
        sl = box.relative_to(outer)
        p, v = p[(slice(None), *sl)], valid[sl]
        pred = np.where(v & (p.sum(0) > 0), p.argmax(0), NODATA_CLASS)
        target = lut[read_labels(prep.labels, box)]
        target = np.where(v, target, NODATA_CLASS)
        cm += confusion_indices(target, pred, n)
    return Metrics(card.class_ids, tuple(c.name for c in card.classes), cm)


def names_target(name: str, words: Sequence[str]) -> bool:
    """Whether a class name says it is what an index measures: one of ``words`` as a whole word (or its
    plural), not negated ("open water", "street trees"; not "non-water", "no water", "street")."""
    tokens = re.findall(r"[a-z0-9]+", name.lower())
    for j, t in enumerate(tokens):
        if t in words or (t.endswith("s") and t[:-1] in words) or (t.endswith("es") and t[:-2] in words):
            if not (j and tokens[j - 1] in NEGATIONS):
                return True
    return False


def _threshold_classes(classes: Sequence[Any], idx: str, means: np.ndarray, counts: np.ndarray) -> tuple[int, int]:
    """The classes above and below the threshold (positions): above, the class named after what the index
    measures, else the one of highest mean index; below, the most frequent other. The names only choose
    where the training pixels agree: a named class whose mean index is not above the other's gives way."""
    words = TARGET_WORDS.get(idx.lower(), ())
    words = (words,) if isinstance(words, str) else words

    def most_frequent_besides(i: int) -> int:
        others = counts.astype(float).copy()
        others[i] = -1
        return int(others.argmax()) if len(classes) > 1 else i

    named = [i for i, c in enumerate(classes) if counts[i] and names_target(c.name, words)]
    if named:
        above = max(named, key=lambda i: means[i])
        below = most_frequent_besides(above)
        if below == above or means[above] > means[below]:
            return above, below
        log.warning("class %r is named after what %s measures but its training pixels have a lower mean %s (%.3f) than "
                    "class %r (%.3f): the class of highest mean goes above the threshold", classes[above].name, idx,
                    idx, means[above], classes[below].name, means[below])
    above = int(means.argmax())
    return above, most_frequent_besides(above)


@files_kept_open()
def train_method(
    inputs: TrainInputs,
    out_dir: str | os.PathLike,
    method: str,
    config: TrainConfig = TrainConfig(),
    *,
    band_roles: str | Sequence[str] | None = None,
    index: str | None = None,
    threshold: str | float = "otsu",
    clusters: int | None = None,
    postprocess: PostProcess = PostProcess(),
    overwrite: bool = False,
) -> TrainResult:
    """Fit ``method`` (threshold, kmeans or pixel) on ``inputs`` and write the model directory ``out_dir``."""
    from geoseg import __version__

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OutputExistsError(f"{out}: already exists and is not empty; choose another --out or pass --overwrite")
    if method == "threshold" and index is None and str(threshold).lower() != "otsu":
        raise ConfigError(f"threshold {threshold}: a fixed value means something for one index only; name the index (--index, "
                          "or index= in Python: ndvi, ndwi, mndwi, ndbi, nbr, expr:...)")
    t0 = time.perf_counter()
    # no chips here: the split's blocks (64 px unless given) are what the pixels are sampled in
    from dataclasses import replace

    block = config.block_size or 64
    # and any labelled pixel counts (min_labelled 0): per-pixel methods learn from pixels, so sparse point labels
    # (a few surveyed pixels per block) serve; only a network's chips need labelled areas
    # and chips of the smallest size: the methods take no chips, so none of prepare's chip checks may refuse them
    from geoseg.training.chips import CELL

    prep = prepare(inputs, replace(config, block_size=block, chip_size=CELL, min_labelled=0.0), 1, cache_bytes=0)  # no chips
    from geoseg.model.card import check_mmu_classes

    check_mmu_classes(postprocess, [c.id for c in prep.classes])
    roles = band_roles_for(prep.stack, band_roles)
    bands = _with_roles(band_infos(prep.stack), roles)
    classes: tuple[ClassInfo, ...] = prep.classes
    lut = class_lut(classes)

    def targets(box: Box) -> np.ndarray:
        return lut[read_labels(prep.labels, box)]

    rng = np.random.default_rng([config.seed, 0x9E0])
    train_boxes, val_boxes = prep.split.boxes("train"), list(prep.val_boxes)
    scale = prep.normalization.std
    params: dict[str, Any] = {}
    record: dict[str, Any] = {}
    files: dict[str, Callable[[Path], None]]

    counts = prep.survey.id_counts
    present = [c for c in prep.classes if counts[c.id] > 0]  # a classes file may list more than the labels hold
    if len(present) < 2:  # a model that gives one class everywhere, validated at mIoU 1.0
        raise InputError(f"{inputs.labels}: the labels hold one class only ({present[0].name if present else '-'}); --method "
                         f"{method} needs two: label the rest with --background ID (vector labels) or give labels of another class")
    if method == "pixel":
        from geoseg.methods import pixel

        features = default_features(roles, prep.stack.count, context=True)
        fitted = fit_pixel_on_split(prep, roles, features, config.seed)
        if fitted is None:
            raise InputError(f"{inputs.labels}: no labelled pixel in the training blocks")
        booster, record = fitted
        params = {"features": list(features)}
        missing = "fill"

        files = {PIXEL_WEIGHTS_NAME: lambda path: pixel.save(booster, path)}

        card_kw = dict(method_params=params)
        make = lambda card: pixel.PixelPredictor(card, booster)  # noqa: E731
    elif method == "kmeans":
        from safetensors.numpy import save_file

        from geoseg.methods import kmeans

        k = clusters or max(2 * len(classes), 8)
        features = default_features(roles, prep.stack.count, texture=False)
        region_boxes = train_boxes + val_boxes
        X, _ = sample_blocks(prep.stack, region_boxes, roles, features, scale, None, KMEANS_SAMPLE, rng)
        if len(X) < k:
            raise InputError(f"{inputs.images[0]}: only {len(X)} valid pixels to cluster into {k} clusters")
        centers, fmean, fstd, record = kmeans.fit(X, k, config.seed)
        Xl, yl = sample_blocks(prep.stack, train_boxes, roles, features, scale, targets, MAX_TRAIN_PIXELS, rng)
        probe = kmeans.KMeansPredictor(None, centers, fmean, fstd, np.zeros(k, np.int64))  # type: ignore[arg-type]
        probe.features = features
        cl, _ = probe.clusters(Xl) if len(Xl) else (np.zeros(0, np.int64), None)
        cluster_class = kmeans.map_clusters(cl, yl.astype(np.int64), k, len(classes))
        unlabelled = int(k - len(np.unique(cl))) if len(cl) else k
        if unlabelled:  # land cover the labels never touch, named after the most frequent class
            log.warning("%d of %d clusters hold no labelled pixel of the training blocks; they are given the most frequent "
                        "class, %s (label some of what they cover, or fewer --clusters)", unlabelled, k,
                        classes[int(np.bincount(yl, minlength=len(classes)).argmax())].name if len(yl) else classes[0].name)
        record["unlabelled_clusters"] = unlabelled
        params = {"features": list(features), "k": k, "cluster_class": [classes[i].id for i in cluster_class]}
        missing = "fill"

        tensors = {"centers": centers, "feature_mean": fmean, "feature_std": fstd, "cluster_class": cluster_class.astype(np.int32)}
        files = {WEIGHTS_NAME: lambda path: save_file(tensors, str(path))}

        card_kw = dict(method_params=params)
        make = lambda card: kmeans.KMeansPredictor(card, centers, fmean, fstd, cluster_class)  # noqa: E731
    elif method == "threshold":
        from geoseg.methods import threshold as th
        from geoseg.methods.features import spectral_index

        idx = index or next((i for i in INDEX_PREFERENCE if i in available_indices(roles)), None)
        if idx is None:
            raise ConfigError(
                "--method threshold needs an index: name one with --index (ndvi, ndwi, mndwi, ndbi, expr:...) and give the "
                "bands' roles with --band-roles (e.g. blue,green,red,nir,swir1,swir2)"
            )
        if idx.lower().startswith("expr:"):
            check_expression(idx[5:], roles)
        features = ("index",)
        # the class the index marks: named after what it measures, else the highest mean index
        from geoseg.methods.features import nan_bands

        sums = np.zeros(len(classes))
        counts = np.zeros(len(classes))
        values = []  # for the training blocks' Otsu (a record): at most MAX_TRAIN_PIXELS values, drawn uniformly
        keep = min(1.0, MAX_TRAIN_PIXELS / max(1, sum(b.size for b in train_boxes)))
        rng = np.random.default_rng([config.seed, 0x07505])
        from geoseg.io.sources import read_bands

        for box in train_boxes:
            data, bv = read_bands(prep.stack, box.window)
            v = spectral_index(nan_bands(data, bv), roles, idx, band_units(prep.stack.bands))
            t = targets(box)
            m = np.isfinite(v) & (t != NODATA_CLASS)
            np.add.at(sums, t[m], v[m])
            np.add.at(counts, t[m], 1)
            values.append(v if keep >= 1.0 else v[rng.random(v.shape) < keep])
        if counts.sum() == 0:
            raise InputError(f"{inputs.labels}: no labelled pixel with a value of {idx} in the training blocks")
        means = np.where(counts > 0, sums / np.maximum(counts, 1), -np.inf)
        above, below = _threshold_classes(classes, idx, means, counts)
        if above == below or not counts[below]:
            raise InputError(f"{inputs.labels}: only {classes[above].name} has pixels with a value of {idx} in the training "
                             "blocks; a threshold needs a class on each side")
        t_value: Any = "otsu" if str(threshold).lower() == "otsu" else float(threshold)
        params = {"index": idx, "threshold": t_value, "above": classes[above].id, "below": classes[below].id}
        if t_value == "otsu":
            record = {"training_otsu": th.otsu_of_blocks(values)}
        missing = "fill"

        files = {}

        card_kw = dict(method_params=params)
        make = lambda card: th.ThresholdPredictor(card)  # noqa: E731
    else:
        raise ConfigError(f"unknown --method {method!r}; use smp (the default), threshold, kmeans or pixel")

    radius = feature_radius(features) if method != "threshold" else 0
    card = ModelCard(
        arch=method, encoder="-", encoder_depth=1, bands=bands, normalization=prep.normalization, classes=classes,
        stride=1, tile_size=1024, receptive_field=radius, default_halo=radius, method=method, missing_bands=missing,
        index_units="physical",
        postprocess=postprocess,
        provenance={"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "geoseg": __version__,
                    "source": "geoseg train", "seed": config.seed},
        **card_kw,
    )  # fmt: skip
    vparams = {"threshold": record["training_otsu"]} if method == "threshold" and params.get("threshold") == "otsu" else {}
    metrics = _validate(make(card), card, prep, val_boxes, lut, vparams)
    training = {
        "method": method,
        "images": [Path(p).name for p in inputs.images],
        "labels": prep.labels.describe(),
        "classes_from": prep.classes_from,
        "region": [prep.region.y0, prep.region.y1, prep.region.x0, prep.region.x1],
        "split": prep.split.describe(prep.survey, [c.id for c in classes]),
        "band_roles": list(roles),
        "fit": record,
        "seconds": round(time.perf_counter() - t0, 3),
        "metrics": metrics.to_dict() if metrics is not None else None,
    }
    card = card.model_copy(update={"training": training})
    card = ModelCard.model_validate_json(card.to_json())  # a card that reads back as written
    write_model_dir(out, card, files, overwrite)
    return TrainResult(card, out, ())
