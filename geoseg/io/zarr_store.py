"""The prediction store: a georeferenced Zarr dataset written chunk by chunk, never whole.

Each chunk's write task leaves a marker (``.geoseg/done/IY_IX``) holding the job key once its
data are in place, so an interrupted job knows which chunks it can reuse.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
from odc.geo.geobox import GeoBox

from geoseg.model.card import NODATA_CLASS
from geoseg.tiling import Chunk, TilingPlan

MARKERS = ".geoseg/done"


def pixel_centres(grid: GeoBox) -> tuple[np.ndarray, np.ndarray]:
    t = grid.affine
    h, w = grid.shape
    return t.f + t.e * (np.arange(h) + 0.5), t.c + t.a * (np.arange(w) + 0.5)


def georeference(ds: xr.Dataset, grid: GeoBox) -> xr.Dataset:
    """Attach CRS and exact transform the way rioxarray/GDAL read them back (``spatial_ref``)."""
    import rioxarray  # noqa: F401  (registers .rio)

    ds = ds.rio.write_crs(grid.crs.to_wkt()).rio.write_transform(grid.affine)
    for v in ds.data_vars:
        # Explicit encodings drop rioxarray's encoding-level grid_mapping: keep it as an attribute.
        ds[v].attrs["grid_mapping"] = "spatial_ref"
    return ds


def create_store(path: Path, grid: GeoBox, plan: TilingPlan, attrs: dict[str, Any]) -> None:
    """Write the store's metadata and coordinates; the data chunks come from the write tasks."""
    y, x = pixel_centres(grid)
    shape, chunks = tuple(grid.shape), plan.chunks
    ds = xr.Dataset(
        {
            "class_id": (("y", "x"), da.full(shape, NODATA_CLASS, dtype=np.uint8, chunks=chunks)),
            "confidence": (("y", "x"), da.full(shape, np.nan, dtype=np.float32, chunks=chunks)),
        },
        coords={"y": y, "x": x},
        attrs=attrs,
    )
    ds["class_id"].attrs.update(nodata=NODATA_CLASS, long_name="class id (255 = nodata)")
    ds["confidence"].attrs.update(long_name="probability of the winning class")
    ds = georeference(ds, grid)
    zchunks = (plan.chunk_size, plan.chunk_size)
    encoding = {
        "class_id": {"_FillValue": None, "fill_value": NODATA_CLASS, "chunks": zchunks},
        "confidence": {"_FillValue": np.nan, "chunks": zchunks},
    }
    ds.to_zarr(str(path), mode="w", compute=False, encoding=encoding, consolidated=False, zarr_format=3)
    (Path(path) / MARKERS).mkdir(parents=True, exist_ok=True)


def write_chunk(path: str, chunk: Chunk, job_key: str, result: tuple[np.ndarray, np.ndarray]) -> dict[str, int]:
    """Write one chunk's class map and confidence into the store, then mark it done."""
    import zarr

    class_id, confidence = result
    group = zarr.open_group(path, mode="r+")
    region = (slice(chunk.core.y0, chunk.core.y1), slice(chunk.core.x0, chunk.core.x1))
    group["class_id"][region] = class_id
    group["confidence"][region] = confidence
    marker = Path(path) / MARKERS / f"{chunk.iy}_{chunk.ix}"
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(job_key)
    tmp.replace(marker)
    return {"iy": chunk.iy, "ix": chunk.ix, "valid": int((class_id != NODATA_CLASS).sum())}


def done_chunks(path: Path, job_key: str) -> set[tuple[int, int]]:
    """Chunks a previous run of the same job (same key) finished."""
    root = Path(path) / MARKERS
    if not root.is_dir():
        return set()
    done = set()
    for m in root.iterdir():
        if m.suffix == ".tmp":
            continue
        try:
            if m.read_text() == job_key:
                iy, ix = m.name.split("_")
                done.add((int(iy), int(ix)))
        except (OSError, ValueError):
            continue
    return done


def finalize_store(path: Path) -> None:
    """Drop the markers of a complete store (a finished store needs none)."""
    shutil.rmtree(Path(path) / ".geoseg", ignore_errors=True)


def open_prediction(path: str | Path) -> xr.Dataset:
    """The prediction store as an xarray Dataset, CRS and transform decoded, class ids as uint8."""
    return xr.open_zarr(str(path), decode_coords="all", consolidated=False)
