"""Instance segmentation of a scene on a cluster, and its outputs.

Stages (futures on ``client``; model tasks carry the job's ``model_resources``):

1. ``detect_chunk`` per chunk (on the model's workers): read the chunk's haloed window, detect.
2. ``match`` per pair of chunks whose windows overlap: pairs of detections that are one object.
3. On the client: ``merge.resolve`` joins the matched detections into objects (ids, classes, scores):
   only boxes, scores and pairs come back, never masks.
4. ``paint_chunk`` per chunk: paints the objects over its core into the store (``instance_id``
   uint32, 0 = none; ``class_id`` of the object, the background class elsewhere, 255 nodata) and
   returns the polygons of the objects whose box centre lies in its core (each object once, whole).

Then the client writes ``instances.tif`` and ``classes.tif`` (COGs) and ``objects.gpkg`` and, last,
run.json (the commit protocol of ``geoseg.pipeline.commit``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from geoseg.errors import detached
from geoseg.instances import merge
from geoseg.instances.net import DEFAULTS, detect
from geoseg.io.sources import RasterStack, read_bands
from geoseg.model.card import NODATA_CLASS, ModelCard
from geoseg.pipeline.plan import INSTANCE_COG, OBJECTS_NAME
from geoseg.runtime import ModelRef, get_model
from geoseg.tiling import Box, Chunk, TilingPlan

OBJECTS_LAYER = "objects"


def background_id(card: ModelCard) -> int:
    """The class of pixels no object covers: the card's first class (network label 0)."""
    return card.classes[0].id


def normalise(card: ModelCard, data: np.ndarray, valid: np.ndarray) -> np.ndarray:
    mean = np.asarray(card.normalization.mean, np.float32)[:, None, None]
    std = np.asarray(card.normalization.std, np.float32)[:, None, None]
    x = (data.astype(np.float32) - mean) / std
    x[~valid] = 0.0  # a missing value is the band's mean
    return x


