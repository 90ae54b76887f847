"""The class map as a Cloud-Optimized GeoTIFF: tiled, DEFLATE, MODE overviews, colour table.

The source is read window by window and GDAL's COG driver works block by block, so memory
does not grow with the scene. The COG appears at its path complete or not at all.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol

import numpy as np
import rasterio
import rasterio.shutil
from odc.geo.geobox import GeoBox
from rasterio.crs import CRS as RioCRS

from geoseg.errors import InputError
from geoseg.model.card import NODATA_CLASS, ClassInfo

# GDAL's default block cache (5% of RAM) fills with written blocks; 64 MB is as fast here and
# keeps a worker's memory predictable (~150 MB above the imports for a 16384^2 map).
_CACHE_BYTES = 64 * 2**20
# Read the source in windows of at most this many pixels on a side (16 MB of uint8).
_MAX_READ_SIDE = 4096
_DEFAULT_READ_SIDE = 2048


class ClassIdSource(Protocol):
    """Anything that returns a uint8 array for ``source[y0:y1, x0:x1]`` (numpy, zarr, dask...)."""

    def __getitem__(self, key: tuple[slice, slice]) -> Any: ...


def _rio_crs(grid: GeoBox) -> RioCRS | None:
    return None if grid.crs is None else RioCRS.from_wkt(grid.crs.to_wkt())


def _read_side(source: Any, blocksize: int) -> int:
    """Side of the read windows: whole tiles, and whole source chunks where the source says.

    Reading 512-pixel windows out of 2048-pixel Zarr chunks would decompress each chunk 16 times;
    without a ``chunks`` attribute 2048 is aligned with any power-of-two chunking up to it.
    """
    chunks = getattr(source, "chunks", None)
    side = _DEFAULT_READ_SIDE
    if isinstance(chunks, tuple) and len(chunks) == 2 and all(isinstance(c, (int, np.integer)) for c in chunks):
        side = max(int(c) for c in chunks)
    cap = max(blocksize, _MAX_READ_SIDE // blocksize * blocksize)
    return min(cap, max(blocksize, -(-side // blocksize) * blocksize))


def _as_class_ids(block: Any, expected: tuple[int, int], where: tuple[int, int]) -> np.ndarray:
    a = np.asarray(block)
    if a.shape != expected:
        raise InputError(f"class id source returned shape {a.shape} for the window at {where}, expected {expected}")
    if a.dtype == np.uint8:
        return a
    if a.dtype.kind not in "iub" or (a.size and (a.min() < 0 or a.max() > 255)):
        raise InputError(f"class ids must be uint8 (0-254, 255 nodata); the source gave {a.dtype} at {where}")
    return a.astype(np.uint8)


def class_tags(classes: Iterable[ClassInfo]) -> tuple[dict[str, str], dict[str, str]]:
    """Dataset tags and band tags that name and colour the classes, for any GIS to read back."""
    classes = tuple(classes)
    dataset = {
        "CLASS_NAMES": json.dumps({str(c.id): c.name for c in classes}),
        "CLASS_COLORS": json.dumps({str(c.id): c.color for c in classes}),
        "NODATA_CLASS": str(NODATA_CLASS),
    }
    band = {f"CLASS_{c.id}_NAME": c.name for c in classes} | {f"CLASS_{c.id}_COLOR": c.color for c in classes}
    return dataset, band


def colormap(classes: Iterable[ClassInfo]) -> dict[int, tuple[int, int, int, int]]:
    """GDAL colour table: each class's colour, opaque; nodata transparent black."""
    cmap = {c.id: (*c.rgb, 255) for c in classes}
    cmap[NODATA_CLASS] = (0, 0, 0, 0)
    return cmap


