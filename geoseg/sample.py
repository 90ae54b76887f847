"""A deterministic synthetic scene (image, labels, classes) for demos, tests and benchmarks.

Every pixel is a pure function of the seed and its position on the grid, so a scene is the
same however it is cut into windows, and it is written block by block: an 8192 x 8192 x 4
scene needs a few tens of MB of memory, not the whole array.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import yaml
from affine import Affine
from pyproj import CRS
from pyproj.exceptions import CRSError
from rasterio.crs import CRS as RioCRS

from geoseg.errors import InputError
from geoseg.model.card import DEFAULT_COLORS, NODATA_CLASS, ClassInfo
from geoseg.io.classes import load_classes  # noqa: F401  (re-exported: sample scenes ship a classes.yaml)
from geoseg.tiling import Box

IMAGE_NAME = "image.tif"
LABELS_NAME = "labels.tif"
CLASSES_NAME = "classes.yaml"
BLOCK = 512
IMAGE_NODATA = 0
_CACHE_BYTES = 64 * 2**20

BAND_NAMES = ("blue", "green", "red", "nir", "swir1", "swir2")

# Surface reflectance x 10000 per band (blue, green, red, nir, swir1, swir2), roughly as
# Landsat sees these covers: agriculture and grassland differ mostly in red and nir, so a
# pixel classifier confuses them at times and context helps, as on real scenes.
_TEMPLATES: tuple[tuple[str, tuple[int, ...], float], ...] = (
    # name, signature, texture amplitude
    ("urban", (1100, 1200, 1300, 2000, 2500, 2200), 0.25),
    ("agriculture", (500, 800, 600, 3600, 2200, 1200), 0.20),
    ("grassland", (650, 1000, 1100, 2700, 2600, 1700), 0.12),
    ("forest", (350, 600, 400, 3000, 1500, 700), 0.15),
    ("water", (800, 700, 450, 250, 120, 80), 0.04),
    ("wetland", (450, 750, 600, 1800, 900, 500), 0.10),
    ("barren", (1600, 1900, 2300, 2800, 3300, 2900), 0.08),
    ("shrubland", (600, 850, 1000, 2300, 2400, 1600), 0.12),
)

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SampleScene:
    """Paths of one generated scene and its classes (ids 0..n-1; 255 is nodata in labels)."""

    image_path: Path
    labels_path: Path
    classes_path: Path
    classes: tuple[ClassInfo, ...]
    unchanged: bool = False  # the folder already held this very scene: its files were left as they were


@dataclass(frozen=True, eq=False)
class SceneSpec:
    """Everything that determines a scene's pixels; `render_window` draws any part of it."""

    height: int
    width: int
    bands: int
    seed: int
    n_classes: int
    coarse_cell: int
    fine_cell: int
    texture_cell: int
    class_coarse: np.ndarray  # (n_classes, ly, lx) float32 lattice values in [0, 1)
    class_fine: np.ndarray  # (n_classes, ly, lx)
    fine_offset: tuple[float, float]  # keeps the two octaves' lattice lines apart
    class_bias: np.ndarray  # (n_classes,) float32
    variation: np.ndarray  # (1, ly, lx) within-class brightness at the fine scale
    texture: np.ndarray  # (1, ly, lx) texture at a few pixels' scale
    wobble: np.ndarray  # (1, ly, lx) jitter of the footprint's edge
    signatures: np.ndarray  # (n_classes, bands) float32 reflectance x 10000
    texture_amp: np.ndarray  # (n_classes,) float32
    angle: float  # radians: the footprint's tilt
    hole: tuple[float, float, float, float]  # centre y, centre x, radius y, radius x (pixels)
    noise_keys: tuple[int, ...]  # one 64-bit stream key per group of four bands


def _class_names(n: int) -> list[str]:
    return [(_TEMPLATES[i][0] if i < len(_TEMPLATES) else f"class_{i}") for i in range(n)]


def _class_color(i: int) -> str:
    if i < len(DEFAULT_COLORS):
        return DEFAULT_COLORS[i]
    return f"#{(i * 2654435761) & 0xFFFFFF:06x}"  # Knuth's multiplicative hash: distinct and stable


def sample_classes(n_classes: int) -> tuple[ClassInfo, ...]:
    """The classes of a sample scene with ``n_classes`` classes, ids 0..n-1."""
    return tuple(ClassInfo(id=i, name=name, color=_class_color(i)) for i, name in enumerate(_class_names(n_classes)))


