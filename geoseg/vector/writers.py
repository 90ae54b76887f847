"""Polygon layers written from part files, one part at a time, under a temporary name moved into place.

* GeoPackage (``.gpkg``): layer ``landuse`` with its R-tree spatial index, appended part by
  part; the categorized style in ``layer_styles`` (QGIS applies it on load).
* GeoParquet 1.1 (``.parquet``): one row group per part, WKB geometry with a bbox covering
  column; a ``.qml`` beside it.
* FlatGeobuf (``.fgb``): with its packed R-tree, which GDAL builds over every feature at once
  (the one format here held whole in memory while written); a ``.qml`` beside it.

The file appears at its path complete or not at all.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable

import geopandas as gpd
import numpy as np
import pandas as pd

from geoseg.errors import ConfigError, OutputExistsError
from geoseg.model.card import ClassInfo
from geoseg.vector.style import add_gpkg_style, polygon_qml, write_qml

LAYER = "landuse"
# a write that fails with less than this left on the file system failed for want of space: GDAL's GeoPackage driver
# does not say so (SQLite's table creation fails unseen, then an insert reports "no such table: gpkg_contents")
FULL_BYTES = 1 << 20
FORMATS = {".gpkg": "GeoPackage", ".parquet": "GeoParquet", ".fgb": "FlatGeobuf"}
COLUMNS = {"class_id": "uint8", "class_name": "object", "area_m2": "float64", "perimeter_m": "float64", "pixels": "int64"}


def check_vector_path(path: str | os.PathLike) -> str:
    from geoseg.io import storage

    if storage.is_url(path):  # Path() made s3://b/k a local folder s3:/b/k
        raise ConfigError(f"{path}: geoseg vectorize writes a local file; write it locally and upload it (geoseg predict "
                          "--out URL uploads its own landuse.gpkg)")
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ConfigError(f"{path}: vector output must end in .gpkg (GeoPackage), .parquet (GeoParquet) or .fgb (FlatGeobuf)")
    qml = Path(path).with_suffix(".qml")
    if suffix != ".gpkg" and qml.is_file() and "<renderer-v2" not in qml.read_text(errors="replace"):
        # the style QGIS loads with this file is <name>.qml: another layer's (the class raster's) would be replaced
        raise OutputExistsError(f"{qml}: holds another layer's style (a raster's), which QGIS would lose: {Path(path).name} "
                                "writes its style there; give the polygons another name (landuse.parquet)")
    return suffix


def empty_frame(crs: Any, confidence: bool = False) -> gpd.GeoDataFrame:
    cols = {k: pd.Series([], dtype=v) for k, v in COLUMNS.items()}
    if confidence:
        cols["mean_confidence"] = pd.Series([], dtype="float32")
    return gpd.GeoDataFrame(cols, geometry=gpd.GeoSeries([], crs=crs), crs=crs)


def _geometry_type(frames_multi: bool) -> str:
    return "MultiPolygon" if frames_multi else "Polygon"


def write_layer(parts: Iterable[gpd.GeoDataFrame], path: str | os.PathLike, *, crs: Any, classes: Iterable[ClassInfo],
                multi: bool = False, confidence: bool = False) -> dict[str, Any]:
    """Write the polygons of ``parts`` to ``path`` (format by suffix), atomically; returns counts.

    ``multi``: regions may be MultiPolygons (8-connectivity): the layer is declared MultiPolygon.
    """
    out = Path(path)
    suffix = check_vector_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.{uuid.uuid4().hex[:12]}.tmp{suffix}")
    classes = list(classes)
    try:
        if suffix == ".gpkg":
            n = _gpkg(parts, tmp, crs, multi, confidence)
            add_gpkg_style(tmp, LAYER, polygon_qml(classes))
        elif suffix == ".parquet":
            n = _parquet(parts, tmp, crs, multi, confidence)
        else:
            n = _fgb(parts, tmp, crs, multi, confidence)
        if suffix != ".gpkg":  # the style first: a file never stands at its path without its style
            write_qml(out, polygon_qml(classes))
        os.replace(tmp, out)
    except Exception as exc:
        if not isinstance(exc, OSError) and shutil.disk_usage(out.parent).free < FULL_BYTES:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out)) from exc
        raise
    finally:
        # GeoPackage is SQLite: an interrupted write can leave -journal/-wal files beside it
        for leftover in (tmp, *out.parent.glob(f"{tmp.name}-*")):
            leftover.unlink(missing_ok=True)
    return {"path": str(out), "format": FORMATS[suffix], "polygons": n}


def _promote(gdf: gpd.GeoDataFrame, multi: bool) -> gpd.GeoDataFrame:
    if not multi or gdf.empty:
        return gdf
    import shapely

    geoms = gdf.geometry.values
    single = shapely.get_type_id(geoms) == 3
    if single.any():
        gdf = gdf.copy()
        arr = np.asarray(geoms, dtype=object)
        arr[single] = [shapely.MultiPolygon([g]) for g in arr[single]]
        gdf = gdf.set_geometry(gpd.GeoSeries(arr, crs=gdf.crs))
    return gdf


def _gpkg(parts: Iterable[gpd.GeoDataFrame], tmp: Path, crs: Any, multi: bool, confidence: bool) -> int:
    import pyogrio

    n, created = 0, False
    for gdf in parts:
        if gdf.empty:
            continue
        pyogrio.write_dataframe(_promote(gdf, multi), tmp, layer=LAYER, driver="GPKG", append=created,
                                geometry_type=_geometry_type(multi))
        created, n = True, n + len(gdf)
    if not created:
        # an empty layer still declares its fields and polygon geometry
        pyogrio.write_dataframe(empty_frame(crs, confidence), tmp, layer=LAYER, driver="GPKG",
                                geometry_type=_geometry_type(multi))
    return n


def _parquet(parts: Iterable[gpd.GeoDataFrame], tmp: Path, crs: Any, multi: bool, confidence: bool) -> int:
    import pyarrow.parquet as pq
    from geopandas.io.arrow import _geopandas_to_arrow

    writer, schema, n = None, None, 0
    try:
        for gdf in parts:
            if gdf.empty:
                continue
            table = _geopandas_to_arrow(_promote(gdf, multi), index=False, schema_version="1.1.0", write_covering_bbox=True)
            if writer is None:
                geo = json.loads(table.schema.metadata[b"geo"])
                col = geo["columns"][geo["primary_column"]]
                col.pop("bbox", None)  # the first part's extent is not the layer's
                col["geometry_types"] = [_geometry_type(multi)]
                schema = table.schema.with_metadata({**table.schema.metadata, b"geo": json.dumps(geo).encode()})
                writer = pq.ParquetWriter(str(tmp), schema)
            writer.write_table(table.cast(schema))
            n += len(gdf)
        if writer is None:
            empty_frame(crs, confidence).to_parquet(tmp, index=False, schema_version="1.1.0", write_covering_bbox=True)
    finally:
        if writer is not None:
            writer.close()
    return n


def _fgb(parts: Iterable[gpd.GeoDataFrame], tmp: Path, crs: Any, multi: bool, confidence: bool) -> int:
    import pyogrio

    frames = [_promote(g, multi) for g in parts if not g.empty]
    gdf = pd.concat(frames, ignore_index=True) if frames else empty_frame(crs, confidence)
    pyogrio.write_dataframe(gpd.GeoDataFrame(gdf, crs=crs), tmp, layer=LAYER, driver="FlatGeobuf", geometry_type=_geometry_type(multi))
    return len(gdf)
