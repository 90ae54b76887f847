"""Labels on the image grid: a class raster, or vector polygons rasterized window by window.

Every label source answers one question, ``read_labels(source, box)``: the class ids (uint8,
255 = no label) of the image pixels in ``box``. Ids keep the values the labels use; they must
be integers 0-254. Nodata, values passed as ``ignore`` and pixels outside the labels are 255.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyproj
import rasterio
from odc.geo.geobox import GeoBox
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import RasterioIOError
from rasterio.vrt import WarpedVRT
from affine import Affine

from geoseg.errors import GridMismatchError, InputError, InputNotFoundError
from geoseg.io import storage
from geoseg.io.sources import dataset, grid_of
from geoseg.io.classes import load_classes  # noqa: F401  (part of the labels API)
from geoseg.model.card import DEFAULT_COLORS, NODATA_CLASS, ClassInfo
from geoseg.tiling import Box

log = logging.getLogger(__name__)

VECTOR_SUFFIXES = frozenset({".gpkg", ".geojson", ".json", ".shp", ".fgb", ".gml", ".kml", ".parquet", ".sqlite"})
# Field names taken as the class field when --label-field is not given, in this order.
FIELD_GUESSES = ("class_id", "classid", "class", "label", "class_name", "classname", "landcover", "lc")
# PROJ terms that name a datum or its realisation rather than the projection itself.
_DATUM_TERMS = ("datum", "towgs84", "nadgrids", "ellps", "no_defs", "type", "wktext", "geoidgrids", "vunits", "init")


class LabelGridWarning(UserWarning):
    """Labels were accepted on a grid whose CRS differs from the image's only in datum realisation."""


# -- classes ---------------------------------------------------------------------------------


def default_classes(ids: Iterable[int]) -> tuple[ClassInfo, ...]:
    """Named ``class_<id>`` with the default palette, for labels that come without names."""
    return tuple(
        ClassInfo(id=int(i), name=f"class_{int(i)}", color=DEFAULT_COLORS[k % len(DEFAULT_COLORS)])
        for k, i in enumerate(sorted(set(int(i) for i in ids)))
    )


# -- CRS -------------------------------------------------------------------------------------


def _pyproj(crs: Any) -> pyproj.CRS:
    proj = getattr(crs, "proj", None)  # odc-geo CRS
    if isinstance(proj, pyproj.CRS):
        return proj
    if hasattr(crs, "to_wkt"):
        return pyproj.CRS.from_wkt(crs.to_wkt())
    return pyproj.CRS.from_user_input(crs)


def _projection_terms(crs: pyproj.CRS) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # to_dict warns that it drops datum information: that is the point
        terms = crs.to_dict()
    return {k: v for k, v in terms.items() if k not in _DATUM_TERMS}


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-9)
    return a == b


def crs_equivalent(a: Any, b: Any) -> bool:
    """Same projection, parameters, units and ellipsoid; the datum realisation may differ.

    EPSG:32119 (NAD83) and EPSG:3358 (NAD83(HARN)) are equivalent: pyproj calls them unequal,
    but coordinates on one grid mean the same pixels to well under a metre.
    """
    pa, pb = _pyproj(a), _pyproj(b)
    if pa.equals(pb, ignore_axis_order=True):
        return True
    if pa.is_projected != pb.is_projected or pa.is_geographic != pb.is_geographic:
        return False
    ea, eb = pa.ellipsoid, pb.ellipsoid
    if ea is None or eb is None:
        return False
    if not (
        math.isclose(ea.semi_major_metre, eb.semi_major_metre, rel_tol=1e-12)
        and math.isclose(ea.semi_minor_metre, eb.semi_minor_metre, rel_tol=1e-12)
    ):
        return False
    pma, pmb = pa.prime_meridian, pb.prime_meridian
    if pma is not None and pmb is not None and not math.isclose(pma.longitude, pmb.longitude, abs_tol=1e-12):
        return False
    ta, tb = _projection_terms(pa), _projection_terms(pb)
    return ta.keys() == tb.keys() and all(_same_value(ta[k], tb[k]) for k in ta)