def _lattice(rng: np.random.Generator, n: int, extent: tuple[int, int], cell: int) -> np.ndarray:
    # +3: index floor((p + 0.5 + offset) / cell) + 1 stays inside for every pixel p, offset < cell
    shape = (n, extent[0] // cell + 3, extent[1] // cell + 3)
    return rng.random(shape, dtype=np.float32)


def scene_spec(height: int, width: int, *, bands: int = 4, seed: int = 0, n_classes: int = 5) -> SceneSpec:
    """The scene drawn for these arguments; the same arguments always give the same scene."""
    if height < 1 or width < 1:
        raise InputError(f"sample scene size must be >= 1 pixel, got {height} x {width}")
    if bands < 1:
        raise InputError(f"sample scene needs at least one band, got bands={bands}")
    if not 1 <= n_classes <= NODATA_CLASS:
        raise InputError(f"n_classes must be 1..{NODATA_CLASS} (255 is nodata), got {n_classes}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    rng = np.random.default_rng([seed, 0x5EED])
    coarse = int(np.clip(min(height, width) // 8, 16, 128))
    fine = max(4, coarse // 4)
    texture = max(2, fine // 4)
    extent = (height, width)
    class_coarse = _lattice(rng, n_classes, extent, coarse)
    class_fine = _lattice(rng, n_classes, extent, fine)
    fine_offset = (float(rng.uniform(0, fine)), float(rng.uniform(0, fine)))
    class_bias = rng.uniform(-0.04, 0.04, n_classes).astype(np.float32)
    variation = _lattice(rng, 1, extent, fine)
    tex = _lattice(rng, 1, extent, texture)
    wobble = _lattice(rng, 1, extent, coarse)

    sig = np.empty((n_classes, bands), np.float32)
    amp = np.empty(n_classes, np.float32)
    for c in range(n_classes):
        if c < len(_TEMPLATES):
            _, template, amp[c] = _TEMPLATES[c]
            known = min(bands, len(template))
            sig[c, :known] = template[:known]
            sig[c, known:] = rng.uniform(300, 4000, bands - known)
        else:
            sig[c] = rng.uniform(300, 5000, bands)
            amp[c] = rng.uniform(0.05, 0.25)

    angle = math.radians(float(rng.uniform(8, 14)) * (1 if rng.random() < 0.5 else -1))
    hole = (
        float(rng.uniform(0.3, 0.7) * height),
        float(rng.uniform(0.3, 0.7) * width),
        float(rng.uniform(0.03, 0.05) * height),
        float(rng.uniform(0.03, 0.05) * width),
    )
    keys = tuple(_mix64_int((seed * 0x632BE59BD9B4E019 + g + 1) & _MASK64) for g in range(-(-bands // 4)))
    return SceneSpec(
        height, width, bands, seed, n_classes, coarse, fine, texture,
        class_coarse, class_fine, fine_offset, class_bias, variation, tex, wobble,
        sig, amp, angle, hole, keys,
    )  # fmt: skip


def _mix64_int(z: int) -> int:
    return int(_mix64(np.array([z], np.uint64))[0])


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a cheap, well-mixed hash of uint64 counters (wraps on purpose)."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _axis(start: int, stop: int, cell: int, offset: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Lattice index and smoothstep weight of each pixel centre along one axis.

    Computed from global pixel coordinates only, so a pixel gets the same value in any window.
    """
    t = (np.arange(start, stop, dtype=np.float64) + 0.5 + offset) / cell
    i = np.floor(t).astype(np.intp)
    f = t - i
    return i, (f * f * (3.0 - 2.0 * f)).astype(np.float32)


def _noise(lattice: np.ndarray, box: Box, cell: int, offset: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Smooth value noise in [0, 1) over ``box``: (n, h, w) float32, bilinear with smoothstep."""
    iy, wy = _axis(box.y0, box.y1, cell, offset[0])
    ix, wx = _axis(box.x0, box.x1, cell, offset[1])
    r0 = int(iy[0])
    rows = lattice[:, r0 : int(iy[-1]) + 2, :]
    a = rows[:, :, ix]
    along_x = a + (rows[:, :, ix + 1] - a) * wx  # each element depends only on its own column
    ry = iy - r0
    top = along_x[:, ry, :]
    return top + (along_x[:, ry + 1, :] - top) * wy[:, None]


def class_field(spec: SceneSpec, box: Box) -> np.ndarray:
    """Class id (uint8, no nodata) of every pixel in ``box``: the same however boxes are cut."""
    field = _noise(spec.class_coarse, box, spec.coarse_cell)
    field += np.float32(0.35) * _noise(spec.class_fine, box, spec.fine_cell, spec.fine_offset)
    field += spec.class_bias[:, None, None]
    return np.argmax(field, axis=0).astype(np.uint8)


def valid_mask(spec: SceneSpec, box: Box) -> np.ndarray:
    """True where the scene has data: a tilted footprint with a wobbly edge, minus a small hole."""
    h, w = spec.height, spec.width
    yn = (np.arange(box.y0, box.y1, dtype=np.float64) + 0.5) / h - 0.5
    xn = (np.arange(box.x0, box.x1, dtype=np.float64) + 0.5) / w - 0.5
    c, s = math.cos(spec.angle), math.sin(spec.angle)
    u = xn[None, :] * c + yn[:, None] * s
    v = yn[:, None] * c - xn[None, :] * s
    # A footprint of the scene's own size tilted by ~10 degrees leaves a nodata triangle at each
    # corner, as a Landsat tile does; the wobble makes the edge irregular at the coarse scale.
    half = 0.5 - 0.02 * _noise(spec.wobble, box, spec.coarse_cell)[0]
    inside = (np.abs(u) <= half) & (np.abs(v) <= half)
    cy, cx, ry, rx = spec.hole
    dy = (np.arange(box.y0, box.y1, dtype=np.float64) + 0.5 - cy) / ry
    dx = (np.arange(box.x0, box.x1, dtype=np.float64) + 0.5 - cx) / rx
    in_hole = dy[:, None] ** 2 + dx[None, :] ** 2 <= 1.0
    return inside & ~in_hole


def _pixel_noise(spec: SceneSpec, box: Box) -> np.ndarray:
    """Per-pixel noise in [-1, 1] (triangular), (bands, h, w) float32, hashed from position."""
    ys = np.arange(box.y0, box.y1, dtype=np.uint64)
    xs = np.arange(box.x0, box.x1, dtype=np.uint64)
    counter = (ys[:, None] << np.uint64(32)) | xs[None, :]
    out = np.empty((spec.bands, *box.shape), np.float32)
    for g, key in enumerate(spec.noise_keys):
        h = _mix64(counter ^ np.uint64(key))
        for b in range(4 * g, min(spec.bands, 4 * g + 4)):
            u16 = (h >> np.uint64(16 * (b - 4 * g))) & np.uint64(0xFFFF)
            lo = (u16 & np.uint64(0xFF)).astype(np.float32)
            hi = (u16 >> np.uint64(8)).astype(np.float32)
            out[b] = (lo + hi - np.float32(255.0)) / np.float32(255.0)  # sum of two uniforms
    return out


def render_window(spec: SceneSpec, box: Box) -> tuple[np.ndarray, np.ndarray]:
    """Image (bands, h, w) uint16 with nodata 0 and labels (h, w) uint8 with nodata 255 for ``box``."""
    labels = class_field(spec, box)
    valid = valid_mask(spec, box)
    one = np.float32(1.0)
    variation = np.float32(0.16) * (_noise(spec.variation, box, spec.fine_cell)[0] - np.float32(0.5))
    texture = np.float32(2.0) * (_noise(spec.texture, box, spec.texture_cell)[0] - np.float32(0.5))
    brightness = one + variation + spec.texture_amp[labels] * texture
    noise = _pixel_noise(spec, box)
    image = np.empty((spec.bands, *box.shape), np.uint16)
    for b in range(spec.bands):
        value = spec.signatures[labels, b] * brightness
        value *= one + np.float32(0.04) * noise[b]  # multiplicative sensor noise...
        value += np.float32(60.0) * noise[(b + 1) % spec.bands]  # ...plus an additive floor
        # valid pixels are never 0 in any band: 0 in all bands is what nodata means here
        image[b] = np.clip(np.rint(value), 1, 65535).astype(np.uint16)
    image[:, ~valid] = IMAGE_NODATA
    labels[~valid] = NODATA_CLASS
    return image, labels


def _band_names(bands: int) -> list[str]:
    return [BAND_NAMES[i] if i < 4 else f"band_{i + 1}" for i in range(bands)]


def _grid(crs_input: str, resolution: float | None, height: int, width: int) -> tuple[RioCRS, Affine]:
    try:
        crs = CRS.from_user_input(crs_input)
    except CRSError as exc:
        raise InputError(f"sample scene CRS {crs_input!r} is not understood: {exc}") from None
    if crs.is_geographic:
        res = 1e-4 if resolution is None else float(resolution)
        x0, y0 = -79.0, 36.0
        if x0 + width * res > 180 or y0 - height * res < -90:
            raise InputError(
                f"a {height} x {width} scene at {res} degrees per pixel does not fit on the globe; "
                "give a geographic CRS a resolution in degrees (e.g. 1e-4)"
            )
    else:
        res = 10.0 if resolution is None else float(resolution)
        x0, y0 = 500000.0, 4000000.0
    if not res > 0:
        raise InputError(f"resolution must be > 0, got {resolution}")
    return RioCRS.from_wkt(crs.to_wkt()), Affine(res, 0.0, x0, 0.0, -res, y0)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.stem}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")


def make_sample(
    out_dir: str | os.PathLike,
    size: int = 1024,
    bands: int = 4,
    seed: int = 0,
    n_classes: int = 5,
    crs: str = "EPSG:32617",
    resolution: float | None = None,
    width: int | None = None,
    overwrite: bool = True,
) -> SampleScene:
    """Write image.tif, labels.tif and classes.yaml for a ``size`` x ``width`` scene into ``out_dir``.

    ``resolution`` is in CRS units: None means 10 m, or 1e-4 degrees for a geographic CRS.
    Files already holding this very scene are left untouched (their mtime stays, so outputs made from them
    stay current); other files of those names are replaced (each appears complete or not at all), or, with
    ``overwrite=False``, refused.
    """
    height, width = int(size), int(size if width is None else width)
    spec = scene_spec(height, width, bands=bands, seed=seed, n_classes=n_classes)
    rio_crs, transform = _grid(crs, resolution, height, width)
    classes = sample_classes(n_classes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    image_path, labels_path, classes_path = out / IMAGE_NAME, out / LABELS_NAME, out / CLASSES_NAME
    tmp_image, tmp_labels, tmp_classes = _tmp_name(image_path), _tmp_name(labels_path), _tmp_name(classes_path)

    common = dict(
        driver="GTiff", height=height, width=width, crs=rio_crs, transform=transform,
        tiled=True, blockxsize=BLOCK, blockysize=BLOCK, compress="deflate", BIGTIFF="IF_SAFER",
    )  # fmt: skip
    try:
        with (
            # GDAL's default block cache (5% of RAM) would hold hundreds of MB of written blocks
            rasterio.Env(GDAL_CACHEMAX=_CACHE_BYTES),
            rasterio.open(
                tmp_image, "w", count=bands, dtype="uint16", nodata=IMAGE_NODATA,
                predictor=2, zlevel=1, interleave="pixel", num_threads="ALL_CPUS", **common,
            ) as img,  # fmt: skip
            rasterio.open(tmp_labels, "w", count=1, dtype="uint8", nodata=NODATA_CLASS, **common) as lab,
        ):
            for b, name in enumerate(_band_names(bands), start=1):
                img.set_band_description(b, name)
            img.update_tags(GEOSEG_SAMPLE_SEED=str(spec.seed), GEOSEG_SAMPLE_CLASSES=str(n_classes))
            lab.set_band_description(1, "class_id")
            cmap = {c.id: (*c.rgb, 255) for c in classes}
            cmap[NODATA_CLASS] = (0, 0, 0, 0)
            lab.write_colormap(1, cmap)
            lab.update_tags(CLASS_NAMES=json.dumps({str(c.id): c.name for c in classes}))
            for y0 in range(0, height, BLOCK):
                for x0 in range(0, width, BLOCK):
                    box = Box(y0, min(height, y0 + BLOCK), x0, min(width, x0 + BLOCK))
                    image, labels = render_window(spec, box)
                    img.write(image, window=box.window)
                    lab.write(labels, 1, window=box.window)
        tmp_classes.write_text(
            yaml.safe_dump([{"id": c.id, "name": c.name, "color": c.color} for c in classes], sort_keys=False)
        )
        import filecmp

        pairs = ((tmp_image, image_path), (tmp_labels, labels_path), (tmp_classes, classes_path))
        same = [final.is_file() and filecmp.cmp(tmp, final, shallow=False) for tmp, final in pairs]
        differ = [final.name for (_, final), s in zip(pairs, same) if final.exists() and not s]
        if differ and not overwrite:
            from geoseg.errors import OutputExistsError

            raise OutputExistsError(f"{out}: holds {', '.join(differ)} of another scene; choose another folder or pass "
                                    "--overwrite to replace them")
        for (tmp, final), s in zip(pairs, same):
            if not s:
                os.replace(tmp, final)
    finally:
        for tmp in (tmp_image, tmp_labels, tmp_classes):
            tmp.unlink(missing_ok=True)
    return SampleScene(image_path, labels_path, classes_path, classes, unchanged=all(same))


