"""`geoseg predict`: inputs and model checked, graph built, run on a cluster, outputs published.

Every output is written under a temporary name in OUT_DIR and moved into place when complete;
``run.json`` is written last and marks a finished output directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

from geoseg.bands import match_bands
from geoseg.errors import ConfigError, OutputExistsError
from geoseg.graph import Segmentation, build_segmentation
from geoseg.infer import InferenceSettings
from geoseg.io.sources import RasterStack, open_stack
from geoseg.model.card import ModelCard
from geoseg.model.store import check_model_dir, model_digest
from geoseg.monitor import Stage
from geoseg.runtime import ModelRef
from geoseg.tiling import TilingPlan

log = logging.getLogger(__name__)

ZARR_NAME, COG_NAME, VECTOR_NAME, RUN_NAME = "prediction.zarr", "classes.tif", "landuse.gpkg", "run.json"
OUTPUTS = (ZARR_NAME, COG_NAME, VECTOR_NAME, RUN_NAME)
PARTIAL = ".partial"
DEFAULT_CHUNK = 2048
DEFAULT_PRECISION = "fp32"


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
    out_dir: Path
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
    def ref(self) -> ModelRef:
        return ModelRef(str(Path(self.model_dir).resolve()), self.digest, self.options.device)


def _identity(path: str) -> list[Any]:
    try:
        st = os.stat(path)
        return [os.path.abspath(path), st.st_size, st.st_mtime_ns]
    except OSError:
        return [path]


def job_key(inputs: Sequence[str], digest: str, plan: TilingPlan, options: PredictOptions) -> str:
    """What a finished chunk's reuse depends on: inputs, model, plan and numerics."""
    blob = json.dumps(
        {
            "inputs": [_identity(p) for p in inputs],
            "model": digest,
            "plan": plan.describe(),
            "precision": options.precision,
            "batch_size": options.batch_size,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def check_out_dir(out_dir: Path, overwrite: bool, resume: bool) -> None:
    """Refuse a directory that holds a finished result (unless --overwrite) or anything not ours."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise OutputExistsError(f"{out_dir}: exists and is not a directory; choose another output directory")
    ours = set(OUTPUTS) | {n + PARTIAL for n in OUTPUTS}
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in ours and not p.name.startswith(".geoseg"))
    if foreign:
        raise OutputExistsError(
            f"{out_dir}: holds files geoseg did not write ({', '.join(foreign[:3])}); choose an empty or new output directory"
        )
    if (out_dir / RUN_NAME).exists() and not (overwrite or resume):
        raise OutputExistsError(f"{out_dir}: holds a finished prediction; pass --overwrite to replace it")


def plan_job(inputs: Sequence[str | os.PathLike], model_dir: str | os.PathLike, out_dir: str | os.PathLike, options: PredictOptions) -> Job:
    """Check inputs, model and output directory and plan the tiling. Starts nothing."""
    inputs = tuple(map(str, inputs))
    stack = open_stack(inputs)
    card = check_model_dir(model_dir)
    stack = match_bands(stack, card, str(model_dir))
    out = Path(out_dir)
    check_out_dir(out, options.overwrite, options.resume)
    if options.precision not in ("fp32", "bf16"):
        raise ConfigError(f"--precision must be fp32 or bf16, not {options.precision!r}")
    halo = card.exact_halo if options.exact else (card.default_halo if options.halo is None else options.halo)
    if options.exact and options.halo is not None and options.halo < card.exact_halo:
        raise ConfigError(f"--exact needs a halo of at least {card.exact_halo} px (the receptive field); drop --halo or raise it")
    plan = TilingPlan.make(
        stack.shape,
        stride=card.stride,
        chunk_size=options.chunk_size or DEFAULT_CHUNK,
        halo=max(halo, options.halo or 0),
        tile_size=options.tile_size or card.tile_size,
    )
    digest = model_digest(Path(model_dir))
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


def run_segmentation(job: Job, client: Any, store: Path, progress: bool = False) -> dict[str, Any]:
    """Compute and write every chunk that is not already done; returns counts."""
    from distributed import as_completed

    from geoseg.io.zarr_store import create_store, done_chunks, write_chunk

    plan = job.plan
    done = done_chunks(store, job.key) if job.options.resume and store.exists() else set()
    if not done:
        if store.exists():
            shutil.rmtree(store)
        create_store(store, job.stack.grid, plan, {"geoseg_job": job.key})
    seg = build_segmentation(job.stack, plan, job.ref, job.settings, job.options.model_resources)
    todo = [ch for ch in plan if (ch.iy, ch.ix) not in done]
    write_name = f"geoseg-write-{job.key[:16]}"
    dsk = dict(seg.graph)
    keys = []
    for ch in todo:
        k = (write_name, ch.iy, ch.ix)
        dsk[k] = (write_chunk, str(store), ch, job.key, seg.infer_key(ch))
        keys.append(k)
    bar = _progress(sum(ch.core.size for ch in todo), progress)
    futures = client.get(dsk, keys, sync=False) if keys else []
    sizes = {(ch.iy, ch.ix): ch.core.size for ch in todo}
    try:
        for fut in as_completed(futures):
            res = fut.result()
            bar.update(round(sizes[(res["iy"], res["ix"])] / 1e6, 4))
    except BaseException:
        client.cancel(futures)
        raise
    finally:
        bar.close()
    return {"chunks": len(plan), "computed": len(todo), "reused": len(done)}


def _publish(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final) if final.is_dir() else final.unlink()
    os.replace(tmp, final)


def run_job(job: Job, client: Any, progress: bool = False, cluster_info: dict | None = None) -> dict[str, Any]:
    """Run a planned job on ``client`` and publish its outputs; returns the run record."""
    from geoseg.io.zarr_store import finalize_store, open_prediction

    out = job.out_dir
    out.mkdir(parents=True, exist_ok=True)
    if job.options.overwrite:
        for name in OUTPUTS:
            p = out / name
            if p.exists():
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    store_tmp = out / (ZARR_NAME + PARTIAL)
    timings: dict[str, float] = {}
    memory: dict[str, int] = {}
    with Stage("segment") as st:
        counts = run_segmentation(job, client, store_tmp, progress)
    timings["segment_s"] = st.seconds
    finalize_store(store_tmp)
    _publish(store_tmp, out / ZARR_NAME)
    ds = open_prediction(out / ZARR_NAME)
    classes = job.card.classes
    outputs = [ZARR_NAME]
    if job.options.cog:
        from geoseg.io.cog import write_cog

        with Stage("cog") as st:
            write_cog(_ZarrWindows(out / ZARR_NAME), out / COG_NAME,
                      grid=job.stack.grid, classes=classes, tags={"GEOSEG_MODEL": job.digest})
        timings["cog_s"], memory["cog_peak_rss"] = st.seconds, st.peak_rss
        outputs.append(COG_NAME)
    if job.options.vectors:
        from geoseg.vectorize import polygonize, write_vectors

        with Stage("vectorize") as st:
            class_map = ds["class_id"].values
            gdf = polygonize(class_map, job.stack.grid.affine, job.stack.grid.crs.to_wkt(), classes)
            del class_map
            write_vectors(gdf, out / VECTOR_NAME)
        timings["vectorize_s"], memory["vectorize_peak_rss"] = st.seconds, st.peak_rss
        outputs.append(VECTOR_NAME)
    h, w = job.stack.shape
    record = {
        "geoseg_run": 1,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": list(job.inputs),
        "bands": [{"file": b.path, "band": b.band, "description": b.description} for b in job.stack.bands],
        "grid": {"crs": job.stack.grid.crs.to_wkt(), "transform": list(job.stack.grid.affine)[:6], "shape": [h, w]},
        "model": {"path": str(Path(job.model_dir).resolve()), "digest": job.digest, "card_sha256": job.card.digest(),
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
    tmp = out / (RUN_NAME + PARTIAL)
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, out / RUN_NAME)
    return record


class _ZarrWindows:
    """The class map of a finished store, read window by window (what write_cog needs)."""

    def __init__(self, path: Path) -> None:
        import zarr

        self._arr = zarr.open_group(str(path), mode="r")["class_id"]
        self.shape = self._arr.shape
        self.dtype = self._arr.dtype

    def __getitem__(self, key: Any) -> Any:
        return self._arr[key]


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
