"""Committing a prediction: the store finished, COG and polygons built, every output published, run.json last.

Commit protocol
---------------
Reader rule: **OUT is finished if and only if OUT/run.json exists**; then every output it
lists is complete and comes from the run it describes. Without run.json nothing in OUT is to
be used. The steps, and what a crash at any point leaves:

1. Planning checks inputs, model and OUT and writes nothing.
2. A run first deletes OUT/run.json (only --overwrite or --resume get this far on a
   finished OUT): from then on OUT no longer claims to be finished. Then it deletes the
   COG and GeoPackage of an earlier run (and with --overwrite its store).
3. Chunks are written into the store (locally ``prediction.zarr.partial``; under a URL
   ``prediction.zarr`` itself, as object stores cannot rename), each followed by its marker
   ``.geoseg/done/IY_IX`` holding the chunk key, written only after the chunk's data writes
   returned. Chunk objects are replaced whole (see geoseg.io.zarr_store).
4. When every chunk is done the store is marked complete (attribute ``geoseg_complete``) and
   its markers are dropped.
5. classes.tif and landuse.gpkg are built whole in a staging folder (a hidden
   ``.geoseg-staging-*`` folder in OUT, or a local temporary one for a URL).
6. Publishing: locally renames (store, COG, GeoPackage); for a URL, uploads, each object
   appearing only once complete. Then run.json, last, atomically (rename or one PUT).

A kill during steps 2-5 leaves locally only ``*.partial`` and hidden names, never
prediction.zarr or run.json; under a URL, no run.json.

Resume (--resume) reuses a chunk only if the store was created for the same chunk key (inputs
by path, size and mtime or ETag; model digest; tiling plan; batch size; the precision and device
the workers resolved) and its marker holds that key; a store marked complete for that key is
reused whole. A chunk without a marker is computed again and rewritten whole; a store of any
other key is rebuilt.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from geoseg.io import storage
from geoseg.monitor import Stage
from geoseg.numerics import Numerics, with_joined
from geoseg.pipeline.execute import placed, prepare_cluster, run_segmentation
from geoseg.pipeline.sieve import sieve_joined
from geoseg.pipeline.plan import (
    COG_NAME,
    COG_STYLE,
    INSTANCE_COG,
    ITEM_NAME,
    OBJECTS_NAME,
    PARTIAL,
    RUN_NAME,
    STAGING,
    VECTOR_NAME,
    ZARR_NAME,
    Job,
    check_out_dir,
    chunk_key,
    _ours,
)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    import rasterio

    out = {"python": sys.version.split()[0], "gdal": rasterio.__gdal_version__}
    for pkg in ("geoseg", "torch", "segmentation-models-pytorch", "rasterio", "dask", "distributed", "xarray", "zarr", "numpy", "geopandas"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished local output into place (replacing an older one)."""
    if final.exists():
        shutil.rmtree(final) if final.is_dir() and not final.is_symlink() else final.unlink()
    os.replace(tmp, final)


def _sweep(out: str | os.PathLike) -> None:
    """Temporaries a killed run left in OUT, a directory or an object-store prefix (staging, polygon part files;
    never read: every run stages anew)."""
    for name in storage.list_names(out):
        if name.startswith(".") and _ours(name) and name not in (".geoseg", LOCK_NAME):
            try:
                storage.remove(storage.join(out, name), recursive=True)
            except OSError:  # one that cannot go stays; it is never read
                pass


LOCK_NAME = ".geoseg.lock"


@contextlib.contextmanager
def out_lock(out: str | os.PathLike) -> Iterator[None]:
    """One run at a time in a local OUT: an advisory lock (flock: released by the kernel when a run dies, so a
    killed run never leaves it held; NFS emulates it with byte-range locks). Two runs on one OUT deleted each
    other's store (a FileNotFoundError traceback). Object stores have no lock: one run per prefix is yours to keep."""
    if storage.is_url(out):
        yield
        return
    import fcntl

    Path(out).mkdir(parents=True, exist_ok=True)
    path = Path(out) / LOCK_NAME
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            import errno

            from geoseg.errors import ConfigError, OutputExistsError

            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # held: another run
                raise OutputExistsError(f"{out}: another geoseg run is writing it now; wait for it to finish (or stop "
                                        "it), then run again (--resume reuses what it finished)") from None
            # ENOLCK (NFS without its lock daemon), ENOTSUP...: no run holds it, the filesystem cannot lock
            raise ConfigError(f"{out}: its filesystem cannot lock files ({exc.strerror or exc}), and geoseg locks OUT so "
                              "that two runs never write it at once; give an OUT on a filesystem with locks (a local "
                              "disk, NFS with its lock service) or an object store URL (s3://...)") from None
        try:  # the file we locked is still the one at the path (a run that just ended removes it)
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


