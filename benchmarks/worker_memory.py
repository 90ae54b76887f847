"""A model worker's memory over many windows: one worker runs the same predict job again and again.

    python benchmarks/worker_memory.py [--size 8192] [--jobs 4] [--workdir DIR] [--model DIR]

One embedded worker (`connect(n_workers=1)`) segments a generated --size scene (`make_sample`, 4
bands; default model: a U-Net-resnet18 with random weights, depth 4, made by `geoseg model init` in a
subprocess) --jobs times, without COG or polygons, so every job is the same windows through the same
worker. After each job it prints the worker's RSS and peak RSS (VmHWM), the job's seconds and windows,
and its RSS change from the job before; at the end the RSS from the first job to the last and the growth
from job 2 to the last. Growth from job 1 to job 2 is kept apart (a kept heap
may still grow once while it settles: not counted as a leak here); a worker whose memory is bounded shows no growth from job 2 on (its heap
is kept for the next window, never trimmed: geoseg.workers); growth job after job means something keeps
each window's arrays (measured: a reference cycle made per window, 4.05 -> 4.34 GB over three jobs of four
4240 px windows, before it was removed). --workdir keeps scene and model; by default a temporary folder,
removed at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from bench_common import init_model_cli  # this folder's: a model made in a subprocess

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def worker_memory() -> tuple[float, float]:
    """RSS and peak RSS (VmHWM) of this process, GB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1e6, int(fields["VmHWM"].split()[0]) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--workdir", default=None, help="keep the scene and model here (default: a temp dir, removed)")
    ap.add_argument("--model", default=None, help="model directory (default: random weights)")
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="geoseg-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        run(args, work)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path) -> None:
    from geoseg.cluster import connect
    from geoseg.pipeline import PredictOptions, predict
    from geoseg.sample import make_sample

    scene = work / f"scene{args.size}"
    if not (scene / "image.tif").exists():
        make_sample(scene, size=args.size, bands=4, seed=0)
    model = Path(args.model) if args.model else init_model_cli(work / "model", encoder_depth=4)
    rows = []
    with connect(n_workers=1) as client:
        for job in range(1, args.jobs + 1):
            t = time.perf_counter()
            rec = predict([scene / "image.tif"], model, work / "out", PredictOptions(overwrite=True, cog=False, vectors=False,
                          precision=args.precision), client=client)
            seconds = time.perf_counter() - t
            (rss, peak), = client.run(worker_memory).values()
            step = "" if not rows else f" ({(rss - rows[-1]) * 1000:+.0f} MB from job {job - 1})"
            rows.append(rss)
            p = rec["parameters"]
            print(f"job {job}: {rec['chunks']['computed']} windows (chunk {p['chunk_size']}, halo {p['halo']}) "
                  f"in {seconds:.1f} s ({p['precision']}); worker RSS {rss:.2f} GB{step}, peak (VmHWM) {peak:.2f} GB",
                  flush=True)
    print(f"worker RSS from job 1 to job {args.jobs}: {rows[0]:.2f} -> {rows[-1]:.2f} GB; job to job: "
          + ", ".join(f"{(b - a) * 1000:+.0f}" for a, b in zip(rows, rows[1:])) + " MB", flush=True)
    if len(rows) >= 3:
        print(f"growth from job 2 to job {args.jobs}: {(rows[-1] - rows[1]) * 1000:+.0f} MB "
              f"({(rows[-1] - rows[1]) / (len(rows) - 2) * 1000:+.0f} MB per job)", flush=True)
    else:
        print("growth from job 2 on: needs --jobs 3 or more", flush=True)

if __name__ == "__main__":
    main()
