"""Post-processing of a class map, halo-aware: a window grown by the card's ``postprocess.ring``
gives its core exactly what the whole map would, so chunks stay seamless.

Majority (mode) filter over a (2r+1)² window, then a sieve with a minimum mapping unit (one for
all classes, or one per class): regions below it take the class of the neighbouring regions at or above it
they share the longest border with (geoseg.vector.sieve).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from geoseg.model.card import NODATA_CLASS, PostProcess
from geoseg.vector.sieve import sieve


def majority(class_map: np.ndarray, radius: int, nodata: int = NODATA_CLASS) -> np.ndarray:
    """Each valid pixel takes the most frequent class of its (2r+1)² window (nodata does not vote;
    ties keep the pixel's own class, then the lowest id). Nodata stays nodata."""
    if radius <= 0:
        return class_map
    size = 2 * radius + 1
    present = [int(c) for c in np.unique(class_map) if c != nodata]
    if len(present) < 2:
        return class_map
    best = np.full(class_map.shape, -1.0, np.float32)
    out = class_map.copy()
    for c in present:
        own = class_map == c
        # counts as integers: uniform_filter of a 0/1 image times the window area, rounded
        votes = np.rint(ndimage.uniform_filter(own.astype(np.float32), size, mode="constant") * size * size)
        votes = votes + 0.5 * own  # a tie keeps the pixel's own class
        better = votes > best
        out[better] = c
        best[better] = votes[better]
    out[class_map == nodata] = nodata
    return out


def apply(class_map: np.ndarray, pp: PostProcess, open_edges: tuple[bool, bool, bool, bool]) -> np.ndarray:
    """Post-process a window of the class map; ``open_edges`` (top, bottom, left, right): sides where the
    scene continues beyond the window (only the core, ``pp.ring`` inside them, is exact)."""
    out = majority(class_map, pp.majority_radius)
    if pp.sieve_pixels > 1:
        out = sieve(out, NODATA_CLASS, pp.min_pixels, pp.connectivity, open_edges, pp.class_min_pixels)
    return out