def run_job(job: Job, client: Any, progress: bool = False, cluster_info: dict | None = None,
            numerics: Numerics | None = None, priority: int = 0) -> dict[str, Any]:
    """Run a planned job on ``client`` and publish its outputs (commit protocol above); returns the run record.

    ``numerics``: decided already for this cluster (``prepare_cluster``); decided here otherwise.
    ``priority``: the dask priority of its tasks (a job runs earlier scenes first). One run at a time in a
    local OUT (``out_lock``).
    """
    with out_lock(job.out_dir):
        # again under the lock: planned long before (geoseg run plans every scene first), OUT may hold a run another
        # process finished since, which only --overwrite or --resume may replace
        check_out_dir(job.out_dir, job.options.overwrite, job.options.resume)
        return _run_job(job, client, progress, cluster_info, numerics, priority)


def _run_job(job: Job, client: Any, progress: bool, cluster_info: dict | None, numerics: Numerics | None,
             priority: int) -> dict[str, Any]:
    from geoseg.io.zarr_store import finalize_store

    job = placed(job, client)  # model tasks on the GPU workers of an embedded cluster that has some
    if job.card.finds_objects:
        from geoseg.instances.outputs import run_instance_job

        return run_instance_job(job, client, cluster_info, job.options.instance_params())
    if _on_this_machine(client):  # the disk reads the scene while the cluster is prepared (a no-op if cached)
        storage.prefetch_local(list(job.stack.paths))
    if numerics is None:
        numerics = prepare_cluster(client, job)

    out = job.out_dir
    remote = storage.is_url(out)
    if not remote:
        Path(out).mkdir(parents=True, exist_ok=True)
    _sweep(out)
    # Step 2: OUT stops claiming to be finished before anything in it changes; outputs of an
    # earlier run go too (they are rebuilt from the store), the store itself only with --overwrite.
    storage.remove(storage.join(out, RUN_NAME))
    for name in (COG_NAME, COG_STYLE, VECTOR_NAME, ITEM_NAME, INSTANCE_COG, OBJECTS_NAME):
        storage.remove(storage.join(out, name), recursive=True)
    if job.options.overwrite:
        from geoseg.io.zarr_store import remove_store

        remove_store(storage.join(out, ZARR_NAME))
    if remote:
        store = storage.join(out, ZARR_NAME)  # no rename on object stores: the store is built in place
    else:
        store = Path(out) / (ZARR_NAME + PARTIAL)
        published = Path(out) / ZARR_NAME
        if job.options.resume and not store.exists() and published.is_dir():
            # A run that died after publishing its store: take the store back; its chunks are
            # reused if (and only if) it was made for this job key.
            os.replace(published, store)
    timings: dict[str, float] = {}
    memory: dict[str, int] = {}
    with Stage("segment") as st:
        counts = run_segmentation(job, client, store, numerics, progress, priority)
    timings["segment_s"] = st.seconds
    if counts["computed"]:  # workers that joined meanwhile and took model tasks: recorded (and said if they emulate bf16)
        numerics = with_joined(client, numerics, job.digest, job.options.device, job.options.model_resources)
    sieved = None
    if sieve_joined(job.postprocess):  # the --mmu over the whole map, joined across chunks
        from geoseg.io.zarr_store import COMPLETE_ATTR, store_attrs
        from geoseg.pipeline.sieve import forget, sieve_store

        if (store_attrs(store) or {}).get(COMPLETE_ATTR):
            sieved = {"sieve": "joined across chunks", "chunks_reused": counts["chunks"]}  # a finished store, taken back
        else:
            with Stage("sieve") as st:
                if counts["computed"]:
                    forget(str(store))  # decisions of an earlier run were made on a map that has changed
                sieved = sieve_store(client, str(store), job.plan, job.postprocess,
                                     chunk_key(job.key, numerics.precision, numerics.device), priority)
            timings["sieve_s"] = st.seconds
    found = None
    if job.objects is not None:  # panoptic: objects laid over the class map, before anything is made from it
        from geoseg.instances.outputs import add_instance_array
        from geoseg.instances.run import find_objects, panoptic_class_map

        with Stage("instances") as st:
            add_instance_array(str(store), job.plan)
            found = find_objects(job.objects, client, str(store), job.options.instance_params(), panoptic=True,
                                 class_map=panoptic_class_map(job.card, job.objects.card))
        timings["instances_s"] = st.seconds
    finalize_store(store)
    classes = panoptic_classes(job)
    outputs = [ZARR_NAME]
    polygons = None
    staging_parent = None if remote else Path(out)
    with _staging(staging_parent) as staging:
        cog_rounds = None
        if job.options.cog and job.options.vectors:
            from geoseg.io.cog_cluster import start_cog_cluster

            # the COG's tiles first in line, below the polygons: the workers make them while they would wait on the
            # client (its join of the chunks' borders, its GeoPackage), and the COG is written after the polygons
            cog_rounds = start_cog_cluster(client, _class_array(store), priority=priority - 0.5)
        try:
            if job.options.vectors:
                from geoseg.vector.api import vectorize

                with Stage("vectorize") as st:
                    # chunk-parallel on the cluster; workers leave part files beside the staging folder
                    # (under OUT's prefix for a URL, where remote workers reach it too)
                    vec = vectorize(str(store), [staging / VECTOR_NAME], client=client, chunk_size=job.plan.chunk_size,
                                    classes=classes, parts_near=out if remote else staging, priority=priority)
                timings["vectorize_s"], memory["vectorize_peak_rss"] = st.seconds, st.peak_rss
                polygons = vec["polygons"]
        except BaseException:
            if cog_rounds is not None:
                from geoseg.io.cog_cluster import release

                release(cog_rounds)
            raise
        if job.options.cog:
            from geoseg.io.cog_cluster import write_cog_cluster

            with Stage("cog") as st:
                # tiles and overviews made by the workers; this process lays out a few tiles at a time
                write_cog_cluster(client, _class_array(store), staging / COG_NAME,
                                  grid=job.stack.grid, classes=classes, tags={"GEOSEG_MODEL": job.digest},
                                  priority=priority, rounds=cog_rounds)
            timings["cog_s"], memory["cog_peak_rss"] = st.seconds, st.peak_rss
            from geoseg.vector.style import raster_qml, write_qml

            write_qml(staging / COG_NAME, raster_qml(classes))  # QGIS loads classes.qml with classes.tif
            outputs += [COG_NAME, COG_STYLE]
        if job.options.vectors:
            outputs.append(VECTOR_NAME)
        if found is not None:
            from geoseg.instances.outputs import write_object_files

            # SAM's objects are labelled by the class map they lie in; an instance model's keep theirs
            outputs += write_object_files(str(store), staging, job.stack.grid, job.objects.digest, found["records"], classes,
                                          cog=job.options.cog, vectors=job.options.vectors)
        with Stage("item") as st:
            from geoseg.io.stac import class_counts

            pixels = class_counts(_class_array(store), client, priority=priority)
        timings["item_s"] = st.seconds
        h, w = job.stack.shape
        record = {
            "geoseg_run": 1,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "inputs": list(job.inputs),
            "bands": [{"file": b.path, "band": b.band, "description": b.description} for b in job.stack.bands],
            "grid": {"crs": job.stack.grid.crs.to_wkt(), "transform": list(job.stack.grid.affine)[:6], "shape": [h, w]},
            "model": {"path": job.model_location, "digest": job.digest, **job.card.identity(),
                      "scene_parameters": counts.pop("scene_parameters", {})},
            "parameters": {**job.plan.describe(), "exact": job.options.exact, "precision": numerics.precision,
                           "precision_requested": job.options.precision,
                           "batch_size": job.options.batch_size, "device": job.options.device,
                           "tta": job.options.tta or job.card.tta,
                           "postprocess": ({**job.postprocess.model_dump(), **(sieved or {}),
                                            "from": "card" if job.options.postprocess is None else "options"}
                                           if job.postprocess.active else None)},
            "job_key": job.key,
            "numerics": numerics.record(),
            "chunks": counts,
            "polygons": polygons,
            "class_pixels": {str(k): v for k, v in pixels.items()},
            **({"objects": found["objects"], "instance_model": {"path": job.objects.model_location, "digest": job.objects.digest,
                                                                 "max_object_px": job.objects.plan.halo}} if found else {}),
            "cluster": cluster_info or {},
            "timings": {k: round(v, 3) for k, v in timings.items()},
            "throughput_mpx_s": round(h * w / 1e6 / timings["segment_s"], 4) if counts["computed"] == counts["chunks"] else None,
            "memory_client_bytes": memory,
            "outputs": outputs + [ITEM_NAME],
            "versions": _versions(),
        }
        _item(job, record, pixels, staging / ITEM_NAME)
        outputs.append(ITEM_NAME)
        # Step 6: publish every output, then run.json.
        if not remote:
            _publish(Path(store), Path(out) / ZARR_NAME)
        for name in outputs[1:]:
            if remote:
                storage.upload(staging / name, storage.join(out, name))
            else:
                _publish(staging / name, Path(out) / name)
    storage.write_atomic(storage.join(out, RUN_NAME), (json.dumps(record, indent=2) + "\n").encode())
    return record


