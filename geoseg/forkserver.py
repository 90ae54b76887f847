"""The process the embedded cluster's workers are forked from, with what a model task needs imported.

A spawned worker starts a fresh interpreter and imports torch and segmentation-models-pytorch
(with timm and torchvision) on its first model task: ~6.5 s of one core each (measured on the 2-core
machine), every worker, every job. On Linux geoseg instead starts a fork server (multiprocessing's
``forkserver``) that imports them once, as early as a command knows it will start an embedded
cluster (``geoseg predict`` and ``evaluate`` without ``--scheduler``, ``geoseg run`` with a local
profile: while the client still imports and plans), and the
cluster's workers are forked from it with everything loaded (measured, a cold ``geoseg predict`` of
an 8192² scene on 2 cores: 59.5 s with spawned workers, 55.2 s forked, means of six alternating runs).

What a spawned worker would have had still reaches a forked one:
* the variables that must be set before a process starts (distributed's
  ``nanny.pre-spawn-environ``: thread counts, the hash seed; geoseg's allocator settings) are the
  fork server's own from its start;
* the rest of this process's environment, as it is when a cluster starts, is passed to every worker
  through distributed's ``nanny.environ``, as are geoseg's worker variables.

Set ``GEOSEG_WORKER_START=spawn`` to spawn workers as distributed does by default (also used
wherever ``fork`` is not safe: not Linux).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

log = logging.getLogger(__name__)

START_ENV = "GEOSEG_WORKER_START"
# imported by the fork server: geoseg._preload imports the modules a model task needs, each in a
# try (multiprocessing's server skips a preload that raises ImportError and dies on any other error)
PRELOAD = ("geoseg._preload",)

_started: bool | None = None  # None: not tried yet in this process
_environ: dict[str, str] = {}  # this process's environment when the server started (the server's own)


def wanted() -> bool:
    """Whether workers of the embedded cluster are forked from the server here (Linux, not turned off)."""
    return sys.platform.startswith("linux") and os.environ.get(START_ENV, "forkserver").lower() != "spawn"


def start() -> bool:
    """Start the fork server (it imports ``PRELOAD`` while this process goes on); True if the embedded
    cluster's workers will be forked from it. Idempotent; never raises (workers are spawned instead)."""
    global _started, _environ
    if _started is not None:
        return _started
    _started = False
    if not wanted():
        return False
    import multiprocessing
    import multiprocessing.forkserver

    import dask

    from geoseg.workers import ALLOCATOR_ENVIRON

    # what distributed sets before it spawns a worker (nanny.pre-spawn-environ and its hash seed), then geoseg's
    # (a value this process's environment holds wins, as distributed lets it for spawned workers)
    env = {k: str(v) for k, v in {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), **ALLOCATOR_ENVIRON}.items()
           if v is not None}
    env.setdefault("PYTHONHASHSEED", "6640")
    env = {k: os.environ.get(k, v) for k, v in env.items()}
    saved = {k: os.environ.get(k) for k in env}
    inherited = dict(os.environ)
    try:
        os.environ.update(env)
        multiprocessing.get_context("forkserver").set_forkserver_preload(list(PRELOAD))
        multiprocessing.forkserver.ensure_running()
    except (OSError, ValueError) as exc:  # no unix sockets, a read-only temp dir...
        log.debug("no fork server (%s): workers are spawned", exc)
        return False
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:  # distributed would import every optional package it knows here, to preload them; the server runs already
        import distributed.utils

        distributed.utils._forkserver_preload_set = True
    except ImportError:  # pragma: no cover - distributed is a dependency
        pass
    _environ = inherited
    _started = True
    return True


def cluster_config(environ: dict[str, str], pre_spawn: dict[str, Any]) -> dict[str, Any]:
    """The dask settings that fork the embedded cluster's workers from the server where ``start`` started
    one, each with ``environ`` on top of the environment this process has now; empty where workers are
    spawned. A forked worker inherits the server's environment (this process's when the server
    started), so only what changed since (less the ``pre_spawn`` variables: the server's own count
    there) goes through ``nanny.environ``; a variable removed since cannot be removed that way, so
    then the workers are spawned. A cluster never starts the server itself: one that runs no model
    (``geoseg vectorize``) would wait for imports it does not need."""
    import dask

    if not _started or dask.config.get("distributed.worker.multiprocessing-method", "spawn") != "spawn":
        return {}  # not started, or someone chose a method of their own
    skip = {*pre_spawn, "PYTHONHASHSEED"}
    removed = sorted(k for k in _environ if k not in os.environ and k not in skip)
    if removed:
        log.debug("%s unset since the fork server started: workers are spawned", ", ".join(removed))
        return {}
    changed = {k: v for k, v in os.environ.items() if k not in skip and _environ.get(k) != v}
    return {"distributed.worker.multiprocessing-method": "forkserver",
            "distributed.nanny.environ": {**changed, **environ}}
