"""Running a planned prediction on a cluster: workers set up, numerics decided on them, chunks computed and written."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from geoseg.errors import ConfigError
from geoseg.graph import build_segmentation, submit, with_layer
from geoseg.io import storage
from geoseg.numerics import Numerics, model_workers, resolve_on_cluster
from geoseg.pipeline.plan import Job, chunk_key
from geoseg.pipeline.sieve import RAW_ARRAY, sieve_joined

log = logging.getLogger(__name__)


def cancel_soon(client: Any, futures: list) -> None:
    """Cancel ``futures`` on ``client`` without waiting for it. A blocking ``client.cancel`` from a scene's thread
    while the job's own client closes (Ctrl-C) could wait for ever: it hands its work to the client's event loop,
    which stopped before running it. The thread then held its OUT's lock, and a --resume was refused. A closing
    client needs none: the scheduler lets go of what a closed client wanted."""
    if client.status not in ("running", "connecting", "newly-created"):
        return
    try:
        # made and run on the event loop (tornado awaits what a callback returns); never made if it never runs
        client.loop.add_callback(lambda: client.cancel(futures, asynchronous=True))
    except RuntimeError:  # the event loop closed meanwhile
        pass


def import_client_modules(cog: bool = True, vectors: bool = True) -> None:
    """Import what this process (the client) needs later in a run: called before it starts or joins a cluster, while it
    would wait for the workers' imports (geoseg.forkserver), not later, while the workers wait for it. Measured on
    two cores (AMD Zen 4), a cold ``geoseg predict``: 0.5 s before the segment graph went out (dask.array, zarr),
    0.2 s before the polygons (geopandas), 0.15 s before the STAC item (pystac). In the caller's thread, not one of
    its own: two threads importing one package at once can meet it half initialised (see geoseg.io.zarr_store)."""
    import dask.array  # noqa: F401  (the graphs; it imports xarray)
    import rioxarray  # noqa: F401

    import geoseg.io.stac  # noqa: F401  (pystac)
    import geoseg.io.zarr_store  # noqa: F401  (zarr)
    import geoseg.methods  # noqa: F401  (tqdm's progress bars)

    if cog:
        import tifffile  # noqa: F401  (GDAL's tags, copied from a GeoTIFF it makes in memory)

        import geoseg.io.cog  # noqa: F401
        import geoseg.io.cog_cluster  # noqa: F401
    if vectors:
        import pyarrow.parquet  # noqa: F401  (the workers' parts)
        import pyogrio  # noqa: F401

        import geoseg.vector.api  # noqa: F401  (geopandas)


def placed(job: Job, client: Any) -> Job:
    """``job`` with its model tasks' resources decided for ``client``'s cluster: its own ``model_resources``,
    else the GPU workers' of an embedded cluster that has some (geoseg.cluster.model_resources)."""
    from geoseg.cluster import model_resources

    objects = placed(job.objects, client) if job.objects is not None else None
    resources = model_resources(job.card.method, job.options.model_resources, client)
    if resources == job.options.model_resources and objects is job.objects:
        return job
    return replace(job, options=replace(job.options, model_resources=resources), objects=objects)


def prepare_cluster(client: Any, job: Job, timeout: float | None = None) -> Numerics:
    """Set up every worker (allocator, threads: geoseg.workers) and decide the job's numerics on
    the workers that take its model tasks; a clear error if none offers the resources they need."""
    from geoseg.workers import register

    register(client)
    job = placed(job, client)
    return resolve_on_cluster(client, job.options.precision, job.options.device, job.options.exact,
                              job.options.model_resources, job.options.worker_timeout if timeout is None else timeout,
                              method=job.card.method)


def _progress(total_px: int, enabled: bool):
    """A progress bar: a widget in Jupyter where ipywidgets is installed, text otherwise (never tqdm's
    'IProgress not found' warning)."""
    from tqdm.std import tqdm

    try:
        from IPython import get_ipython

        if get_ipython() is not None and "IPKernelApp" in get_ipython().config:
            import ipywidgets  # noqa: F401
            from tqdm.notebook import tqdm  # type: ignore[no-redef]
    except (ImportError, AttributeError):
        pass

    return tqdm(total=round(total_px / 1e6, 2), unit="Mpx", unit_scale=False, disable=not enabled, dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} Mpx [{elapsed}<{remaining}, {rate_fmt}]")


def segmentation_graph(job: Job, store: Path | str, numerics: Numerics, todo: list, client: Any = None,
                       settings: Any = None) -> tuple[Any, list]:
    """The read -> infer -> write graph of the chunks in ``todo`` and the write keys (built, not run)."""
    from dask.base import tokenize

    from geoseg.io.zarr_store import write_chunk

    key = chunk_key(job.key, numerics.precision, numerics.device)
    from geoseg.methods import scene_settings

    if settings is None:
        settings = scene_settings(job.card, job.stack, job.plan, job.settings(numerics.precision), client)
    seg = build_segmentation(job.stack, job.plan, job.ref, settings, job.options.model_resources)
    # Reads and inferences of one job are the same wherever they go (a shared cluster may share
    # them); writes are not: their name carries the store, or a second run of the same job into
    # another OUT would be merged with the first and write nothing.
    write_name = f"geoseg-write-{tokenize(key, str(store))}"
    # a map the sieve stage sieves later is written raw beside the final one (geoseg.pipeline.sieve)
    target = RAW_ARRAY if sieve_joined(job.postprocess) else "class_id"
    writes = {(write_name, ch.iy, ch.ix): (write_chunk, str(store), ch, key, seg.infer_key(ch), target) for ch in todo}
    graph = with_layer(seg.graph, write_name, writes, {seg.infer_name})
    return graph, list(writes)