def panoptic_classes(job: Job) -> tuple:
    """The semantic model's classes, and the instance model's object classes it lacks (panoptic)."""
    classes = tuple(job.card.classes)
    if job.objects is not None and job.objects.card.method != "sam":
        from geoseg.instances.run import panoptic_class_map

        have = {c.id for c in classes}
        mapped = panoptic_class_map(job.card, job.objects.card)
        classes += tuple(c.model_copy(update={"id": mapped[c.id]}) for c in job.objects.card.classes[1:] if mapped[c.id] not in have)
    return classes


def _item(job: Job, record: dict[str, Any], pixels: dict[int, int], path: Path) -> None:
    """item.json: the STAC Item of the output folder (geoseg.io.stac)."""
    from geoseg.io.stac import make_item, write_item

    hrefs = {"prediction": ZARR_NAME, "classes": COG_NAME, "classes-style": COG_STYLE, "polygons": VECTOR_NAME,
             "instances": INSTANCE_COG, "objects": OBJECTS_NAME, "run": RUN_NAME}
    present = set(record["outputs"]) | {RUN_NAME}
    card = job.card
    model = {"digest": job.digest, **card.identity(), "bands": [b.name for b in card.bands],
             "provenance": card.provenance, "metrics": (card.training or {}).get("metrics")}
    run = {k: record[k] for k in ("finished", "parameters", "chunks", "polygons", "objects", "timings", "throughput_mpx_s")
           if k in record}
    run["precision"] = record["numerics"]["precision"]
    item = make_item(Path(str(job.out_dir)).name or "prediction", job.stack.grid, panoptic_classes(job),
                     {k: v for k, v in hrefs.items() if v in present}, counts=pixels, model=model, run=run,
                     when=datetime.fromisoformat(record["finished"]),
                     acquired=datetime.fromisoformat(job.stack.acquired) if job.stack.acquired else None)
    write_item(item, path)


