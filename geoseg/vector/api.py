"""Polygons of class maps: one per connected region of one class, exactly as GDAL's polygonize draws them.

* ``vectorize(source, outputs)``: a prediction store or a class raster of any size, polygonized
  chunk by chunk on a Dask cluster with an exact join across chunk borders (geoseg.vector.run),
  written to GeoPackage / GeoParquet / FlatGeobuf with a QGIS style.
* ``polygonize(array, transform, crs, classes)``: an in-memory class map, in this process.

Polygons follow pixel edges, so rasterizing them back (pixel centres) gives the class map again.
``area_m2`` and ``perimeter_m`` are measured on the ellipsoid in every CRS (geoseg.vector.measure).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterable, Sequence

import geopandas as gpd
import numpy as np
from affine import Affine

from geoseg.errors import ConfigError, InputError
from geoseg.io import storage
from geoseg.model.card import NODATA_CLASS, ClassInfo
from geoseg.vector.measure import Measurer, to_pyproj
from geoseg.vector.polygons import attributes, label_polygons, region_stats
from geoseg.vector.regions import check_connectivity, label_regions
from geoseg.vector.run import ClassRaster, VectorizeOptions, iter_parts, open_class_raster, vectorize_parts
from geoseg.vector.writers import LAYER, check_vector_path, empty_frame, write_layer

__all__ = ["LAYER", "classes_from_attrs", "classes_of", "polygonize", "vectorize", "write_vectors"]


def polygonize(
    class_id: np.ndarray,
    transform: Affine,
    crs: Any,
    classes: Iterable[ClassInfo],
    nodata: int | None = NODATA_CLASS,
    connectivity: int = 4,
    confidence: np.ndarray | None = None,
) -> gpd.GeoDataFrame:
    """One polygon per connected region of one class (nodata in none), in ``crs``, in this process.

    Columns: ``class_id``, ``class_name`` ("class_<id>" for ids not in ``classes``), ``area_m2``,
    ``perimeter_m`` (ellipsoidal), ``pixels``, ``mean_confidence`` (with ``confidence``), ``geometry``.
    """
    a = np.asarray(class_id)
    if a.ndim != 2:
        raise InputError(f"class map must be 2-D, got shape {a.shape}")
    if a.dtype != np.uint8:
        if a.dtype.kind not in "iu" or (a.size and (a.min() < 0 or a.max() > 255)):
            raise InputError(f"class ids must be uint8 (0-255), got dtype {a.dtype}")
        a = a.astype(np.uint8)
    check_connectivity(connectivity)
    pcrs = to_pyproj(crs)
    labels, lab_class = label_regions(a, nodata, connectivity)
    ids, geoms = label_polygons(labels, transform, connectivity)
    if not len(ids):
        return empty_frame(pcrs, confidence is not None)
    pixels, conf_sum = region_stats(labels, len(lab_class), confidence)
    cols = attributes(geoms, lab_class[ids], pixels[ids], None if conf_sum is None else conf_sum[ids],
                      {c.id: c.name for c in classes}, Measurer(pcrs))
    return gpd.GeoDataFrame(cols, geometry=gpd.GeoSeries(geoms, crs=pcrs), crs=pcrs)


def write_vectors(gdf: gpd.GeoDataFrame, path: str | os.PathLike, classes: Iterable[ClassInfo] = ()) -> Path:
    """Write an in-memory polygon layer as .gpkg / .parquet / .fgb, atomically, styled by ``classes``."""
    classes = list(classes) or [ClassInfo(id=int(i), name=f"class_{int(i)}", color="#888888")
                                for i in sorted(set(gdf["class_id"].astype(int)))] if len(gdf) else list(classes)
    write_layer([gdf], path, crs=gdf.crs, classes=classes, confidence="mean_confidence" in gdf)
    return Path(path)


def classes_of(src: ClassRaster) -> list[ClassInfo]:
    """The classes a class map carries (a geoseg store's or COG's class names and colours), else none."""
    import json

    if src.kind == "zarr":
        import zarr

        from geoseg.io.zarr_store import store_attrs

        found = (store_attrs(src.path) or {}).get("geoseg_classes")
        if found:
            return [ClassInfo(**c) for c in found]
        # a store written by xarray from geoseg.predict: CF-style attributes on class_id
        return classes_from_attrs(zarr.open_group(src.path, mode="r", **storage.zarr_kwargs(src.path))["class_id"].attrs)
    import rasterio

    with storage.gdal_env(src.path), rasterio.open(src.path) as ds:
        tags = ds.tags()
    if "CLASS_NAMES" not in tags:
        return []
    names = json.loads(tags["CLASS_NAMES"])
    colors = json.loads(tags.get("CLASS_COLORS", "{}"))
    palette = palette_of(src)  # the raster's colour table where the tags give no colour (as QGIS shows the raster)
    return [ClassInfo(id=int(k), name=v, color=colors.get(k) or palette.get(int(k), "#888888")) for k, v in names.items()]


def classes_from_attrs(attrs: Any) -> list[ClassInfo]:
    """Classes from the CF-style attributes geoseg.predict puts on ``class_id`` (flag_values, class_names, class_colors)."""
    ids = attrs.get("flag_values")
    if ids is None or not len(np.atleast_1d(ids)):
        return []
    ids = [int(i) for i in np.atleast_1d(ids)]
    names = list(attrs.get("class_names") or [f"class_{i}" for i in ids])
    colors = list(attrs.get("class_colors") or ["#808080"] * len(ids))
    return [ClassInfo(id=i, name=n, color=c) for i, n, c in zip(ids, names, colors)]


@contextlib.contextmanager
def _parts_dir(near: str | os.PathLike | None) -> Any:
    """Where workers put part files: a hidden folder beside the output (local) or under its prefix (URL)."""
    if near is not None and storage.is_url(near):
        loc = storage.join(str(near), f".geoseg-parts-{uuid.uuid4().hex[:12]}")
        try:
            yield str(loc)
        finally:
            storage.remove(loc, recursive=True)
        return
    parent = Path(near) if near is not None else Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".geoseg-parts-", dir=parent))
    try:
        yield str(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def vectorize(
    source: str | os.PathLike | ClassRaster,
    outputs: Sequence[str | os.PathLike],
    *,
    client: Any = None,
    chunk_size: int | None = None,
    connectivity: int = 4,
    classes: Iterable[ClassInfo] | None = None,
    keep_classes: Sequence[int] | None = None,
    min_area: str | float | None = None,
    simplify: str | float | None = None,
    parts_near: str | os.PathLike | None = None,
    priority: int = 0,
) -> dict[str, Any]:
    """Polygonize ``source`` (prediction.zarr or a class raster) on the cluster into each of ``outputs``.

    Same polygons as GDAL's polygonize of the whole raster, for any chunk size (4-connectivity;
    with 8, regions joined only at a corner across a chunk line come out as MultiPolygons).
    ``min_area``: sieve the map first: regions smaller than this ("25px", "500m2", "0.5ha"; a bare
    number is pixels) take the class they share the longest border with, so the polygons stay a
    partition. ``simplify``: a tolerance ("1.5px" or map units) for GEOS's coverage simplification,
    which simplifies each shared border once, so neighbours keep sharing it (no gaps, no overlaps);
    it runs over the whole layer in this process (memory grows with the polygons, not the raster).
    Without ``client`` an embedded local cluster runs it. Returns counts and the files written.
    """
    for out in outputs:
        check_vector_path(out)
    src = source if isinstance(source, ClassRaster) else open_class_raster(source)
    classes = list(classes) if classes is not None else classes_of(src)
    min_pixels, min_area_m2 = min_area_limit(min_area, src)
    tolerance = simplify_tolerance(simplify, src)  # a bad tolerance stops here, before any cluster work
    if keep_classes is not None and any(not 0 <= int(k) <= 254 for k in keep_classes):
        raise ConfigError(f"classes to keep must be class ids 0-254, not {', '.join(map(str, keep_classes))}")
    opts = VectorizeOptions(chunk_size=chunk_size, connectivity=check_connectivity(connectivity),
                            keep_classes=None if keep_classes is None else tuple(int(k) for k in keep_classes),
                            names={c.id: c.name for c in classes}, min_pixels=min_pixels, min_area_m2=min_area_m2)
    near = parts_near if parts_near is not None else Path(outputs[0]).parent if outputs else None
    with contextlib.ExitStack() as stack:
        if client is None:
            from geoseg.cluster import connect

            client = stack.enter_context(connect(gpus=()))  # no model tasks: no GPU workers
        parts = stack.enter_context(_parts_dir(near))
        stats = vectorize_parts(client, src, parts, opts, priority)
        # a class for every id the polygons hold: a categorized style without one draws nothing of that id in QGIS
        # (a class raster whose CLASS_NAMES name some of its ids)
        named = {c.id for c in classes}
        classes = sorted([*classes, *(c for c in _classes_from_parts(parts, palette_of(src)) if c.id not in named)],
                         key=lambda c: c.id)
        layer = (lambda: [_simplified(iter_parts(parts), tolerance, src)]) if tolerance else (lambda: iter_parts(parts))
        written = [write_layer(layer(), out, crs=to_pyproj(src.crs_wkt), classes=classes,
                               multi=connectivity == 8, confidence=src.has_confidence) for out in outputs]
    return {**stats, "outputs": written}


def _quantity(value: str | float | None, units: str, default: str, problem: str) -> tuple[float, str] | None:
    """``value`` as (number, unit) with ``units`` a regex alternation ("px|m2|ha"); None for nothing."""
    import re

    from geoseg.errors import ConfigError

    if value is None or value == "" or value == 0:
        return None
    m = re.fullmatch(rf"\s*([0-9]*\.?[0-9]+)\s*({units})?\s*", str(value))
    if not m:
        raise ConfigError(f"{value!r}: {problem}")
    return float(m.group(1)), m.group(2) or default


def simplify_tolerance(value: str | float | None, src: ClassRaster) -> float:
    """``--simplify`` in map units: "1.5px" (pixel widths) or a number in the CRS's units."""
    q = _quantity(value, "px", "", "--simplify takes a tolerance in pixels (1.5px) or in the CRS's units (15)")
    if q is None:
        return 0.0
    number, unit = q
    return number * abs(src.affine.a) if unit == "px" else number


