"""Connected regions of a class map, chunk by chunk, and the join of regions across chunk borders.

Pure kernels on arrays: no files, no cluster. A region is a maximal set of pixels of one class
connected through edges (4-connectivity, GDAL's default) or edges and corners (8). Each chunk
labels its own regions 1..n; regions that touch an interior chunk border are joined with the
regions across it by a union-find over the border pixels only, so the join needs memory in
proportion to the chunk borders, never to the scene.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

STRUCTURE = {4: ndimage.generate_binary_structure(2, 1), 8: ndimage.generate_binary_structure(2, 2)}


def check_connectivity(connectivity: int) -> int:
    if connectivity not in (4, 8):
        from geoseg.errors import ConfigError

        raise ConfigError(f"connectivity must be 4 or 8, not {connectivity}")
    return connectivity


def label_regions(values: np.ndarray, nodata: int | None, connectivity: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Labels (int32, 0 = nodata) of the connected same-value regions of ``values`` and each label's value.

    ``classes[k]`` is the value of label ``k`` (``classes[0]`` is meaningless).

    A class map (uint8, nodata 255: geoseg's) is labelled in one pass over all its classes by cc3d
    (connected-components-3d): 0.09 s for a 4096 px chunk of six classes, against 0.4-0.55 s for one
    ``ndimage.label`` per class (the way any other map goes). Labels then follow the raster order of
    the regions' first pixels, not the classes.
    """
    if values.dtype == np.uint8 and nodata == 255 and values.ndim == 2 and values.size:
        import cc3d

        # 255 + 1 wraps to 0, cc3d's background; the classes 0-254 become 1-255
        lab = cc3d.connected_components(np.ascontiguousarray(values) + np.uint8(1), connectivity=connectivity,
                                        out_dtype=np.uint32)
        labels = lab.view(np.int32)  # fewer labels than pixels: 2**31 is never reached
        classes = np.zeros(int(labels.max()) + 1 if labels.size else 1, np.int64)
        classes[labels.ravel()] = values.ravel()
        classes[0] = 0
        return labels, classes
    labels = np.zeros(values.shape, np.int32)
    classes = [0]
    # the values present: a byte map's by counting (np.unique sorts the whole chunk)
    present = np.flatnonzero(np.bincount(values.ravel(), minlength=256)) if values.dtype == np.uint8 else np.unique(values)
    lab = np.empty(values.shape, np.int32)  # one value's labels, reused
    n = 0
    for v in present:
        if nodata is not None and v == nodata:
            continue
        mask = values == v
        k = ndimage.label(mask, structure=STRUCTURE[connectivity], output=lab)
        if k:
            # regions of different values never overlap: this value's labels, offset, go where it is
            np.add(lab, n, out=labels, where=mask)
            classes.extend([int(v)] * k)
            n += k
    return labels, np.asarray(classes, np.int64)


@dataclass(frozen=True)
class LabelClasses:
    """The classes of some labels, looked up like an array indexed by label: what the client needs of a chunk's
    border labels without a table of all its regions (one per pixel on a speckled map)."""

    labels: np.ndarray  # sorted
    values: np.ndarray

    @classmethod
    def of(cls, classes: np.ndarray, labels: np.ndarray) -> "LabelClasses":
        labels = np.unique(labels)
        return cls(labels, np.asarray(classes)[labels].astype(np.uint8))

    def __getitem__(self, labels: np.ndarray) -> np.ndarray:
        return self.values[np.searchsorted(self.labels, labels)]


@dataclass(frozen=True)
class Edges:
    """A chunk's outermost rows and columns of labels (0 = nodata), as its neighbours see them."""

    top: np.ndarray
    bottom: np.ndarray
    left: np.ndarray
    right: np.ndarray

    @classmethod
    def of(cls, labels: np.ndarray) -> "Edges":
        return cls(labels[0].copy(), labels[-1].copy(), labels[:, 0].copy(), labels[:, -1].copy())

    def labels(self) -> np.ndarray:
        return np.unique(np.concatenate([self.top, self.bottom, self.left, self.right]))


