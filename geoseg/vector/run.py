"""Vectorize a class map on a Dask cluster, chunk by chunk, exactly as GDAL polygonizes the whole raster.

Phase 1 (one task per chunk, on the workers): label the chunk's regions, polygonize them with
GDAL, write the polygons of regions that do not touch an interior chunk border to a part file,
keep the pieces of those that do (on the worker), and send the client only the chunk's border
pixels' labels and the classes of its labels.

Join (on the client, border pixels only): a union-find over facing border pixels of the same
class says which pieces form one region.

Phase 2 (one task per chunk that owns merged regions, on the workers): union each region's
pieces (moved from the chunks that hold them: only pieces, never rasters), measure it, write
a part file.

Memory: a worker holds one chunk and its pieces; the client holds the border labels. Nothing
grows with the scene but the borders and the regions that cross them.
"""

from __future__ import annotations

import io
import operator
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import shapely
from affine import Affine

from geoseg.errors import detached
from geoseg.io import storage
from geoseg.tiling import Box, TilingPlan
from geoseg.vector.measure import Measurer
from geoseg.vector.polygons import attributes, label_polygons, merge_pieces, region_stats, to_map
from geoseg.vector.regions import Edges, LabelClasses, check_connectivity, join_borders, label_regions
from geoseg.vector.sieve import Regions, border_facts, core_regions, joined_decisions, sieve, sieve_core, window_ring

DEFAULT_CHUNK = 2048


@dataclass(frozen=True)
class ClassRaster:
    """A class map to vectorize: a geoseg prediction store (class_id, confidence) or a class GeoTIFF."""

    path: str
    kind: str  # zarr | raster
    shape: tuple[int, int]
    affine: Affine
    crs_wkt: str | None
    nodata: int | None
    chunks: tuple[int, int] | None  # the source's own chunking (reads aligned to it)
    has_confidence: bool = False
    masked: bool = False  # the raster has a mask band (per dataset, alpha): pixels it hides are none, as GDAL's polygonize has them

    def read(self, box: Box) -> tuple[np.ndarray, np.ndarray | None]:
        ys, xs = slice(box.y0, box.y1), slice(box.x0, box.x1)
        if self.kind == "zarr":
            import zarr

            g = zarr.open_group(self.path, mode="r", **storage.zarr_kwargs(self.path))
            conf = np.asarray(g["confidence"][ys, xs]) if self.has_confidence else None
            return np.asarray(g["class_id"][ys, xs]), conf
        import rasterio

        with storage.gdal_env(self.path), rasterio.open(self.path) as ds:
            a = ds.read(1, window=box.window)
            nodata = ds.nodata
            hidden = ds.read_masks(1, window=box.window) == 0 if self.masked else np.zeros(a.shape, bool)
        if a.dtype == np.uint8:
            if hidden.any():  # none: the map's nodata (255 where the file names none)
                a = np.where(hidden, np.uint8(255 if self.nodata is None else self.nodata), a)
            return a, None
        # wider integer types: class ids 0-254, the file's nodata (and what its mask hides) becomes 255; 255 is none
        # where the file names no nodata, as in a uint8 map
        missing = hidden | (a == 255) if nodata is None else hidden | (a == nodata)
        ids = a[~missing]
        if ids.size and (ids.min() < 0 or ids.max() > 254):
            from geoseg.errors import InputError

            raise InputError(f"{self.path}: class ids must be 0-254 (255 where the file names no nodata, and the "
                             "file's nodata, mean none); found "
                             f"{int(ids.min())}..{int(ids.max())} in rows {box.y0}-{box.y1}, cols {box.x0}-{box.x1}")
        out = a.astype(np.uint8)
        out[missing] = 255
        return out, None


@dataclass(frozen=True)
class VectorizeOptions:
    chunk_size: int | None = None  # None: the source's tiles (at least 2048), else 2048 (plan_chunks)
    connectivity: int = 4
    keep_classes: tuple[int, ...] | None = None  # None: every class
    names: dict[int, str] = field(default_factory=dict)
    min_pixels: int = 0  # sieve: regions smaller than this take their main neighbour's class
    min_area_m2: float = 0.0  # or smaller than this on the ground (min_pixels: that area in the scene's smallest pixels)
    sieve_window_max: int = 256  # sieve halos (px) up to which a chunk sieves a grown window; beyond: joined (vector.sieve)

    @property
    def sieve_limit(self) -> float:
        return self.min_area_m2 if self.min_area_m2 > 0 else float(self.min_pixels)

    @property
    def sieve_halo(self) -> int:
        """The halo a chunk's window needs for the sieve to equal the whole map's (2 L - 1: ``window_ring``)."""
        return window_ring(self.min_pixels)

    @property
    def sieve_joined(self) -> bool:
        return self.sieve_halo > max(1, self.sieve_window_max)