@detached
def detect_chunk(ref: ModelRef, stack: RasterStack, chunk: Chunk, params: dict[str, Any],
                 prompts: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Detections in ``chunk``'s window (scene pixels), with the window, the core and the core's
    valid pixels. SAM: automatic masks, or one per prompt of ``prompts`` (its ``index``)."""
    bundle = get_model(ref)
    card = bundle.card
    data, valid = read_bands(stack, chunk.input.window)
    ok = valid.all(axis=0) if card.missing_bands == "nodata" else valid.any(axis=0)
    offset = (chunk.input.y0, chunk.input.x0)
    if card.method == "sam":
        from geoseg.instances.sam import sam_detect

        dets = sam_detect(bundle.net, data, ok, card, params, offset, prompts)
    else:
        dets = detect(bundle.net, normalise(card, data, valid), ok, card.class_ids, {**card.method_params, **params},
                      offset=offset, device=bundle.device)
    return {**dets, "window": chunk.input, "core": chunk.core, "valid": ok[chunk.core.relative_to(chunk.input)]}


def meta(dets: dict[str, Any]) -> dict[str, Any]:
    """What the client needs of a window's detections: everything but the masks."""
    return {k: dets[k] for k in ("boxes", "scores", "labels", "index", "window", "core")}


def prompted_objects(meta: dict[tuple[int, int], dict[str, Any]], shape: tuple[int, int]) -> list[merge.SceneObject]:
    """One object per prompt that gave a mask, from the chunk that segmented it; id = prompt row + 1."""
    found = []
    for key, m in sorted(meta.items()):
        for i, number in enumerate(m["index"]):
            box = tuple(int(v) for v in m["boxes"][i])
            found.append(merge.SceneObject(int(number) + 1, int(m["labels"][i]), float(m["scores"][i]), box, ((key, i),),
                                           not bool(merge.cut(m["boxes"][i], m["window"], shape)[0])))
    return sorted(found, key=lambda o: o.id)


@detached
def match_windows(a: dict[str, Any], b: dict[str, Any], min_iou: float) -> list[tuple[int, int]]:
    return merge.match(a, a["window"], b, b["window"], min_iou)


def _polygon(mask: np.ndarray, box: Box, affine: Any) -> Any:
    import shapely
    from affine import Affine
    from rasterio.features import shapes

    t = affine @ Affine.translation(box.x0, box.y0)
    parts = [shapely.geometry.shape(g) for g, v in shapes(mask.astype(np.uint8), mask=mask, transform=t, connectivity=8) if v]
    return parts[0] if len(parts) == 1 else shapely.MultiPolygon(parts)


@detached
def paint_chunk(store: str, chunk: Chunk, objects: list[merge.SceneObject], owned: list[int],
                dets: dict[tuple[int, int], dict[str, Any]], affine: Any, background: int | None,
                label_by_map: bool = False) -> list[dict[str, Any]]:
    """Paint ``objects`` over the chunk's core into the store; the polygons of the ``owned`` objects
    (the visible part: where objects overlap the higher score wins, as in the raster).

    ``background`` None (panoptic): the store's class map is a semantic model's; objects are laid
    over it (their pixels take their class) and none is drawn where it is nodata. ``label_by_map``
    (panoptic with SAM, whose masks have no class): the class map stays; each object takes the
    class most of its pixels have there."""
    import shapely
    import zarr

    from geoseg.io import storage

    region = chunk.core
    for o in objects:
        if o.id in owned:
            region = Box(min(region.y0, o.box[0]), max(region.y1, o.box[2]), min(region.x0, o.box[1]), max(region.x1, o.box[3]))
    canvas = merge.paint(objects, dets, region)
    ids = canvas[chunk.core.relative_to(region)]
    valid = dets[(chunk.iy, chunk.ix)]["valid"]
    ids = np.where(valid, ids, 0).astype(np.uint32)
    lut = {o.id: o.class_id for o in objects}
    group = zarr.open_group(store, mode="r+", **storage.zarr_kwargs(store))
    sl = (slice(chunk.core.y0, chunk.core.y1), slice(chunk.core.x0, chunk.core.x1))
    if background is None:
        classes = np.asarray(group["class_id"][sl])
        ids[classes == NODATA_CLASS] = 0
    else:
        classes = np.full(ids.shape, background, np.uint8)
        classes[~valid] = NODATA_CLASS
    canvas[chunk.core.relative_to(region)] = ids  # the polygons are what the raster shows
    if not label_by_map:
        for oid in np.unique(ids[ids > 0]):
            classes[ids == oid] = lut[int(oid)]
        group["class_id"][sl] = classes
    group["instance_id"][sl] = ids
    semantic = None
    if label_by_map and owned:
        semantic = np.asarray(group["class_id"][region.y0:region.y1, region.x0:region.x1])
    out = []
    for o in objects:
        if o.id not in owned:
            continue
        box = Box(o.box[0], o.box[2], o.box[1], o.box[3])
        mask = canvas[box.relative_to(region)] == o.id
        if not mask.any():
            continue
        cls = o.class_id
        if semantic is not None:
            under = semantic[box.relative_to(region)][mask]
            under = under[under != NODATA_CLASS]
            cls = int(np.bincount(under).argmax()) if under.size else NODATA_CLASS
        out.append({"instance_id": o.id, "class_id": cls, "score": o.score, "pixels": int(mask.sum()),
                    "whole": o.whole, "wkb": shapely.to_wkb(_polygon(mask, box, affine))})
    return out


def neighbour_pairs(plan: TilingPlan) -> list[tuple[Chunk, Chunk]]:
    """Pairs of chunks whose windows overlap (each pair once)."""
    reach = -(-2 * plan.halo // plan.chunk_size) if plan.halo else 0
    ny, nx = plan.grid_shape
    pairs = []
    for a in plan:
        for dy in range(0, reach + 1):
            for dx in range(-reach, reach + 1):
                if (dy, dx) <= (0, 0) or not (0 <= a.iy + dy < ny and 0 <= a.ix + dx < nx):
                    continue
                b = plan.chunk(a.iy + dy, a.ix + dx)
                if a.input.intersect(b.input) is not None:
                    pairs.append((a, b))
    return pairs


def create_instance_store(path: str, grid: Any, plan: TilingPlan, attrs: dict[str, Any]) -> None:
    import dask.array as da
    import xarray as xr

    from geoseg.io import storage
    from geoseg.io.zarr_store import georeference, pixel_centres

    y, x = pixel_centres(grid)
    shape, chunks = tuple(grid.shape), plan.chunks
    ds = xr.Dataset({"instance_id": (("y", "x"), da.zeros(shape, dtype=np.uint32, chunks=chunks)),
                     "class_id": (("y", "x"), da.full(shape, NODATA_CLASS, dtype=np.uint8, chunks=chunks))},
                    coords={"y": y, "x": x}, attrs=attrs)
    ds["instance_id"].attrs.update(long_name="object id (0 = no object)")
    ds["class_id"].attrs.update(nodata=NODATA_CLASS, long_name="class of the object (background elsewhere, 255 = nodata)")
    ds = georeference(ds, grid)
    z = (plan.chunk_size, plan.chunk_size)
    enc = {"instance_id": {"_FillValue": None, "fill_value": 0, "chunks": z},
           "class_id": {"_FillValue": None, "fill_value": NODATA_CLASS, "chunks": z}}
    ds.to_zarr(path, mode="w", compute=False, encoding=enc, consolidated=False, zarr_format=3, **storage.zarr_kwargs(path))


def add_instance_array(store: str, plan: TilingPlan) -> None:
    """An ``instance_id`` array (uint32, 0 = none) beside a semantic store's class map (panoptic)."""
    import zarr

    from geoseg.io import storage

    group = zarr.open_group(store, mode="r+", **storage.zarr_kwargs(store))
    arr = group.create_array("instance_id", shape=plan.shape, chunks=(plan.chunk_size, plan.chunk_size), dtype="uint32",
                             fill_value=0, dimension_names=("y", "x"), overwrite=True)
    arr.attrs.update(long_name="object id (0 = no object)", grid_mapping="spatial_ref")


def find_objects(job: Any, client: Any, store: str, params: dict[str, Any] | None = None, panoptic: bool = False) -> dict[str, Any]:
    """Stages 1-4 on ``client``; returns the objects' records (polygons as WKB) and counts.
    ``panoptic``: objects are laid over the semantic class map the store already holds."""
    card, plan, stack = job.card, job.plan, job.stack
    params = dict(params or {})
    p = {**DEFAULTS, **card.method_params, **params}
    ref = job.ref
    res = dict(job.options.model_resources or {}) or None
    token = uuid.uuid4().hex[:10]
    by_chunk: dict[tuple[int, int], list] | None = None
    if card.method == "sam":
        from geoseg.instances.sam import read_prompts, scene_stretch

        params["stretch"] = scene_stretch(stack, card)  # one stretch for every chunk
        if job.options.prompts:
            by_chunk = {}
            cs = plan.chunk_size
            for pr in read_prompts(job.options.prompts, stack.grid):
                by_chunk.setdefault((pr["centre"][0] // cs, pr["centre"][1] // cs), []).append(pr)
    dets = {(ch.iy, ch.ix): client.submit(detect_chunk, ref, stack, ch, params,
                                          None if by_chunk is None else by_chunk.get((ch.iy, ch.ix), []),
                                          resources=res, pure=False, key=f"geoseg-detect-{token}-{ch.iy}-{ch.ix}") for ch in plan}
    metas = {k: client.submit(meta, f, key=f"geoseg-meta-{token}-{k[0]}-{k[1]}") for k, f in dets.items()}
    pairs = [] if by_chunk is not None else [
        (a, b, client.submit(match_windows, dets[(a.iy, a.ix)], dets[(b.iy, b.ix)], float(p["match_iou"]),
                             key=f"geoseg-match-{token}-{a.iy}-{a.ix}-{b.iy}-{b.ix}")) for a, b in neighbour_pairs(plan)]
    got = client.gather(metas)
    matched = client.gather([f for _, _, f in pairs])
    edges = [(((a.iy, a.ix), i), ((b.iy, b.ix), j)) for (a, b, _), found in zip(pairs, matched) for i, j in found]
    objects = prompted_objects(got, plan.shape) if by_chunk is not None else merge.resolve(got, edges, plan.shape)
    detections = sum(len(m["scores"]) for m in got.values())
    tasks = []
    for ch in plan:
        core = ch.core
        owned = [o for o in objects if core.y0 <= (o.box[0] + o.box[2]) // 2 < core.y1 and core.x0 <= (o.box[1] + o.box[3]) // 2 < core.x1]
        region = core
        for o in owned:
            region = Box(min(region.y0, o.box[0]), max(region.y1, o.box[2]), min(region.x0, o.box[1]), max(region.x1, o.box[3]))
        needed = [o for o in objects if Box(o.box[0], o.box[2], o.box[1], o.box[3]).intersect(region) is not None]
        keys = {(ch.iy, ch.ix)} | {k for o in needed for k, _ in o.members}
        tasks.append(client.submit(paint_chunk, store, ch, needed, [o.id for o in owned], {k: dets[k] for k in keys},
                                   stack.grid.affine, None if panoptic else background_id(card), panoptic and card.method == "sam",
                                   key=f"geoseg-paint-{token}-{ch.iy}-{ch.ix}"))
    records = [r for part in client.gather(tasks) for r in part]
    for f in [*dets.values(), *metas.values(), *(f for _, _, f in pairs), *tasks]:
        f.release()
    records.sort(key=lambda r: r["instance_id"])
    return {"records": records, "detections": detections, "objects": len(records), "pairs": len(edges),
            "scene_parameters": {"stretch": params["stretch"]} if "stretch" in params else {}}


def objects_frame(records: list[dict[str, Any]], classes: Any, crs: Any) -> Any:
    """The objects as a GeoDataFrame: instance_id, class_id, class_name, score, area_m2 (ellipsoidal), pixels."""
    import geopandas as gpd
    import pandas as pd
    import shapely

    from geoseg.vector.measure import Measurer

    names = {c.id: c.name for c in classes}
    geoms = shapely.from_wkb([r["wkb"] for r in records]) if records else np.array([], dtype=object)
    area, _ = Measurer(crs)(np.asarray(geoms, dtype=object))
    cols = {
        "instance_id": pd.Series([r["instance_id"] for r in records], dtype="uint32"),
        "class_id": pd.Series([r["class_id"] for r in records], dtype="uint8"),
        "class_name": pd.Series([names.get(r["class_id"], str(r["class_id"])) for r in records], dtype="object"),
        "score": pd.Series([r["score"] for r in records], dtype="float32"),
        "area_m2": pd.Series(area, dtype="float64"),
        "pixels": pd.Series([r["pixels"] for r in records], dtype="int64"),
    }
    return gpd.GeoDataFrame(cols, geometry=gpd.GeoSeries(geoms, crs=crs), crs=crs)


def write_objects(frame: Any, path: Path, card: ModelCard) -> None:
    """objects.gpkg, atomically, with a QGIS style colouring objects by class."""
    import pyogrio

    from geoseg.vector.style import add_gpkg_style, polygon_qml

    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:12]}.tmp.gpkg")
    try:
        pyogrio.write_dataframe(frame, tmp, layer=OBJECTS_LAYER, driver="GPKG", geometry_type="Unknown", promote_to_multi=True)
        add_gpkg_style(tmp, OBJECTS_LAYER, polygon_qml(card.classes))
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, *path.parent.glob(f"{tmp.name}-*")):
            leftover.unlink(missing_ok=True)


def run_instance_job(job: Any, client: Any, cluster: dict[str, Any] | None = None, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Detect, merge, paint and publish an instance job (local OUT); run.json last."""
    import zarr

    from geoseg.errors import ConfigError
    from geoseg.io import storage
    from geoseg.io.cog import write_cog, write_id_cog
    from geoseg.io.zarr_store import finalize_store
    from geoseg.monitor import Stage
    from geoseg.pipeline.commit import _publish, _sweep, _versions
    from geoseg.pipeline.execute import prepare_cluster
    from geoseg.pipeline.plan import COG_NAME, PARTIAL, RUN_NAME, STAGING, ZARR_NAME

    if storage.is_url(job.out_dir):
        raise ConfigError(f"{job.out_dir}: instance outputs are written to a local directory for now; give a path")
    numerics = prepare_cluster(client, job)
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _sweep(out)
    (out / RUN_NAME).unlink(missing_ok=True)
    for name in (ZARR_NAME, COG_NAME, INSTANCE_COG, OBJECTS_NAME):
        p = out / name
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    store = out / (ZARR_NAME + PARTIAL)
    shutil.rmtree(store, ignore_errors=True)
    create_instance_store(str(store), job.stack.grid, job.plan, {"geoseg_job": job.key, "geoseg_task": "instance",
                                                                  "geoseg_classes": [c.model_dump() for c in job.card.classes]})
    timings = {}
    with Stage("instances") as st:
        found = find_objects(job, client, str(store), params)
    timings["instances_s"] = st.seconds
    finalize_store(store)
    group = zarr.open_group(str(store), mode="r")
    staging = Path(tempfile.mkdtemp(prefix=STAGING, dir=out))
    try:
        with Stage("cog") as st:
            write_id_cog(group["instance_id"], staging / INSTANCE_COG, grid=job.stack.grid, tags={"GEOSEG_MODEL": job.digest})
            write_cog(group["class_id"], staging / COG_NAME, grid=job.stack.grid, classes=job.card.classes,
                      tags={"GEOSEG_MODEL": job.digest})
        timings["cog_s"] = st.seconds
        frame = objects_frame(found["records"], job.card.classes, job.stack.grid.crs.to_wkt())
        write_objects(frame, staging / OBJECTS_NAME, job.card)
        h, w = job.stack.shape
        p = {**DEFAULTS, **job.card.method_params, **(params or {})}
        record = {
            "geoseg_run": 1, "task": "instance",
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "inputs": list(job.inputs),
            "grid": {"crs": job.stack.grid.crs.to_wkt(), "transform": list(job.stack.grid.affine)[:6], "shape": [h, w]},
            "model": {"path": job.model_location, "digest": job.digest, "card_sha256": job.card.digest(), "method": job.card.method,
                      "arch": job.card.arch, "encoder": job.card.encoder},
            "parameters": {**job.plan.describe(), "score_threshold": p["score_threshold"], "nms_iou": p["nms_iou"],
                           "match_iou": p["match_iou"], "max_object_px": job.plan.halo, "precision": numerics.precision},
            "numerics": numerics.record(),
            "objects": found["objects"], "detections": found["detections"], "matched_pairs": found["pairs"],
            "scene_parameters": found["scene_parameters"], "prompts": job.options.prompts,
            "cluster": cluster or {},
            "timings": {k: round(v, 3) for k, v in timings.items()},
            "throughput_mpx_s": round(h * w / 1e6 / max(timings["instances_s"], 1e-9), 4),
            "outputs": [ZARR_NAME, INSTANCE_COG, COG_NAME, OBJECTS_NAME],
            "versions": _versions(),
        }
        _publish(store, out / ZARR_NAME)
        for name in (INSTANCE_COG, COG_NAME, OBJECTS_NAME):
            _publish(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    storage.write_atomic(out / RUN_NAME, (json.dumps(record, indent=2) + "\n").encode())
    return record
