"""Polygons of a class map: one per 4-connected region of one class, as GDAL's polygonize draws them.

Polygons follow pixel edges exactly, so rasterizing them back (pixel centres, no all_touched)
gives the class map again. Files are written atomically as GeoPackage or GeoParquet.
"""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path
from typing import Any, Iterable

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from affine import Affine
from pyproj import CRS, Geod
from rasterio.features import shapes

from geoseg.errors import ConfigError, InputError
from geoseg.model.card import NODATA_CLASS, ClassInfo

LAYER = "landuse"
COLUMNS = ("class_id", "class_name", "area_m2")


def _empty(crs: CRS | None) -> gpd.GeoDataFrame:
    return gpd.GeoDataFrame(
        {
            "class_id": pd.Series([], dtype="uint8"),
            "class_name": pd.Series([], dtype=object),
            "area_m2": pd.Series([], dtype="float64"),
        },
        geometry=gpd.GeoSeries([], crs=crs),
        crs=crs,
    )


def _to_pyproj(crs: Any) -> CRS | None:
    if crs is None:
        return None
    try:
        return CRS.from_user_input(crs.to_wkt() if hasattr(crs, "to_wkt") else crs)
    except Exception as exc:  # pyproj raises CRSError, odc and rasterio their own types
        raise InputError(f"CRS {crs!r} is not understood: {exc}") from None


def areas_m2(geoms: np.ndarray, crs: CRS | None) -> np.ndarray:
    """Area of each polygon in square metres: planar for projected CRSs, geodesic for geographic.

    NaN where the CRS says nothing about metres (no CRS, or an engineering CRS).
    """
    if crs is None or len(geoms) == 0:
        return np.full(len(geoms), np.nan)
    if crs.is_geographic:
        # GeographicLib on the CRS's own ellipsoid; rasterio's x is longitude (GIS axis order)
        geod: Geod = crs.get_geod()  # type: ignore[assignment]
        to_degrees = crs.axis_info[0].unit_conversion_factor / (math.pi / 180.0)
        if not math.isclose(to_degrees, 1.0, rel_tol=1e-12):
            geoms = shapely.transform(geoms, lambda xy: xy * to_degrees)
        # orient: exteriors counter-clockwise, holes clockwise, so holes subtract and areas are > 0
        return np.array([abs(geod.geometry_area_perimeter(shapely.orient_polygons(g))[0]) for g in geoms])
    if crs.is_projected:
        # metres per CRS unit: 0.3048006096 for US survey feet, 1.0 for metres
        factor = crs.axis_info[0].unit_conversion_factor
        return shapely.area(geoms) * factor * factor
    return np.full(len(geoms), np.nan)


def polygonize(
    class_id: np.ndarray,
    transform: Affine,
    crs: Any,
    classes: Iterable[ClassInfo],
    nodata: int = NODATA_CLASS,
) -> gpd.GeoDataFrame:
    """One polygon per 4-connected region of one class (nodata in none), in ``crs``.

    Columns: ``class_id`` (uint8), ``class_name`` ("class_<id>" for ids not in ``classes``),
    ``area_m2`` and ``geometry``. Holds the whole ``class_id`` array and its polygons in memory.
    """
    a = np.asarray(class_id)
    if a.ndim != 2:
        raise InputError(f"class map must be 2-D, got shape {a.shape}")
    if a.dtype != np.uint8:
        if a.dtype.kind not in "iu" or (a.size and (a.min() < 0 or a.max() > 255)):
            raise InputError(f"class ids must be uint8 (0-255), got dtype {a.dtype}")
        a = a.astype(np.uint8)
    pcrs = _to_pyproj(crs)
    names = {c.id: c.name for c in classes}
    geoms: list[shapely.Polygon] = []
    ids: list[int] = []
    mask = a != nodata
    if mask.any():
        for geom, value in shapes(a, mask=mask, connectivity=4, transform=transform):
            rings = geom["coordinates"]
            geoms.append(shapely.Polygon(rings[0], rings[1:]))
            ids.append(int(value))
    if not geoms:
        return _empty(pcrs)
    geom_arr = np.array(geoms, dtype=object)
    id_arr = np.array(ids, dtype=np.uint8)
    return gpd.GeoDataFrame(
        {
            "class_id": id_arr,
            "class_name": [names.get(i, f"class_{i}") for i in ids],
            "area_m2": areas_m2(geom_arr, pcrs),
        },
        geometry=gpd.GeoSeries(geom_arr, crs=pcrs),
        crs=pcrs,
    )


def write_vectors(gdf: gpd.GeoDataFrame, path: str | os.PathLike) -> Path:
    """Write ``gdf`` as GeoPackage (.gpkg, layer "landuse") or GeoParquet (.parquet), atomically.

    An existing file at ``path`` is replaced only once the new one is complete.
    """
    out = Path(path)
    suffix = out.suffix.lower()
    if suffix not in (".gpkg", ".parquet"):
        raise ConfigError(f"{out}: vector output must end in .gpkg (GeoPackage) or .parquet (GeoParquet)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.{uuid.uuid4().hex[:12]}.tmp{suffix}")
    try:
        if suffix == ".gpkg":
            # geometry_type: an empty layer still declares polygons rather than "Unknown"
            gdf.to_file(tmp, layer=LAYER, driver="GPKG", engine="pyogrio", geometry_type="Polygon")
        else:
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise ConfigError(
                    f"{out}: writing GeoParquet needs the pyarrow package; install it or write .gpkg"
                ) from None
            gdf.to_parquet(tmp, index=False)
        os.replace(tmp, out)
    finally:
        # GeoPackage is SQLite: an interrupted write can leave -journal/-wal files beside it
        for leftover in (tmp, *out.parent.glob(f"{tmp.name}-*")):
            leftover.unlink(missing_ok=True)
    return out
