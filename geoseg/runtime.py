"""Per-process model cache: each worker loads a model once, from its directory, never from the graph.

A model directory at a URL is fetched once per machine into the local cache, keyed and checked
by its digest (``geoseg.model.store.fetch_model_dir``); the graph only carries the URL and digest.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from geoseg.errors import ConfigError, ModelError
from geoseg.model.store import ModelBundle, load_model, local_model_dir

# Loaded models by (digest, device): one copy of a model whatever path it was given by. A long-lived worker
# keeps the few used last (several models of one comparison run together) and drops a path's older versions.
_CACHE: "OrderedDict[tuple[str, str], tuple[str, ModelBundle]]" = OrderedDict()
CACHE_SIZE = 8  # geoseg evaluate compares up to this many models without reloading
_LOCK = threading.Lock()


@dataclass(frozen=True)
class ModelRef:
    """What a task needs to find its model: a path and the digest it must have (a few bytes in the graph)."""

    path: str  # a local directory or a URL (s3://...)
    digest: str
    device: str = "auto"  # auto | cpu | cuda


def pick_device(requested: str = "auto") -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        # asked for by name: running on the CPU instead would be many times slower, and silent
        raise ConfigError(no_cuda_message(requested, "this process"))
    return requested


def no_cuda_message(requested: str, where: str) -> str:
    import torch

    return (f"device {requested} was asked for, but torch sees no CUDA GPU on {where} (torch {torch.__version__}, built for "
            f"CUDA {torch.version.cuda or 'none'}; check the GPU and that its driver supports that CUDA version with "
            "nvidia-smi); use device auto (or cpu) to run on the CPU")


def _worker_threads() -> int | None:
    try:
        from distributed import get_worker

        return get_worker().state.nthreads
    except (ImportError, ValueError, AttributeError):
        return None


def task_threads() -> int | None:
    """torch threads for the model task running in this thread of a distributed worker (None: not in one):
    the worker's threads shared by the model tasks it can run at once. A CPU worker of N threads runs N model
    tasks, one torch thread each (N each was N² threads on N cores); a GPU worker (a model task needs its one
    GPU) runs one, with all N."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return None
    try:
        ts = worker.state.tasks.get(worker.get_current_task())
        needs = dict(ts.resource_restrictions or {}) if ts is not None else {}
    except Exception:  # no current task (client.run): every thread may run one
        needs = {}
    return model_threads(worker, needs)


def model_threads(worker: Any, needs: dict[str, float] | None) -> int:
    """torch threads of one model task on ``worker`` whose model tasks need ``needs`` (resources): its threads over
    the model tasks it can run at once (as many as its threads, fewer where the resources they need run out)."""
    nthreads = concurrent = worker.state.nthreads
    for name, need in (needs or {}).items():
        if need > 0:
            concurrent = min(concurrent, int(worker.state.total_resources.get(name, 0) // need))
    return max(1, nthreads // max(1, concurrent))


def get_model(ref: ModelRef) -> ModelBundle:
    """The model for ``ref``, loaded on first use in this process and kept (the last few used); the calling
    thread's torch threads set for a model task (``task_threads``)."""
    import torch

    threads = task_threads() or int(os.environ.get("GEOSEG_TORCH_THREADS", "0") or 0)
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    key = (ref.digest, ref.device)
    hit = _CACHE.get(key)  # no lock for a model loaded: it never waits for another's load
    if hit is not None:
        with contextlib.suppress(KeyError):  # evicted meanwhile: still the model asked for
            _CACHE.move_to_end(key)
        return hit[1]
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            return hit[1]
        device = pick_device(ref.device)
        # a URL: the cached copy with this digest (fetched and verified on first use)
        bundle = load_model(local_model_dir(ref.path, ref.digest), device=device)
        if bundle.digest != ref.digest:
            raise ModelError(
                f"{ref.path}: model changed while the job ran (digest {bundle.digest[:12]} != {ref.digest[:12]}); rerun the job"
            )
        if isinstance(bundle.net, torch.nn.Module):
            bundle.net.to(memory_format=torch.channels_last)
        for old in [k for k, (path, _) in list(_CACHE.items()) if path == ref.path and k[0] != ref.digest]:
            del _CACHE[old]  # the same directory rewritten: its earlier model is no longer on disk
        _CACHE[key] = (ref.path, bundle)
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    return bundle


def loaded_digests() -> list[str]:
    """The digests of the models this process holds (it ran their model tasks)."""
    return sorted({digest for digest, _ in _CACHE})


def fast_bf16(device: str) -> bool:
    """Whether ``device`` computes bf16 natively (CUDA with bf16, or a CPU with AVX512-BF16 or AMX)."""
    import torch

    if device.startswith("cuda"):
        # not emulated: a T4 or V100 holds bf16 tensors (torch's default says "supported") but computes them slowly
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(torch.cpu, probe, None)  # private probes: absent in some torch builds
        if check is not None and check():
            return True
    return False
