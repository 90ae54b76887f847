"""`geoseg predict`: inputs and model checked, graph built, run on a cluster, outputs published.

OUT is a local directory or a URL prefix (``s3://bucket/run/``); inputs and the model
directory may be URLs too (see geoseg.io.storage).

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
   ``.geoseg/done/IY_IX`` holding the job key, written only after the chunk's data writes
   returned. Chunk objects are replaced whole (see geoseg.io.zarr_store).
4. When every chunk is done the store is marked complete (attribute ``geoseg_complete``) and
   its markers are dropped.
5. classes.tif and landuse.gpkg are built whole in a staging folder (a hidden
   ``.geoseg-staging-*`` folder in OUT, or a local temporary one for a URL).
6. Publishing: locally renames (store, COG, GeoPackage); for a URL, uploads, each object
   appearing only once complete. Then run.json, last, atomically (rename or one PUT).

A kill during steps 2-5 leaves locally only ``*.partial`` and hidden names, never
prediction.zarr or run.json; under a URL, no run.json.

Resume (--resume) reuses a chunk only if the store was created for the same job key (inputs
by path, size and mtime or ETag; model digest; tiling plan; precision and batch size) and its
marker holds that key; a store marked complete for that key is reused whole. A chunk without
a marker is computed again and rewritten whole; a store of any other key is rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

from geoseg.bands import match_bands
from geoseg.errors import ConfigError, OutputExistsError
from geoseg.graph import build_segmentation
from geoseg.infer import InferenceSettings
from geoseg.io import storage
from geoseg.io.sources import RasterStack, open_stack
from geoseg.model.card import ModelCard
from geoseg.model.store import check_model_dir, local_model_dir, model_digest
from geoseg.monitor import Stage
from geoseg.runtime import ModelRef, resolve_precision
from geoseg.tiling import TilingPlan, plan_for

log = logging.getLogger(__name__)

ZARR_NAME, COG_NAME, VECTOR_NAME, RUN_NAME = "prediction.zarr", "classes.tif", "landuse.gpkg", "run.json"
OUTPUTS = (ZARR_NAME, COG_NAME, VECTOR_NAME, RUN_NAME)
PARTIAL = ".partial"
STAGING = ".geoseg-staging-"
DEFAULT_PRECISION = "auto"  # see geoseg.runtime.resolve_precision


@dataclass(frozen=True)
class PredictOptions:
    chunk_size: int | None = None
    halo: int | None = None
    exact: bool = False
    tile_size: int | None = None
    precision: str = DEFAULT_PRECISION
    batch_size: int = 2
    device: str = "auto"
    overwrite: bool = False
    resume: bool = False
    cog: bool = True
    vectors: bool = True
    model_resources: dict[str, float] | None = None


@dataclass(frozen=True)
class Job:
    """Everything checked and planned for one scene; nothing has run yet."""

    inputs: tuple[str, ...]
    model_dir: str
    out_dir: Path | str  # a Path for a local directory, a str for a URL prefix
    stack: RasterStack
    card: ModelCard
    digest: str
    plan: TilingPlan
    options: PredictOptions
    key: str = field(default="")

    @property
    def settings(self) -> InferenceSettings:
        return InferenceSettings(self.options.precision, self.options.batch_size)

    @property
    def model_location(self) -> str:
        """The model directory as workers find it: an absolute path or the URL."""
        return self.model_dir if storage.is_url(self.model_dir) else str(Path(self.model_dir).resolve())

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.model_location, self.digest, self.options.device)


def job_key(inputs: Sequence[str], digest: str, plan: TilingPlan, options: PredictOptions) -> str:
    """What a finished chunk's reuse depends on: inputs, model, plan and numerics."""
    blob = json.dumps(
        {
            "inputs": [storage.identity(p) for p in inputs],
            "model": digest,
            "plan": plan.describe(),
            "precision": options.precision,
            "batch_size": options.batch_size,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _ours(name: str) -> bool:
    """Names geoseg writes in OUT, including temporaries a killed run can leave behind."""
    if name in OUTPUTS or name.endswith(PARTIAL) and name[: -len(PARTIAL)] in OUTPUTS:
        return True
    return name.startswith(".geoseg") or any(name.startswith("." + Path(n).stem + ".") for n in OUTPUTS)


def check_out_dir(out_dir: Path | str, overwrite: bool, resume: bool) -> None:
    """Refuse an OUT that holds a finished result (unless --overwrite or --resume) or anything not ours."""
    if storage.is_url(out_dir):
        if storage.scheme(out_dir) in ("http", "https"):
            raise ConfigError(f"{out_dir}: outputs cannot be written over HTTP; give a local directory or an object-store URL (s3://...)")
        try:
            is_object = storage.isfile(out_dir)
            names = [] if is_object else storage.list_names(out_dir)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{out_dir}: cannot list the output prefix ({exc}); check the URL and the credentials (AWS_* variables)") from None
        if is_object:
            raise OutputExistsError(f"{out_dir}: is an object, not a prefix; choose another output URL")
    else:
        out = Path(out_dir)
        if not out.exists():
            return
        if not out.is_dir():
            raise OutputExistsError(f"{out_dir}: exists and is not a directory; choose another output directory")
        names = [p.name for p in out.iterdir()]
    foreign = sorted(n for n in names if not _ours(n))
    if foreign:
        raise OutputExistsError(
            f"{out_dir}: holds files geoseg did not write ({', '.join(foreign[:3])}); choose an empty or new output directory"
        )
    if RUN_NAME in names and not (overwrite or resume):
        raise OutputExistsError(f"{out_dir}: holds a finished prediction; pass --overwrite to replace it")


def plan_job(inputs: Sequence[str | os.PathLike], model_dir: str | os.PathLike, out_dir: str | os.PathLike, options: PredictOptions) -> Job:
    """Check inputs, model and output directory and plan the tiling. Starts nothing."""
    inputs = tuple(map(str, inputs))
    stack = open_stack(inputs)
    model_dir = str(model_dir).rstrip("/") if storage.is_url(model_dir) else model_dir
    local_model = local_model_dir(model_dir)  # a URL's model is fetched once into the local cache
    card = check_model_dir(local_model)
    stack = match_bands(stack, card, str(model_dir))
    out: Path | str = str(out_dir).rstrip("/") if storage.is_url(out_dir) else Path(out_dir)
    check_out_dir(out, options.overwrite, options.resume)
    if options.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"--precision must be auto, fp32 or bf16, not {options.precision!r}")
    options = replace(options, precision=resolve_precision(options.precision, options.device, options.exact))
    plan = plan_for(card, stack.shape, chunk_size=options.chunk_size, halo=options.halo, exact=options.exact,
                    tile_size=options.tile_size)
    digest = model_digest(local_model)
    return Job(inputs, str(model_dir), out, stack, card, digest, plan, options, job_key(inputs, digest, plan, options))


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


def _progress(total_px: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=round(total_px / 1e6, 2), unit="Mpx", unit_scale=False, disable=not enabled, dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} Mpx [{elapsed}<{remaining}, {rate_fmt}]")


def run_segmentation(job: Job, client: Any, store: Path | str, progress: bool = False) -> dict[str, Any]:
    """Compute and write every chunk that is not already done; returns counts.

    With --resume, chunks the store holds for this very job key are kept; otherwise (or when
    the store belongs to another key) the store is made anew.
    """
    from dask.base import tokenize
    from distributed import as_completed

    from geoseg.io.zarr_store import JOB_ATTR, create_store, reusable_chunks, write_chunk

    plan = job.plan
    done = reusable_chunks(store, job.key, plan) if job.options.resume else set()
    if not done:
        storage.remove(store, recursive=True)
        create_store(store, job.stack.grid, plan, {JOB_ATTR: job.key})
    seg = build_segmentation(job.stack, plan, job.ref, job.settings, job.options.model_resources)
    todo = [ch for ch in plan if (ch.iy, ch.ix) not in done]
    # Reads and inferences of one job key are the same wherever they go (a shared cluster may
    # share them); writes are not: their name carries the store, or a second run of the same job
    # into another OUT would be merged with the first and write nothing.
    write_name = f"geoseg-write-{tokenize(job.key, str(store))}"
    dsk = dict(seg.graph)
    keys = []
    for ch in todo:
        k = (write_name, ch.iy, ch.ix)
        dsk[k] = (write_chunk, str(store), ch, job.key, seg.infer_key(ch))
        keys.append(k)
    bar = _progress(sum(ch.core.size for ch in todo), progress)
    # A worker lost mid-job is survived by the scheduler: its tasks (and results other tasks
    # still need) are computed again elsewhere; a write task lost half-way rewrites its chunk
    # whole. How often one task may take a worker down with it before the job fails is the
    # scheduler's distributed.scheduler.allowed-failures (default 3).
    futures = client.get(dsk, keys, sync=False) if keys else []
    pending = {f.key: f for f in futures}
    sizes = {(ch.iy, ch.ix): ch.core.size for ch in todo}
    try:
        for fut in as_completed(futures):
            res = fut.result()
            # The chunk is on disk: let its result go, or the scheduler would recompute every
            # finished chunk whose (tiny) result sat on a worker that is lost later.
            fut.release()
            pending.pop(fut.key, None)
            bar.update(round(sizes[(res["iy"], res["ix"])] / 1e6, 4))
    except BaseException:
        client.cancel(list(pending.values()))
        raise
    finally:
        bar.close()
    return {"chunks": len(plan), "computed": len(todo), "reused": len(done)}


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished local output into place (replacing an older one)."""
    if final.exists():
        shutil.rmtree(final) if final.is_dir() and not final.is_symlink() else final.unlink()
    os.replace(tmp, final)


def _sweep(out: Path) -> None:
    """Temporaries a killed local run left in OUT (never read: every run stages anew)."""
    for p in out.iterdir():
        if p.name.startswith(".") and _ours(p.name) and p.name != ".geoseg":
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def run_job(job: Job, client: Any, progress: bool = False, cluster_info: dict | None = None) -> dict[str, Any]:
    """Run a planned job on ``client`` and publish its outputs (commit protocol above); returns the run record."""
    from geoseg.io.zarr_store import finalize_store, open_prediction

    out = job.out_dir
    remote = storage.is_url(out)
    if not remote:
        Path(out).mkdir(parents=True, exist_ok=True)
        _sweep(Path(out))
    # Step 2: OUT stops claiming to be finished before anything in it changes; outputs of an
    # earlier run go too (they are rebuilt from the store), the store itself only with --overwrite.
    storage.remove(storage.join(out, RUN_NAME))
    for name in (COG_NAME, VECTOR_NAME) + ((ZARR_NAME,) if job.options.overwrite else ()):
        storage.remove(storage.join(out, name), recursive=True)
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
        counts = run_segmentation(job, client, store, progress)
    timings["segment_s"] = st.seconds
    finalize_store(store)
    classes = job.card.classes
    outputs = [ZARR_NAME]
    staging_parent = None if remote else Path(out)
    with _staging(staging_parent) as staging:
        if job.options.cog:
            from geoseg.io.cog import write_cog

            with Stage("cog") as st:
                write_cog(_class_array(store), staging / COG_NAME,
                          grid=job.stack.grid, classes=classes, tags={"GEOSEG_MODEL": job.digest})
            timings["cog_s"], memory["cog_peak_rss"] = st.seconds, st.peak_rss
            outputs.append(COG_NAME)
        if job.options.vectors:
            from geoseg.vectorize import polygonize, write_vectors

            with Stage("vectorize") as st:
                class_map = open_prediction(store)["class_id"].values
                gdf = polygonize(class_map, job.stack.grid.affine, job.stack.grid.crs.to_wkt(), classes)
                del class_map
                write_vectors(gdf, staging / VECTOR_NAME)
            timings["vectorize_s"], memory["vectorize_peak_rss"] = st.seconds, st.peak_rss
            outputs.append(VECTOR_NAME)
        # Step 6: publish every output, then run.json.
        if not remote:
            _publish(Path(store), Path(out) / ZARR_NAME)
        for name in outputs[1:]:
            if remote:
                storage.upload(staging / name, storage.join(out, name))
            else:
                _publish(staging / name, Path(out) / name)
    h, w = job.stack.shape
    record = {
        "geoseg_run": 1,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": list(job.inputs),
        "bands": [{"file": b.path, "band": b.band, "description": b.description} for b in job.stack.bands],
        "grid": {"crs": job.stack.grid.crs.to_wkt(), "transform": list(job.stack.grid.affine)[:6], "shape": [h, w]},
        "model": {"path": job.model_location, "digest": job.digest, "card_sha256": job.card.digest(),
                  "arch": job.card.arch, "encoder": job.card.encoder, "receptive_field": job.card.receptive_field},
        "parameters": {**job.plan.describe(), "exact": job.options.exact, "precision": job.options.precision,
                       "batch_size": job.options.batch_size, "device": job.options.device},
        "job_key": job.key,
        "chunks": counts,
        "cluster": cluster_info or {},
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "throughput_mpx_s": round(h * w / 1e6 / timings["segment_s"], 4) if counts["computed"] == counts["chunks"] else None,
        "memory_client_bytes": memory,
        "outputs": outputs,
        "versions": _versions(),
    }
    storage.write_atomic(storage.join(out, RUN_NAME), (json.dumps(record, indent=2) + "\n").encode())
    return record


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


def cluster_info(client: Any) -> dict[str, Any]:
    info = client.scheduler_info()
    return {"scheduler": client.scheduler.address, "workers": len(info.get("workers", {})),
            "threads": sum(w.get("nthreads", 0) for w in info.get("workers", {}).values()),
            "dashboard": client.dashboard_link}


def predict(
    inputs: Sequence[str | os.PathLike],
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    options: PredictOptions = PredictOptions(),
    *,
    client: Any = None,
    scheduler: str | None = None,
    n_workers: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Segment a scene into OUT_DIR (Zarr, COG, GeoPackage, run.json). Checks everything before any cluster starts."""
    job = plan_job(inputs, model_dir, out_dir, options)
    if client is not None:
        return run_job(job, client, progress, cluster_info(client))
    from geoseg.cluster import connect

    t0 = time.perf_counter()
    with connect(scheduler, n_workers) as c:
        info = {**cluster_info(c), "start_s": round(time.perf_counter() - t0, 3)}
        return run_job(job, c, progress, info)
