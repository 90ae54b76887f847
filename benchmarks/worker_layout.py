"""Worker layouts on this machine's cores: the same large windows in plain processes, side by side.

    python benchmarks/worker_layout.py [--model DIR] [--window 4240] [--windows-per-core 2] [--precision auto]
        [--workdir DIR]

Runs the network of DIR (default: a random U-Net-resnet18 depth 4, 4 bands, made by `geoseg model init` in a
subprocess, in --workdir or a temporary folder removed at the end) on WINDOW px windows
the way a geoseg worker does (``geoseg.infer.forward_classes``: stage by stage in strips, the
workers' allocator settings) in plain spawned processes, in two layouts that use every core:
  - one process per core, one torch thread each, its share of the windows each, all at once
    (the embedded cluster's layout);
  - one process with one torch thread per core, all windows one after another.
Prints the load time, every window's seconds (the first includes faulting in a fresh heap), the
peak memory of each process (VmHWM: its own since its start; ru_maxrss would include this process's
RSS at the spawn), the wall time of each layout and their ratio. Each layout runs twice,
alternating, because a VM's memory history moves first-touch costs between runs. This measures
the network alone: reading, writing, the COG and the polygons are left out (in a geoseg job they
run beside the passes, and in one process they share its GIL).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench_common import init_model_cli, own_peak  # this folder's: a model made apart, a process's own VmHWM

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _job(args: tuple[int, int, str, int, str]) -> list[float]:
    threads, windows, model, size, precision = args
    from geoseg.workers import tune_allocator

    tune_allocator()
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from geoseg.infer import InferenceSettings, forward_classes
    from geoseg.model.store import load_model

    t0 = time.perf_counter()
    bundle = load_model(model)
    out = [time.perf_counter() - t0]
    x = np.random.default_rng(os.getpid()).standard_normal((1, bundle.card.n_inputs, size, size), dtype=np.float32)
    settings = InferenceSettings(precision=precision)
    for _ in range(windows):
        t = time.perf_counter()
        forward_classes(bundle.net, x, bundle.card.stride, settings)
        out.append(time.perf_counter() - t)
    out.append(own_peak()[0] / 1e9)  # VmHWM, GB
    return out


def run_layout(procs: int, threads: int, windows: int, model: str, size: int, precision: str) -> float:
    ctx = multiprocessing.get_context("spawn")
    t = time.perf_counter()
    with ctx.Pool(procs) as pool:
        results = pool.map(_job, [(threads, windows, model, size, precision)] * procs)
    wall = time.perf_counter() - t
    for k, r in enumerate(results):
        print(f"  process {k}: load {r[0]:.1f} s, windows " + ", ".join(f"{v:.2f}" for v in r[1:-1])
              + f" s, peak (VmHWM) {r[-1]:.2f} GB", flush=True)  # fmt: skip
    print(f"  {procs} process(es) x {threads} thread(s), {procs * windows} windows: wall {wall:.1f} s", flush=True)
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory (default: a random U-Net-resnet18 depth 4)")
    ap.add_argument("--window", type=int, default=4240, help="window side in px (a 4096 px chunk with its halo)")
    ap.add_argument("--windows-per-core", type=int, default=2)
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--workdir", default=None, help="keep the default model here (default: a temp dir, removed)")
    args = ap.parse_args()
    work = None if args.model else Path(args.workdir or tempfile.mkdtemp(prefix="geoseg-layout-"))
    try:
        run(args, work)
    finally:
        if work is not None and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path | None) -> None:
    from geoseg.numerics import resolve_here

    cores = len(os.sched_getaffinity(0))
    precision = resolve_here(args.precision).precision
    model = args.model or str(init_model_cli(work / "model-r18-d4", encoder_depth=4))
    n = args.windows_per_core * cores
    print(f"{cores} cores, {args.window} px windows, {precision}, {n} windows per layout", flush=True)
    walls: dict[str, list[float]] = {"single": [], "threaded": []}
    for _ in range(2):
        print("one single-threaded process per core:", flush=True)
        walls["single"].append(run_layout(cores, 1, args.windows_per_core, model, args.window, precision))
        print(f"one process of {cores} threads, one pass at a time:", flush=True)
        walls["threaded"].append(run_layout(1, cores, n, model, args.window, precision))
    best = {k: min(v) for k, v in walls.items()}
    print(f"best wall: single-threaded processes {best['single']:.1f} s, threaded {best['threaded']:.1f} s; "
          f"ratio {best['single'] / best['threaded']:.2f}x", flush=True)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
