"""``--min-area`` over the whole scene with tasks the size of a chunk, whatever the area.

A region smaller than the area can span as many pixels as the area holds, so a chunk that sieves
a window grown by that many pixels judges it as the whole map would: fine for small areas, but
half a hectare of 0.25 m pixels is 80 000 pixels, and every task would read the whole scene.
Beyond ``VectorizeOptions.sieve_window_max`` the sieve is joined instead, as the polygons are:

1. each chunk labels its regions and counts, for those that touch its border, their size and their
   pixel edges to each other class (over a one-pixel ring of its neighbours' pixels);
2. the client joins border regions across chunks (``join_borders``), adds their sizes and edges,
   and decides each small joined region's class;
3. each chunk then sieves its core: its inner regions as it can decide alone, its border regions
   as the client decided.

The result equals ``regions.sieve`` of the whole map (tested). Pure kernels here; the tasks are in
``geoseg.vector.run``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from geoseg.tiling import Box
from geoseg.vector.regions import Edges, Join, ground_weights, label_regions, winners


@dataclass(frozen=True)
class Regions:
    """A chunk core's regions: labels (0 = nodata), the class of each label, each label's size (pixels or
    ground area) and its pixel edges to other classes as (label, class, count) rows."""

    labels: np.ndarray
    classes: np.ndarray
    sizes: np.ndarray
    votes: np.ndarray  # (n, 3) int64


def core_regions(window: np.ndarray, core: Box, window_box: Box, nodata: int | None, connectivity: int,
                 row_area: np.ndarray | None = None) -> Regions:
    """The regions of ``core`` (read as part of ``window``, its pixels plus a ring of up to one pixel), with the
    edges of its pixels to every valid pixel of another class around them, in the core or in the ring."""
    ys, xs = core.relative_to(window_box)
    values = window[ys, xs]
    labels, classes = label_regions(values, nodata, connectivity)
    n = len(classes)
    if row_area is None:
        sizes = np.bincount(labels.ravel(), minlength=n).astype(np.float64)
    else:
        weights = np.broadcast_to(ground_weights(row_area)[:, None], labels.shape)
        sizes = np.bincount(labels.ravel(), weights=weights.ravel(), minlength=n)
    full = np.zeros(window.shape, np.int64)  # the core's labels on the window (0 in the ring)
    full[ys, xs] = labels
    valid = np.ones(window.shape, bool) if nodata is None else window != nodata
    rows = []
    for a, b in (((slice(None), slice(None, -1)), (slice(None), slice(1, None))),
                 ((slice(None), slice(1, None)), (slice(None), slice(None, -1))),
                 ((slice(None, -1), slice(None)), (slice(1, None), slice(None))),
                 ((slice(1, None), slice(None)), (slice(None, -1), slice(None)))):
        la, va, vb, ok = full[a], window[a], window[b], valid[b]
        m = (la > 0) & ok & (vb != va)
        rows.append((la[m] << 8) | vb[m].astype(np.int64))
    codes, counts = np.unique(np.concatenate(rows), return_counts=True) if rows else (np.zeros(0, np.int64),) * 2
    votes = np.stack([codes >> 8, codes & 0xFF, counts], axis=1).astype(np.int64)
    return Regions(labels, classes, sizes, votes)


def decide(sizes: np.ndarray, votes: np.ndarray, limit: float, n: int) -> np.ndarray:
    """The class each of ``n`` regions takes (-1: it stays): those smaller than ``limit`` take the class they share
    the most pixel edges with (ties: the lowest class id); a small region with no valid neighbour stays."""
    out = np.full(n, -1, np.int64)
    small = sizes < limit
    small[0] = False  # nodata
    if not small.any() or not len(votes):
        return out
    regions, classes = winners(votes[small[votes[:, 0]]])
    out[regions] = classes
    return out


def border_labels(labels: np.ndarray, facing: tuple[bool, bool, bool, bool]) -> np.ndarray:
    """Labels on the core's sides that face another chunk (top, bottom, left, right)."""
    e = Edges.of(labels)
    sides = [s for s, inner in zip((e.top, e.bottom, e.left, e.right), facing) if inner]
    found = np.unique(np.concatenate(sides)) if sides else np.zeros(0, labels.dtype)
    return found[found > 0].astype(np.int64)


def joined_decisions(join: Join, facts: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]], limit: float
                     ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Each chunk's border labels that change class, and to which: ``facts[chunk]`` holds its border labels, their
    sizes and their vote rows; joined regions add theirs up."""
    n_regions = int(join.region.max()) + 1 if len(join.region) else 0
    size = np.zeros(n_regions, np.float64)
    region_of = {}
    for c, (labels, sizes, _) in facts.items():
        rid = join.region_of(c, labels)
        region_of[c] = rid
        np.add.at(size, rid, sizes)
    rows = []
    for c, (labels, _, votes) in facts.items():
        if len(votes):
            rid = region_of[c][np.searchsorted(labels, votes[:, 0])]
            keep = size[rid] < limit
            rows.append(np.stack([rid[keep], votes[keep, 1], votes[keep, 2]], axis=1))
    votes = np.concatenate(rows) if rows else np.zeros((0, 3), np.int64)
    # region numbers start at 0; decide() keeps 0 for nodata: shift by one
    new = decide(np.concatenate([[np.inf], size]), votes + np.array([1, 0, 0]), limit, n_regions + 1)[1:]
    out = {}
    for c, (labels, _, _) in facts.items():
        cls = new[region_of[c]]
        changed = cls >= 0
        out[c] = (labels[changed], cls[changed])
    return out


def sieve_core(regions: Regions, facing: tuple[bool, bool, bool, bool], limit: float, values: np.ndarray,
               decided: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The core's class map sieved: inner regions decided here, border regions as ``decided`` (labels, classes)."""
    n = len(regions.classes)
    new = decide(regions.sizes, regions.votes, limit, n)
    new[border_labels(regions.labels, facing)] = -1
    labels, classes = decided
    new[np.asarray(labels, np.int64)] = classes
    change = new >= 0
    if not change.any():
        return values
    lut = np.where(change, new, regions.classes).astype(values.dtype)
    out = values.copy()
    pix = regions.labels > 0
    out[pix] = lut[regions.labels[pix]]
    return out
