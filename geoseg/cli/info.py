"""`geoseg info`: what a raster or a model directory holds."""

from __future__ import annotations

import json
from pathlib import Path

import click

from geoseg.errors import InputError


@click.command(short_help="Summarise rasters or a model directory.")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(paths, as_json):
    """Summarise PATHS: rasters (grid, bands, nodata), a model directory (card), or a finished output
    folder (classes with their area shares, polygon count, run figures)."""
    from geoseg.io.sources import open_stack
    from geoseg.model.store import check_model_dir

    out = []
    for p in paths:
        if Path(p).is_dir() and (Path(p) / "run.json").exists():
            out.append(output_summary(Path(p)))
            continue
        if Path(p).is_dir() and (Path(p) / "job.json").exists():
            out.append(job_summary(Path(p)))
            continue
        if Path(p).is_file() and Path(p).suffix.lower() == ".json":
            item = _stac_item(Path(p))
            if item is not None:
                out.append(item)
                continue
        if Path(p).is_dir() and not (Path(p) / "model.json").exists() and any(Path(p).glob("*.safetensors")):
            check_model_dir(p)  # weights without their card: says so
        if Path(p).is_dir() and (Path(p) / "model.json").exists():
            card = check_model_dir(p)
            ens = card.method_params.get("ensemble")
            out.append({"model": p, "method": card.method, "arch": card.arch, "encoder": card.encoder, "depth": card.encoder_depth,
                        "members": card.members,
                        "method_params": {k: v for k, v in card.method_params.items() if k not in ("ensemble", "files")},
                        "ensemble": {"with": ens["method"], "network_weight": ens["weight"]} if ens else None,
                        "bands": [b.description or b.name for b in card.bands],
                        "band_roles": list(card.band_roles), "missing_bands": card.missing_bands,
                        "postprocess": card.postprocess.model_dump() if card.postprocess.active else None, "tta": card.tta,
                        "classes": {c.id: c.name for c in card.classes}, "stride": card.stride,
                        "receptive_field": card.receptive_field, "default_halo": card.default_halo,
                        "tile_size": card.tile_size, "metrics": (card.training or {}).get("metrics")})
            continue
        if Path(p).is_dir() and ((Path(p) / "zarr.json").exists() or (Path(p) / ".zgroup").exists()):
            out.append(store_summary(p))  # a prediction store (prediction.zarr): GDAL does not read its CRS
            continue
        if Path(p).is_dir() and any(c.name.startswith(("prediction.zarr", ".geoseg")) for c in Path(p).iterdir()):
            raise InputError(f"{p}: an output of geoseg predict that is not finished (no run.json); run the same "
                             "command with --resume to finish it")
        stack = open_stack([p])
        g = stack.grid
        out.append({"raster": p, "crs": g.crs.to_wkt() if g.crs.epsg is None else f"EPSG:{g.crs.epsg}",
                    "shape": list(g.shape), "transform": list(g.affine)[:6], "block_shape": list(stack.block_shape),
                    "bands": [{"band": b.band, "description": b.description, "dtype": b.dtype, "nodata": b.nodata,
                               **({"scale": b.scale, "offset": b.offset} if (b.scale, b.offset) != (1.0, 0.0) else {})}
                              for b in stack.bands]})
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


def output_summary(folder: Path) -> dict:
    """What a finished output folder holds: classes and their shares (true areas from the polygons), run figures."""

    try:
        run = json.loads((folder / "run.json").read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{folder / 'run.json'}: unreadable ({exc}); the output is not finished") from None
    names: dict[int, str] = {}
    item_path = folder / "item.json"
    if item_path.exists():
        try:
            item = json.loads(item_path.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{item_path}: unreadable ({exc}); the output folder is damaged") from None
        for c in item.get("assets", {}).get("classes", item.get("assets", {}).get("prediction", {})).get("classification:classes", []):
            if not c.get("nodata"):
                names[int(c["value"])] = c.get("title") or c.get("name")
    pixels = {int(k): int(v) for k, v in (run.get("class_pixels") or {}).items()}
    total = sum(pixels.values()) or 1
    areas: dict[int, tuple[float, int]] = {}
    gpkg = folder / "landuse.gpkg"
    if gpkg.exists():
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


def job_summary(root: Path) -> dict:
    """A job's output root (job.json): its status and each scene's."""
    try:
        job = json.loads((root / "job.json").read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{root / 'job.json'}: cannot be read ({exc}); run the job again") from None
    scenes = job.get("scenes") or []
    return {"job": job.get("job"), "root": str(root), "status": job.get("status"), "job_file": job.get("job_file"),
            "finished": job.get("finished"), "wall_s": job.get("wall_s"),
            "scenes": {s.get("name"): f"{s.get('status')} ({s.get('reason')})" if s.get("reason") else s.get("status")
                       for s in scenes},
            "outputs": "geoseg info " + " ".join(str(s.get("out_dir")) for s in scenes[:3]) + (" ..." if len(scenes) > 3 else "")}


def _stac_item(path: Path) -> dict | None:
    """A STAC item (geoseg's item.json, or any): its assets, which are what rasters there are to read."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or "stac_version" not in doc or doc.get("type") != "Feature":
        return None
    props = doc.get("properties") or {}
    assets = {k: {"href": a.get("href"), "type": a.get("type"), "roles": a.get("roles")}
              for k, a in (doc.get("assets") or {}).items() if isinstance(a, dict)}
    return {"stac_item": str(path), "id": doc.get("id"), "datetime": props.get("datetime"), "bbox": doc.get("bbox"),
            "proj:code": props.get("proj:code", props.get("proj:epsg")), "assets": assets,
            "read": "geoseg info ASSET_HREF for a raster; geoseg.open_scene(ITEM) in Python stacks its bands to segment them"}
