"""Pixels for the per-pixel methods: features of whole blocks (read with their texture context),
sampled in the training and validation blocks of the same spatial split the networks use."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from geoseg.io.sources import RasterStack, read_bands
from geoseg.methods.features import band_units, feature_radius, feature_stack, nan_bands
from geoseg.model.card import NODATA_CLASS
from geoseg.tiling import Box


def window_features(
    stack: RasterStack, box: Box, roles: Sequence[str | None], features: Sequence[str], scale: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Features ``(F, h, w)`` of ``box`` (computed with their context around it) and its any-band valid mask."""
    x, bv, sl = _window(stack, box, features)
    return feature_stack(x, roles, features, scale, band_units(stack.bands))[(slice(None), *sl)], bv.any(axis=0)[sl]


def _window(stack: RasterStack, box: Box, features: Sequence[str]) -> tuple[np.ndarray, np.ndarray, tuple[slice, slice]]:
    """``box`` grown by the features' reach, read: its bands (NaN where missing), their valid masks, and where
    ``box`` lies in it."""
    outer = box.grow(feature_radius(features), stack.shape)
    data, bv = read_bands(stack, outer.window)
    return nan_bands(data, bv), bv, box.relative_to(outer)


def sample_blocks(
    stack: RasterStack,
    boxes: Sequence[Box],
    roles: Sequence[str | None],
    features: Sequence[str],
    scale: Sequence[float],
    targets,  # callable box -> (h, w) uint8 class index (255 = none), or None: every valid pixel
    max_pixels: int,
    rng: np.random.Generator,
    band_dropout: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """``X`` (n, F) float32 and ``y`` (n,) uint8 over the boxes; at most ``max_pixels`` pixels (and
    ``band_dropout`` times that more), drawn uniformly (seeded) when there are more. ``band_dropout``: the
    share of pixels also given once more with one band missing (drawn at random per box, the box's
    features made again without it), so that a classifier learns where a pixel with that band missing
    goes (a band can be missing alone: a sensor's stripes, one band file's smaller footprint)."""
    xs, ys = [], []
    total = sum(b.size for b in boxes)
    keep = min(1.0, max_pixels / max(1, total))

    def take(f: np.ndarray, valid: np.ndarray, y: np.ndarray, share: float = 1.0) -> None:
        m = valid & (y != NODATA_CLASS)
        if keep * share < 1.0:
            m &= rng.random(m.shape) < keep * share
        if m.any():
            xs.append(f[:, m].T)
            ys.append(y[m])

    units = band_units(stack.bands)
    for box in boxes:
        x, bv, sl = _window(stack, box, features)
        y = targets(box) if targets is not None else np.zeros(box.shape, np.uint8)
        take(feature_stack(x, roles, features, scale, units)[(slice(None), *sl)], bv.any(axis=0)[sl], y)
        if band_dropout > 0 and stack.count > 1:  # the same read, one band taken away
            drop = int(rng.integers(stack.count))
            x[drop] = np.nan
            bv[drop] = False
            take(feature_stack(x, roles, features, scale, units)[(slice(None), *sl)], bv.any(axis=0)[sl], y, band_dropout)
    if not xs:
        return np.zeros((0, len(features)), np.float32), np.zeros(0, np.uint8)
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys)