@contextlib.contextmanager
def _staging(parent: Path | None) -> Iterator[Path]:
    """Where COG and GeoPackage are built: a hidden folder in a local OUT (same file system, so
    publishing is a rename), a private temporary folder when OUT is a URL."""
    if parent is None:
        with storage.local_staging() as tmp:
            yield tmp
        return
    tmp = Path(tempfile.mkdtemp(prefix=STAGING, dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _class_array(path: Path | str) -> Any:
    """The finished store's class_id as a zarr array: windowed reads, and chunks write_cog aligns to."""
    import zarr

    return zarr.open_group(str(path), mode="r", **storage.zarr_kwargs(path))["class_id"]


def _on_this_machine(client: Any) -> bool:
    """Whether the client's scheduler listens on this machine's loopback (an embedded or local cluster)."""
    from urllib.parse import urlsplit

    host = urlsplit(str(getattr(client.scheduler, "address", "") or "")).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def cluster_info(client: Any) -> dict[str, Any]:
    workers = client.scheduler_info().get("workers", {})
    return {"scheduler": client.scheduler.address, "workers": len(workers),
            "threads": sum(w.get("nthreads", 0) for w in workers.values()),
            "gpu_workers": sum(1 for w in workers.values() if (w.get("resources") or {}).get("GPU")),
            "dashboard": client.dashboard_link}
