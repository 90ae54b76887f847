"""The Python/xarray face of geoseg: lazy scenes in, lazy predictions out. The CLI is a layer over it.

    >>> import geoseg
    >>> scene = geoseg.open_scene(["B2.tif", "B3.tif", "B4.tif", "B8.tif"])   # lazy DataArray (band, y, x)
    >>> with geoseg.cluster() as client:                                      # or your own distributed.Client
    ...     ds = geoseg.predict(scene, "model_dir")                           # lazy Dataset: class_id, confidence
    ...     ds.class_id.isel(y=slice(0, 2048), x=slice(0, 2048)).compute()    # only the chunks it touches
    >>> gdf = geoseg.vectorize(ds)                                            # polygons as a GeoDataFrame

A scene can be file paths, a local STAC Item (pystac) whose assets are the bands, or any
DataArray with a CRS (rioxarray, odc-stac, stackstac). Without any client, dask's threaded
scheduler runs the model with one torch thread per dask thread.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence
from urllib.parse import urlsplit

import numpy as np
import xarray as xr

from geoseg.errors import ConfigError, GridMismatchError, InputError, InputNotFoundError
from geoseg.io import storage
from geoseg.model.card import NODATA_CLASS, ModelCard
from geoseg.tiling import plan_for

plan_tiling = plan_for


# ---------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Model:
    """A model directory (local or at a URL), checked: its card, where workers find it, its digest."""

    location: str
    card: ModelCard
    digest: str

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Model":
        from geoseg.model.store import open_model

        m = open_model(path)
        return cls(m.location, m.card, m.digest)

    @classmethod
    def init(cls, path: str | os.PathLike, *, bands: int = 4, classes: Any = 5, encoder: str = "resnet18",
             encoder_depth: int = 4, seed: int = 0, overwrite: bool = False, input_skip: bool = False) -> "Model":
        """A model directory with seeded random weights (``classes``: a count or ClassInfo list), to try
        the pipeline before training; nothing is downloaded. ``input_skip``: as ``geoseg model init --input-skip``."""
        from geoseg.model.store import init_model

        listed = None if isinstance(classes, int) else list(classes)
        init_model(path, n_bands=bands, n_classes=classes if isinstance(classes, int) else len(listed),
                   classes=listed, encoder=encoder, encoder_depth=encoder_depth, seed=seed, overwrite=overwrite,
                   input_skip=input_skip)
        return cls.open(path)

    @property
    def classes(self) -> dict[int, str]:
        return {c.id: c.name for c in self.card.classes}

    def __repr__(self) -> str:
        c = self.card
        lines = [f"geoseg Model {c.network} at {self.location}",
                 f"  bands: {', '.join(b.name for b in c.bands)}",
                 f"  classes: {', '.join(f'{k} {v}' for k, v in self.classes.items())}",
                 f"  receptive field {c.reach}, stride {c.stride}, digest {self.digest[:12]}"]
        metrics = (c.training or {}).get("metrics") or {}
        if "miou" in metrics:
            lines.append(f"  validation mIoU {metrics['miou']:.3f}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        from html import escape

        c = self.card
        rows = "".join(
            f'<tr><td>{k.id}</td><td><span style="display:inline-block;width:1em;height:1em;background:{k.color}"></span></td>'
            f"<td>{escape(k.name)}</td></tr>" for k in c.classes)
        metrics = (c.training or {}).get("metrics") or {}
        miou = f"<p>validation mIoU {metrics['miou']:.3f}</p>" if "miou" in metrics else ""
        return (f"<div><b>geoseg Model</b> {escape(c.network)}"
                f"<br><small>{escape(self.location)} &middot; digest {self.digest[:12]}</small>"
                f"<p>bands: {escape(', '.join(b.name for b in c.bands))}; receptive field {escape(c.reach)}</p>"
                f"{miou}<table><tr><th>id</th><th></th><th>class</th></tr>{rows}</table></div>")


def _model(model: "Model | str | os.PathLike") -> Model:
    return model if isinstance(model, Model) else Model.open(model)


# ---------------------------------------------------------------------------------------------- cluster


@contextlib.contextmanager
def cluster(n_workers: int | None = None, scheduler: str | None = None) -> Iterator[Any]:
    """The embedded local cluster (localhost, one single-threaded worker per core), or a client on
    ``scheduler``; it is the default client inside the block, so ``compute()`` runs there."""
    from geoseg.cluster import connect

    with connect(scheduler, n_workers) as client:
        yield client


# ---------------------------------------------------------------------------------------------- scenes


def sample_data(out_dir: str | os.PathLike, *, size: int = 1024, bands: int = 4, classes: int = 5, seed: int = 0) -> Any:
    """A generated scene to try things on: ``image.tif``, ``labels.tif`` and ``classes.yaml`` in ``out_dir``
    (the returned object has ``image_path``, ``labels_path``, ``classes``)."""
    from geoseg.sample import make_sample

    return make_sample(out_dir, size=size, bands=bands, seed=seed, n_classes=classes)


def open_scene(source: Any, *, chunks: int = 2048, assets: Sequence[str] | None = None) -> xr.DataArray:
    """A lazy ``(band, y, x)`` DataArray of a scene, on its grid, band names and nodata kept.

    ``source``: a raster path, a list of single-band (or multi-band) rasters stacked in order,
    a STAC Item (pystac, its dict or its JSON file: its ``assets``, or every GeoTIFF asset with the role
    "data", in order; bands named by asset key, with the files' descriptions and the items' common names
    as coordinates, so a model finds its bands by any of them), or a DataArray (checked and passed through).
    """
    if isinstance(source, xr.DataArray):
        return _as_scene(source)
    if isinstance(source, xr.Dataset):  # one variable per band (odc-stac's load, a netCDF of bands)
        names = list(source.data_vars)
        if not names:
            raise InputError("the Dataset holds no variable; a scene is one variable per band, or a (band, y, x) DataArray")
        # each variable's nodata and scale as its own DataArray says them (attributes, or its encoding: values
        # decoded on reading are physical, their stored fill value NaN); to_array keeps neither
        one = [source[v].expand_dims(band=[str(v)]) for v in names]
        nodata = [band_nodata(b)[0] for b in one]
        scales = [band_scales(b) for b in one]
        scene = source.to_array("band").assign_coords(band=[str(v) for v in names])
        scene.attrs = {}
        if any(s is not None for s in scales):
            scene = _with_scales(scene, [s[0] if s else (1.0, 0.0) for s in scales])
        return _as_scene(_with_nodata(scene, nodata))
    source = _stac_item(source)
    if _is_item(source):
        keys = list(assets) if assets else _band_assets(source)
        if not keys:
            raise InputError(f"STAC item {source.id}: no GeoTIFF asset; pass assets=[...] to name the bands")
        missing = [k for k in keys if k not in source.assets]
        if missing:
            raise InputError(f"STAC item {source.id}: no asset {', '.join(missing)}; it has {', '.join(source.assets)}")
        paths = [source.assets[k].get_absolute_href() or source.assets[k].href for k in keys]
        relative = [k for k, p in zip(keys, paths) if not urlsplit(p).scheme and not p.startswith("/vsi") and not os.path.isabs(p)]
        if relative:
            raise InputError(f"STAC item {source.id}: asset {relative[0]}'s href {source.assets[relative[0]].href} is relative and "
                             "the item has no self link to resolve it against; open the item from its file "
                             "(pystac.Item.from_file) or give absolute hrefs")
        try:
            scene, counts = _open_files(paths, chunks)
        except GridMismatchError as exc:
            raise GridMismatchError(f"STAC item {source.id}: {exc}; or choose assets on one grid with "
                                    f"open_scene(item, assets=[...]) (it has {', '.join(keys)})") from None
        scene = _declared_bands(scene, [(k, source.assets[k]) for k in keys], counts, source.id)
        # a band per asset, named by its key; the bands of a multi-band asset (a "visual" RGB) key_1, key_2, ...
        names = [k if n == 1 else f"{k}_{i + 1}" for k, n in zip(keys, counts) for i in range(n)]
        # what else names each band, for matching a model's bands (its card records the files' descriptions or
        # names, not the keys of an item): the file's description (else its name), and the item's common name
        common = [d.get("common_name") or d.get("eo:common_name") or ""
                  for k, n in zip(keys, counts) for d in _asset_bands(source.assets[k], ("eo:bands", "bands"), n)]
        return scene.assign_coords(band=names, description=("band", [str(b) for b in scene["band"].values]),
                                   common_name=("band", common))
    return _open_files([str(p) for p in ([source] if isinstance(source, (str, os.PathLike)) else source)], chunks)[0]


def _is_item(source: Any) -> bool:
    try:
        import pystac
    except ImportError:
        return False
    return isinstance(source, pystac.Item)


def _stac_item(source: Any) -> Any:
    """A STAC Item from an Item, its dict or its JSON file; a Collection or ItemCollection refused with what to pass."""
    try:
        import pystac
    except ImportError:
        return source
    if isinstance(source, (str, os.PathLike)) and str(source).lower().endswith(".json") and not storage.is_url(str(source)):
        if not Path(source).is_file():
            raise InputNotFoundError(f"{source}: no such file; check the path")
        try:
            d = json.loads(Path(source).read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{source}: not a STAC item (not JSON: {exc})") from None
        if not isinstance(d, dict) or d.get("type") not in ("Feature", "FeatureCollection", "Collection"):
            raise InputError(f"{source}: not a STAC item (a JSON Feature); give a raster or an item's JSON file")
        # from the dict read (not the file again); its path resolves relative asset hrefs
        source = (pystac.ItemCollection.from_dict(d) if d["type"] == "FeatureCollection"
                  else pystac.read_dict(d, href=str(Path(source).resolve())))
    elif isinstance(source, dict) and source.get("type") in ("Feature", "FeatureCollection", "Collection"):
        source = (pystac.ItemCollection.from_dict(source) if source["type"] == "FeatureCollection"
                  else pystac.read_dict(source))
    if isinstance(source, pystac.ItemCollection) or (isinstance(source, (list, tuple)) and source
                                                     and all(isinstance(s, pystac.Item) for s in source)):
        ids = [i.id for i in source]
        raise InputError(f"open_scene takes one STAC item, not {len(ids)} ({', '.join(ids[:5])}"
                         f"{', ...' if len(ids) > 5 else ''}): pick one, open_scene(items[i]) (items on several grids are "
                         "not one scene)")
    if isinstance(source, pystac.Collection):
        raise InputError(f"STAC collection {source.id}: open_scene takes one of its items, "
                         "open_scene(next(collection.get_items()))")
    return source


def _band_assets(item: Any) -> list[str]:
    """An item's GeoTIFF assets that hold bands: those with the role "data" where any has it, else all but
    thumbnails and overviews."""
    tifs = {k: set(a.roles or ()) for k, a in item.assets.items()
            if (a.media_type or "").startswith("image/tiff") or a.href.lower().endswith((".tif", ".tiff"))}
    data = [k for k, roles in tifs.items() if "data" in roles]
    return data or [k for k, roles in tifs.items() if not roles & {"thumbnail", "overview"}]


def _asset_bands(asset: Any, fields: Sequence[str], n: int) -> list[dict[str, Any]]:
    """The per-band dicts an asset declares under the first of ``fields`` that lists one per band (``{}`` each else)."""
    for field in fields:
        bands = asset.extra_fields.get(field)
        if isinstance(bands, list) and len(bands) == n and all(isinstance(b, dict) for b in bands):
            return bands
    return [{}] * n


def _declared_bands(scene: xr.DataArray, assets: Sequence[tuple[str, Any]], counts: Sequence[int], item: str) -> xr.DataArray:
    """Each band's nodata from its asset's ``raster:bands`` where the file does not say it (STAC items often
    declare what the COGs leave out, as odc-stac and stackstac read it); where both say and disagree, the
    file's, with a warning. A declared scale and offset are not taken: a model's card records those of the
    files it was trained on, and the same files read through an item must match it (a warning says them)."""
    import warnings

    declared: list[dict[str, Any]] = []
    for (key, asset), n in zip(assets, counts):
        # STAC 1.0's raster:bands, else 1.1's bands (nodata, raster:scale, raster:offset); a list not one per band
        # describes something else. 1.1's nodata may sit on the asset, for all its bands
        for d in _asset_bands(asset, ("raster:bands", "bands"), n):
            d = {k.removeprefix("raster:"): v for k, v in d.items()}
            if d.get("nodata") is None and asset.extra_fields.get("nodata") is not None:
                d["nodata"] = asset.extra_fields["nodata"]
            declared.append(d)
    nodata, scales = band_nodata(scene), band_scales(scene) or [(1.0, 0.0)] * len(declared)
    floating = np.issubdtype(scene.dtype, np.floating)  # NaN is nodata already
    keys = [k for (k, _), n in zip(assets, counts) for _ in range(n)]
    for i, d in enumerate(declared):
        nd = d.get("nodata")
        if nd is not None:
            nd = float(nd)  # STAC writes "nan", "inf", "-inf" as strings
            if nodata[i] is None:
                if not (floating and np.isnan(nd)):  # NaN in a float file is nodata already
                    nodata[i] = nd
            elif not (nd == nodata[i] or (np.isnan(nd) and np.isnan(nodata[i]))):
                warnings.warn(f"STAC item {item}, asset {keys[i]}: raster:bands says nodata {nd:g}, the file {nodata[i]:g}; "
                              "the file's is used", stacklevel=3)
        want = (float(d.get("scale", 1.0)), float(d.get("offset", 0.0)))
        if want != scales[i]:
            warnings.warn(f"STAC item {item}, asset {keys[i]}: raster:bands says scale {want[0]:g} and offset {want[1]:g}, "
                          f"the file {scales[i][0]:g} and {scales[i][1]:g}; the values are read as the file says (as "
                          "geoseg predict reads the file; geoseg.physical(scene.assign_coords(scale=..., offset=...)) "
                          "applies the declared ones)", stacklevel=3)
    return _with_nodata(scene, nodata)


def _open_files(paths: list[str], chunks: int) -> tuple[xr.DataArray, list[int]]:
    """The scene of ``paths`` stacked in order, and how many bands each gave."""
    from geoseg.io.sources import open_stack

    stack = open_stack(paths)  # one clear error for a missing file, no CRS or mixed grids
    import rioxarray

    parts = []
    per_source = _bands_per_source(stack, paths)
    for p, used in zip(paths, per_source):
        bands = [stack.bands[i] for i in used]
        if storage.is_url(p) or any(b.use_mask for b in bands) or _mixed_dtypes(p):  # read as the pipeline reads (read_bands)
            parts.append(_read_part(stack, p, chunks, used))
            continue
        da_ = rioxarray.open_rasterio(p, chunks={"band": -1, "y": chunks, "x": chunks}, lock=False)
        names = da_.attrs.get("long_name")
        names = [names] if isinstance(names, str) else list(names or [])
        stem = Path(p).stem
        band_names = [n if n else (stem if da_.sizes["band"] == 1 else f"{stem}_{i + 1}")
                      for i, n in enumerate(names + [None] * (da_.sizes["band"] - len(names)))]
        da_ = da_.assign_coords(band=band_names)
        # the bands geoseg stacks, each with its own nodata (a VRT's may differ)
        da_ = da_.isel(band=[b.band - 1 for b in bands])
        da_.attrs = {}
        parts.append(_with_scales(_with_nodata(da_, [b.nodata for b in bands]), [(b.scale, b.offset) for b in bands]))
    # open_stack checked that the files share one grid: their coordinates are the first file's (an outer
    # join of coordinates a rounding apart would double the grid)
    scene = xr.concat(parts, dim="band", join="override", combine_attrs="drop") if len(parts) > 1 else parts[0]
    scene = _with_nodata(scene, band_nodata(scene))  # the scalar attribute, where every band agrees
    scene.attrs["sources"] = paths
    return scene.rio.write_crs(parts[0].rio.crs), [len(used) for used in per_source]


def _bands_per_source(stack: Any, paths: Sequence[str]) -> list[list[int]]:
    """The positions in the stack of each entry of ``paths``'s bands, in turn (a file given twice gives its bands
    twice, once each)."""
    out, cursor = [], 0
    for p in paths:
        n = sum(1 for b in stack.bands if b.path == p) // paths.count(p)
        used = list(range(cursor, cursor + n))
        if cursor + n > len(stack.bands) or any(stack.bands[i].path != p for i in used):
            raise AssertionError(f"the stack's bands are not in the order of the files given ({p})")
        out.append(used)
        cursor += n
    return out


NODATA = "nodata"  # the band coordinate that holds each band's nodata (NaN: none), so it follows band selections


def _with_nodata(da_: xr.DataArray, nodata: Sequence[float | None]) -> xr.DataArray:
    """``da_`` with each band's nodata as the ``nodata`` coordinate of its band dimension, and as rioxarray's
    scalar nodata where every band has the same (rioxarray's ``.rio.nodata``, ``to_raster``, ``reproject`` read that)."""
    values = [np.nan if v is None else float(v) for v in nodata]
    out = da_.assign_coords({NODATA: ("band", np.asarray(values, np.float64))})
    out.attrs = {k: v for k, v in out.attrs.items() if k not in ("nodata", "_FillValue")}
    same = {None if v is None else float(v) for v in nodata}
    if len(same) == 1 and None not in same:
        out = out.rio.write_nodata(same.pop(), encoded=False)
    return out


# the band coordinates that hold each band's GDAL scale and offset (physical = value x scale + offset), as the
# model's card records those of its training bands: values stored otherwise are refused, not fed to the model
SCALE, OFFSET = "scale", "offset"


def _with_scales(da_: xr.DataArray, scales: Sequence[tuple[float, float]]) -> xr.DataArray:
    return da_.assign_coords({SCALE: ("band", np.asarray([s for s, _ in scales], np.float64)),
                              OFFSET: ("band", np.asarray([o for _, o in scales], np.float64))})


def band_scales(scene: xr.DataArray) -> list[tuple[float, float]] | None:
    """Each band's (scale, offset), or None where the scene does not say: the ``scale``/``offset`` band coordinates
    (``open_scene``), else rioxarray's attributes of values read as stored (``scale_factor``/``add_offset``, or
    per band ``scales``/``offsets``), else (1, 0) for values rioxarray already scaled (``mask_and_scale=True``)."""
    n = scene.sizes["band"]
    if SCALE in scene.coords and scene.coords[SCALE].dims in (("band",), ()):  # per band, or one for all
        scales = np.broadcast_to(np.asarray(scene.coords[SCALE].values, np.float64), (n,))
        offsets = np.broadcast_to(np.asarray(scene.coords[OFFSET].values if OFFSET in scene.coords else 0.0, np.float64), (n,))
        return [(float(s), float(o)) for s, o in zip(scales, offsets)]
    attrs = scene.attrs

    def per_band(many: str, one: str, default: float) -> list[float] | None:
        """rioxarray's per-band tuple (``scales``), else its one value (``scale_factor``), else None."""
        values = attrs.get(many)
        if values is not None and np.ndim(values) and len(values) == n:
            return [default if v is None else float(v) for v in values]
        value = attrs.get(one)
        return [float(value)] * n if value is not None and not np.ndim(value) else None

    scales, offsets = per_band("scales", "scale_factor", 1.0), per_band("offsets", "add_offset", 0.0)
    if scales is not None or offsets is not None:  # values as stored, with how to make them physical
        return list(zip(scales or [1.0] * n, offsets or [0.0] * n))
    if "scale_factor" in scene.encoding or "add_offset" in scene.encoding:
        return [(1.0, 0.0)] * n  # decoded: the values are physical
    return None


_SCALE_ATTRS = ("scale_factor", "add_offset", "scales", "offsets")


def physical(scene: Any) -> xr.DataArray:
    """A scene's values as physical quantities (float32: value x scale + offset of each band), its ``scale`` and
    ``offset`` coordinates set to 1 and 0 to say so, and each band's nodata as NaN: for a model trained on physical
    values (``gdal_translate -unscale``). Converting in xarray by hand keeps the coordinates of the stored values."""
    scene = open_scene(scene)
    scales = band_scales(scene) or [(1.0, 0.0)] * scene.sizes["band"]
    nodata = band_nodata(scene)
    s = xr.DataArray(np.asarray([v for v, _ in scales], np.float32), dims="band")
    o = xr.DataArray(np.asarray([v for _, v in scales], np.float32), dims="band")
    missing = xr.DataArray(np.asarray([np.nan if v is None else v for v in nodata], np.float64), dims="band")
    values = scene.astype(np.float32)
    out = (values * s + o).where(values != missing)  # NaN where a band had its nodata
    # not the stored values' scale attributes (rioxarray's): written or reopened, they scaled the values a second time
    out.attrs = {k: v for k, v in scene.attrs.items() if k not in _SCALE_ATTRS}  # xarray's arithmetic kept them all
    out = out.rio.write_crs(scene.rio.crs).rio.write_transform(scene.rio.transform())
    n = scene.sizes["band"]
    return _with_scales(_with_nodata(out, [float("nan")] * n), [(1.0, 0.0)] * n)


def band_nodata(scene: xr.DataArray) -> list[float | None]:
    """Each band's nodata: the ``nodata`` band coordinate (``open_scene``), else a per-band ``nodata`` attribute
    (a list, or an array as netCDF reads one back), else one value for every band (``rio.nodata``, ``_FillValue``)."""
    if NODATA in scene.coords and scene.coords[NODATA].dims in (("band",), ()):  # per band, or one band selected
        values = np.broadcast_to(np.asarray(scene.coords[NODATA].values, np.float64), (scene.sizes.get("band", 1),))
        return [None if np.isnan(v) else float(v) for v in values]
    nd = scene.attrs.get("nodata")
    if nd is None:
        nd = scene.attrs.get("_FillValue")
    if nd is None and scene.encoding.get("_FillValue") is not None:
        stored = scene.encoding.get("dtype")
        decoded = any(k in scene.encoding for k in ("scale_factor", "add_offset")) or (
            stored is not None and np.dtype(stored) != scene.dtype)
        # masked (and scaled) on reading: the stored fill value is NaN now, and a valid value may equal it
        nd = float("nan") if decoded else scene.encoding["_FillValue"]
    if nd is not None and np.ndim(nd):
        values = list(np.asarray(nd, dtype=object).ravel())
        if len(values) != scene.sizes["band"]:
            raise InputError(f"attrs['nodata'] holds {len(values)} values for {scene.sizes['band']} bands; give one, "
                             "or one per band (after selecting bands, set it again or use geoseg.open_scene, which "
                             "keeps each band's nodata with its band)")
        return [None if v is None else float(v) for v in values]
    return [None if nd is None else float(nd)] * scene.sizes["band"]


def _stack_block(stack: Any, dtype: str, block_info: Any = None) -> np.ndarray:
    from rasterio.windows import Window

    from geoseg.io.sources import read_bands

    _, (y0, y1), (x0, x1) = block_info[None]["array-location"]
    data, valid = read_bands(stack, Window(x0, y0, x1 - x0, y1 - y0), dtype=dtype)
    if np.dtype(dtype).kind == "f":
        data[~valid] = np.nan  # masked (GDAL's mask) or nodata: no value
    return data


def _mixed_dtypes(path: str) -> bool:
    """Whether the bands of a local file differ in dtype (a VRT of uint16 reflectances and a float32 index):
    rioxarray opens only files of one dtype; read_bands reads such a file a band at a time."""
    import rasterio

    with rasterio.open(path) as ds:
        return len(set(ds.dtypes)) > 1


def _read_part(stack: Any, path: str, chunks: int, positions: Sequence[int]) -> xr.DataArray:
    """The bands of ``path`` as a lazy DataArray whose blocks are read by ``geoseg.io.sources.read_bands``,
    as the pipeline reads them: inside the GDAL Env that reaches an object store on whichever worker
    reads them (rioxarray's lazy reads run outside it: a custom endpoint is never reached), and with
    GDAL's mask applied (an internal mask band, an alpha): masked pixels are NaN, the bands float32."""
    import dask.array as da

    sub = stack.select(list(positions))
    dtype = "float32" if any(b.use_mask for b in sub.bands) else np.result_type(*[b.dtype for b in sub.bands]).name
    h, w = sub.shape
    grid_chunks = ((len(positions),), da.core.normalize_chunks(chunks, (h,))[0], da.core.normalize_chunks(chunks, (w,))[0])
    data = da.map_blocks(_stack_block, sub, dtype, dtype=dtype, chunks=grid_chunks, meta=np.zeros((0, 0, 0), dtype))
    t = sub.grid.affine
    stem = Path(path).stem
    names = [b.description or (stem if len(positions) == 1 else f"{stem}_{b.band}") for b in sub.bands]
    out = xr.DataArray(data, dims=("band", "y", "x"),
                       coords={"band": names, "y": t.f + t.e * (np.arange(h) + 0.5), "x": t.c + t.a * (np.arange(w) + 0.5)})
    out = _with_scales(_with_nodata(out, [b.nodata for b in sub.bands]), [(b.scale, b.offset) for b in sub.bands])
    return out.rio.write_crs(sub.grid.crs.to_wkt()).rio.write_transform(t)


def _as_scene(da_: xr.DataArray) -> xr.DataArray:
    """A DataArray as ``(band, y, x)`` with a CRS; a 2-D array becomes one band."""
    import rioxarray  # noqa: F401  (registers .rio)

    if da_.ndim == 2:
        da_ = da_.expand_dims(band=[da_.name or "band_1"])
    dims = set(da_.dims)
    ydim = "y" if "y" in dims else "latitude" if "latitude" in dims else None
    xdim = "x" if "x" in dims else "longitude" if "longitude" in dims else None
    other = [d for d in da_.dims if d not in (ydim, xdim)]
    if ydim is None or xdim is None or len(other) != 1:
        raise InputError(f"a scene has dims (band, y, x); this DataArray has {da_.dims}")
    da_ = da_.transpose(other[0], ydim, xdim)
    renames = {k: v for k, v in ((other[0], "band"), (ydim, "y"), (xdim, "x")) if k != v}
    if renames:
        da_ = da_.rename(renames)
    if da_.rio.crs is None:
        raise InputError("the DataArray has no CRS; set one with .rio.write_crs(...) (odc-stac and stackstac set it)")
    nodata = band_nodata(da_)
    scales = band_scales(da_)
    if scales is not None and SCALE not in da_.coords:
        da_ = _with_scales(da_, scales)
    return _with_nodata(_north_up(da_), nodata)


def _north_up(obj: Any) -> Any:
    """A DataArray or Dataset with rows north-up (y descending) and columns west to east, as rasters are, and its transform from its
    coordinates: a strided selection, coarsen or flip keeps rioxarray's cached transform, which no longer fits."""
    if {"x", "y"} <= set(obj.coords) and obj.sizes.get("y", 0) > 1 and obj.sizes.get("x", 0) > 1:  # else no orientation
        if float(obj["y"][1]) > float(obj["y"][0]):  # south-up rows (y ascending)
            obj = obj.isel(y=slice(None, None, -1))
        if float(obj["x"][1]) < float(obj["x"][0]):  # columns east to west: the model saw a mirror image
            obj = obj.isel(x=slice(None, None, -1))
        obj = obj.rio.write_transform(obj.rio.transform(recalc=True))
    return obj


# ---------------------------------------------------------------------------------------------- predict


def _class_attrs(card: ModelCard) -> dict[str, Any]:
    """CF-style attributes of the class map: plain lists and strings, so to_zarr and to_netcdf keep them."""
    ids = [c.id for c in card.classes]
    return {
        "long_name": "class id (255 = nodata)",
        "flag_values": ids,
        "flag_meanings": " ".join(c.name.replace(" ", "_") for c in card.classes),
        "class_names": [c.name for c in card.classes],
        "class_colors": [c.color for c in card.classes],
        "nodata": NODATA_CLASS,
    }


def predict(
    scene: Any,
    model: "Model | str | os.PathLike",
    *,
    chunk_size: int | None = None,
    halo: int | None = None,
    exact: bool = False,
    tile_size: int | None = None,
    precision: str = "auto",
    batch_size: int = 2,
    device: str = "auto",
    tta: str | None = None,
    postprocess: dict[str, Any] | None = None,
) -> xr.Dataset:
    """A lazy Dataset (``class_id`` uint8, 255 = nodata; ``confidence``) on the scene's grid.

    Nothing is computed until asked; a selection computes only the chunks it touches (a threshold model
    with Otsu's threshold reads the whole scene once first, for the threshold: ``attrs["geoseg_threshold"]``). The model
    tasks run where the current distributed client puts them, else on dask's threaded scheduler.
    ``tta``: "none" or "d4" in place of the card's; ``postprocess``: a majority filter and sieve in place
    of the card's (``{"majority_radius": 1, "min_pixels": 16}``; ``{}``: none), run in each chunk's window
    grown by their reach.
    """
    from geoseg.graph import segmentation_from_array
    from geoseg.infer import InferenceSettings
    from geoseg.numerics import resolve_current
    from geoseg.runtime import ModelRef

    scene = open_scene(scene)
    m = _model(model)
    card = m.card
    if card.finds_objects:
        raise ConfigError(f"{m.location} finds objects, which are joined across the whole scene (not lazily per chunk): "
                          "use geoseg.api.objects(images, model, out_dir)")
    scene = _match_bands(scene, card, m.location)
    _check_scales(scene, card, m.location)
    if tta not in (None, "none", "d4"):
        raise ConfigError(f"tta must be None (the card's), 'none' or 'd4', not {tta!r}")
    if tta == "d4" and card.method != "smp":
        raise ConfigError(f"{m.location}: tta='d4' augments a network's passes, and this is a {card.method} model")
    if postprocess is not None:
        card = card.with_postprocess(postprocess, f"{m.location}: postprocess")
    shape = (scene.sizes["y"], scene.sizes["x"])
    plan = plan_tiling(card, shape, chunk_size=chunk_size, halo=halo, exact=exact, tile_size=tile_size)
    from geoseg.cluster import model_resources

    resources = model_resources(card.method, None, _current_client())  # the GPU workers of an embedded cluster
    numerics = resolve_current(precision, device, exact, resources, method=card.method)
    import dask.array as da

    data = scene.data if isinstance(scene.data, da.Array) else da.from_array(scene.data, chunks=(-1, plan.chunk_size, plan.chunk_size))
    from geoseg.methods import scene_settings

    nodata = band_nodata(scene)
    settings = scene_settings(card, None, plan, InferenceSettings(numerics.precision, batch_size, tta=tta,
                                                                  postprocess=card.postprocess), array=data, nodata=nodata)
    seg = segmentation_from_array(data, nodata, plan, ModelRef(m.location, m.digest, device), settings, resources)
    coords = {"y": scene["y"].values, "x": scene["x"].values}
    ds = xr.Dataset({"class_id": (("y", "x"), seg.class_id), "confidence": (("y", "x"), seg.confidence)}, coords=coords)
    ds["class_id"].attrs.update(_class_attrs(card))
    ds["confidence"].attrs.update(long_name="probability of the model's winning class (before the card's post-processing)", units="1")
    ds.attrs.update(geoseg_model=m.location, geoseg_model_digest=m.digest, geoseg_precision=numerics.precision,
                    geoseg_chunk_size=plan.chunk_size, geoseg_halo=plan.halo)
    if settings.params:  # computed over the scene first (Otsu's threshold): the value the map was made with
        ds.attrs.update({f"geoseg_{k}": v for k, v in settings.params})
    # rioxarray records the grid mapping in each variable's encoding: to_zarr/to_netcdf write it
    return ds.rio.write_crs(scene.rio.crs).rio.write_transform(scene.rio.transform())


def _match_bands(scene: xr.DataArray, card: ModelCard, location: str) -> xr.DataArray:
    """The scene's bands as the card lists them, by name, as ``geoseg.bands.match_bands`` does for files: the card's
    band descriptions (or file names) found among more bands are selected; the same bands in another order are
    refused (a model fed its bands swapped gives a wrong map without a word)."""
    keys = [str(b) for b in scene["band"].values]
    # the band names, and for a STAC item's scene the files' descriptions and the common names; compared ignoring case
    named = [keys] + [[str(v) for v in scene[c].values] for c in ("description", "common_name")
                      if c in scene.coords and scene[c].dims == ("band",)]
    for want in ([b.description for b in card.bands], [Path(b.file).stem if b.file else None for b in card.bands]):
        if not all(want):
            continue
        wanted = [w.casefold() for w in want]
        for names in named:
            folded = [n.casefold() for n in names]
            if not all(folded) or len(set(folded)) != len(folded) or not set(wanted) <= set(folded):
                continue
            if folded == wanted:
                return scene
            at = [folded.index(w) for w in wanted]
            picked = [keys[i] for i in at]
            if len(folded) != card.n_bands:
                return scene.isel(band=at)
            raise InputError(f"the scene's bands ({', '.join(names)}) are those of the model in {location} in another "
                             f"order; it expects ({', '.join(want)}): pass scene.sel(band={picked!r})")
    if scene.sizes["band"] != card.n_bands:
        raise ConfigError(f"the scene has {scene.sizes['band']} bands, the model in {location} takes {card.n_bands} "
                          f"({', '.join(b.name for b in card.bands)})")
    return scene


def _check_scales(scene: xr.DataArray, card: ModelCard, location: str) -> None:
    from geoseg.bands import check_band_scales

    scales = band_scales(scene)
    if scales is None:
        return
    names = [str(b) for b in scene["band"].values]
    check_band_scales([(f"the scene's band {name!r}", s, o) for name, (s, o) in zip(names, scales)], card, location,
                      "give values stored as the training imagery was (rioxarray: open_rasterio(..., mask_and_scale="
                      "False) keeps them as stored), or train on imagery like this; values converted in xarray keep "
                      "the scene's scale and offset coordinates: geoseg.physical(scene) converts and resets them")


def segment(images: Sequence[str | os.PathLike], model: str | os.PathLike, **options: Any) -> xr.Dataset:
    """``predict`` on raster files (kept for code written before ``open_scene``)."""
    return predict(open_scene([str(p) for p in images]), model, **options)


def objects(images: Sequence[str | os.PathLike], model: str | os.PathLike, out_dir: str | os.PathLike, *,
            client: Any = None, **options: Any) -> tuple[xr.Dataset, Any]:
    """Objects of an instance or SAM model (``options``: chunk_size, max_object_size, score_threshold,
    nms_iou, prompts, overwrite...; ``instance_model`` with a semantic ``model``: panoptic), written to
    ``out_dir`` like ``geoseg predict``; returns the store (``instance_id``, ``class_id``) and the
    objects as a GeoDataFrame."""
    import pyogrio

    from geoseg.instances.outputs import OBJECTS_LAYER
    from geoseg.pipeline import PredictOptions
    from geoseg.pipeline import predict as run

    if not _model(model).card.finds_objects and not options.get("instance_model"):
        raise ConfigError(f"{model}: a class-map model finds no objects; give an instance or SAM model, or instance_model=")

    run([str(p) for p in images], str(model), out_dir, PredictOptions(**options), client=client or _current_client())
    out = Path(out_dir)
    return open_prediction(out / "prediction.zarr"), pyogrio.read_dataframe(out / "objects.gpkg", layer=OBJECTS_LAYER)


def _current_client() -> Any:
    from geoseg.methods import current_client

    return current_client()


def open_prediction(path: str | os.PathLike) -> xr.Dataset:
    """A prediction store (``prediction.zarr``) as a Dataset, CRS and transform decoded, classes in the attributes."""
    from geoseg.io.zarr_store import CLASSES_ATTR, check_finished
    from geoseg.io.zarr_store import open_prediction as _open

    ds = check_finished(_open(path), path)
    classes = ds.attrs.get(CLASSES_ATTR)
    if classes:
        ds["class_id"].attrs.update(
            flag_values=[c["id"] for c in classes], flag_meanings=" ".join(c["name"].replace(" ", "_") for c in classes),
            class_names=[c["name"] for c in classes], class_colors=[c["color"] for c in classes])
    return ds


def classes_of(ds: xr.Dataset | xr.DataArray) -> list[Any]:
    """The ClassInfo list a prediction carries in its attributes."""
    from geoseg.vector.api import classes_from_attrs

    return classes_from_attrs((ds["class_id"] if isinstance(ds, xr.Dataset) else ds).attrs)


# ---------------------------------------------------------------------------------------------- vectorize


def vectorize(source: Any, outputs: Sequence[str | os.PathLike] | None = None, **options: Any) -> Any:
    """Polygons of a prediction: a Dataset (computed, polygonized in this process) gives a GeoDataFrame;
    a store or class raster path is polygonized chunk by chunk on the cluster into ``outputs``
    (files), or into a GeoDataFrame when no outputs are given."""
    from geoseg.vector.api import polygonize
    from geoseg.vector.api import vectorize as vectorize_files

    if isinstance(source, (xr.Dataset, xr.DataArray)):
        import dask

        unsupported = sorted(set(options) - {"connectivity"})
        if unsupported:
            raise ConfigError(f"{', '.join(unsupported)}: for a Dataset in memory only connectivity applies; write it "
                              "to a store (ds.to_zarr) and vectorize the store for the other options")
        source = _north_up(source)
        var = source["class_id"] if isinstance(source, xr.Dataset) else source
        with_conf = isinstance(source, xr.Dataset) and "confidence" in source
        # one computation for both layers: the model runs once
        ids, conf = dask.compute(var.data, source["confidence"].data if with_conf else None)
        gdf = polygonize(np.asarray(ids), var.rio.transform(), var.rio.crs, classes_of(var),
                         connectivity=options.get("connectivity", 4), confidence=None if conf is None else np.asarray(conf))
        if outputs:
            from geoseg.vector.writers import write_layer

            for out in outputs:
                write_layer([gdf], out, crs=gdf.crs, classes=classes_of(var), confidence=conf is not None)
        return gdf
    if outputs:
        return vectorize_files(source, list(outputs), **options)
    import tempfile

    import geopandas as gpd

    with tempfile.TemporaryDirectory(prefix="geoseg-vec-") as tmp:
        out = Path(tmp) / "polygons.parquet"
        vectorize_files(source, [out], **options)
        return gpd.read_parquet(out)


def to_cog(ds: xr.Dataset | xr.DataArray, path: str | os.PathLike, *, client: Any = None) -> Path:
    """The class map as a COG: built on the cluster when there is a distributed client, else in this process."""
    from geoseg.io.cog import write_cog
    from geoseg.io.cog_cluster import write_cog_cluster

    var = _north_up(ds["class_id"] if isinstance(ds, xr.Dataset) else ds)
    if var.ndim != 2 or not np.issubdtype(var.dtype, np.integer):
        raise InputError(f"to_cog writes a class map (2-D integer class ids, a prediction's class_id); this is "
                         f"{var.ndim}-D {var.dtype} with dims {tuple(var.dims)}: predict it first (geoseg.predict(scene, model))")
    if var.rio.crs is None:
        raise InputError("the class map has no CRS; set one with .rio.write_crs(...)")
    from odc.geo.geobox import GeoBox

    grid = GeoBox(var.shape, var.rio.transform(), var.rio.crs.to_wkt())
    classes = classes_of(var)
    nodata = var.rio.nodata if var.rio.nodata is not None else var.rio.encoded_nodata
    if nodata is not None and not (isinstance(nodata, float) and np.isnan(nodata)) and int(nodata) != NODATA_CLASS:
        # the COG's nodata is 255: a map whose own nodata is another value (a class raster opened with rioxarray)
        # had its nodata pixels written as that class, valid. Widened first, so 255 fits (an int8 map's would wrap
        # to -1); ids out of 0-254 are refused by the writer
        var = var.astype(np.promote_types(var.dtype, np.uint8))
        var = xr.where(var == nodata, NODATA_CLASS, var)
    if not classes:  # no class attributes: the ids present, in the default colours (a table of zeros was all black)
        from geoseg.model.card import DEFAULT_COLORS, ClassInfo

        import dask.array as da

        ids = da.unique(var.data).compute() if isinstance(var.data, da.Array) else np.unique(np.asarray(var.data))
        classes = [ClassInfo(id=int(i), name=f"class_{int(i)}", color=DEFAULT_COLORS[int(i) % len(DEFAULT_COLORS)])
                   for i in ids if 0 <= int(i) < NODATA_CLASS]
    if client is None:
        try:
            from distributed import default_client

            client = default_client()
        except (ImportError, ValueError):
            client = None
    if client is not None:
        import dask.array as da

        data = var.data if isinstance(var.data, da.Array) else da.from_array(var.values, chunks=2048)
        if data.dtype != np.uint8:  # ids 0-254 of a wider type, checked block by block as write_cog checks them
            data = data.map_blocks(_class_ids_block, dtype=np.uint8)
        write_cog_cluster(client, data, path, grid=grid, classes=classes)
    else:
        write_cog(var.data, path, grid=grid, classes=classes)
    return Path(path)


def _class_ids_block(block: np.ndarray, block_info: Any = None) -> np.ndarray:
    """A block of class ids as uint8 (an InputError for ids out of 0-255, naming where)."""
    from geoseg.io.cog import _as_class_ids

    where = tuple(int(r[0]) for r in block_info[0]["array-location"]) if block_info else (0, 0)
    return _as_class_ids(block, block.shape, where)


# ---------------------------------------------------------------------------------------------- train / evaluate


def train(images: Sequence[str | os.PathLike], labels: str | os.PathLike, out_dir: str | os.PathLike, *,
          method: str = "smp", band_roles: Sequence[str] | str | None = None, **config: Any) -> Any:
    """Train a model (see ``geoseg train``); keyword arguments are TrainConfig fields, and for the other
    methods (``method="pixel" | "kmeans" | "threshold"``) also ``index``, ``threshold``, ``clusters``,
    ``postprocess`` (a dict) and ``overwrite``. Returns the TrainResult."""
    from geoseg.model.card import PostProcess
    from geoseg.training import TrainConfig, TrainInputs
    from geoseg.training import train as run

    known = {k: config.pop(k) for k in list(config) if k in ("classes_file", "label_field", "label_layer", "ignore", "reproject_labels", "background",
                                                              "bbox", "window")}
    inputs = TrainInputs(tuple(str(p) for p in images), str(labels), **known)
    overwrite = config.pop("overwrite", False)
    postprocess = PostProcess(**config.pop("postprocess", {}))
    if method != "smp":
        from geoseg.methods.fit import train_method

        extra = {k: config.pop(k) for k in list(config) if k in ("index", "threshold", "clusters")}
        return train_method(inputs, out_dir, method, TrainConfig(**config), band_roles=band_roles, postprocess=postprocess,
                            overwrite=overwrite, **extra)  # fmt: skip
    update: dict[str, Any] = {"postprocess": postprocess.model_dump()}
    if band_roles:
        from geoseg.io.sources import open_stack
        from geoseg.methods.fit import band_roles_for

        update["band_roles"] = band_roles_for(open_stack(inputs.images), band_roles)
    return run(inputs, out_dir, TrainConfig(**config), overwrite=overwrite, card_update=update)


def evaluate(images: Sequence[str | os.PathLike], model: str | os.PathLike, labels: str | os.PathLike, **options: Any) -> Any:
    """Metrics of a model on labelled imagery (see ``geoseg evaluate``): ``.metrics`` renders as a table."""
    from geoseg.evaluation import EvaluateOptions
    from geoseg.evaluation import evaluate as run

    return run(images, model, labels, EvaluateOptions(**options))


__all__ = ["Model", "classes_of", "cluster", "evaluate", "open_prediction", "open_scene", "plan_tiling", "predict",
           "sample_data", "segment", "to_cog", "train", "vectorize"]
