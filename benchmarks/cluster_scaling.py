"""Per-worker peak memory as the scene grows, and the speed-up from one to two workers.

    python benchmarks/cluster_scaling.py [--sizes 4096,16384] [--precision bf16] [--model DIR]

For each size, a fresh two-worker cluster segments the scene into Zarr (the segmentation stage
alone: COG and polygons run in the client and are measured by predict_throughput.py) and the
peak RSS of each worker process is read back. Then the smallest scene runs on one worker and
on two, and the speed-up is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run(image: Path, model: Path, out: Path, n_workers: int, precision: str) -> dict:
    from geoseg.cluster import connect
    from geoseg.pipeline import PredictOptions, predict

    with connect(n_workers=n_workers) as client:
        rec = predict([image], model, out, PredictOptions(overwrite=True, precision=precision, cog=False, vectors=False), client=client)
        peaks = sorted(client.run(peak_rss).values())
    return {"workers": n_workers, "segment_s": rec["timings"]["segment_s"], "mpx_s": rec["throughput_mpx_s"],
            "worker_peak_rss_mb": [round(p / 2**20) for p in peaks], "chunks": rec["chunks"]["chunks"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="4096,16384")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--model", default=None)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    from geoseg.model.store import init_model
    from geoseg.sample import make_sample

    work = Path(args.workdir or tempfile.mkdtemp(prefix="geoseg-scaling-"))
    model = Path(args.model) if args.model else work / "model"
    if not (model / "model.json").exists():
        init_model(model, n_bands=4, n_classes=5, seed=0)
    sizes = [int(s) for s in args.sizes.split(",")]
    results = {}
    for size in sizes:
        image = work / f"scene{size}" / "image.tif"
        if not image.exists():
            t = time.perf_counter()
            make_sample(image.parent, size=size, bands=4, seed=0)
            print(f"generated {size}² in {time.perf_counter() - t:.0f} s", flush=True)
        results[size] = run(image, model, work / f"out{size}", 2, args.precision)
        print(f"{size}² on 2 workers: {json.dumps(results[size])}", flush=True)
    small = sizes[0]
    one = run(work / f"scene{small}" / "image.tif", model, work / f"out{small}-1", 1, args.precision)
    print(f"{small}² on 1 worker: {json.dumps(one)}", flush=True)
    big = sizes[-1]
    growth = max(results[big]["worker_peak_rss_mb"]) / max(results[small]["worker_peak_rss_mb"])
    print(f"\nper-worker peak RSS: {max(results[small]['worker_peak_rss_mb'])} MB at {small}², "
          f"{max(results[big]['worker_peak_rss_mb'])} MB at {big}² ({(big / small) ** 2:.0f}x pixels): {growth:.2f}x")
    print(f"speed-up 1 -> 2 workers at {small}²: {one['segment_s'] / results[small]['segment_s']:.2f}x "
          f"({one['mpx_s']} -> {results[small]['mpx_s']} Mpx/s)")


if __name__ == "__main__":
    main()