def _pairs(a: np.ndarray, b: np.ndarray, connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    """Label pairs of two facing pixel lines (``a`` on one side of a border, ``b`` on the other)
    that touch: same position, and with 8-connectivity the diagonal neighbours too. Nodata (0)
    never joins; the caller keeps only pairs of the same class."""
    out_a, out_b = [a], [b]
    if connectivity == 8:
        out_a += [a[1:], a[:-1]]
        out_b += [b[:-1], b[1:]]
    pa, pb = np.concatenate(out_a), np.concatenate(out_b)
    keep = (pa > 0) & (pb > 0)
    return pa[keep], pb[keep]


@dataclass(frozen=True)
class Join:
    """Regions that cross chunk borders: each border label's region, and what the region holds."""

    keys: np.ndarray  # (n,) int64 chunk index << 32 | label, sorted
    region: np.ndarray  # (n,) int64 region number of each key

    def region_of(self, chunk: int, labels: np.ndarray) -> np.ndarray:
        codes = (np.int64(chunk) << 32) | labels.astype(np.int64)
        return self.region[np.searchsorted(self.keys, codes)]


def join_borders(grid_shape: tuple[int, int], edges: dict[tuple[int, int], Edges],
                 classes: dict[tuple[int, int], np.ndarray], connectivity: int = 4) -> Join:
    """Union-find over the chunk borders: which border labels of which chunks are one region.

    ``edges[(iy, ix)]`` is each chunk's Edges, ``classes[(iy, ix)]`` the class of each of its
    labels (indexed by label). Every border label gets a region, joined or alone.
    """
    ny, nx = grid_shape

    def code(iy: int, ix: int, labels: np.ndarray) -> np.ndarray:
        return (np.int64(iy * nx + ix) << 32) | labels.astype(np.int64)

    a_codes, b_codes = [], []

    def link(c1: tuple[int, int], l1: np.ndarray, c2: tuple[int, int], l2: np.ndarray) -> None:
        pa, pb = _pairs(l1, l2, connectivity) if len(l1) else (l1, l2)
        if not len(pa):
            return
        same = classes[c1][pa] == classes[c2][pb]
        a_codes.append(code(*c1, pa[same]))
        b_codes.append(code(*c2, pb[same]))

    for (iy, ix), e in edges.items():
        if ix + 1 < nx:
            link((iy, ix), e.right, (iy, ix + 1), edges[(iy, ix + 1)].left)
        if iy + 1 < ny:
            link((iy, ix), e.bottom, (iy + 1, ix), edges[(iy + 1, ix)].top)
        if connectivity == 8 and iy + 1 < ny:
            # corners: a chunk's bottom-right pixel touches the bottom-right neighbour's top-left one
            if ix + 1 < nx:
                link((iy, ix), e.bottom[-1:], (iy + 1, ix + 1), edges[(iy + 1, ix + 1)].top[:1])
            if ix > 0:
                link((iy, ix), e.bottom[:1], (iy + 1, ix - 1), edges[(iy + 1, ix - 1)].top[-1:])
    everyone = [code(iy, ix, e.labels()[e.labels() > 0]) for (iy, ix), e in edges.items()]
    keys = np.unique(np.concatenate(everyone)) if everyone else np.zeros(0, np.int64)
    if a_codes:
        a, b = np.concatenate(a_codes), np.concatenate(b_codes)
        ia, ib = np.searchsorted(keys, a), np.searchsorted(keys, b)
        graph = coo_matrix((np.ones(len(ia), np.int8), (ia, ib)), shape=(len(keys), len(keys)))
        _, region = connected_components(graph, directed=False)
    else:
        region = np.arange(len(keys))
    return Join(keys, region.astype(np.int64))