def _simplified(parts: Iterable[gpd.GeoDataFrame], tolerance: float, src: ClassRaster) -> gpd.GeoDataFrame:
    """Every polygon at once through GEOS's coverage simplification; areas and perimeters measured again."""
    import pandas as pd
    import shapely

    frames = [g for g in parts if not g.empty]
    if not frames:
        return empty_frame(to_pyproj(src.crs_wkt), src.has_confidence)
    gdf = pd.concat(frames, ignore_index=True)
    geoms = np.asarray(gdf.geometry.values, dtype=object)
    # 8-connected regions are GDAL's rings that touch themselves at corners, no valid coverage: split there first
    # (into valid MultiPolygons), or the simplification leaves gaps and overlaps at those corners
    geoms = shapely.make_valid(geoms, method="structure", keep_collapsed=False)
    geoms = shapely.coverage_simplify(geoms, tolerance)
    area, perimeter = Measurer(to_pyproj(src.crs_wkt))(geoms)
    out = gpd.GeoDataFrame(gdf.drop(columns="geometry"), geometry=gpd.GeoSeries(geoms, crs=gdf.crs), crs=gdf.crs)
    out["area_m2"], out["perimeter_m"] = area, perimeter
    return out


def min_area_limit(value: str | float | None, src: ClassRaster) -> tuple[int, float]:
    """``--min-area`` as (pixels, m²): "25" or "25px" is (25, 0); "500m2" or "0.5ha" is judged on the ground (each
    region's pixels summed by their area, ``row_pixel_areas``), with the pixels that area spans at the most (the
    area over the scene's smallest pixel: the halo that keeps chunks exact)."""
    from geoseg.errors import ConfigError
    from geoseg.vector.run import row_pixel_areas

    q = _quantity(value, "px|m2|ha", "px", "--min-area takes pixels (25 or 25px), square metres (500m2) or hectares (0.5ha)")
    if q is None:
        return 0, 0.0
    number, unit = q
    if unit == "px":
        return int(np.ceil(number)), 0.0
    metres = number * (1e4 if unit == "ha" else 1.0)
    areas = row_pixel_areas(src, 0, src.shape[0])
    if not np.isfinite(areas).all() or areas.min() <= 0:
        raise ConfigError(f"--min-area {value!r}: {src.path} has no CRS on an ellipsoid to measure pixels with; give pixels")
    return int(np.ceil(metres / areas.min())), metres


