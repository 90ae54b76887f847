"""The outputs of objects: the store's arrays, objects.gpkg, and an instance job committed (run.json last,
as in ``geoseg.pipeline.commit``)."""

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

from geoseg.instances.net import DEFAULTS
from geoseg.instances.run import find_objects
from geoseg.model.card import NODATA_CLASS
from geoseg.pipeline.plan import INSTANCE_COG, OBJECTS_NAME
from geoseg.tiling import TilingPlan

OBJECTS_LAYER = "objects"


# the arrays of an object store (zarr_store.create_store)
INSTANCE_ARRAYS = {
    "instance_id": (np.uint32, 0, {"long_name": "object id (0 = no object)"}),
    "class_id": (np.uint8, NODATA_CLASS, {"nodata": NODATA_CLASS, "long_name": "class of the object (background elsewhere, 255 = nodata)"}),
}


def add_instance_array(store: str, plan: TilingPlan) -> None:
    """An ``instance_id`` array (uint32, 0 = none) beside a semantic store's class map (panoptic)."""
    import zarr

    from geoseg.io import storage

    group = zarr.open_group(store, mode="r+", **storage.zarr_kwargs(store))
    arr = group.create_array("instance_id", shape=plan.shape, chunks=(plan.chunk_size, plan.chunk_size), dtype="uint32",
                             fill_value=0, dimension_names=("y", "x"), overwrite=True)
    arr.attrs.update(long_name="object id (0 = no object)", grid_mapping="spatial_ref")


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


def write_object_files(store: str, staging: Path, grid: Any, digest: str, records: list[dict[str, Any]], classes: Any, *,
                       cog: bool = True, vectors: bool = True) -> list[str]:
    """instances.tif (from the store's ``instance_id``; unless not ``cog``) and objects.gpkg (from the paint
    tasks' records; unless not ``vectors``) in ``staging``. Returns the names written."""
    import zarr

    from geoseg.io import storage
    from geoseg.io.cog import write_id_cog

    written = []
    if cog:
        group = zarr.open_group(store, mode="r", **storage.zarr_kwargs(store))
        write_id_cog(group["instance_id"], staging / INSTANCE_COG, grid=grid, tags={"GEOSEG_MODEL": digest})
        written.append(INSTANCE_COG)
    if vectors:
        write_objects(objects_frame(records, classes, grid.crs.to_wkt()), staging / OBJECTS_NAME, classes)
        written.append(OBJECTS_NAME)
    return written


def write_objects(frame: Any, path: Path, classes: Any) -> None:
    """objects.gpkg, atomically, with a QGIS style colouring objects by class."""
    import pyogrio

    from geoseg.vector.style import add_gpkg_style, polygon_qml

    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:12]}.tmp.gpkg")
    try:
        pyogrio.write_dataframe(frame, tmp, layer=OBJECTS_LAYER, driver="GPKG", geometry_type="MultiPolygon", promote_to_multi=True)
        add_gpkg_style(tmp, OBJECTS_LAYER, polygon_qml(classes))
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, *path.parent.glob(f"{tmp.name}-*")):
            leftover.unlink(missing_ok=True)


def run_instance_job(job: Any, client: Any, cluster: dict[str, Any] | None = None, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Detect, merge, paint and publish an instance job (local OUT); run.json last."""
    import zarr

    from geoseg.io import storage
    from geoseg.io.cog import write_cog
    from geoseg.io.zarr_store import create_store, finalize_store
    from geoseg.monitor import Stage
    from geoseg.pipeline.commit import _item, _publish, _sweep, _versions
    from geoseg.numerics import with_joined
    from geoseg.pipeline.execute import prepare_cluster
    from geoseg.pipeline.plan import COG_NAME, ITEM_NAME, OUTPUTS, PARTIAL, RUN_NAME, STAGING, ZARR_NAME

    numerics = prepare_cluster(client, job)
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _sweep(out)
    (out / RUN_NAME).unlink(missing_ok=True)
    for name in OUTPUTS:  # an earlier run's outputs, whatever model made them (a stale classes.qml would mislabel)
        p = out / name
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    store = out / (ZARR_NAME + PARTIAL)
    shutil.rmtree(store, ignore_errors=True)
    create_store(str(store), job.stack.grid, job.plan, {"geoseg_job": job.key, "geoseg_task": "instance",
                                                        "geoseg_classes": [c.model_dump() for c in job.card.classes]}, INSTANCE_ARRAYS)
    timings = {}
    with Stage("instances") as st:
        found = find_objects(job, client, str(store), params)
    timings["instances_s"] = st.seconds
    numerics = with_joined(client, numerics, job.digest, job.options.device, job.options.model_resources)
    finalize_store(store)
    group = zarr.open_group(str(store), mode="r")
    staging = Path(tempfile.mkdtemp(prefix=STAGING, dir=out))
    try:
        outputs = [ZARR_NAME]
        with Stage("cog") as st:
            if job.options.cog:
                write_cog(group["class_id"], staging / COG_NAME, grid=job.stack.grid, classes=job.card.classes,
                          tags={"GEOSEG_MODEL": job.digest})
                outputs.append(COG_NAME)
            outputs += write_object_files(str(store), staging, job.stack.grid, job.digest, found["records"], job.card.classes,
                                          cog=job.options.cog, vectors=job.options.vectors)
        timings["cog_s"] = st.seconds
        from geoseg.io.stac import class_counts

        pixels = class_counts(group["class_id"], client)
        h, w = job.stack.shape
        p = {**DEFAULTS, **job.card.method_params, **(params or {})}
        record = {
            "geoseg_run": 1, "task": "instance", "job_key": job.key,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "inputs": list(job.inputs),
            "grid": {"crs": job.stack.grid.crs.to_wkt(), "transform": list(job.stack.grid.affine)[:6], "shape": [h, w]},
            "model": {"path": job.model_location, "digest": job.digest, **job.card.identity()},
            "parameters": {**job.plan.describe(), "score_threshold": p["score_threshold"], "nms_iou": p["nms_iou"],
                           "match_iou": p["match_iou"], "max_object_px": job.plan.halo, "precision": "fp32"},  # detection runs in fp32
            "numerics": numerics.record(),
            "objects": found["objects"], "detections": found["detections"], "matched_pairs": found["pairs"],
            "scene_parameters": found["scene_parameters"], "prompts": job.options.prompts,
            "cluster": cluster or {},
            "timings": {k: round(v, 3) for k, v in timings.items()},
            "throughput_mpx_s": round(h * w / 1e6 / max(timings["instances_s"], 1e-9), 4),
            "class_pixels": {str(k): v for k, v in pixels.items()},
            "outputs": [*outputs, ITEM_NAME],
            "versions": _versions(),
        }
        _item(job, record, pixels, staging / ITEM_NAME)
        _publish(store, out / ZARR_NAME)
        for name in (*outputs[1:], ITEM_NAME):
            _publish(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    storage.write_atomic(out / RUN_NAME, (json.dumps(record, indent=2) + "\n").encode())
    return record