class WorkerWatch(threading.Thread):
    """Cancels a job's futures once the cluster has had no worker that can run its model tasks (one offering
    ``resources``, or any) for ``timeout`` s: the scheduler would keep them waiting for one forever (a GPU
    worker lost mid-job); checked every ``period`` s. Used as a context around the wait for those futures, it
    turns what the wait then raises (their cancellation) into ``error``, which says what happened."""

    def __init__(self, client: Any, futures: list, resources: dict[str, float] | None, timeout: float,
                 period: float = 1.0, pause_timeout: float | None = None) -> None:
        super().__init__(name="geoseg-worker-watch", daemon=True)
        self.client, self.futures, self.resources, self.timeout, self.period = client, futures, resources, timeout, period
        # workers that are there but paused get longer: a pause may pass (spilling to disk)
        self.pause_timeout = max(timeout, pause_timeout or timeout)
        self.stopped = threading.Event()
        self.error: ConfigError | None = None

    def run(self) -> None:
        since = None
        while not self.stopped.wait(self.period):
            try:
                status = set(model_workers(self.client, self.resources).values())
            except Exception:  # noqa: BLE001 - the client is closing: nothing left to watch
                return
            paused = status == {"paused"}
            if status and not paused:
                since = None
                continue
            since = since if since is not None else time.monotonic()
            if time.monotonic() - since >= (self.pause_timeout if paused else self.timeout):
                want = ",".join(f"{k}={v:g}" for k, v in (self.resources or {}).items())
                start = f"'dask worker ... --resources {want}'" if want else "workers"
                if paused:  # a worker above the pause threshold stays there: its heap holds its largest window
                    self.error = ConfigError(
                        f"every worker of the cluster at {self.client.scheduler.address} that can run the model tasks has "
                        f"been paused for {self.pause_timeout:g} s: its memory is above distributed's pause threshold "
                        "(distributed.worker.memory.pause, a share of the worker's memory limit). Give the workers more "
                        "memory (dask worker --memory-limit, the profile's memory_limit) or the job smaller chunks "
                        "(--chunk-size), and run it again with --resume"
                    )
                else:
                    self.error = ConfigError(
                        f"the cluster at {self.client.scheduler.address} has had no worker "
                        + (f"offering {want} " if want else "")
                        + f"for {self.timeout:g} s, and the model tasks need one: the job stopped with its chunks not yet "
                        f"written left to do; start {start} and run it again with --resume"
                    )
                cancel_soon(self.client, self.futures)
                return

    def __enter__(self) -> "WorkerWatch":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stopped.set()
        self.join(self.period + 30)  # a daemon: one stuck in a call to a scheduler that is gone does not hold the job
        if exc[0] is not None and self.error is not None:
            raise self.error from None


def run_segmentation(job: Job, client: Any, store: Path | str, numerics: Numerics | None = None, progress: bool = False,
                     priority: int = 0) -> dict[str, Any]:
    """Compute and write every chunk that is not already done; returns counts.

    With --resume, chunks the store holds for this very job and numerics are kept; otherwise (or
    when the store belongs to another key) the store is made anew.
    """
    from distributed import as_completed

    from geoseg.io.zarr_store import CLASSES_ATTR, JOB_ATTR, SEMANTIC_ARRAYS, create_store, remove_store, reusable_chunks

    job = placed(job, client)  # model tasks on the GPU workers of an embedded cluster that has some
    if numerics is None:
        numerics = prepare_cluster(client, job)
    plan = job.plan
    key = chunk_key(job.key, numerics.precision, numerics.device)
    done = reusable_chunks(store, key, plan) if job.options.resume else set()
    if not done:
        remove_store(store)
        arrays = dict(SEMANTIC_ARRAYS)
        if sieve_joined(job.postprocess):
            arrays[RAW_ARRAY] = SEMANTIC_ARRAYS["class_id"]
        create_store(store, job.stack.grid, plan, {JOB_ATTR: key, CLASSES_ATTR: [c.model_dump() for c in job.card.classes]},
                     arrays)
    todo = [ch for ch in plan if (ch.iy, ch.ix) not in done]
    from geoseg.methods import scene_settings

    # what the method computes over the whole scene first (Otsu's threshold), recorded in run.json
    settings = scene_settings(job.card, job.stack, job.plan, job.settings(numerics.precision), client)
    graph, keys = segmentation_graph(job, store, numerics, todo, client, settings)
    bar = _progress(sum(ch.core.size for ch in todo), progress)
    # A worker lost mid-job is survived by the scheduler: its tasks (and results other tasks
    # still need) are computed again elsewhere; a write task lost half-way rewrites its chunk
    # whole. How often one task may take a worker down with it before the job fails is the
    # scheduler's distributed.scheduler.allowed-failures (default 3).
    futures = submit(client, graph, keys, priority)
    pending = {f.key: f for f in futures}
    sizes = {(ch.iy, ch.ix): ch.core.size for ch in todo}
    try:
        with WorkerWatch(client, futures, job.options.model_resources, job.options.worker_timeout,
                         pause_timeout=job.options.pause_timeout):
            for fut in as_completed(futures):
                res = fut.result()
                # The chunk is on disk: let its result go, or the scheduler would recompute every
                # finished chunk whose (tiny) result sat on a worker that is lost later.
                fut.release()
                pending.pop(fut.key, None)
                bar.update(round(sizes[(res["iy"], res["ix"])] / 1e6, 4))
    except BaseException:
        cancel_soon(client, list(pending.values()))
        raise
    finally:
        bar.close()
    return {"chunks": len(plan), "computed": len(todo), "reused": len(done), "scene_parameters": dict(settings.params)}