def _crs_name(crs: Any) -> str:
    p = _pyproj(crs)
    epsg = p.to_epsg(min_confidence=70)
    if epsg:
        return f"EPSG:{epsg} ({p.name})"
    name = p.name if p.name and p.name != "unnamed" else "an unnamed CRS"
    try:  # GDAL identifies more of the CRSs old files carry than PROJ does
        like = rasterio.crs.CRS.from_wkt(p.to_wkt()).to_epsg()
    except Exception:
        like = None
    return f"{name} (GDAL reads it as EPSG:{like})" if like else name


# -- sources ---------------------------------------------------------------------------------


def _to_ids(data: np.ndarray, valid: np.ndarray, nodata: float | None, ignore: Sequence[int], path: str, box: Box) -> np.ndarray:
    """Label values to uint8 class ids (255 = no label), or a clear error for values that are no id."""
    if nodata is not None:
        valid &= ~np.isnan(data) if np.isnan(nodata) else data != nodata
    if np.issubdtype(data.dtype, np.floating):
        valid &= np.isfinite(data)
    for v in ignore:
        valid &= data != v
    values = data[valid]
    out = np.full(data.shape, NODATA_CLASS, np.uint8)
    if values.size == 0:
        return out
    if np.issubdtype(values.dtype, np.floating):
        frac = values != np.floor(values)
        if frac.any():
            raise InputError(
                f"{path}: label value {float(values[frac][0])!r} (window rows {box.y0}-{box.y1}, cols {box.x0}-{box.x1}) "
                "is not an integer class id; labels must hold integer ids 0-254 (round them first, e.g. "
                "gdal_calc.py --calc 'round(A)' --type Byte)"
            )
    lo, hi = values.min(), values.max()
    if lo < 0 or hi > 254:
        bad = lo if lo < 0 else hi
        bad_s = int(bad) if np.isfinite(bad) else bad
        raise InputError(
            f"{path}: label value {bad_s} is not a class id (ids are 0-254, 255 means nodata); "
            f"set it as the raster's nodata or pass --ignore-index {bad_s} to leave it out"
        )
    out[valid] = values.astype(np.uint8)
    return out


@dataclass(frozen=True)
class RasterLabels:
    """A single-band class raster, read on the image grid (directly, or warped nearest-neighbour)."""

    path: str
    grid: GeoBox
    nodata: float | None
    ignore: tuple[int, ...] = ()
    use_mask: bool = False
    warp: bool = False
    source_crs_wkt: str | None = None  # CRS the source is read in when warped (the image's, when equivalent)

    @property
    def classes(self) -> tuple[ClassInfo, ...] | None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"file": Path(self.path).name, "kind": "raster", "ignore": list(self.ignore), "reprojected": self.warp}

    def __dask_tokenize__(self) -> Any:
        return ("geoseg-labels", _identity(self.path), _grid_token(self.grid), self.ignore, self.warp)

    def read(self, box: Box) -> np.ndarray:
        try:
            with dataset(self.path) as ds:
                if self.warp:
                    g = self.grid
                    kwargs: dict[str, Any] = {
                        "crs": rasterio.crs.CRS.from_wkt(g.crs.to_wkt()),
                        "transform": g.affine,
                        "width": g.shape[1],
                        "height": g.shape[0],
                        "resampling": Resampling.nearest,  # class ids: never interpolate
                    }
                    if self.source_crs_wkt:
                        kwargs["src_crs"] = rasterio.crs.CRS.from_wkt(self.source_crs_wkt)
                    if ds.nodata is None:
                        kwargs["add_alpha"] = True  # so pixels outside the label raster read as masked
                    with WarpedVRT(ds, **kwargs) as vrt:
                        data = vrt.read(1, window=box.window)
                        valid = vrt.read_masks(1, window=box.window) > 0
                else:
                    data = ds.read(1, window=box.window)
                    valid = ds.read_masks(1, window=box.window) > 0 if self.use_mask else np.ones(data.shape, bool)
        except RasterioIOError as exc:
            raise InputError(f"{self.path}: read failed at {box.window} ({exc}); the file may be truncated") from None
        return _to_ids(data, valid, self.nodata, self.ignore, self.path, box)


