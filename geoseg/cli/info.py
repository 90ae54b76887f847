"""`geoseg info`: what a raster or a model directory holds."""

from __future__ import annotations

import json
from pathlib import Path

import click

from geoseg.errors import InputError


@click.command(short_help="Summarise rasters, models, outputs, stores, STAC items or vector files.")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(paths, as_json):
    """Summarise PATHS, local paths or URLs: rasters (grid, bands, nodata, layout, a class raster's classes), a
    model directory (card), a finished output folder (classes with their area shares, polygon count, run figures),
    a job's root, a prediction store, a STAC item, or a local vector file (layers, features, fields)."""

    out = []
    for p in paths:
        kind = _kind(p)
        if kind == "output":
            out.append(output_summary(p))
        elif kind == "job":
            out.append(job_summary(p))
        elif kind == "item":
            out.append(_stac_item(p))
        elif kind == "model":
            out.append(model_summary(p))
        elif kind == "store":
            out.append(store_summary(p))  # a prediction store (prediction.zarr): GDAL does not read its CRS
        elif kind == "vector":
            out.append(vector_summary(p))
        else:
            out.append(raster_summary(p))
    if as_json:
        click.echo(json.dumps(_json_safe(out), indent=2, default=str, allow_nan=False))
        return
    for item in out:
        classes = item.pop("classes_table", None)
        for k, v in item.items():
            click.echo(f"{k:>16}: {v}")
        if classes:
            click.echo(f"{'':>16}  {'id':>3}  {'class':<20} {'share':>8} {'pixels':>12} {'area km2':>12} {'polygons':>9}")
            for c in classes:
                area = "-" if c["area_km2"] is None else f"{c['area_km2']:.3f}"
                click.echo(f"{'':>16}  {c['id']:>3}  {c['name']:<20} {c['share_pct']:>7.2f}% {c['pixels']:>12} {area:>12} "
                           f"{c['polygons'] if c['polygons'] is not None else '-':>9}")
        click.echo("")


RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".img", ".nc", ".hdf", ".h5", ".png", ".jpg", ".jpeg", ".asc", ".dem")
VECTOR_SUFFIXES = (".gpkg", ".shp", ".geojson", ".parquet", ".geoparquet", ".fgb", ".gml", ".kml", ".gdb")
# the file that says what a folder (or prefix) is, in the order asked
MARKERS = (("run.json", "output"), ("job.json", "job"), ("model.json", "model"), ("zarr.json", "store"), (".zgroup", "store"))
FOLDER_HINT = "give a raster file, a model directory (model.json), an output folder of geoseg predict (run.json) or a job's root"


def _is_stac_item(doc: object) -> bool:
    return isinstance(doc, dict) and "stac_version" in doc and doc.get("type") == "Feature"


def _json_doc(path: str) -> object:
    from geoseg.io import storage

    try:
        return json.loads(storage.read_bytes(path))
    except (OSError, ValueError):
        return None


def _kind(p: str) -> str:
    """What PATH (a local path or a URL) holds, by the files geoseg writes: an output, a job's root, a model, a
    prediction store, a STAC item, a vector file, else a raster (GDAL says whether it is one)."""
    from urllib.parse import urlsplit

    from geoseg.io import storage
    from geoseg.model.store import check_model_dir

    remote = storage.is_url(p)
    name = urlsplit(p).path.rstrip("/").rsplit("/", 1)[-1] if remote else Path(p).name  # no ?query
    suffix = Path(name).suffix.lower()
    if suffix in RASTER_SUFFIXES:
        return "raster"
    if suffix in VECTOR_SUFFIXES and not remote:
        return "vector"
    if suffix == ".json":
        what = {"model.json": "model directory", "run.json": "output folder", "job.json": "job's root"}.get(name)
        if what:
            parent = p.rstrip("/").rsplit("/", 1)[0] if remote else str(Path(p).parent)
            raise InputError(f"{p}: the card of a {what}; give the folder: geoseg info {parent}")
        doc = _json_doc(p)
        if _is_stac_item(doc):
            return "item"
        if isinstance(doc, dict) and "stac_version" in doc:
            raise InputError(f"{p}: a STAC {doc.get('type')}, not an item; give one item's JSON (or its assets' files)")
        if isinstance(doc, dict) and doc.get("type") in ("FeatureCollection", "Feature") and not remote:
            return "vector"  # GeoJSON
        if not remote and Path(p).is_file():
            raise InputError(f"{p}: a JSON file that is no STAC item; {FOLDER_HINT}")
    if remote and suffix in VECTOR_SUFFIXES:
        raise InputError(f"{p}: a vector file; geoseg info reads vector files on this machine only, download it first")
    if not remote and not Path(p).is_dir():
        return "raster"  # a missing path is named as such by the raster reader
    for marker, kind in MARKERS:
        try:
            if storage.exists(storage.join(p, marker)):
                return kind
        except PermissionError:
            continue  # a bucket that may be read but not listed answers 403 for a missing key
        except (ImportError, OSError, ValueError):
            break  # no such scheme here, or unreachable: the raster reader says what is wrong
    if remote:
        return "raster"
    path = Path(p)
    if any(path.glob("*.safetensors")):
        check_model_dir(p)  # weights without their card: says so
    if any(c.name.startswith(("prediction.zarr", ".geoseg")) for c in path.iterdir()):
        raise InputError(f"{p}: an output of geoseg predict that is not finished (no run.json); run the same "
                         "command with --resume to finish it")
    import rasterio

    try:  # a folder GDAL reads as one raster (an Arc/Info grid)
        with rasterio.open(p):
            return "raster"
    except rasterio.errors.RasterioError:
        raise InputError(f"{p}: a folder that is no model, output or store of geoseg; {FOLDER_HINT}") from None


