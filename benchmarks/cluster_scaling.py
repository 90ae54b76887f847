"""Per-worker peak memory as the scene grows, and the speed-up from one to two workers.

    python benchmarks/cluster_scaling.py [--sizes 4096,16384] [--precision auto] [--model DIR] [--chunk-size N]
        [--workdir DIR]

Model: DIR, else a random-weight U-Net-resnet18 of encoder depth 4 (the other benchmarks' architecture), made by
`geoseg model init` in a subprocess so this (client) process never imports torch.

For each size, a fresh two-worker cluster (`connect(n_workers=2)`, spawned workers), warmed up as
predict_throughput.py does (a 1024² scene in 256 px chunks, then a tile through the model on every
worker), segments the scene into Zarr (the segmentation stage alone: no COG, no polygons, which run on
the cluster too and are measured by predict_throughput.py and vectorize.py), and prints the plan (chunk
size, halo, chunks), the seconds, and the peak memory of each worker process since its start (VmHWM,
the warm-up included; not ru_maxrss, which a spawned process inherits from its parent).

Then the speed-up from one worker to two, both warmed up the same way, on the first size whose plan has at
least 2 chunks per worker (two workers) with --chunk-size or the planner's chunks: one chunk per worker or
fewer leaves a worker idle, so no speed-up is printed when no size has that many (pass --chunk-size).
--workdir keeps scenes, model and outputs; by default a temporary folder, removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from bench_common import init_model_cli, worker_peaks  # this folder's: a model made apart, workers' VmHWM

os.environ.setdefault("HF_HUB_OFFLINE", "1")
WARM_SIZE, WARM_CHUNK, TILE = 1024, 256, 512
MIN_CHUNKS_PER_WORKER = 2


def _warm_worker(ref, precision: str) -> None:
    """Load the model in this worker and run one tile through it (predict_throughput.py's warm-up)."""
    import numpy as np

    from geoseg.infer import InferenceSettings, forward
    from geoseg.runtime import get_model

    b = get_model(ref)
    x = np.zeros((1, b.card.n_inputs, TILE, TILE), np.float32)
    forward(b.net, x, b.card.stride, InferenceSettings(precision, 1, str(next(b.net.parameters()).device)))


def scene(work: Path, size: int) -> Path:
    from geoseg.sample import make_sample

    image = work / f"scene{size}" / "image.tif"
    if not image.exists():
        t = time.perf_counter()
        make_sample(image.parent, size=size, bands=4, seed=0)
        print(f"generated {size}² in {time.perf_counter() - t:.0f} s", flush=True)
    return image


def run(image: Path, model: Path, warm: Path, out: Path, n_workers: int, precision: str, chunk_size: int | None) -> dict:
    from geoseg.cluster import connect
    from geoseg.model.store import model_digest
    from geoseg.pipeline import PredictOptions, predict
    from geoseg.runtime import ModelRef

    def options(**kw) -> PredictOptions:
        return PredictOptions(**{"overwrite": True, "precision": precision, "cog": False, "vectors": False,
                                 "chunk_size": chunk_size, **kw})

    with connect(n_workers=n_workers) as client:
        t = time.perf_counter()
        rec = predict([warm], model, out.with_name(out.name + "-warmup"), options(chunk_size=WARM_CHUNK), client=client)
        ref = ModelRef(str(model.resolve()), model_digest(model), "auto")
        client.gather([client.submit(_warm_worker, ref, rec["parameters"]["precision"], workers=[w], pure=False)
                       for w in client.scheduler_info(n_workers=-1)["workers"]])
        warm_s = time.perf_counter() - t
        rec = predict([image], model, out, options(), client=client)
        hwm, _ = worker_peaks(client)
    p = rec["parameters"]
    return {"workers": n_workers, "warm_up_s": round(warm_s, 1), "segment_s": rec["timings"]["segment_s"],
            "mpx_s": rec["throughput_mpx_s"], "chunk_size": p["chunk_size"], "halo": p["halo"],
            "chunks": rec["chunks"]["chunks"], "precision": p["precision"],
            "worker_peak_vmhwm_mb": [round(v / 2**20) for v in hwm]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="4096,16384")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--model", default=None, help="model directory (default: random U-Net-resnet18, depth 4)")
    ap.add_argument("--chunk-size", type=int, default=None, help="chunk size of every run (default: the planner's)")
    ap.add_argument("--workdir", default=None, help="keep scenes, model and outputs here (default: a temp dir, removed)")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="geoseg-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        model = Path(args.model) if args.model else init_model_cli(work / "model-r18-d4", encoder_depth=4)
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
        warm = scene(work, WARM_SIZE)
        results = {}
        for size in sizes:
            results[size] = run(scene(work, size), model, warm, work / f"out{size}", 2, args.precision, args.chunk_size)
            r = results[size]
            print(f"{size}² on 2 workers: chunk {r['chunk_size']}, halo {r['halo']}, {r['chunks']} chunks; "
                  f"{json.dumps(r)}", flush=True)
        small, big = sizes[0], sizes[-1]
        lo, hi = max(results[small]["worker_peak_vmhwm_mb"]), max(results[big]["worker_peak_vmhwm_mb"])
        print(f"\nper-worker peak (VmHWM): {lo} MB at {small}², {hi} MB at {big}² ({(big / small) ** 2:.0f}x pixels): "
              f"{hi / lo:.2f}x", flush=True)
        enough = [s for s in sizes if results[s]["chunks"] >= MIN_CHUNKS_PER_WORKER * 2]
        if not enough:
            most = max(sizes, key=lambda s: results[s]["chunks"])
            print(f"no speed-up printed: the most chunks at any size is {results[most]['chunks']} ({most}², chunk "
                  f"{results[most]['chunk_size']}), fewer than {MIN_CHUNKS_PER_WORKER} per worker of 2; pass a smaller "
                  "--chunk-size or a larger size", flush=True)
            return
        size = enough[0]
        two = results[size]
        one = run(scene(work, size), model, warm, work / f"out{size}-1", 1, args.precision, args.chunk_size)
        print(f"{size}² on 1 worker: {json.dumps(one)}", flush=True)
        if one["chunks"] < 1 or two["chunks"] < 2:  # the same plan both times; kept as a guard
            print("no speed-up printed: fewer chunks than workers", flush=True)
            return
        print(f"speed-up 1 -> 2 workers at {size}² (chunk {two['chunk_size']}, halo {two['halo']}, {two['chunks']} "
              f"chunks, both clusters warmed up): {one['segment_s'] / two['segment_s']:.2f}x "
              f"({one['mpx_s']} -> {two['mpx_s']} Mpx/s)", flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
