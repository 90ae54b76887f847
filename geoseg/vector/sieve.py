"""The sieve (``--min-area``, ``--mmu``): regions smaller than a limit take the class of the neighbouring
regions at or above the limit that they share the most pixel edges with; a small region whose neighbours are
all small keeps its class (they take their large neighbours' classes, and often its own). One pass on the map
as given.

Small neighbours do not vote: a speck voted by its edges to neighbours that changed class themselves, and a
map with 20% speckle kept 314 of its 366 regions under a 5 px limit (now 3 of 55; GDAL's sieve, which merges
into the largest neighbour again and again, keeps none; 5% speckle: none here either): benchmarks/sieve_speckle.py.

``sieve`` sieves one window. A region smaller than the limit L reaches at most L - 1 px out of the core,
and a neighbour of it that reaches the window's side spans at least L px (large, as in the whole map), so a
chunk that sieves a window grown by 2 L - 1 px judges its core's regions as the whole map would: fine for
small limits, but half a hectare of 0.25 m pixels is 80 000 pixels, and every task would read the whole
scene. Beyond ``VectorizeOptions.sieve_window_max`` vectorize joins the sieve instead, as it joins the
polygons:

1. each chunk labels its regions and counts, for those that touch its border, their size and their
   pixel edges to each other class (over a one-pixel ring of its neighbours' pixels);
2. the client joins border regions across chunks (``join_borders``), adds their sizes and edges,
   and decides each small joined region's class;
3. each chunk then sieves its core: its inner regions as it can decide alone, its border regions
   as the client decided.

The joined result equals ``sieve`` of the whole map (tested). Pure kernels; the tasks are in
``geoseg.vector.run``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from geoseg.tiling import Box
from geoseg.vector.regions import Edges, Join, LabelClasses, label_regions

AREA_QUANTUM = 2.0**-16  # m²: ground areas summed on this grid are exact in float64, so any order gives the same sum


def window_ring(limit_px: int) -> int:
    """Pixels of class map a sieve in a window needs around its core to equal the whole map's, for a limit of L px: a
    small region reaches up to L - 1 px out of the core, and a neighbour of it that reaches the window's side then
    spans at least L px, large as in the whole map: 2 L - 1."""
    return 2 * limit_px - 1 if limit_px > 1 else 0


def class_limits(min_pixels: float, class_min: dict[int, int] | None = None) -> np.ndarray:
    """The limit of each class id (256): ``min_pixels``, or the class's own minimum mapping unit."""
    limits = np.full(256, min_pixels, np.float64)
    for c, v in (class_min or {}).items():
        limits[int(c)] = v
    return limits


def _below(sizes: np.ndarray, classes: np.ndarray, limit: float | np.ndarray) -> np.ndarray:
    """Which regions are small: ``limit`` is one for all, or one per class id (``class_limits``)."""
    lim = np.asarray(limit, np.float64)
    return sizes < (lim if lim.ndim == 0 else lim[np.asarray(classes, np.intp)])


def ground_weights(row_area: np.ndarray) -> np.ndarray:
    """Row areas on the AREA_QUANTUM grid: a region's area is then the same summed pixel by pixel over the whole
    map or chunk by chunk (float sums in another order differ in the last bit, and a limit may sit right there)."""
    return np.round(np.asarray(row_area, np.float64) / AREA_QUANTUM) * AREA_QUANTUM


RING_SIDES = ("top", "bottom", "left", "right")


@dataclass(frozen=True)
class Regions:
    """A core's regions: labels (0 = nodata), the class of each label, each label's size (pixels or ground
    area) and its pixel edges to other classes as (label, class, count, neighbour) rows: the neighbour is the
    label of the core region across the edges, or for a pixel of the ring around the core -(1 + side << 32 | pos)
    (``ring_code``: side 0-3 top, bottom, left, right; pos along it, from the core's first row or column)."""

    labels: np.ndarray
    classes: np.ndarray
    sizes: np.ndarray
    votes: np.ndarray  # (n, 4) int64


