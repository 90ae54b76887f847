"""Training data: one windowed survey of imagery and labels, the spatial block split, the
normalisation statistics and the chips sampled from them.

The region used for training is the labels' extent within the scene, window or bbox; it is cut
into square blocks; every block goes to the training or the validation split as a
whole, and a training chip lies entirely in training blocks, so no chip of one split overlaps the
other. Everything is computed window by window: no array of the whole scene is ever held in
float64, the imagery of a window without labels is not read, and the region is kept in memory only
if it is small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from odc.geo.geobox import GeoBox

from geoseg.errors import ConfigError, InputError
from geoseg.infer import normalize
from geoseg.io.sources import RasterStack, read_window
from geoseg.methods.features import band_units
from geoseg.model.card import NODATA_CLASS, ClassInfo, Normalization
from geoseg.tiling import Box
from geoseg.training.labels import LabelSource, VectorLabels, read_labels
from geoseg.training.metrics import ID_SPACE

CELL = 8  # chips start on this lattice; labelled pixels are counted per CELL x CELL cell
SURVEY_WINDOW = 1024  # pixels per side read at once by the survey (rounded to whole blocks)
DEFAULT_CACHE_BYTES = 2 * 2**30


def bbox_pixels(grid: GeoBox, bbox: Sequence[float]) -> Box:
    """The pixel box of ``bbox`` (xmin, ymin, xmax, ymax in the grid's CRS), snapped outward to whole pixels
    (not cut to the scene); the tolerance keeps a bbox on pixel edges from growing by one."""
    xmin, ymin, xmax, ymax = (float(v) for v in bbox)
    cols, rows = zip(*(~grid.affine @ (x, y) for x in (xmin, xmax) for y in (ymin, ymax)))
    return Box(math.floor(min(rows) + 1e-6), math.ceil(max(rows) - 1e-6), math.floor(min(cols) + 1e-6),
               math.ceil(max(cols) - 1e-6))


def bounds_box(grid: GeoBox, bounds: Sequence[float], region: Box) -> Box | None:
    """The pixel box of ``region`` that every pixel whose centre lies within features' ``bounds`` (xmin, ymin,
    xmax, ymax in the grid's CRS) falls in, a pixel to spare (None: none in the region)."""
    box = bbox_pixels(grid, bounds)
    return Box(box.y0 - 1, box.y1 + 1, box.x0 - 1, box.x1 + 1).intersect(region)


def region_box(
    grid: GeoBox, bbox: Sequence[float] | None = None, window: Sequence[int] | None = None
) -> Box | None:
    """The pixel box of a ``bbox`` (xmin, ymin, xmax, ymax in the grid's CRS; snapped outward to
    whole pixels) or a ``window`` (col_off, row_off, width, height), cut to the scene; None for both None."""
    h, w = (int(v) for v in grid.shape)
    if bbox is not None and window is not None:
        raise ConfigError("give either a bbox or a window, not both")
    if bbox is not None:
        xmin, ymin, xmax, ymax = (float(v) for v in bbox)
        if not (xmin < xmax and ymin < ymax):
            raise ConfigError(f"bbox {tuple(bbox)}: expected xmin ymin xmax ymax with xmin < xmax and ymin < ymax")
        b = bbox_pixels(grid, bbox)
        y0, y1, x0, x1 = b.y0, b.y1, b.x0, b.x1
        what = f"bbox {tuple(bbox)}"
    elif window is not None:
        x0, y0, ww, wh = (int(v) for v in window)
        if ww <= 0 or wh <= 0:
            raise ConfigError(f"window {tuple(window)}: width and height must be > 0 (col_off row_off width height)")
        x1, y1 = x0 + ww, y0 + wh
        what = f"window {tuple(window)}"
    else:
        return None
    box = Box(y0, y1, x0, x1).intersect(Box(0, h, 0, w))
    if box is None:
        raise ConfigError(f"{what} does not overlap the scene ({h} x {w} px); check the coordinates and the CRS")
    if box != Box(y0, y1, x0, x1):
        import warnings

        warnings.warn(f"{what} reaches past the scene ({h} x {w} px): using its part inside, columns {box.x0}-{box.x1} "
                      f"and rows {box.y0}-{box.y1}", UserWarning, stacklevel=3)
    return box


def labelled_extent(labels: LabelSource, region: Box) -> Box | None:
    """The smallest box of ``region`` that holds every labelled pixel (None: none there). Vector labels from
    their features' bounds (the whole region with a background class); a label raster read window by window."""
    if isinstance(labels, VectorLabels):
        if labels.background is not None:
            return region
        b = labels.bounds
        if not len(b):
            return None
        return bounds_box(labels.grid, (b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()), region)
    return scan_extent(lambda win: read_labels(labels, win) != NODATA_CLASS, region)[0]


def scan_extent(has: Callable[[Box], np.ndarray], region: Box, boxes: Sequence[Box] | None = None
                ) -> tuple[Box | None, list[bool]]:
    """The smallest box of ``region`` where ``has`` (a window's boolean mask) holds (None: nowhere), and which
    of ``boxes`` (parts of the region; default the region itself) held any: read window by window, never whole."""
    rows, cols = np.zeros(region.shape[0], bool), np.zeros(region.shape[1], bool)
    held = []
    for b in [region] if boxes is None else boxes:
        any_ = False
        for wy in range(b.y0, b.y1, SURVEY_WINDOW):
            for wx in range(b.x0, b.x1, SURVEY_WINDOW):
                win = Box(wy, min(b.y1, wy + SURVEY_WINDOW), wx, min(b.x1, wx + SURVEY_WINDOW))
                m = has(win)
                if m.any():
                    any_ = True
                    rows[win.y0 - region.y0 : win.y1 - region.y0] |= m.any(axis=1)
                    cols[win.x0 - region.x0 : win.x1 - region.x0] |= m.any(axis=0)
        held.append(any_)
    if not rows.any():
        return None, held
    (ys,), (xs,) = np.nonzero(rows), np.nonzero(cols)
    return Box(region.y0 + int(ys[0]), region.y0 + int(ys[-1]) + 1, region.x0 + int(xs[0]), region.x0 + int(xs[-1]) + 1), held


# -- survey ----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SceneCache:
    """The region's pixels in memory, filled by the survey when they fit in the budget."""

    data: np.ndarray  # (bands, h, w) float32, raw values
    valid: np.ndarray  # (h, w) image valid
    labels: np.ndarray  # (h, w) uint8 class ids, 255 = none


@dataclass(frozen=True, eq=False)
class Survey:
    """What one pass over the region's imagery and labels found, per block and per cell."""

    region: Box
    block_size: int
    class_counts: np.ndarray  # (nby, nbx, 256) labelled pixels per class id, on valid image pixels
    valid_pixels: np.ndarray  # (nby, nbx) valid image pixels
    band_mean: np.ndarray  # (nby, nbx, bands) float64 mean of valid pixels
    band_m2: np.ndarray  # (nby, nbx, bands) float64 sum of squared deviations
    cell_labelled: np.ndarray  # (ncy, ncx) labelled valid pixels per CELL x CELL cell
    cache: SceneCache | None

    @property
    def blocks_shape(self) -> tuple[int, int]:
        return self.valid_pixels.shape  # type: ignore[return-value]

    def block(self, by: int, bx: int) -> Box:
        r, b = self.region, self.block_size
        return Box(r.y0 + by * b, min(r.y1, r.y0 + (by + 1) * b), r.x0 + bx * b, min(r.x1, r.x0 + (bx + 1) * b))

    @property
    def id_counts(self) -> np.ndarray:
        """Labelled pixels per class id over the whole region (256,)."""
        return self.class_counts.sum(axis=(0, 1), dtype=np.int64)


def _moments(x: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """Count, mean and sum of squared deviations per band of ``x`` (bands, n), in float64."""
    n = x.shape[1]
    if n == 0:
        return 0, np.zeros(x.shape[0]), np.zeros(x.shape[0])
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=1)
    return n, mean, ((x64 - mean[:, None]) ** 2).sum(axis=1)


def _cell_sums(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    ph, pw = -h % CELL, -w % CELL
    m = np.pad(mask, ((0, ph), (0, pw))) if ph or pw else mask
    return m.reshape(m.shape[0] // CELL, CELL, m.shape[1] // CELL, CELL).sum(axis=(1, 3), dtype=np.int64)


def empty_bands(stack: RasterStack, region: Box) -> list[int]:
    """The bands of ``stack`` with no valid pixel in ``region`` (read window by window, stopping once every band has
    shown one): which files to name when no pixel of a training region has a value in every band."""
    from geoseg.io.sources import read_bands

    seen = np.zeros(stack.count, bool)
    for wy in range(region.y0, region.y1, SURVEY_WINDOW):
        for wx in range(region.x0, region.x1, SURVEY_WINDOW):
            win = Box(wy, min(region.y1, wy + SURVEY_WINDOW), wx, min(region.x1, wx + SURVEY_WINDOW))
            _, valid = read_bands(stack, win.window)
            seen |= valid.reshape(stack.count, -1).any(axis=1)
            if seen.all():
                return []
    return [i for i in range(stack.count) if not seen[i]]


def survey(
    stack: RasterStack,
    labels: LabelSource,
    region: Box | None,
    block_size: int,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
) -> Survey:
    """Read the region once, window by window: per-block class counts and band moments, per-cell
    labelled counts, and the pixels themselves if they fit in ``cache_bytes``. A window without labels
    has its imagery left unread (no valid pixels, no moments): no chip, validation box or normalisation
    uses a block without labels."""
    h, w = stack.shape
    region = region or Box(0, h, 0, w)
    if block_size % CELL:
        raise ConfigError(f"block size {block_size} must be a multiple of {CELL}")
    nby, nbx = -(-region.shape[0] // block_size), -(-region.shape[1] // block_size)
    bands = stack.count
    counts = np.zeros((nby, nbx, ID_SPACE), np.int32)  # a block holds < 2**31 pixels
    valid_px = np.zeros((nby, nbx), np.int64)
    mean = np.zeros((nby, nbx, bands))
    m2 = np.zeros((nby, nbx, bands))
    cells = np.zeros((-(-region.shape[0] // CELL), -(-region.shape[1] // CELL)), np.int64)
    need = region.size * (4 * bands + 2)
    cache = (
        SceneCache(
            np.empty((bands, *region.shape), np.float32),
            np.empty(region.shape, bool),
            np.empty(region.shape, np.uint8),
        )
        if need <= cache_bytes
        else None
    )
    step = block_size * max(1, SURVEY_WINDOW // block_size)
    for wy in range(region.y0, region.y1, step):
        for wx in range(region.x0, region.x1, step):
            win = Box(wy, min(region.y1, wy + step), wx, min(region.x1, wx + step))
            ids = read_labels(labels, win)
            if not (ids != NODATA_CLASS).any():
                if cache is not None:  # never read: chips lie in labelled blocks only
                    sl = win.relative_to(region)
                    cache.data[(slice(None), *sl)] = 0
                    cache.valid[sl] = False
                    cache.labels[sl] = NODATA_CLASS
                continue
            data, valid = read_window(stack, win.window)
            ids = np.where(valid, ids, NODATA_CLASS).astype(np.uint8)
            if cache is not None:
                sl = win.relative_to(region)
                cache.data[(slice(None), *sl)] = data
                cache.valid[sl] = valid
                cache.labels[sl] = ids
            cy, cx = (win.y0 - region.y0) // CELL, (win.x0 - region.x0) // CELL
            c = _cell_sums(ids != NODATA_CLASS)
            cells[cy : cy + c.shape[0], cx : cx + c.shape[1]] = c
            for y in range(win.y0, win.y1, block_size):
                for x in range(win.x0, win.x1, block_size):
                    by, bx = (y - region.y0) // block_size, (x - region.x0) // block_size
                    blk = Box(y, min(win.y1, y + block_size), x, min(win.x1, x + block_size))
                    sl = blk.relative_to(win)
                    v = valid[sl]
                    counts[by, bx] = np.bincount(ids[sl].ravel(), minlength=ID_SPACE)
                    counts[by, bx, NODATA_CLASS] = 0
                    n, mu, s2 = _moments(data[(slice(None), *sl)][:, v])
                    valid_px[by, bx], mean[by, bx], m2[by, bx] = n, mu, s2
    return Survey(region, block_size, counts, valid_px, mean, m2, cells, cache)


# -- split -----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class BlockSplit:
    """Which blocks of the region train and which validate; blocks without labels do neither."""

    region: Box
    block_size: int
    val: np.ndarray  # (nby, nbx) bool
    labelled: np.ndarray  # (nby, nbx) bool: blocks with at least one labelled valid pixel

    @property
    def train(self) -> np.ndarray:
        """Blocks whose imagery and labels are used for training (normalisation uses all of ~val)."""
        return self.labelled & ~self.val

    def block(self, by: int, bx: int) -> Box:
        r, b = self.region, self.block_size
        return Box(r.y0 + by * b, min(r.y1, r.y0 + (by + 1) * b), r.x0 + bx * b, min(r.x1, r.x0 + (bx + 1) * b))

    def boxes(self, which: str) -> list[Box]:
        mask = {"train": self.train, "val": self.val & self.labelled}[which]
        return [self.block(int(by), int(bx)) for by, bx in zip(*np.nonzero(mask))]

    def overlaps(self, box: Box) -> set[str]:
        """The splits whose blocks ``box`` touches (a training chip must touch only ``train``)."""
        out = set()
        for by in range((box.y0 - self.region.y0) // self.block_size, (box.y1 - 1 - self.region.y0) // self.block_size + 1):
            for bx in range((box.x0 - self.region.x0) // self.block_size, (box.x1 - 1 - self.region.x0) // self.block_size + 1):
                out.add("val" if self.val[by, bx] else ("train" if self.labelled[by, bx] else "none"))
        return out

    def describe(self, survey: Survey, class_ids: Sequence[int]) -> dict[str, Any]:
        per = {}
        for name, mask in (("train", self.train), ("val", self.val & self.labelled)):
            counts = survey.class_counts[mask].sum(axis=0)
            per[name] = {
                "blocks": int(mask.sum()),
                "labelled_pixels": int(counts.sum()),
                "class_pixels": {str(c): int(counts[c]) for c in class_ids},
            }
        per["val"]["boxes"] = [[b.y0, b.y1, b.x0, b.x1] for b in self.boxes("val")]
        return {
            "method": "spatial blocks",
            "region": [self.region.y0, self.region.y1, self.region.x0, self.region.x1],
            "block_size": self.block_size,
            "blocks": list(self.val.shape),
            **per,
        }


def split_blocks(survey: Survey, val_fraction: float, seed: int, tries: int = 256) -> BlockSplit:
    """A seeded split of the labelled blocks into train and validation.

    Of ``tries`` random splits with the requested share of validation blocks, the one kept
    covers the most classes in training, then the most in validation, then comes closest to
    ``val_fraction`` of the labelled pixels: rare classes end up on both sides when they can.
    """
    labelled = survey.class_counts.sum(axis=2) > 0
    idx = np.flatnonzero(labelled)
    shape = labelled.shape
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"validation fraction {val_fraction} must be in [0, 1)")
    if val_fraction == 0:
        return BlockSplit(survey.region, survey.block_size, np.zeros(shape, bool), labelled)
    if idx.size < 2:
        raise InputError(
            f"labels cover {idx.size} block(s) of {survey.block_size} px: too few to split into training and "
            "validation; use a smaller --chip-size and --block-size, or more labels"
        )
    n_val = min(idx.size - 1, max(1, round(val_fraction * idx.size)))
    per_block = survey.class_counts.reshape(-1, ID_SPACE)[idx].astype(np.int64)
    total = per_block.sum()
    rng = np.random.default_rng([seed, 0x5B117])
    best: tuple | None = None
    best_val: np.ndarray | None = None
    for _ in range(tries):
        pick = np.zeros(idx.size, bool)
        pick[rng.choice(idx.size, n_val, replace=False)] = True
        val_counts, train_counts = per_block[pick].sum(axis=0), per_block[~pick].sum(axis=0)
        score = (
            int((train_counts > 0).sum()),
            int(((val_counts > 0) & (train_counts > 0)).sum()),
            -abs(val_counts.sum() / total - val_fraction),
        )
        if best is None or score > best:
            best, best_val = score, pick
    val = np.zeros(shape, bool).ravel()
    val[idx[best_val]] = True
    return BlockSplit(survey.region, survey.block_size, val.reshape(shape), labelled)


def train_normalization(survey: Survey, split: BlockSplit) -> tuple[Normalization, int]:
    """Per-band mean and std of the valid image pixels of the training blocks (labelled, not validation;
    Chan's merge of the per-block moments), and how many pixels they come from."""
    mask = split.train & (survey.valid_pixels > 0)
    n = survey.valid_pixels[mask].astype(np.float64)
    if n.sum() == 0:
        raise InputError("no valid image pixel in the training blocks; the imagery is nodata there")
    means = survey.band_mean[mask]
    total = n.sum()
    mean = (n[:, None] * means).sum(axis=0) / total
    m2 = survey.band_m2[mask].sum(axis=0) + (n[:, None] * (means - mean) ** 2).sum(axis=0)
    std = np.sqrt(m2 / total)
    # A constant band carries no information; std 1 keeps it at 0 after normalisation.
    std = np.where(std > 1e-12 * np.maximum(1.0, np.abs(mean)), std, 1.0)
    return Normalization(mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std)), int(total)


# -- chips -----------------------------------------------------------------------------------


def _window_sums(grid: np.ndarray, k: int) -> np.ndarray:
    """Sums of every ``k x k`` window of ``grid`` (valid positions only)."""
    s = np.zeros((grid.shape[0] + 1, grid.shape[1] + 1), np.int64)
    s[1:, 1:] = grid.cumsum(0).cumsum(1)
    return s[k:, k:] - s[:-k, k:] - s[k:, :-k] + s[:-k, :-k]


def chip_candidates(survey: Survey, split: BlockSplit, chip: int, min_labelled: float) -> np.ndarray:
    """Top-left corners ``(y, x)`` (scene pixels, on the CELL lattice) of the training chips:
    wholly inside the region and inside training blocks, with at least ``min_labelled`` of
    their pixels labelled (and at least one)."""
    if chip % CELL:
        raise ConfigError(f"chip size {chip} must be a multiple of {CELL}")
    k = chip // CELL
    rh, rw = survey.region.shape
    ncy, ncx = survey.cell_labelled.shape
    per_block = survey.block_size // CELL
    train_cells = np.repeat(np.repeat(split.train, per_block, 0), per_block, 1)[:ncy, :ncx]
    if ncy < k or ncx < k:
        return np.zeros((0, 2), np.int64)
    outside = _window_sums((~train_cells).astype(np.int64), k)
    labelled = _window_sums(survey.cell_labelled, k)
    ok = (outside == 0) & (labelled >= max(1, math.ceil(min_labelled * chip * chip)))
    cy, cx = np.nonzero(ok)
    ys, xs = cy * CELL, cx * CELL
    fits = (ys + chip <= rh) & (xs + chip <= rw)
    return np.stack([ys[fits] + survey.region.y0, xs[fits] + survey.region.x0], axis=1).astype(np.int64)


@dataclass(frozen=True)
class _NormOnly:
    """Stands in for a card in `geoseg.infer.normalize`: training normalises exactly as predict does."""

    normalization: Normalization
    index_channels: tuple[str, ...] = ()
    band_roles: tuple[str | None, ...] = ()
    index_band_units: tuple[tuple[float, float], ...] | None = None


def class_lut(classes: Sequence[ClassInfo]) -> np.ndarray:
    """Class id -> network output index (uint8); ids of no class (and 255) map to 255 (ignored)."""
    lut = np.full(ID_SPACE, NODATA_CLASS, np.uint8)
    for i, c in enumerate(classes):
        lut[c.id] = i
    return lut


@dataclass(frozen=True, eq=False)
class ChipReader:
    """Normalised image and target indices of any box of the region, from memory or from the files."""

    stack: RasterStack
    labels: LabelSource
    region: Box
    normalization: Normalization
    lut: np.ndarray
    cache: SceneCache | None = None
    index_channels: tuple[str, ...] = ()
    band_roles: tuple[str | None, ...] = ()

    def read(self, box: Box) -> tuple[np.ndarray, np.ndarray]:
        """``x`` (bands, h, w) float32, normalised, 0 where invalid; ``target`` (h, w) uint8 index, 255 = ignore."""
        if self.cache is not None:
            sl = box.relative_to(self.region)
            data, valid, ids = self.cache.data[(slice(None), *sl)], self.cache.valid[sl], self.cache.labels[sl]
        else:
            data, valid = read_window(self.stack, box.window)
            ids = np.where(valid, read_labels(self.labels, box), NODATA_CLASS)
        card = _NormOnly(self.normalization, self.index_channels, self.band_roles, band_units(self.stack.bands))
        x = normalize(data, valid, card)  # type: ignore[arg-type]
        return x, self.lut[ids]


def augment(x: np.ndarray, target: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One of the 8 flips/rotations of a square chip, drawn from ``rng``."""
    k, flip = int(rng.integers(4)), bool(rng.integers(2))
    x, target = np.rot90(x, k, axes=(1, 2)), np.rot90(target, k, axes=(0, 1))
    if flip:
        x, target = x[:, :, ::-1], target[:, ::-1]
    return np.ascontiguousarray(x), np.ascontiguousarray(target)
