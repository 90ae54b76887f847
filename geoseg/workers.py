"""What geoseg sets up in every worker process it uses, embedded or remote, and what workers say of themselves.

``distributed`` sets ``MALLOC_TRIM_THRESHOLD_`` in every nanny-spawned worker. Setting any glibc
threshold turns off glibc's dynamic mmap threshold, so every forward pass then maps and faults
its activations afresh (measured: a third of CPU inference lost). Workers started by someone else
(``dask worker``, SLURM, Kubernetes) carry the same setting, so the fix travels as a worker plugin
the client registers: it raises the mmap and trim thresholds at run time (``mallopt``), gives
torch as many threads as the worker has, and caps GDAL's block cache.

``capabilities`` is what a worker reports of itself (device, native bf16), so numerics are
decided where the model runs, never on the client's CPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
import time
from typing import Any

PLUGIN_NAME = "geoseg-worker"
GDAL_CACHEMAX_MB = "128"
# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLDS = (256 << 20, 32 << 20)  # glibc >= 2.35 refuses more than 32 MiB on 64-bit


_GLIBC_TUNABLES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def tune_allocator(force: bool = False) -> dict[str, Any]:
    """Undo a fixed glibc threshold in this process: raise the mmap and trim thresholds (``mallopt``).

    Only where one of glibc's ``MALLOC_*_`` variables is set (a dask nanny sets one) or with
    ``force``: a process that has none keeps glibc's dynamic threshold, as plain processes do.
    Returns what was set (``{}``: nothing to undo, or not glibc).
    """
    if platform.system() != "Linux":
        return {}
    if not force and not any(k in os.environ for k in _GLIBC_TUNABLES):
        return {"glibc": "dynamic thresholds (untouched)"}
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return {}  # not glibc (musl has no mallopt): nothing to undo there
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done: dict[str, Any] = {}
    for value in _MMAP_THRESHOLDS:
        if mallopt(_M_MMAP_THRESHOLD, value) == 1:
            done["mmap_threshold"] = value
            break
    if mallopt(_M_TRIM_THRESHOLD, 256 << 20) == 1:
        done["trim_threshold"] = 256 << 20
    return done


def set_threads(n: int | None) -> int | None:
    """torch intra-op threads = the worker's threads (one stream per core, no oversubscription).

    Only where torch is loaded already: I/O-only workers never import it (model loading sets the
    same count, geoseg.runtime.get_model).
    """
    if "torch" not in sys.modules:
        return None
    import torch

    if n and n > 0 and torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def setup_process(nthreads: int | None) -> dict[str, Any]:
    """Everything a process that runs geoseg tasks needs; idempotent."""
    os.environ.setdefault("GDAL_CACHEMAX", GDAL_CACHEMAX_MB)
    allocator = tune_allocator()
    threads = set_threads(nthreads)
    return {"allocator": allocator, "torch_threads": threads}


try:
    from distributed.diagnostics.plugin import WorkerPlugin
except ImportError:  # pragma: no cover - distributed is a dependency
    WorkerPlugin = object  # type: ignore[misc,assignment]


class GeosegWorkerPlugin(WorkerPlugin):  # type: ignore[misc]
    """Registered by the client on every cluster geoseg uses; runs in each worker, also ones joining later."""

    name = PLUGIN_NAME

    def setup(self, worker: Any) -> None:
        worker.geoseg_setup = setup_process(worker.state.nthreads)


def register(client: Any) -> None:
    """Register the worker plugin on ``client``'s cluster (existing and future workers)."""
    client.register_plugin(GeosegWorkerPlugin(), name=PLUGIN_NAME)


def capabilities(device: str = "auto") -> dict[str, Any]:
    """What this process computes on and in: device, native bf16, CPU features, threads."""
    import torch

    from geoseg.runtime import fast_bf16, pick_device

    dev = pick_device(device)
    info: dict[str, Any] = {
        "device": dev,
        "bf16_native": fast_bf16(dev),
        "torch_threads": torch.get_num_threads(),
        "host": platform.node(),
    }
    if dev.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    else:
        info["cpu"] = _cpu_name()
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bf16_slowdown(device: str = "cpu", size: int = 128, repeats: int = 3) -> float:
    """Measured time of a small conv stack in bf16 autocast over fp32 on ``device`` (>1: bf16 slower)."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Conv2d(32, 32, 3, padding=1) for _ in range(4)]).eval().to(device)
    x = torch.randn(1, 32, size, size, device=device).contiguous(memory_format=torch.channels_last)
    net = net.to(memory_format=torch.channels_last)

    def timed(bf16: bool) -> float:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            with torch.inference_mode(), torch.autocast(torch.device(device).type, torch.bfloat16, enabled=bf16):
                net(x)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return best

    timed(False), timed(True)  # warm-up
    return timed(True) / timed(False)