def palette_of(src: ClassRaster) -> dict[int, str]:
    """A class raster's own colour table (GDAL's palette of band 1: what QGIS shows it with), as #rrggbb by id."""
    if src.kind != "raster":
        return {}
    import rasterio

    try:
        with storage.gdal_env(src.path), rasterio.open(src.path) as ds:
            table = ds.colormap(1)
    except ValueError:  # no colour table
        return {}
    return {int(i): "#{:02x}{:02x}{:02x}".format(*rgba[:3]) for i, rgba in table.items() if i <= 254}


def _classes_from_parts(parts: str, palette: dict[int, str] | None = None) -> list[ClassInfo]:
    """Classes for the ids the polygons hold: the raster's own colours where it has a table (the layer then looks
    like the raster), else geoseg's defaults."""
    from geoseg.model.card import DEFAULT_COLORS

    ids: set[int] = set()
    for frame in iter_parts(parts, columns=["class_id"]):  # the ids alone: no polygon is read for them
        ids |= set(int(i) for i in frame["class_id"].unique())
    # a map whose nodata is another value may hold 255 as a class: polygons, but no class to style (ids 0-254)
    palette = palette or {}
    return [ClassInfo(id=i, name=f"class_{i}", color=palette.get(i, DEFAULT_COLORS[i % len(DEFAULT_COLORS)]))
            for i in sorted(ids) if i <= 254]