def model_summary(p: str) -> dict:
    """A model directory's card, local or at a URL (fetched once into the cache, as predict does)."""
    from geoseg.model.store import open_model

    card = open_model(p).card
    ens = card.method_params.get("ensemble")
    return {"model": p, "method": card.method, "arch": card.arch, "encoder": card.encoder, "depth": card.encoder_depth,
            "arch_params": dict(card.arch_params), "members": card.members,
            "method_params": {k: v for k, v in card.method_params.items() if k not in ("ensemble", "files")},
            "ensemble": {"with": ens["method"], "network_weight": ens["weight"]} if ens else None,
            "bands": [b.description or b.name for b in card.bands],
            "band_roles": list(card.band_roles), "missing_bands": card.missing_bands,
            "postprocess": card.postprocess.model_dump() if card.postprocess.active else None, "tta": card.tta,
            "classes": {c.id: c.name for c in card.classes}, "stride": card.stride,
            "receptive_field": card.receptive_field, "default_halo": card.default_halo,
            "tile_size": card.tile_size, "metrics": (card.training or {}).get("metrics")}


def raster_summary(p: str) -> dict:
    """Grid and bands of a raster as geoseg stacks it; a class raster's classes and a file's layout (tiles,
    overviews, compression, COG) as GDAL reads them."""
    import rasterio

    from geoseg.io.sources import dataset, open_stack

    stack = open_stack([p])
    g = stack.grid
    out = {"raster": p, "crs": g.crs.to_wkt() if g.crs.epsg is None else f"EPSG:{g.crs.epsg}",
           "shape": list(g.shape), "transform": list(g.affine)[:6], "block_shape": list(stack.block_shape),
           "bands": [{"band": b.band, "description": b.description, "dtype": b.dtype, "nodata": b.nodata,
                      **({"scale": b.scale, "offset": b.offset} if (b.scale, b.offset) != (1.0, 0.0) else {})}
                     for b in stack.bands]}
    try:
        with dataset(stack.bands[0].path) as ds:
            structure = ds.tags(ns="IMAGE_STRUCTURE")
            bh, bw = ds.block_shapes[0]
            tiled = ds.profile.get("tiled")  # GDAL's answer where the driver gives one (a square strip is no tile)
            out["layout"] = {"driver": ds.driver, "tiled": bool(tiled) if tiled is not None else bw != ds.width,
                             "compression": ds.compression.name.upper() if ds.compression else None,
                             "overviews": len(ds.overviews(1)), "cog": structure.get("LAYOUT") == "COG"}
            names = ds.tags().get("CLASS_NAMES")
            if names and ds.count == 1:
                out["classes"] = {int(k): v for k, v in json.loads(names).items()}
    except (rasterio.errors.RasterioError, ValueError, OSError):
        pass  # the grid and bands above were read: the layout is extra
    return out


def vector_summary(p: str) -> dict:
    """Layers, CRS, feature counts, geometry types and fields of a vector file (a landuse.gpkg, labels)."""
    import pyogrio

    try:
        layers = pyogrio.list_layers(p)
    except Exception as exc:  # noqa: BLE001  (pyogrio raises DataSourceError and others)
        raise InputError(f"{p}: not a vector file OGR can read ({str(exc).splitlines()[0]}); give a GeoPackage, "
                         "Shapefile, GeoJSON or GeoParquet") from None
    out: dict = {"vector": p, "layers": {}}
    for name, _ in layers:
        info = pyogrio.read_info(p, layer=name)
        crs = info.get("crs")
        if crs and not str(crs).upper().startswith("EPSG:"):  # a page of WKT: its EPSG code or name where it has one
            from pyproj import CRS

            parsed = CRS.from_user_input(crs)
            epsg = parsed.to_epsg()
            crs = f"EPSG:{epsg}" if epsg else (parsed.name if parsed.name and parsed.name != "unnamed" else crs)
        out["layers"][name] = {"features": int(info.get("features", -1)), "geometry": info.get("geometry_type"),
                               "crs": crs, "fields": list(info.get("fields", []))}
    return out