def _code(chunk_index: int, labels: np.ndarray) -> np.ndarray:
    return (np.int64(chunk_index) << 32) | labels.astype(np.int64)


def _part_bytes(cols: dict[str, Any], geoms: np.ndarray, crs_wkt: str | None) -> bytes:
    import geopandas as gpd

    gdf = gpd.GeoDataFrame(cols, geometry=gpd.GeoSeries(geoms, crs=crs_wkt), crs=crs_wkt)
    buf = io.BytesIO()
    gdf.to_parquet(buf, index=False)
    return buf.getvalue()


def _write_part(parts: str, name: str, cols: dict[str, Any], geoms: np.ndarray, crs_wkt: str | None) -> int:
    if len(geoms):
        storage.write_atomic(storage.join(parts, name), _part_bytes(cols, geoms, crs_wkt))
    return len(geoms)


def _regions(src: ClassRaster, plan: TilingPlan, iy: int, ix: int, opts: VectorizeOptions
             ) -> tuple[Regions, tuple[bool, ...], np.ndarray, np.ndarray | None]:
    """A chunk core's regions (read with a one-pixel ring of its neighbours, for the edges), which sides face a
    chunk, and the core's class map and confidence."""
    box = plan.chunk(iy, ix).core
    window = box.grow(1, plan.shape)
    values, conf = src.read(window)
    rows = row_pixel_areas(src, box.y0, box.y1) if opts.min_area_m2 > 0 else None
    ny, nx = plan.grid_shape
    regions = core_regions(values, box, window, src.nodata, opts.connectivity, rows)
    ys, xs = box.relative_to(window)
    return regions, (iy > 0, iy < ny - 1, ix > 0, ix < nx - 1), values[ys, xs], None if conf is None else conf[ys, xs]


@detached
def sieve_phase(src: ClassRaster, plan: TilingPlan, iy: int, ix: int, opts: VectorizeOptions) -> dict[str, Any]:
    """What the client needs of a chunk to sieve regions across chunks: its edges, classes, border labels, their
    sizes, and the edges to other classes of those small enough here to be small joined."""
    regions, facing, _, _ = _regions(src, plan, iy, ix, opts)
    return border_facts(regions, facing, opts.sieve_limit)


@detached
def chunk_phase(src: ClassRaster, plan: TilingPlan, iy: int, ix: int, opts: VectorizeOptions, parts: str,
                decided: tuple[np.ndarray, ...] | None = None) -> tuple[dict, dict]:
    """Phase 1 of one chunk: (summary for the client, border pieces kept on the worker). ``decided``: the classes its
    border regions take in a joined sieve (``sieve_phase``)."""
    ch = plan.chunk(iy, ix)
    box = ch.core
    if opts.sieve_joined:
        regions, facing, values, conf = _regions(src, plan, iy, ix, opts)
        empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
        values = sieve_core(regions, facing, opts.sieve_limit, values, empty if decided is None else decided)
    else:
        values, conf = _read_sieved(src, plan, box, opts)
    labels, classes = label_regions(values, src.nodata, opts.connectivity)
    n = len(classes)
    # pixel coordinates of the scene: whole numbers, so the pieces two chunks make of one region share
    # their border vertices exactly (map coordinates of one corner differ in the last bits between chunks
    # on grids like 1/10800 degree, and the union would leave slivers); moved to the map once whole
    ids, geoms = label_polygons(labels, Affine.translation(box.x0, box.y0), opts.connectivity)
    pixels, conf_sum = region_stats(labels, n, conf)
    edges = Edges.of(labels)
    # borders that face another chunk (the scene's own edges join nothing)
    ny, nx = plan.grid_shape
    facing = [e for e, inner in ((edges.top, iy > 0), (edges.bottom, iy < ny - 1), (edges.left, ix > 0),
                                 (edges.right, ix < nx - 1)) if inner]
    border = np.unique(np.concatenate(facing)) if facing else np.zeros(0, np.int32)
    border = border[border > 0]
    at_border = np.isin(ids, border)
    keep = np.ones(len(ids), bool) if opts.keep_classes is None else np.isin(classes[ids], opts.keep_classes)
    inner_ids, inner_geoms = ids[~at_border & keep], to_map(geoms[~at_border & keep], src.affine)
    cols = attributes(inner_geoms, classes[inner_ids], pixels[inner_ids],
                      None if conf_sum is None else conf_sum[inner_ids], opts.names, Measurer(src.crs_wkt))
    written = _write_part(parts, f"inner-{iy}-{ix}.parquet", cols, inner_geoms, src.crs_wkt)
    summary = {
        "iy": iy, "ix": ix, "edges": edges, "classes": LabelClasses.of(classes, edges.labels()),
        "border_labels": border, "written": written,
    }
    pieces = {
        "labels": ids[at_border], "wkb": shapely.to_wkb(geoms[at_border]),
        "pixels": pixels[ids[at_border]], "conf_sum": None if conf_sum is None else conf_sum[ids[at_border]],
    }
    return summary, pieces