@dataclass(frozen=True, eq=False)
class VectorLabels:
    """Polygons (or lines, points) with a class id each, in the image CRS, rasterized per window.

    Pixels take the id of the polygon that contains their centre; where polygons overlap the
    one later in the file wins.
    """

    path: str
    field: str
    grid: GeoBox
    geoms: np.ndarray  # shapely geometries in the image CRS
    bounds: np.ndarray  # (n, 4) minx, miny, maxx, maxy
    ids: np.ndarray  # uint8 class id per geometry
    classes: tuple[ClassInfo, ...] | None  # classes the file defines by name (None when it holds ids)
    all_touched: bool = False
    background: int | None = None  # class of valid pixels no feature covers (None: unlabelled)

    def describe(self) -> dict[str, Any]:
        return {"file": Path(self.path).name, "kind": "vector", "field": self.field, "features": int(len(self.ids)),
                "background": self.background}

    @cached_property
    def features_digest(self) -> str:
        """sha256 of the features' geometries: two layers of one file, or a file edited in place, are other labels."""
        import hashlib

        import shapely

        digest = hashlib.sha256()
        for wkb in shapely.to_wkb(self.geoms):
            digest.update(wkb)
        return digest.hexdigest()

    def __dask_tokenize__(self) -> Any:
        return ("geoseg-labels", os.path.abspath(self.path), self.field, _grid_token(self.grid), self.features_digest,
                self.ids.tobytes(), self.all_touched, self.background)

    def hits(self, box: Box) -> np.ndarray:
        """Which features' bounds meet pixel box ``box`` (the others put no label there)."""
        a = self.grid.affine
        left, top = a @ (box.x0, box.y0)
        right, bottom = a @ (box.x1, box.y1)
        left, right, bottom, top = min(left, right), max(left, right), min(bottom, top), max(bottom, top)
        b = self.bounds
        return (b[:, 0] <= right) & (b[:, 2] >= left) & (b[:, 1] <= top) & (b[:, 3] >= bottom)

    def read(self, box: Box) -> np.ndarray:
        from rasterio.features import rasterize

        hit = self.hits(box)
        fill = NODATA_CLASS if self.background is None else self.background
        if not hit.any():
            return np.full(box.shape, fill, np.uint8)
        shapes = zip(self.geoms[hit], self.ids[hit].tolist())
        return rasterize(
            shapes,
            out_shape=box.shape,
            transform=self.grid.affine @ Affine.translation(box.x0, box.y0),
            fill=fill,
            dtype="uint8",
            all_touched=self.all_touched,
        )


LabelSource = RasterLabels | VectorLabels


def read_labels(source: LabelSource, box: Box) -> np.ndarray:
    """Class ids (uint8, 255 = no label) of the image pixels in ``box``."""
    return source.read(box)


