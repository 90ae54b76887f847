"""`geoseg predict`: plan (``plan``), run on a cluster (``execute``), publish (``commit``).

OUT is a local directory or a URL prefix (``s3://bucket/run/``); inputs and the model
directory may be URLs too (see geoseg.io.storage). The commit protocol is in geoseg.pipeline.commit.
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

from geoseg.pipeline.commit import cluster_info, run_job
from geoseg.pipeline.execute import import_client_modules, prepare_cluster, run_segmentation, segmentation_graph
from geoseg.pipeline.plan import (
    COG_NAME,
    DEFAULT_PRECISION,
    OUTPUTS,
    PARTIAL,
    RUN_NAME,
    STAGING,
    VECTOR_NAME,
    ZARR_NAME,
    Job,
    PredictOptions,
    check_out_dir,
    chunk_key,
    job_key,
    plan_job,
)


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

    import_client_modules(options.cog, options.vectors)  # while the workers start, not after
    t0 = time.perf_counter()
    # --device cpu: no GPU workers on a machine with CUDA devices (geoseg.cluster.connect)
    with connect(scheduler, n_workers, device=options.device) as c:
        info = {**cluster_info(c), "start_s": round(time.perf_counter() - t0, 3)}
        return run_job(job, c, progress, info)


__all__ = [
    "COG_NAME", "DEFAULT_PRECISION", "OUTPUTS", "PARTIAL", "RUN_NAME", "STAGING", "VECTOR_NAME", "ZARR_NAME",
    "Job", "PredictOptions", "check_out_dir", "chunk_key", "cluster_info", "import_client_modules", "job_key", "plan_job",
    "predict",
    "prepare_cluster", "run_job", "run_segmentation", "segmentation_graph",
]
