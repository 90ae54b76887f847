"""``threshold``: a spectral index against a fixed threshold or Otsu's, computed over the whole scene.

Otsu's threshold comes from the index's histogram over every valid pixel of the scene: one
task per chunk computes the index and its min/max, a second pass per chunk its 256-bin histogram
over the scene's range, and the client sums the counts; the threshold is skimage's
``threshold_otsu`` on that histogram, so it equals skimage's on the whole array.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from geoseg.methods.features import spectral_index
from geoseg.model.card import ModelCard

NBINS = 256  # skimage's default
SOFTNESS = 0.05  # confidence = logistic((index - threshold) / SOFTNESS): 0.5 at the threshold


class ThresholdPredictor:
    def __init__(self, card: ModelCard):
        self.card = card
        p = card.method_params
        self.index = p["index"]
        ids = list(card.class_ids)
        self.above, self.below = ids.index(int(p["above"])), ids.index(int(p["below"]))

    def threshold(self, params: dict[str, Any]) -> float:
        t = params.get("threshold", self.card.method_params.get("threshold"))
        if not isinstance(t, (int, float)):
            raise ValueError("Otsu's threshold must be computed over the scene before prediction (geoseg.methods.threshold.otsu_on_cluster)")
        return float(t)

    def probabilities(self, data: np.ndarray, valid: np.ndarray, params: dict[str, Any]) -> np.ndarray:
        v = spectral_index(data, self.card.band_roles, self.index, self.card.index_band_units)
        t = self.threshold(params)
        if not np.isfinite(t):  # the scene had no index value at all: no class anywhere
            v = np.full(v.shape, np.nan, np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            p = 1.0 / (1.0 + np.exp(-(v - t) / SOFTNESS))
        p = np.where(np.isfinite(v), p, 0.5).astype(np.float32)
        p = np.where(np.isfinite(v) & (v > t), np.maximum(p, 0.5000001), np.minimum(p, 0.4999999)).astype(np.float32)
        out = np.zeros((self.card.n_classes, *v.shape), np.float32)
        ok = np.isfinite(v)
        out[self.above] = np.where(ok, p, 0.0)
        out[self.below] += np.where(ok, 1.0 - p, 0.0)  # no index value: no class (nodata)
        return out


def index_values(card: ModelCard, data: np.ndarray, band_valid: np.ndarray) -> np.ndarray:
    """The card's index over a window, NaN where it has no value (or a needed band is missing)."""
    from geoseg.methods.features import nan_bands

    return spectral_index(nan_bands(data, band_valid), card.band_roles, card.method_params["index"], card.index_band_units)


def otsu_from_histogram(counts: np.ndarray, lo: float, hi: float) -> float:
    from skimage.filters import threshold_otsu

    # the bin edges np.histogram gives skimage for a float32 image with this range
    lo32, hi32 = np.float32(lo), np.float32(hi)
    edges = np.histogram(np.array([lo32, hi32], np.float32), bins=NBINS, range=(lo32, hi32))[1]
    centers = (edges[:-1] + edges[1:]) / 2.0
    return float(threshold_otsu(hist=(counts, centers)))


def _range(v: np.ndarray) -> tuple[float, float, int]:
    f = v[np.isfinite(v)]
    return (float(f.min()), float(f.max()), int(f.size)) if f.size else (np.inf, -np.inf, 0)


def _hist(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
    f = v[np.isfinite(v)]
    # same range and bins as skimage gives np.histogram on the whole array: same bin for every value
    return np.histogram(f, bins=NBINS, range=(np.float32(lo), np.float32(hi)))[0].astype(np.int64)


def otsu_of_blocks(values: Sequence[np.ndarray]) -> float:
    """Otsu's threshold over blocks of index values held here (tests, small scenes)."""
    ranges = [_range(v) for v in values]
    lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
    if not np.isfinite(lo):
        raise ValueError("no valid index value")
    if lo == hi:
        return lo
    return otsu_from_histogram(sum(_hist(v, lo, hi) for v in values), lo, hi)


def otsu_of_delayed(values, client=None) -> float:
    """Otsu's threshold over lazy blocks of index values: ranges first, then histograms over the common
    range; only those come back (``client``: a distributed client, else the current scheduler)."""
    import dask
    from dask import delayed

    def compute(obj):
        return client.gather(client.compute(obj)) if client is not None else dask.compute(obj)[0]

    rs = compute([delayed(_range, pure=True)(v) for v in values])
    lo, hi = min(r[0] for r in rs), max(r[1] for r in rs)
    if not np.isfinite(lo):  # no index value anywhere: no threshold, the map is nodata (as with a fixed one)
        return float("nan")
    if lo == hi:
        return float(lo)
    counts = compute(delayed(sum)([delayed(_hist, pure=True)(v, lo, hi) for v in values]))
    return otsu_from_histogram(counts, lo, hi)


def otsu_on_cluster(card: ModelCard, stack, plan, client=None) -> float:
    """Otsu's threshold of the card's index over every valid pixel of ``stack``, chunk by chunk.

    Each chunk's index is computed where it is read (on the workers with a client; dask's threaded
    scheduler without one); only ranges and histograms come back.
    """
    from dask import delayed

    from geoseg.io.sources import read_bands

    def index_of(box):
        data, bv = read_bands(stack, box.window)
        return index_values(card, data, bv)

    values = [delayed(index_of, pure=True)(ch.core) for ch in plan]
    return otsu_of_delayed(values, client)


def otsu_of_array(card: ModelCard, data, nodata, client=None) -> float:
    """The same over a dask array ``(bands, y, x)`` from anywhere (one block per chunk of the array)."""
    from dask import delayed

    from geoseg.graph import band_masks

    def index_of(block):
        return index_values(card, block, band_masks(block, nodata))

    data = data.rechunk({0: -1})
    values = [delayed(index_of, pure=True)(b) for b in data.to_delayed().ravel()]
    return otsu_of_delayed(values, client)