def output_summary(folder: str | Path) -> dict:
    """What a finished output folder (local or at a URL) holds: classes and their shares (true areas from the
    polygons of a local folder), run figures."""
    from geoseg.io import storage

    run_path = storage.join(folder, "run.json")
    try:
        run = json.loads(storage.read_bytes(run_path))
    except (OSError, ValueError) as exc:
        raise InputError(f"{run_path}: unreadable ({exc}); the output is not finished") from None
    names: dict[int, str] = {}
    item_path = storage.join(folder, "item.json")
    if storage.exists(item_path):
        try:
            item = json.loads(storage.read_bytes(item_path))
        except (OSError, ValueError) as exc:
            raise InputError(f"{item_path}: unreadable ({exc}); the output folder is damaged") from None
        for c in item.get("assets", {}).get("classes", item.get("assets", {}).get("prediction", {})).get("classification:classes", []):
            if not c.get("nodata"):
                names[int(c["value"])] = c.get("title") or c.get("name")
    if not names:  # no classes.tif (--no-cog): the item names no class, the store does
        from geoseg.io.zarr_store import store_attrs

        for c in (store_attrs(storage.join(folder, "prediction.zarr")) or {}).get("geoseg_classes") or []:
            names[int(c["id"])] = c["name"]
    pixels = {int(k): int(v) for k, v in (run.get("class_pixels") or {}).items()}
    total = sum(pixels.values()) or 1
    areas: dict[int, tuple[float, int]] = {}
    gpkg = storage.join(folder, "landuse.gpkg")
    if not storage.is_url(gpkg) and Path(gpkg).exists():  # a remote one is not downloaded for its areas
        import pyogrio

        df = pyogrio.read_dataframe(gpkg, sql="SELECT class_id, SUM(area_m2) AS area, COUNT(*) AS n FROM landuse GROUP BY class_id",
                                    read_geometry=False)
        areas = {int(r.class_id): (float(r.area), int(r.n)) for r in df.itertuples()}
    table = [{"id": k, "name": names.get(k, f"class_{k}"), "pixels": n, "share_pct": round(100.0 * n / total, 3),
              "area_km2": None if k not in areas else round(areas[k][0] / 1e6, 6),
              "polygons": None if k not in areas else areas[k][1]} for k, n in sorted(pixels.items())]
    t = run.get("timings", {})
    return {"output": str(folder), "finished": run.get("finished"), "shape": run.get("grid", {}).get("shape"),
            "model": run.get("model", {}).get("path"), "precision": run.get("parameters", {}).get("precision"),
            "chunks": run.get("chunks"), "polygons": run.get("polygons"), "throughput_mpx_s": run.get("throughput_mpx_s"),
            "timings_s": t, "outputs": run.get("outputs"), "classes_table": table}


def store_summary(path: str) -> dict:
    """A prediction store's grid and layers, read as geoseg and xarray read it (CRS from its attributes)."""
    from pyproj import CRS

    from geoseg.vector.run import open_class_raster

    src = open_class_raster(path)
    crs = CRS.from_wkt(src.crs_wkt) if src.crs_wkt else None
    epsg = crs.to_epsg() if crs is not None else None
    return {"store": path, "crs": f"EPSG:{epsg}" if epsg else (crs.to_wkt() if crs else None), "shape": list(src.shape),
            "transform": list(src.affine)[:6], "chunks": list(src.chunks or ()), "class_nodata": src.nodata,
            "layers": ["class_id"] + (["confidence"] if src.has_confidence else [])}


def _json_safe(obj):
    """NaN and infinities as JSON can hold them (null, "inf"): a NaN nodata is no number JSON knows."""
    import math

    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def job_summary(root: str | Path) -> dict:
    """A job's output root (job.json, local or at a URL): its status and each scene's."""
    from geoseg.io import storage

    path = storage.join(root, "job.json")
    try:
        job = json.loads(storage.read_bytes(path))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot be read ({exc}); run the job again") from None
    scenes = job.get("scenes") or []
    return {"job": job.get("job"), "root": str(root), "status": job.get("status"), "job_file": job.get("job_file"),
            "finished": job.get("finished"), "wall_s": job.get("wall_s"),
            "scenes": {s.get("name"): f"{s.get('status')} ({s.get('reason')})" if s.get("reason") else s.get("status")
                       for s in scenes},
            "outputs": "geoseg info " + " ".join(str(s.get("out_dir")) for s in scenes[:3]) + (" ..." if len(scenes) > 3 else "")}


def _stac_item(path: str) -> dict | None:
    """A STAC item (geoseg's item.json, or any; local or at a URL): its assets, which are what rasters there are to read."""
    doc = _json_doc(path)
    if not _is_stac_item(doc):
        return None
    props = doc.get("properties") or {}
    assets = {k: {"href": a.get("href"), "type": a.get("type"), "roles": a.get("roles")}
              for k, a in (doc.get("assets") or {}).items() if isinstance(a, dict)}
    return {"stac_item": str(path), "id": doc.get("id"), "datetime": props.get("datetime"), "bbox": doc.get("bbox"),
            "proj:code": props.get("proj:code", props.get("proj:epsg")), "assets": assets,
            "read": "geoseg info ASSET_HREF for a raster; geoseg.open_scene(ITEM) in Python stacks its bands to segment them"}
