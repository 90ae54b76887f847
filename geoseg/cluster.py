"""Where the graph runs: an embedded LocalCluster (localhost only) or an existing scheduler."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

from geoseg.errors import ConfigError

log = logging.getLogger(__name__)


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@contextlib.contextmanager
def connect(
    scheduler: str | None = None,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    security: object | None = None,
    memory_limit: str | float | None = "auto",
) -> Iterator["distributed.Client"]:  # noqa: F821
    """A client on an existing scheduler (``scheduler`` address) or on a new local cluster.

    The local cluster runs worker processes with one thread each (one torch stream per core
    is the fastest way to run a CNN on CPU cores) and binds to 127.0.0.1 only.
    """
    import dask
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, security=security, timeout="30s")
        except (OSError, TimeoutError) as exc:
            raise ConfigError(f"cannot reach the dask scheduler at {scheduler} ({exc}); check the address and that it runs") from None
        try:
            yield client
        finally:
            client.close()
        return
    with dask.config.set({"distributed.worker.daemon": False}):
        cluster = LocalCluster(
            n_workers=n_workers or default_workers(),
            threads_per_worker=threads_per_worker,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            memory_limit=memory_limit,
            silence_logs=logging.WARNING,
        )
    try:
        with Client(cluster) as client:
            log.info("local cluster: %d workers, dashboard %s", len(cluster.workers), client.dashboard_link)
            yield client
    finally:
        cluster.close()
