"""A STAC Item for a finished output folder: its grid, its classes and every output as an asset.

Written with pystac: the projection extension (code or WKT2, shape, transform), raster (uint8,
nodata 255) and classification (class ids, names, colours, pixel counts and shares) on the class
assets, the model card's provenance under ``geoseg:model``, and ``geoseg:run`` figures.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping

import numpy as np
from odc.geo.geobox import GeoBox

from geoseg.model.card import NODATA_CLASS, ClassInfo

ITEM_NAME = "item.json"
MEDIA = {
    ".tif": "image/tiff; application=geotiff; profile=cloud-optimized",
    ".zarr": "application/vnd+zarr",
    ".gpkg": "application/geopackage+sqlite3",
    ".parquet": "application/vnd.apache.parquet",
    ".fgb": "application/vnd.flatgeobuf",
    ".json": "application/json",
    ".qml": "text/xml",
}
ROLES = {".tif": ["data"], ".zarr": ["data"], ".gpkg": ["data"], ".parquet": ["data"], ".fgb": ["data"],
         ".json": ["metadata"], ".qml": ["style"]}


ZARR_ARRAYS = ("class_id (uint8, 255 = nodata; the class ids of the classes asset), confidence (float32, the "
               "probability of the winning class)")
INSTANCE_ARRAY = ", instance_id (uint32, 0 = none)"
EDGE_POINTS = 64  # points per edge of the grid's outline: its edges are curves in longitude/latitude


def footprint(grid: GeoBox) -> dict[str, Any]:
    """The grid's outline in longitude/latitude (edges densified in the grid's CRS), as GeoJSON (RFC 7946):
    split into a MultiPolygon where it crosses the antimeridian, closed over the pole it encloses, longitudes
    within [-180, 180], latitudes within [-90, 90]. The splitting and the pole are antimeridian's (the library
    stactools uses). A lon/lat grid 360 degrees wide (0..360 or -180..180) is the whole band of latitudes it
    spans. An outline that still crosses itself (a MODIS polar tile, whose top edge is the pole) is made valid."""
    import antimeridian
    import pyproj
    import shapely
    import shapely.geometry.polygon

    outline = shapely.geometry.polygon.orient(grid.extent.geom)  # counter-clockwise, also for a south-up grid
    west, south, east, north = outline.bounds
    dense = shapely.segmentize(outline, max(east - west, north - south) / EDGE_POINTS)
    ring = np.asarray(dense.exterior.coords)
    to_lonlat = pyproj.Transformer.from_crs(grid.crs.proj, "EPSG:4326", always_xy=True)
    lon, lat = (np.asarray(v, np.float64) for v in to_lonlat.transform(ring[:, 0], ring[:, 1]))
    if grid.crs.geographic:
        if east - west >= 360 - 1e-9 * abs(grid.affine.a):  # round the globe: no antimeridian to split at
            lat = np.clip(lat[np.isfinite(lat)], -90, 90)
            return _geojson(shapely.box(-180.0, float(lat.min()), 180.0, float(lat.max())))
        lon = (lon + 180.0) % 360.0 - 180.0  # a 0..360 grid's longitudes; the dense ring's jumps are the crossings
    points = np.column_stack([lon, np.clip(lat, -90.0, 90.0)])
    fixed = antimeridian.fix_polygon(shapely.Polygon(points), fix_winding=True, great_circle=False)
    if not fixed.is_valid:
        fixed = _polygonal(shapely.make_valid(fixed))
    return _geojson(fixed)


def _polygonal(geom: Any) -> Any:
    import shapely

    parts = [g for g in getattr(geom, "geoms", [geom]) if g.geom_type in ("Polygon", "MultiPolygon") and not g.is_empty]
    return shapely.union_all(parts) if parts else geom


def _geojson(geom: Any) -> dict[str, Any]:
    import shapely.geometry

    return json.loads(json.dumps(shapely.geometry.mapping(geom)))


def bbox_of(geom: dict[str, Any]) -> list[float]:
    """[west, south, east, north] of a footprint; across the antimeridian west > east (RFC 7946 5.2)."""
    import antimeridian
    import shapely.geometry

    return [float(v) for v in antimeridian.bbox(shapely.geometry.shape(geom))]


def class_items(classes: Iterable[ClassInfo], counts: Mapping[int, int] | None) -> list[Any]:
    from pystac.extensions.classification import Classification

    total = sum((counts or {}).values())
    out, used = [], {"nodata"}
    for c in classes:
        n = None if counts is None else int(counts.get(c.id, 0))
        name = _slug(c.name, c.id)
        name = name if name not in used else f"{name}_{c.id}"  # "Forêt" and "Foret": two classes, two names
        used.add(name)
        out.append(Classification.create(value=c.id, name=name, title=c.name, color_hint=c.color.lstrip("#").upper(),
                                         count=n, percentage=None if not total or n is None else round(100.0 * n / total, 4)))
    out.append(Classification.create(value=NODATA_CLASS, name="nodata", title="no data", nodata=True))
    return out


def _slug(name: str, value: int | None = None) -> str:
    """classification:classes names are machine-readable: ASCII letters, digits, - and _ (the extension's schema);
    accents are dropped ("Forêt" -> "Foret"), other letters replaced; a name left with none is class_ID."""
    import unicodedata

    folded = unicodedata.normalize("NFKD", name.strip()).encode("ascii", "ignore").decode()
    s = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "-_") else "_" for ch in folded)
    return s if s.strip("_") else (f"class_{value}" if value is not None else "class")


def make_item(
    item_id: str,
    grid: GeoBox,
    classes: Iterable[ClassInfo],
    assets: Mapping[str, str],
    *,
    counts: Mapping[int, int] | None = None,
    model: Mapping[str, Any] | None = None,
    run: Mapping[str, Any] | None = None,
    when: datetime | None = None,
    acquired: datetime | None = None,
) -> Any:
    """A pystac Item; ``assets`` maps asset keys to hrefs relative to the item (class rasters get the class list).

    ``datetime`` is when the imagery was acquired (``acquired``: what the input files say) where known, else when
    the map was made; ``created`` is when the map was made (``when``), and ``geoseg:datetime`` says which."""
    import pystac
    from pystac.extensions.classification import ClassificationExtension
    from pystac.extensions.projection import ProjectionExtension
    from pystac.extensions.raster import DataType, RasterBand, RasterExtension

    classes = list(classes)
    geom = footprint(grid)
    props: dict[str, Any] = {}
    if model:
        props["geoseg:model"] = dict(model)
    if run:
        props["geoseg:run"] = dict(run)
    made = when or datetime.now(timezone.utc)
    props["created"] = made.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
    props["geoseg:datetime"] = "acquired" if acquired else "created"
    # STAC's datetime is UTC ('Z' or +00:00: the core schema's pattern); an acquisition time given with its local
    # offset made an item that catalogues refuse
    item = pystac.Item(item_id, geom, bbox_of(geom), (acquired or made).astimezone(timezone.utc), props)
    proj = ProjectionExtension.ext(item, add_if_missing=True)
    epsg = grid.crs.epsg
    proj.apply(code=f"EPSG:{epsg}" if epsg else None, wkt2=None if epsg else grid.crs.to_wkt(),
               shape=[int(v) for v in grid.shape], transform=[float(v) for v in list(grid.affine)[:6]])
    for key, href in assets.items():
        suffix = "." + href.rsplit(".", 1)[-1] if "." in href else ""
        asset = pystac.Asset(href, title=key, media_type=MEDIA.get(suffix), roles=ROLES.get(suffix, ["data"]))
        item.add_asset(key, asset)
        if key == "classes":
            RasterExtension.ext(asset, add_if_missing=True).apply(
                bands=[RasterBand.create(nodata=NODATA_CLASS, data_type=DataType.UINT8)])
            ClassificationExtension.ext(asset, add_if_missing=True).apply(classes=class_items(classes, counts))
        if key == "prediction":  # a Zarr store of several arrays: described, not given one band's fields
            asset.description = ZARR_ARRAYS + (INSTANCE_ARRAY if "instances" in assets else "")
        if key == "instances":  # object ids: 0 = none
            RasterExtension.ext(asset, add_if_missing=True).apply(bands=[RasterBand.create(nodata=0, data_type=DataType.UINT32)])
    return item


def write_item(item: Any, path: Any) -> None:
    """The item as JSON (relative asset hrefs, no self link), written atomically."""
    from geoseg.io import storage

    d = item.to_dict(include_self_link=False, transform_hrefs=False)
    storage.write_atomic(path, (json.dumps(d, indent=2) + "\n").encode())


def block_class_counts(array: Any, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Pixels per value (256) of a block of a zarr array, read by the task itself; counted a few rows at a time
    (``np.bincount`` counts through an int64 copy of what it is given: 8 bytes a pixel)."""
    block = np.asarray(array[y0:y1, x0:x1])
    rows = max(1, (1 << 20) // max(1, block.shape[1]))
    counts = np.zeros(256, np.int64)
    for r in range(0, block.shape[0], rows):
        counts += np.bincount(block[r:r + rows].ravel(), minlength=256)
    return counts


def class_counts(class_id: Any, client: Any = None, *, block: int = 4096, priority: int = 0) -> dict[int, int]:
    """Pixels per class id of a (dask or zarr-backed) uint8 class map, computed chunk by chunk.

    A zarr array with a ``client``: one plain task per block of about ``block`` px (whole zarr chunks), each reading
    it (no worker imports dask.array, and with it xarray and pandas: 0.55 s of one core, to count a map the COG stage
    reads in 1 s)."""
    if client is not None and not hasattr(class_id, "map_blocks"):
        h, w = class_id.shape
        # whole zarr chunks a block: no chunk read (or fetched from object storage) by two tasks
        by, bx = (max(1, block // c) * c for c in class_id.chunks)
        futures = [client.submit(block_class_counts, class_id, y, min(y + by, h), x, min(x + bx, w), pure=False,
                                 priority=priority) for y in range(0, h, by) for x in range(0, w, bx)]
        counts = np.sum(client.gather(futures), axis=0)
        return {i: int(n) for i, n in enumerate(counts) if n and i != NODATA_CLASS}
    import dask.array as da

    arr = class_id if isinstance(class_id, da.Array) else da.from_zarr(class_id)
    # one histogram per block, then their sum (no reshaping of the map)
    per_block = arr.map_blocks(lambda b: np.bincount(b.ravel(), minlength=256)[None, None, :], dtype=np.int64,
                               new_axis=2, chunks=(1, 1, 256))
    counts = np.asarray(per_block.sum(axis=(0, 1)).compute())
    return {i: int(n) for i, n in enumerate(counts) if n and i != NODATA_CLASS}
