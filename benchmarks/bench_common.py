"""Helpers the benchmarks share: a process's own peak memory, every worker's, a model made outside this process.

Not a benchmark: imported by the scripts of this folder (run as ``python benchmarks/NAME.py``, which puts this
folder on sys.path).
"""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path


def own_peak() -> tuple[int, int]:
    """(VmHWM, ru_maxrss) of the calling process, in bytes.

    Linux carries ru_maxrss over fork and exec: a process spawned by a large one (a worker by the client
    holding its nannies, a subprocess by a benchmark) reports at least its parent's peak at the spawn.
    VmHWM (/proc/self/status) is the high-water mark of the process's own memory since its exec; it is
    the figure reported (ru_maxrss where there is no /proc).
    """
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    try:
        with open("/proc/self/status") as f:
            hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        hwm = maxrss
    return hwm, maxrss


def worker_peaks(client) -> tuple[list[int], list[int]]:
    """Every worker's peak RSS in bytes since its start: (VmHWM, ru_maxrss), each sorted."""
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import this folder
    got = client.run(own_peak).values()
    return sorted(h for h, _ in got), sorted(m for _, m in got)


def init_model_cli(out: Path, encoder_depth: int = 4, bands: int = 4, classes: int = 5, seed: int = 0) -> Path:
    """A random-weight U-Net-resnet18 made by `geoseg model init` in a subprocess (cached), so this process never
    imports torch: its memory, and what spawned workers inherit from it, stay the client's own."""
    if not (out / "model.json").exists():
        exe = Path(sys.executable).with_name("geoseg")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "geoseg"]
        subprocess.run([*cmd, "model", "init", str(out), "--encoder", "resnet18", "--encoder-depth", str(encoder_depth),
                        "--bands", str(bands), "--classes", str(classes), "--seed", str(seed), "--overwrite"],
                       check=True, stdout=subprocess.DEVNULL)
    return out