def _identity(path: str) -> tuple[Any, ...]:
    try:
        st = os.stat(path)
        return (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    except OSError:
        return (path,)


def _grid_token(grid: GeoBox) -> tuple[Any, ...]:
    return (tuple(grid.shape), tuple(grid.affine)[:6], grid.crs.to_wkt())


def is_vector(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VECTOR_SUFFIXES or str(path).lower().endswith(".shp.zip")


def open_labels(
    path: str | os.PathLike,
    grid: GeoBox,
    *,
    field: str | None = None,
    classes: Sequence[ClassInfo] | None = None,
    classes_from: str = "--classes",
    ignore: Sequence[int] = (),
    reproject: bool = False,
    layer: str | None = None,
    all_touched: bool = False,
    image: str = "the image",
    background: int | None = None,
) -> LabelSource:
    """Open a label raster or vector file for reading onto ``grid``; checks everything it can cheaply.

    ``classes`` map class names of a vector field to ids (``classes_from`` says where they
    came from, for messages); ``image`` names the image for messages.
    """
    path = str(path)
    if "://" not in path and not path.startswith("/vsi") and not Path(path).exists():
        raise InputNotFoundError(f"{path}: no such label file; check the path")
    ignore = tuple(int(v) for v in ignore)
    if is_vector(path):
        return _open_vector(path, grid, field, classes, classes_from, ignore, layer, all_touched, image, background)
    if background is not None:
        raise InputError(f"{path}: --background is for vector labels (pixels no polygon covers), but this is a raster; drop it")
    if layer:
        raise InputError(f"{path}: --label-layer {layer!r} is for vector labels, but this is a raster; drop it")
    if field:
        raise InputError(f"{path}: --label-field {field!r} is for vector labels, but this is a raster; drop it")
    return _open_raster(path, grid, ignore, reproject, image)


def _open_raster(path: str, grid: GeoBox, ignore: tuple[int, ...], reproject: bool, image: str) -> RasterLabels:
    try:
        with storage.gdal_env(path):
            ds = rasterio.open(path)
    except RasterioIOError as exc:
        raise InputError(
            f"{path}: neither a raster GDAL can read nor a vector file ({str(exc).splitlines()[0]}); "
            "give a class raster (GeoTIFF) or polygons (GeoPackage, GeoJSON, Shapefile)"
        ) from None
    with ds:
        lgrid = grid_of(ds, path)
        if ds.count != 1:
            raise InputError(f"{path}: label raster has {ds.count} bands; give a single-band class raster")
        if not np.issubdtype(np.dtype(ds.dtypes[0]), np.number) or np.issubdtype(np.dtype(ds.dtypes[0]), np.complexfloating):
            raise InputError(f"{path}: label raster has data type {ds.dtypes[0]}; give integer class ids")
        nodata = ds.nodata
        flags = ds.mask_flag_enums[0]
        # a per-dataset mask, an alpha GDAL applies, or the band's own mask band (a VRT's <MaskBand>):
        # beside nodata (read by _to_ids), GDAL's mask of the band says where labels are
        use_mask = MaskFlags.all_valid not in flags and MaskFlags.nodata not in flags
    same_affine = lgrid.affine.almost_equals(grid.affine, precision=1e-9 * max(1.0, abs(grid.affine.a)))
    same_frame = tuple(lgrid.shape) == tuple(grid.shape) and same_affine
    same_crs = lgrid.crs == grid.crs
    equivalent = same_crs or crs_equivalent(lgrid.crs, grid.crs)
    if same_frame and equivalent:
        if not same_crs:
            msg = (
                f"{path}: label CRS {_crs_name(lgrid.crs)} differs from the image CRS {_crs_name(grid.crs)} only in "
                "datum realisation (same projection and ellipsoid) and the grids match; using the labels as they are"
            )
            warnings.warn(msg, LabelGridWarning, stacklevel=3)
        return RasterLabels(path, grid, nodata, ignore, use_mask)
    if not reproject:
        what = []
        if not equivalent:
            what.append(f"CRS {_crs_name(lgrid.crs)} vs {_crs_name(grid.crs)}")
        if tuple(lgrid.shape) != tuple(grid.shape):
            what.append(f"shape {lgrid.shape[0]}x{lgrid.shape[1]} vs {grid.shape[0]}x{grid.shape[1]}")
        if not same_affine:  # at the tolerance of the test above (Affine's default, 1e-5, let 1e-6 m offsets through)
            what.append(f"transform {tuple(lgrid.affine)[:6]} vs {tuple(grid.affine)[:6]}")
        raise GridMismatchError(
            f"{path}: label grid differs from the grid of {image} ({'; '.join(what)}); give labels on the image grid, "
            "or pass --reproject-labels to resample them onto it (nearest neighbour)"
        )
    # Equivalent CRSs are read as the image's CRS: resampling only, no datum shift.
    src_crs = grid.crs.to_wkt() if equivalent and not same_crs else None
    return RasterLabels(path, grid, nodata, ignore, use_mask, warp=True, source_crs_wkt=src_crs)


INDEXED_REMOTE = (".gpkg", ".fgb")  # remote vector formats a bbox reads in part (a spatial index, ranged reads)


def scene_bbox(path: str, layer: str | None, grid: GeoBox) -> tuple[float, float, float, float] | None:
    """``grid``'s bounds in the CRS of ``path`` (its ``layer``), edges densified and grown by a hundredth: the
    box outside which no feature can meet the image. None where it cannot be said (no CRS, a box across the
    antimeridian, an unreadable file: those read every feature, and say what is wrong as before)."""
    import pyogrio

    suffix = Path(path.split("?")[0]).suffix.lower()
    if suffix == ".parquet" or ("://" in path and suffix not in INDEXED_REMOTE):  # a remote file without an index: each
        return None  # open would fetch it whole again
    try:
        info = pyogrio.read_info(path, layer=_spatial_layer(path, layer))
        crs = info["crs"]
        if not crs:
            return None
        x0, y0, x1, y1 = grid.extent.to_crs(crs, resolution="auto").boundingbox
        geographic = pyproj.CRS.from_user_input(crs).is_geographic
    except Exception:  # noqa: BLE001 - the full read that follows reports it
        return None
    if not all(map(math.isfinite, (x0, y0, x1, y1))) or x0 >= x1 or y0 >= y1:
        return None
    if geographic:
        # near a pole or the antimeridian a box of the corners can miss what the image covers, and a file may
        # give longitudes 0-360: every feature
        total = info.get("total_bounds")
        if x0 < -179 or x1 > 179 or y0 < -89 or y1 > 89 or (total is not None and total[2] > 180):
            return None
    mx, my = (x1 - x0) / 100, (y1 - y0) / 100
    return (x0 - mx, y0 - my, x1 + mx, y1 + my)


def _read_vector(path: str, layer: str | None, choose: str = "pass --label-layer NAME",
                 bbox: tuple[float, float, float, float] | None = None):
    """The features of ``path`` (its ``layer``); a file of several layers must say which (``choose``: how).
    With ``bbox`` (in the file's CRS; ``scene_bbox``) only the features that meet it are read: a country's
    building footprints for one scene read that scene's.

    Only layers with geometries count: a GeoPackage's attribute tables (QGIS's ``layer_styles``) are not labels.
    GeoParquet is read with geopandas (GDAL builds often lack its driver).
    """
    import geopandas as gpd

    try:
        if Path(path).suffix.lower() == ".parquet" and "://" not in path:
            if layer:
                raise InputError(f"{path}: --label-layer {layer!r} is for files of several layers; GeoParquet holds one, drop it")
            return gpd.read_parquet(path)
        layer = _spatial_layer(path, layer, choose)
        where = {} if bbox is None else {"bbox": bbox}
        return gpd.read_file(path, layer=layer, **where) if layer else gpd.read_file(path, **where)
    except InputError:
        raise
    except Exception as exc:  # pyogrio raises DataSourceError, DataLayerError, ...
        raise InputError(
            f"{path}: cannot read vector labels ({str(exc).splitlines()[0]}); give a GeoPackage, GeoJSON or Shapefile"
        ) from None


def _spatial_layer(path: str, layer: str | None, choose: str = "pass --label-layer NAME") -> str | None:
    """The layer of ``path`` that holds the labels (None: the file's only one); a clear error where none does."""
    import pyogrio

    listed = [(str(name), gtype) for name, gtype in pyogrio.list_layers(path)]
    spatial = [name for name, gtype in listed if gtype is not None]
    if layer:
        names = [name for name, _ in listed]  # matched as GDAL matches them: exactly, else ignoring case
        layer = layer if layer in names else next((n for n in names if n.casefold() == layer.casefold()), layer)
        if layer not in names:
            raise InputError(f"{path}: no layer {layer!r}; its layers are {', '.join(spatial) or '(none with geometries)'}")
        if layer not in spatial:
            raise InputError(f"{path}: layer {layer!r} is a table without geometries; "
                             f"the layers with geometries are {', '.join(spatial) or '(none)'}")
        return layer
    if len(spatial) > 1:
        raise InputError(f"{path}: holds {len(spatial)} layers ({', '.join(spatial)}); {choose}")
    if not spatial:
        raise InputError(f"{path}: holds no layer with geometries; give the file that holds the labels")
    return spatial[0] if len(listed) > 1 else None


def file_values(path: str, layer: str | None, field: str) -> Any:
    """The values ``field`` holds over the whole file's features with a geometry (missing values left out), as a
    whole read would give them, without making the geometries: what class ids are given over when only a
    scene's features were read."""
    import pandas as pd
    import pyogrio
    import shapely

    meta, table = pyogrio.read_arrow(path, layer=_spatial_layer(path, layer), columns=[field])
    wkb = table.column(meta["geometry_name"] or "wkb_geometry").to_numpy(zero_copy_only=False)
    present = np.array([g is not None for g in wkb], bool)
    present[present] = ~shapely.is_empty(shapely.from_wkb(wkb[present]))
    values = pd.Series(table.column(field).to_pandas().to_numpy()[present])
    return values.dropna()


def _names(values: Any) -> Any:
    """Class names as the labels give them: text, stripped, blanks left out."""
    text = values.astype(str).str.strip()
    return text[text != ""]


def _pick_field(path: str, columns: Sequence[str], field: str | None) -> str:
    if field:
        if field not in columns:
            raise InputError(f"{path}: no field {field!r}; its fields are {', '.join(columns) or '(none)'}")
        return field
    lower = {c.lower(): c for c in columns}
    for guess in FIELD_GUESSES:
        if guess in lower:
            return lower[guess]
    if len(columns) == 1:
        return columns[0]
    raise InputError(
        f"{path}: which field holds the classes? pass --label-field (one of {', '.join(columns) or '(no fields)'})"
    )


def _open_vector(
    path: str,
    grid: GeoBox,
    field: str | None,
    classes: Sequence[ClassInfo] | None,
    classes_from: str,
    ignore: tuple[int, ...],
    layer: str | None,
    all_touched: bool,
    image: str,
    background: int | None = None,
) -> VectorLabels:
    import pandas as pd

    # Only the features that can meet the image are read; where none does, every feature is (the errors below
    # say what the file holds). Class ids from names come from the whole file's names (file_values): a class
    # outside this scene keeps its place, so one file gives every scene the same ids.
    bbox = scene_bbox(path, layer, grid)
    gdf = _read_vector(path, layer, bbox=bbox)
    if bbox is not None and not len(gdf):
        gdf, bbox = _read_vector(path, layer), None
    where = f" (layer {layer!r})" if layer else ""
    with warnings.catch_warnings():  # geopandas warns that empty geometries are not missing ones: both are dropped
        warnings.simplefilter("ignore", UserWarning)
        present = gdf.geometry.notna().to_numpy() & ~gdf.geometry.is_empty.to_numpy()
    if not present.any():
        raise InputError(f"{path}{where}: holds no features with a geometry; give the file that holds the labels")
    columns = [c for c in gdf.columns if c != gdf.geometry.name]
    field = _pick_field(path, columns, field)

    @functools.cache
    def whole_names() -> Any:  # the names of the whole file, where only the scene's features were read
        return _names(file_values(path, layer, field))
    if gdf.crs is None:
        raise InputError(f"{path}: vector labels have no CRS; assign one first (ogr2ogr -a_srs EPSG:XXXX)")
    gdf = gdf[present]
    values = gdf[field]
    missing = values.isna().to_numpy().copy()
    if not pd.api.types.is_numeric_dtype(values):
        missing |= values.astype(str).str.strip().eq("").to_numpy()  # a blank name is no class
    if missing.all():
        raise InputError(f"{path}{where}: no feature with a geometry has a value in field {field!r}; "
                         f"give the field that holds the classes (--label-field; its fields are {', '.join(columns)})")
    if missing.any():
        log.warning("%s: %d feature(s) have no value in %r and are left out", path, int(missing.sum()), field)
        gdf, values = gdf[~missing], values[~missing]
    defined: tuple[ClassInfo, ...] | None = None
    if not pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        # ids written as text ("0", "3": CSV and some exports): ids, unless the class list names them so
        text = values.astype(str).str.strip()
        known = {c.name for c in classes} if classes else set()
        every = text if bbox is None else whole_names()  # decided for the file, not per scene
        if len(text) and every.str.fullmatch(r"\d{1,3}(?:\.0*)?").all() and not set(every) <= known:
            values = text.astype(np.float64).astype(np.int64)  # "3" and "3.0" alike
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        v = values.to_numpy(np.float64)
        if (v != np.floor(v)).any():
            raise InputError(f"{path}: field {field!r} holds non-integer values; class ids must be integers 0-254")
        ids = v.astype(np.int64)
    else:
        names = values.astype(str).str.strip()
        if classes:
            exact = {c.name: c.id for c in classes}
            folded = {c.name.casefold(): c.id for c in classes}
            unknown = sorted({n for n in names if n not in exact and n.casefold() not in folded})
            if unknown:
                raise InputError(
                    f"{path}: field {field!r} holds class name(s) {', '.join(map(repr, unknown))} not in {classes_from} "
                    f"(known: {', '.join(c.name for c in classes)}); add them there or fix the names"
                )
            ids = np.array([exact.get(n, folded.get(n.casefold())) for n in names], np.int64)
        else:
            # No class list: names sorted alphabetically get ids 1, 2, ... (0 stays free for a background class).
            # Names that differ only in case are one class (as a class list matches them), spelled as first sorted.
            spelling: dict[str, str] = {}
            every = names if bbox is None else whole_names()
            for n in sorted(set(every) | set(names)):
                spelling.setdefault(n.casefold(), n)
            merged = sorted({n for n in names if spelling[n.casefold()] != n})
            if merged:
                log.warning("%s: class names %s differ only in case from others and are read as those (%s)", path,
                            ", ".join(map(repr, merged)), ", ".join(repr(spelling[n.casefold()]) for n in merged))
            names = names.map(lambda n: spelling[n.casefold()])
            order = sorted({spelling[n.casefold()] for n in every} | set(names))
            if len(order) > 254:
                raise InputError(f"{path}: field {field!r} holds {len(order)} distinct names; at most 254 classes")
            lookup = {n: i + 1 for i, n in enumerate(order)}
            ids = np.array([lookup[n] for n in names], np.int64)
            defined = tuple(
                ClassInfo(id=lookup[n], name=n, color=DEFAULT_COLORS[(lookup[n] - 1) % len(DEFAULT_COLORS)]) for n in order
            )
            if background is not None:
                if background in lookup.values():
                    raise InputError(f"{path}: --background {background} is the id given to class {order[background - 1]!r}; "
                                     "use 0 (or pass --classes)")
                defined = (ClassInfo(id=background, name="background", color="#bababa"), *defined)
    # ignored features stay and burn as no label (255): they mask the pixels they cover, over the background
    # and over features below them, as ignored values of a label raster do (dropped, they took those classes)
    ignored = np.isin(ids, ignore)
    bad = ids[~ignored & ((ids < 0) | (ids > 254))]
    if bad.size:
        raise InputError(
            f"{path}: field {field!r} holds {int(bad[0])}, not a class id (ids are 0-254, 255 is nodata); "
            f"fix the value or pass --ignore-index {int(bad[0])}"
        )
    ids = np.where(ignored, NODATA_CLASS, ids)
    image_crs = _pyproj(grid.crs)
    label_crs = pyproj.CRS.from_user_input(gdf.crs)
    if not label_crs.equals(image_crs, ignore_axis_order=True):
        # PROJ's transformation, also between realisations of one datum on one projection: GDA94 and GDA2020
        # differ by 1.5 m, NAD83 and NAD83(HARN) by under one (where PROJ knows none, it moves nothing)
        gdf = gdf.to_crs(image_crs)
    geoms = np.asarray(gdf.geometry.values, dtype=object)
    bounds = np.asarray(gdf.geometry.bounds.to_numpy(np.float64)).reshape(-1, 4)
    left, bottom, right, top = grid.extent.boundingbox
    inside = (bounds[:, 0] <= right) & (bounds[:, 2] >= left) & (bounds[:, 1] <= top) & (bounds[:, 3] >= bottom)
    if not inside.any():
        raise InputError(
            f"{path}: no labelled feature overlaps {image} (labels in {_crs_name(label_crs)}, image in "
            f"{_crs_name(image_crs)}); check that both cover the same area"
        )
    if background is not None and not 0 <= background <= 254:
        raise InputError(f"--background {background}: class ids are 0-254")
    return VectorLabels(
        path, field, grid, geoms[inside], bounds[inside], ids[inside].astype(np.uint8), defined, all_touched, background
    )
