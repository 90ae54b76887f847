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

# Set in the workers geoseg spawns itself (geoseg.cluster.connect): theirs is a short life that ends
# with the job. A spawned process ends with a full interpreter shutdown, which with torch loaded
# took ~2 s after the worker had closed (measured; the nanny kills it after 4 s when it holds a
# large heap). Once the worker has closed (its results are on disk or with the scheduler), such a
# process leaves at once. Workers started by anyone else exit as they always do.
EMBEDDED_ENV = "GEOSEG_EMBEDDED_WORKER"


# glibc's mallopt parameters (malloc.h) and what geoseg's workers run with
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# never trim: a worker keeps the heap of its largest window for the next one. Memory handed back
# and taken again is faulted in afresh, which costs ~0.5 s per GB on VMs that report free pages to
# their host (Firecracker; measured: a 4240 px window of U-Net-resnet18 bf16 took 6.3-8.1 s warm
# with a 512 MiB threshold, 5.1-5.4 s without trimming; the first window 11.2 s against 8.1 s).
TRIM_NEVER = -1  # mallopt takes an int; glibc stores it as size_t: the largest value
# the same settings as environment variables, for worker processes geoseg spawns itself
ALLOCATOR_ENVIRON = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**63 - 1), "MALLOC_ARENA_MAX": "1"}


def tune_allocator() -> dict[str, Any]:
    """Keep a worker's large buffers in its heap, reused from one forward pass to the next.

    A U-Net's activations on a 2176 px tile are hundreds of MB each. glibc serves anything above
    its mmap threshold (at most 32 MiB) with a fresh mmap, so every forward pass maps and faults
    them afresh; distributed's MALLOC_TRIM_THRESHOLD_ also freezes that threshold at 128 KiB.
    Here: no mmap for allocations (the heap serves them), no trimming (the heap stays at the
    largest window's size), and one arena (threads share the main heap instead of small mmapped ones).
    Measured on one core, U-Net-resnet18 fp32, 2176 px tiles in a thread: 0.253 Mpx/s with glibc's
    defaults, 0.326 with these (512 px tiles: 0.348 and 0.391). Returns what was set ({} off glibc).
    """
    if platform.system() != "Linux":
        return {}
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return {}  # not glibc (musl has no mallopt)
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done: dict[str, Any] = {}
    for key, param, value in (("mmap_max", _M_MMAP_MAX, 0), ("trim_threshold", _M_TRIM_THRESHOLD, TRIM_NEVER),
                              ("arena_max", _M_ARENA_MAX, 1)):
        if mallopt(param, value) == 1:
            done[key] = value
    return done


def set_threads(n: int | None) -> int | None:
    """torch intra-op threads of the calling thread = ``n``.

    Only where torch is loaded already: I/O-only workers never import it. Each model task sets its own
    thread's count (geoseg.runtime.task_threads: the worker's threads shared by the model tasks it runs at once).
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
        if os.environ.get(EMBEDDED_ENV) == "1":
            _ignore_interrupts()
            _quiet_failed_tasks()

    def teardown(self, worker: Any) -> None:
        """geoseg's own workers leave at once when closed (no 2-4 s interpreter shutdown with torch loaded, no nanny kill)."""
        if os.environ.get(EMBEDDED_ENV) == "1":
            import atexit

            atexit.register(_exit_now)  # runs first at exit (atexit is last in, first out)


def _quiet_failed_tasks() -> None:
    """geoseg's own workers do not log a failed task's traceback ("Compute Failed"): the command that submitted it
    gets the error and says it once, in one line (its traceback with -vv)."""
    import logging

    for name in ("distributed.worker", "distributed.worker.state_machine"):
        worker_log = logging.getLogger(name)
        if not any(isinstance(f, _NotComputeFailed) for f in worker_log.filters):
            worker_log.addFilter(_NotComputeFailed())


class _NotComputeFailed:
    """Also not each task cancelled mid-run when the command stops ("Async instruction ... ended with CancelledError"),
    nor a heartbeat cut by the scheduler closing first as the command stops (its traceback reached the command's
    terminal after a SIGTERM; a scheduler lost mid-job is said by the command, in one line)."""

    def filter(self, record: Any) -> bool:
        msg = str(record.msg)
        return not (msg.startswith("Compute Failed") or msg.startswith("Failed to communicate with scheduler during heartbeat")
                    or msg.startswith("Async instruction") and "CancelledError" in str(record.getMessage()))


def _ignore_interrupts() -> None:
    """Ctrl-C in a terminal reaches every process of its group: geoseg's own workers leave it to the command, which
    closes the cluster (each worker printed its KeyboardInterrupt traceback); workers someone else started keep it."""
    import signal

    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: this worker keeps the default
        pass


def _exit_now() -> None:
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    os._exit(0)


def register(client: Any) -> None:
    """Register the worker plugin on ``client``'s cluster (existing and future workers)."""
    client.register_plugin(GeosegWorkerPlugin(), name=PLUGIN_NAME)


VERSIONED = ("geoseg", "torch", "segmentation-models-pytorch", "lightgbm")  # what a model task's result depends on


def versions() -> dict[str, str]:
    """This process's versions of the packages a model task's result depends on."""
    import importlib.metadata as md

    out = {}
    for pkg in VERSIONED:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def capabilities(device: str = "auto", resources: dict[str, float] | None = None, dask_worker: Any = None) -> dict[str, Any]:
    """What this process computes on and in: device, native bf16, CPU, the torch threads of a model task
    (``dask_worker``: the worker running it, whose model tasks need ``resources``), package versions; an
    ``error`` where torch cannot be used here."""
    try:
        import torch

        from geoseg.runtime import fast_bf16, model_threads, no_cuda_message, pick_device
    except Exception as exc:  # a broken install on one worker: said to the client, which names the worker
        return {"device": "cpu", "error": f"torch cannot be imported there ({type(exc).__name__}: {exc}); "
                "install the client's torch on every worker", "host": platform.node()}
    if device.startswith("cuda") and not torch.cuda.is_available():  # said to the client, which names the workers
        return {"device": "cpu", "error": no_cuda_message(device, platform.node()), "host": platform.node()}
    dev = pick_device(device)
    threads = torch.get_num_threads() if dask_worker is None else model_threads(dask_worker, resources)
    info: dict[str, Any] = {
        "device": dev,
        "bf16_native": fast_bf16(dev),
        "torch_threads": threads,
        "host": platform.node(),
        "versions": versions(),
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