def ring_code(side: np.ndarray | int, pos: np.ndarray | int) -> np.ndarray:
    return -(1 + ((np.asarray(side, np.int64) << 32) | np.asarray(pos, np.int64)))


def ring_side_pos(code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c = -np.asarray(code, np.int64) - 1
    return c >> 32, c & 0xFFFFFFFF


def core_regions(window: np.ndarray, core: Box, window_box: Box, nodata: int | None, connectivity: int,
                 row_area: np.ndarray | None = None) -> Regions:
    """The regions of ``core`` (read as part of ``window``: its pixels and a ring of up to one pixel, or none), with
    the edges of its pixels to every valid pixel of another class around them, in the core or in the ring."""
    ys, xs = core.relative_to(window_box)
    values = window[ys, xs]
    labels, classes = label_regions(values, nodata, connectivity)
    n = len(classes)
    if row_area is None:
        sizes = np.bincount(labels.ravel(), minlength=n).astype(np.float64)
    else:
        weights = np.broadcast_to(ground_weights(row_area)[:, None], labels.shape)
        sizes = np.bincount(labels.ravel(), weights=weights.ravel(), minlength=n)
    inner = []
    # pairs of 4-adjacent core pixels of different regions (labels differ where values do), both ways
    for a, b in (((slice(None), slice(None, -1)), (slice(None), slice(1, None))),
                 ((slice(None), slice(1, None)), (slice(None), slice(None, -1))),
                 ((slice(None, -1), slice(None)), (slice(1, None), slice(None))),
                 ((slice(1, None), slice(None)), (slice(None, -1), slice(None)))):
        la, lb = labels[a], labels[b]
        m = (la > 0) & (lb > 0) & (values[a] != values[b])
        inner.append((la[m].astype(np.int64), lb[m].astype(np.int64)))
    n = max(len(classes), 1)
    codes, counts = np.unique(np.concatenate([p[0] for p in inner]) * n + np.concatenate([p[1] for p in inner]),
                              return_counts=True)
    lab, nbr = codes // n, codes % n
    rows = [np.stack([lab, classes[nbr], counts, nbr], axis=1)]
    # the ring: each side's line of the window just outside the core, against the core's line along it
    for side, (edge, outside) in enumerate(((ys.start, ys.start - 1), (ys.stop - 1, ys.stop),
                                            (xs.start, xs.start - 1), (xs.stop - 1, xs.stop))):
        if not 0 <= outside < window.shape[0 if side < 2 else 1]:
            continue  # no ring on this side (the scene's edge, or a window that is the core)
        if side < 2:
            la, va, vb = labels[edge - ys.start], window[edge, xs], window[outside, xs]
        else:
            la, va, vb = labels[:, edge - xs.start], window[ys, edge], window[ys, outside]
        m = (la > 0) & (vb != va)
        if nodata is not None:
            m &= vb != nodata
        pos = np.flatnonzero(m)
        rows.append(np.stack([la[m].astype(np.int64), vb[m].astype(np.int64), np.ones(len(pos), np.int64),
                              ring_code(side, pos)], axis=1))
    return Regions(labels, classes, sizes, np.concatenate(rows).astype(np.int64))


def decide(small: np.ndarray, votes: np.ndarray, large: np.ndarray | None = None) -> np.ndarray:
    """The class each region takes (-1: it stays): a ``small`` one takes the class it shares the most pixel edges
    with (ties: the lowest class id), among the rows whose neighbour is ``large`` (one flag per row) where flags
    are given; one with no such neighbour stays. Memory in proportion to the vote rows."""
    out = np.full(len(small), -1, np.int64)
    pick = small[votes[:, 0]]
    rows = votes[pick]
    if not len(rows):
        return out
    if large is not None:
        rows = rows[np.asarray(large, bool)[pick]]
        if not len(rows):
            return out
    codes, at = np.unique((rows[:, 0] << 8) | rows[:, 1], return_inverse=True)
    counts = np.bincount(at, weights=rows[:, 2]).astype(np.int64)
    region, cls = codes >> 8, codes & 0xFF
    order = np.lexsort((cls, -counts, region))
    region, cls = region[order], cls[order]
    first = np.ones(len(region), bool)
    first[1:] = region[1:] != region[:-1]
    out[region[first]] = cls[first]
    return out


def _apply(values: np.ndarray, regions: Regions, new: np.ndarray) -> np.ndarray:
    change = new >= 0
    if not change.any():
        return values
    lut = np.where(change, new, regions.classes).astype(values.dtype)
    out = values.copy()
    pix = regions.labels > 0
    out[pix] = lut[regions.labels[pix]]
    return out


def sieve(values: np.ndarray, nodata: int | None, min_pixels: int, connectivity: int = 4,
          open_edges: tuple[bool, bool, bool, bool] = (False, False, False, False),
          class_min: dict[int, int] | None = None, row_area: np.ndarray | None = None,
          min_area: float = 0.0) -> np.ndarray:
    """Regions of fewer than ``min_pixels`` pixels take the class of the neighbouring regions at or above it they
    share the most pixel edges with; one whose neighbours are all small stays.

    One pass on the map as given (every small region decides from the original map, so the
    result does not depend on any order); nodata is never sieved nor given; a small region with
    no valid neighbour stays. ``open_edges`` (top, bottom, left, right): edges of a window that
    the scene continues beyond; regions touching them are not judged here, and count as large. A
    window grown by 2 ``min_pixels`` - 1 on those sides judges every small region of its core exactly
    as the whole map would, so sieving chunk by chunk equals sieving the whole scene. ``class_min``: a
    minimum per class id (a minimum mapping unit per class) in place of ``min_pixels`` for those classes
    (the window grown by the largest). ``row_area``: each row's pixel area on the ground; regions then
    are small below ``min_area`` of it (L: that area over the scene's smallest pixel, in pixels).
    """
    limits = class_limits(min_pixels, class_min)
    if row_area is not None:
        limits[:] = min_area
    elif limits.max() <= 1:
        return values
    whole = Box(0, values.shape[0], 0, values.shape[1])
    regions = core_regions(values, whole, whole, nodata, connectivity, row_area)
    small = _below(regions.sizes, regions.classes, limits)
    small[0] = False  # nodata
    e = Edges.of(regions.labels)
    for edge, is_open in zip((e.top, e.bottom, e.left, e.right), open_edges):
        if is_open:
            # not judged here; and a neighbour of a small core region that reaches a side the window was grown
            # by 2 L - 1 on spans L px: large, as in the whole map
            small[edge] = False
    votes = regions.votes[regions.votes[:, 3] > 0]  # the window is the core: no ring row
    return _apply(values, regions, decide(small, votes, ~small[votes[:, 3]]))


def border_labels(labels: np.ndarray, facing: tuple[bool, bool, bool, bool]) -> np.ndarray:
    """Labels on the core's sides that face another chunk (top, bottom, left, right)."""
    e = Edges.of(labels)
    sides = [s for s, inner in zip((e.top, e.bottom, e.left, e.right), facing) if inner]
    found = np.unique(np.concatenate(sides)) if sides else np.zeros(0, labels.dtype)
    return found[found > 0].astype(np.int64)


# what a border candidate's vote row says of the neighbour across its edges (the votes' 5th column)
SMALL, LARGE, BORDER, RING = 0, 1, 2, 3


def border_facts(regions: Regions, facing: tuple[bool, bool, bool, bool], limit: float | np.ndarray) -> dict:
    """What the client needs of a chunk to sieve across chunks: its edges and their labels' classes (to join
    regions), its border labels with their sizes and classes, and the edges to other classes of those small
    enough here to be small joined, each with what its neighbour is: a region of the core wholly here (SMALL or
    LARGE), a border region (BORDER: joined by the client) or a pixel of the ring (RING: the neighbouring
    chunk's region there). ``limit``: one, or one per class id (``class_limits``)."""
    border = border_labels(regions.labels, facing)
    classes = regions.classes[border]
    candidates = border[_below(regions.sizes[border], classes, limit)]
    edges = Edges.of(regions.labels)
    votes = regions.votes[np.isin(regions.votes[:, 0], candidates)]
    nbr = votes[:, 3]
    state = np.full(len(votes), RING, np.int64)
    in_core = nbr > 0
    small_here = _below(regions.sizes, regions.classes, limit)
    state[in_core] = np.where(small_here[nbr[in_core]], SMALL, LARGE)
    state[in_core & np.isin(nbr, border)] = BORDER
    return {"edges": edges, "classes": LabelClasses.of(regions.classes, edges.labels()), "labels": border,
            "sizes": regions.sizes[border], "label_classes": classes, "votes": np.column_stack([votes, state])}


def joined_decisions(join: Join, facts: dict[int, dict], limit: float | np.ndarray, n_cols: int
                     ) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Each chunk's border labels that change class, and to which, and its border labels whose joined region is
    small (its inner regions' neighbours): ``facts[chunk]`` is its ``border_facts``, chunk = row * ``n_cols`` +
    column; joined regions add their sizes and edges up."""
    n_regions = int(join.region.max()) + 1 if len(join.region) else 0
    size = np.zeros(n_regions, np.float64)
    region_class = np.zeros(n_regions, np.intp)
    region_of = {}
    for c, f in facts.items():
        rid = join.region_of(c, f["labels"])
        region_of[c] = rid
        np.add.at(size, rid, f["sizes"])
        region_class[rid] = f["label_classes"]
    small = _below(size, region_class, limit)
    # the chunk across each side (top, bottom, left, right) and the edge of it that faces this one
    step = {0: (-n_cols, "bottom"), 1: (n_cols, "top"), 2: (-1, "right"), 3: (1, "left")}
    rows, large = [], []
    for c, f in facts.items():
        votes = f["votes"]
        if not len(votes):
            continue
        rows.append(np.stack([region_of[c][np.searchsorted(f["labels"], votes[:, 0])], votes[:, 1], votes[:, 2]], axis=1))
        state, nbr = votes[:, 4], votes[:, 3]
        big = state == LARGE
        at = state == BORDER
        big[at] = ~small[region_of[c][np.searchsorted(f["labels"], nbr[at])]]
        ring = np.flatnonzero(state == RING)
        sides, positions = ring_side_pos(nbr[ring])
        for side, (delta, facing_edge) in step.items():
            at_side = sides == side
            if at_side.any():
                d = c + delta
                there = getattr(facts[d]["edges"], facing_edge)[positions[at_side]]
                big[ring[at_side]] = ~small[region_of[d][np.searchsorted(facts[d]["labels"], there)]]
        large.append(big)
    new = decide(small, np.concatenate(rows) if rows else np.zeros((0, 3), np.int64),
                 np.concatenate(large) if large else np.zeros(0, bool))
    out = {}
    for c, f in facts.items():
        cls = new[region_of[c]]
        changed = cls >= 0
        out[c] = (f["labels"][changed], cls[changed], f["labels"][small[region_of[c]]])
    return out


def sieve_core(regions: Regions, facing: tuple[bool, bool, bool, bool], limit: float | np.ndarray, values: np.ndarray,
               decided: tuple[np.ndarray, ...]) -> np.ndarray:
    """The core's class map sieved: inner regions decided here, border regions as ``decided`` (labels, classes,
    and the border labels whose joined region is small: inner regions prefer their other neighbours). Only
    border regions' votes reach outside the core: ``regions`` may be those of the core alone."""
    labels, classes = decided[0], decided[1]
    small = _below(regions.sizes, regions.classes, limit)
    small[0] = False
    border = border_labels(regions.labels, facing)
    small[border] = False
    small_nbr = small.copy()  # inner regions' neighbours: small here, or border regions small joined
    if len(decided) > 2:
        small_nbr[np.asarray(decided[2], np.int64)] = True
    votes = regions.votes[regions.votes[:, 3] > 0] if len(regions.votes) else regions.votes  # inner regions see no ring
    new = decide(small, votes, ~small_nbr[votes[:, 3]])
    new[np.asarray(labels, np.int64)] = classes
    return _apply(values, regions, new)