def _tmp_path(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.{tag}.tif")


def write_cog(
    class_id_source: ClassIdSource,
    out_path: str | os.PathLike,
    *,
    grid: GeoBox,
    classes: Iterable[ClassInfo],
    tags: Mapping[str, Any] | None = None,
    blocksize: int = 512,
) -> Path:
    """Write ``class_id_source`` (uint8, ``grid.shape``) to ``out_path`` as a COG, atomically.

    An existing file at ``out_path`` is replaced only once the new one is complete; on any
    error nothing is left behind. ``tags`` are extra dataset tags (values written as str).
    """
    out = Path(out_path)
    classes = tuple(classes)
    if blocksize < 16 or blocksize % 16:
        raise InputError(f"COG blocksize must be a positive multiple of 16, got {blocksize}")
    height, width = (int(n) for n in grid.shape)
    shape = getattr(class_id_source, "shape", None)
    if shape is not None and tuple(int(n) for n in shape) != (height, width):
        raise InputError(f"class id source has shape {tuple(shape)} but the grid is {height} x {width}")

    dataset_tags, band_tags = class_tags(classes)
    dataset_tags |= {str(k): str(v) for k, v in (tags or {}).items()}

    def describe(dst: Any) -> None:
        dst.write_colormap(1, colormap(classes))
        dst.set_band_description(1, "class_id")
        dst.update_tags(**dataset_tags)
        dst.update_tags(1, **band_tags)

    # Overviews must be MODE: averaging would invent classes (on a paletted band GDAL averages
    # colours and takes the nearest palette entry, just as wrong). GDAL's COG driver keeps the
    # colour table, tags and band description (checked in tests).
    return _write_cog(class_id_source, out, grid, "uint8", NODATA_CLASS, blocksize, describe, _as_class_ids, "MODE")


def _write_cog(source: Any, out: Path, grid: GeoBox, dtype: str, nodata: int, blocksize: int, describe: Any, block: Any,
               resampling: str) -> Path:
    """``source`` window by window into a tiled GeoTIFF (``describe(dst)`` sets tags and colours,
    ``block(array, shape, corner)`` checks each window), then GDAL's COG driver with ``resampling``
    overviews; the COG replaces ``out`` when complete, nothing is left behind on error."""
    height, width = (int(n) for n in grid.shape)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging, cog = _tmp_path(out, "staging"), _tmp_path(out, "cog")
    profile = dict(
        driver="GTiff", height=height, width=width, count=1, dtype=dtype, nodata=nodata,
        crs=_rio_crs(grid), transform=grid.affine, tiled=True, blockxsize=blocksize, blockysize=blocksize,
        # fast settings: this file is read once by the COG driver and deleted
        compress="deflate", zlevel=1, BIGTIFF="IF_SAFER",
    )  # fmt: skip
    step = _read_side(source, blocksize)
    try:
        with rasterio.Env(GDAL_CACHEMAX=_CACHE_BYTES):
            with rasterio.open(staging, "w", **profile) as dst:
                describe(dst)
                for y0 in range(0, height, step):
                    for x0 in range(0, width, step):
                        y1, x1 = min(height, y0 + step), min(width, x0 + step)
                        dst.write(block(source[y0:y1, x0:x1], (y1 - y0, x1 - x0), (y0, x0)), 1, window=((y0, y1), (x0, x1)))
            rasterio.shutil.copy(
                staging, cog, driver="COG",
                COMPRESS="DEFLATE", BLOCKSIZE=str(blocksize), OVERVIEW_RESAMPLING=resampling,
                RESAMPLING=resampling, BIGTIFF="IF_SAFER", NUM_THREADS="ALL_CPUS",
            )  # fmt: skip
        os.replace(cog, out)
    finally:
        # the COG driver stages overviews in "<its output>.ovr.tmp" and removes them itself,
        # except when interrupted
        for tmp in (staging, cog, *out.parent.glob(f"{cog.name}.*")):
            tmp.unlink(missing_ok=True)
    return out


def validate_cog(path: str | os.PathLike) -> tuple[bool, list[str], list[str]]:
    """rio-cogeo's validation of ``path``: (is_valid, errors, warnings)."""
    from rio_cogeo.cogeo import cog_validate

    is_valid, errors, warnings = cog_validate(str(path), quiet=True)
    return bool(is_valid), list(errors), list(warnings)


def write_id_cog(source: Any, out_path: str | os.PathLike, *, grid: GeoBox, tags: Mapping[str, Any] | None = None,
                 blocksize: int = 512) -> Path:
    """An object-id raster (uint32, 0 = no object) as a COG, like ``write_cog``, with NEAREST
    overviews (ids are labels: averaging would invent ids)."""
    def describe(dst: Any) -> None:
        dst.set_band_description(1, "instance_id")
        dst.update_tags(**{str(k): str(v) for k, v in (tags or {}).items()})

    return _write_cog(source, Path(out_path), grid, "uint32", 0, blocksize, describe,
                      lambda a, shape, corner: np.asarray(a, dtype=np.uint32), "NEAREST")