def _read_sieved(src: ClassRaster, plan: TilingPlan, box: Box, opts: VectorizeOptions) -> tuple[np.ndarray, np.ndarray | None]:
    """The chunk's class map, sieved with a halo of 2 ``min_pixels`` - 1: any region that small and touching the
    core lies wholly in the window, and so does all a neighbour of it needs to be seen at the limit, so chunks
    agree with a sieve of the whole map."""
    if opts.min_pixels <= 1:
        return src.read(box)
    window = box.grow(opts.sieve_halo, plan.shape)
    values, conf = src.read(window)
    opened = (window.y0 > 0, window.y1 < plan.shape[0], window.x0 > 0, window.x1 < plan.shape[1])
    rows = row_pixel_areas(src, window.y0, window.y1) if opts.min_area_m2 > 0 else None
    values = sieve(values, src.nodata, opts.min_pixels, opts.connectivity, opened, row_area=rows, min_area=opts.min_area_m2)
    ys, xs = box.relative_to(window)
    return values[ys, xs], None if conf is None else conf[ys, xs]


def row_pixel_areas(src: ClassRaster, y0: int, y1: int) -> np.ndarray:
    """The ground area (m², on the ellipsoid) of a pixel of each row ``y0``..``y1`` of ``src``, at its middle
    column: exact per row on a north-up lon/lat grid (the area changes with latitude only), the projection's
    scale at the middle column elsewhere; every chunk measures the same rows alike."""
    import shapely

    from geoseg.vector.measure import Measurer, to_pyproj

    rows = np.arange(y0, y1, dtype=np.float64)
    cols = np.full_like(rows, src.shape[1] // 2)
    corners = [src.affine @ (cols + dx, rows + dy) for dx, dy in ((0, 0), (1, 0), (1, 1), (0, 1), (0, 0))]
    rings = np.stack([np.stack(xy, axis=-1) for xy in corners], axis=1)  # (rows, 5 corners, x/y)
    area, _ = Measurer(to_pyproj(src.crs_wkt))(shapely.polygons(rings))
    return np.asarray(area, np.float64)


def select_pieces(pieces: dict, labels: np.ndarray) -> dict:
    """The pieces of ``labels`` out of one chunk's border pieces (runs where they are kept)."""
    order = np.argsort(pieces["labels"])
    sorted_labels = pieces["labels"][order]
    pos = order[np.searchsorted(sorted_labels, labels)]
    return {"labels": labels, "wkb": pieces["wkb"][pos], "pixels": pieces["pixels"][pos],
            "conf_sum": None if pieces["conf_sum"] is None else pieces["conf_sum"][pos]}


@detached
def merge_phase(owner: int, region_ids: np.ndarray, region_class: np.ndarray, members: list[tuple[np.ndarray, dict]],
                src: ClassRaster, opts: VectorizeOptions, parts: str) -> int:
    """Phase 2 for the regions ``owner`` owns: union of each region's pieces, measured, written."""
    rid_all, wkb_all, px_all, conf_all = [], [], [], []
    for rids, sel in members:
        rid_all.append(rids)
        wkb_all.append(sel["wkb"])
        px_all.append(sel["pixels"])
        conf_all.append(sel["conf_sum"] if sel["conf_sum"] is not None else np.zeros((len(rids), 2)))
    rid = np.concatenate(rid_all)
    geoms = shapely.from_wkb(np.concatenate(wkb_all))
    px, conf = np.concatenate(px_all), np.concatenate(conf_all)
    order = np.argsort(rid, kind="stable")
    rid, geoms, px, conf = rid[order], geoms[order], px[order], conf[order]
    starts = np.flatnonzero(np.r_[True, rid[1:] != rid[:-1]])
    ends = np.r_[starts[1:], len(rid)]
    out = np.empty(len(starts), dtype=object)
    for k, (a, b) in enumerate(zip(starts, ends)):
        out[k] = merge_pieces(geoms[a:b])
    out = to_map(out, src.affine)
    uniq = rid[starts]
    cls = region_class[np.searchsorted(region_ids, uniq)]
    pixels = np.add.reduceat(px, starts)
    conf_sum = np.add.reduceat(conf, starts) if src.has_confidence else None
    cols = attributes(out, cls, pixels, conf_sum, opts.names, Measurer(src.crs_wkt))
    return _write_part(parts, f"merged-{owner}.parquet", cols, out, src.crs_wkt)


def plan_chunks(src: ClassRaster, chunk_size: int | None) -> TilingPlan:
    """Chunks of ``chunk_size``, else the source's own tiles where they are tiles (a GeoTIFF's or a
    store's, 256-4096 px a side: reads stay aligned), else ``DEFAULT_CHUNK`` (strips of a striped
    GeoTIFF are a raster's width wide: as chunks they would make one task hold the whole map)."""
    tiles = src.chunks or ()
    tiled = bool(tiles) and 256 <= min(tiles) and max(tiles) <= 4096
    size = chunk_size or (max(DEFAULT_CHUNK, *tiles) if tiled else DEFAULT_CHUNK)
    return TilingPlan.make(src.shape, stride=1, chunk_size=size, halo=0)


def vectorize_parts(client: Any, src: ClassRaster, parts: str, opts: VectorizeOptions = VectorizeOptions(),
                    priority: int = 0) -> dict[str, Any]:
    """Both phases on ``client`` (tasks at dask ``priority``); the polygons end up as GeoParquet part files under ``parts``."""
    from distributed import wait

    check_connectivity(opts.connectivity)
    if not storage.is_url(parts):
        os.makedirs(parts, exist_ok=True)
    plan = plan_chunks(src, opts.chunk_size)
    ny, nx = plan.grid_shape
    decided: dict[tuple[int, int], Any] = {}
    if opts.sieve_joined:  # --min-area beyond a window's reach: small regions decided across chunks first
        found = {(ch.iy, ch.ix): client.submit(sieve_phase, src, plan, ch.iy, ch.ix, opts, pure=False, priority=priority)
                 for ch in plan}
        facts = dict(zip(found, client.gather(list(found.values()))))
        del found
        sieve_join = join_borders((ny, nx), {k: f["edges"] for k, f in facts.items()},
                                  {k: f["classes"] for k, f in facts.items()}, opts.connectivity)
        decisions = joined_decisions(sieve_join, {iy * nx + ix: f for (iy, ix), f in facts.items()}, opts.sieve_limit, nx)
        decided = {(c // nx, c % nx): d for c, d in decisions.items()}
        del facts
    first = {(ch.iy, ch.ix): client.submit(chunk_phase, src, plan, ch.iy, ch.ix, opts, parts, decided.get((ch.iy, ch.ix)),
                                           pure=False, priority=priority) for ch in plan}
    summaries_f = {k: client.submit(operator.getitem, f, 0, pure=False, priority=priority) for k, f in first.items()}
    pieces_f = {k: client.submit(operator.getitem, f, 1, pure=False, priority=priority) for k, f in first.items()}
    summaries = dict(zip(summaries_f, client.gather(list(summaries_f.values()))))
    del first
    edges = {k: s["edges"] for k, s in summaries.items()}
    classes = {k: s["classes"] for k, s in summaries.items()}
    join = join_borders((ny, nx), edges, classes, opts.connectivity)
    # Every border label of every chunk: its region; each region is owned by its first chunk.
    owners: dict[int, list[tuple[int, np.ndarray, np.ndarray]]] = {}
    region_owner = np.full(int(join.region.max()) + 1 if len(join.region) else 0, np.iinfo(np.int64).max, np.int64)
    per_chunk: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    for (iy, ix), s in summaries.items():
        labels = s["border_labels"].astype(np.int64)
        if not len(labels):
            continue
        if opts.keep_classes is not None:
            labels = labels[np.isin(s["classes"][labels], opts.keep_classes)]
        c = iy * nx + ix
        rid = join.region_of(c, labels)
        per_chunk[(iy, ix)] = (labels, rid)
        np.minimum.at(region_owner, rid, c)
    n_regions = len(region_owner)
    region_class = np.zeros(n_regions, np.uint8)
    for (iy, ix), (labels, rid) in per_chunk.items():
        region_class[rid] = summaries[(iy, ix)]["classes"][labels]
    for (iy, ix), (labels, rid) in per_chunk.items():
        own = region_owner[rid]
        for o in np.unique(own):
            sel = own == o
            owners.setdefault(int(o), []).append((iy * nx + ix, labels[sel], rid[sel]))
    merges = []
    for owner, items in owners.items():
        members = []
        for c, labels, rid in items:
            piece = client.submit(select_pieces, pieces_f[(c // nx, c % nx)], labels, pure=False, priority=priority)
            members.append((rid, piece))
        owned = np.unique(np.concatenate([rid for _, _, rid in items]))  # sorted: merge_phase searches it
        merges.append(client.submit(merge_phase, owner, owned, region_class[owned], members, src, opts, parts, pure=False,
                                    priority=priority))
    wait(merges)
    merged = sum(f.result() for f in merges)
    inner = sum(s["written"] for s in summaries.values())
    del pieces_f
    return {"chunks": len(plan), "chunk_size": plan.chunk_size, "polygons": inner + merged, "inner": inner,
            "merged": merged, "border_labels": len(join.keys), "connectivity": opts.connectivity}


def iter_parts(parts: str, columns: list[str] | None = None) -> Iterator[Any]:
    """The part files' GeoDataFrames, one at a time, in a fixed order; with ``columns``, DataFrames of those
    attribute columns alone (Parquet reads no geometry then)."""
    import geopandas as gpd
    import pandas as pd

    read = gpd.read_parquet if columns is None else (lambda f: pd.read_parquet(f, columns=columns))
    names = sorted(n for n in storage.list_names(parts) if n.endswith(".parquet"))
    for name in names:
        path = storage.join(parts, name)
        yield read(io.BytesIO(storage.read_bytes(path)) if storage.is_url(path) else path)


def store_transform(ds: Any) -> Any:
    """The transform of a store's rows and columns as stored. rioxarray's saved GeoTransform, unless the
    coordinates say otherwise: a store written from a coarsened, strided or flipped Dataset keeps the
    GeoTransform of the array it came from, and only its coordinates are right."""
    saved = ds.rio.transform()
    if ds.sizes.get("y", 0) < 2 or ds.sizes.get("x", 0) < 2:
        return saved
    coords = ds.rio.transform(recalc=True)
    tol = 1e-6 * max(abs(coords.a), abs(coords.e))
    return saved if saved.almost_equals(coords, precision=tol) else coords


def open_class_raster(path: str | os.PathLike) -> ClassRaster:
    """A class map to vectorize: ``prediction.zarr`` (with confidence) or a single-band integer raster."""
    from geoseg.errors import InputError

    p = str(path).rstrip("/")
    if p.endswith(".zarr") or storage.exists(storage.join(p, "zarr.json")):
        import zarr

        try:
            g = zarr.open_group(p, mode="r", **storage.zarr_kwargs(p))
            arr = g["class_id"]
        except Exception as exc:  # zarr raises several types for a missing or foreign store
            raise InputError(f"{p}: not a geoseg prediction store ({exc}); give prediction.zarr or a class raster") from None
        from geoseg.io.zarr_store import check_finished, open_prediction

        ds = check_finished(open_prediction(p), p)
        crs = ds.rio.crs
        return ClassRaster(p, "zarr", tuple(arr.shape), store_transform(ds), None if crs is None else crs.to_wkt(),
                           int(ds["class_id"].attrs.get("nodata", 255)), tuple(arr.chunks), "confidence" in g)
    import rasterio
    from rasterio.errors import RasterioIOError

    if not storage.is_url(p) and not os.path.exists(p):
        raise InputError(f"{p}: no such file; check the path")
    try:
        with storage.gdal_env(p), rasterio.open(p) as ds:
            if ds.count != 1 or ds.dtypes[0] not in ("uint8", "int8", "uint16", "int16", "uint32", "int32"):
                raise InputError(f"{p}: a class raster has one integer band; this has {ds.count} band(s) of {ds.dtypes[0]}")
            from rasterio.enums import MaskFlags

            # class ids are 0-254: in a map that names no nodata, 255 is none
            nodata = 255 if ds.nodata is None else int(ds.nodata)
            if ds.dtypes[0] != "uint8":
                nodata = 255  # read() maps the file's nodata to 255 and checks ids fit 0-254
            flags = ds.mask_flag_enums[0]
            masked = MaskFlags.per_dataset in flags or MaskFlags.alpha in flags  # beside a nodata value or not
            return ClassRaster(p, "raster", (ds.height, ds.width), ds.transform,
                               None if ds.crs is None else ds.crs.to_wkt(), nodata, tuple(ds.block_shapes[0]),
                               masked=masked)
    except RasterioIOError as exc:
        raise InputError(f"{p}: not a raster GDAL can open ({exc})") from None
