"""geoseg predict throughput against the bare model's ceiling, measured side by side in one run.

    python benchmarks/predict_throughput.py [--size 8192] [--precisions fp32,bf16] [--model DIR]

Prints, per precision and halo mode (default halo, --exact):
  * geoseg Mpx/s: scene pixels / wall time of read -> infer -> Zarr + COG, on an already started cluster;
  * bare Mpx/s: the same network on 512 px tiles without overlap, one single-threaded stream per
    core (the cluster's own worker processes), channels_last, in the same precision: the ceiling;
  * their ratio, per-stage timings, the vectorize time, and the class-map disagreement of the
    default halo against --exact.
Then the peak memory of the segmentation stage (per worker process) for a 2048 and a --size scene.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def bare_model(ref, precision: str, tile: int, seconds: float) -> tuple[int, float]:
    """Forward passes on random tiles for about ``seconds`` in this worker; (pixels, wall)."""
    import numpy as np

    from geoseg.infer import InferenceSettings, forward
    from geoseg.runtime import get_model

    bundle = get_model(ref)
    settings = InferenceSettings(precision=precision, batch_size=1, device=str(next(bundle.net.parameters()).device))
    x = np.random.default_rng(0).standard_normal((1, bundle.card.n_bands, tile, tile)).astype(np.float32)
    forward(bundle.net, x, bundle.card.stride, settings)  # warm-up: kernels chosen, memory allocated
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        forward(bundle.net, x, bundle.card.stride, settings)
        n += 1
    return n * tile * tile, time.perf_counter() - t0


def bare_throughput(client, ref, precision: str, seconds: float = 20.0) -> float:
    """Mpx/s of all workers running bare forward passes at the same time."""
    workers = list(client.scheduler_info()["workers"])
    futs = [client.submit(bare_model, ref, precision, 512, seconds, workers=[w], pure=False) for w in workers]
    results = client.gather(futs)
    return sum(px for px, _ in results) / 1e6 / max(s for _, s in results)


def worker_peak_rss(client) -> int:
    return max(client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024).values())


def run_predict(client, image, model, out, **options):
    from geoseg.predict import PredictOptions, predict

    return predict([image], model, out, PredictOptions(overwrite=True, **options), client=client)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--model", default=None, help="model directory (default: a fresh U-Net-resnet18 with random weights)")
    ap.add_argument("--workdir", default=None, help="keep scenes and outputs here (default: a temp dir)")
    ap.add_argument("--bare-seconds", type=float, default=20.0)
    ap.add_argument("--skip-exact", action="store_true")
    ap.add_argument("--halo", type=int, default=None, help="halo of the default mode (default: the card's default_halo)")
    ap.add_argument("--memory-sizes", default="2048", help="extra scene sizes whose peak memory is measured")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()

    from geoseg.cluster import connect
    from geoseg.io.zarr_store import open_prediction
    from geoseg.model.store import init_model, model_digest, read_card
    from geoseg.runtime import ModelRef
    from geoseg.sample import make_sample

    work = Path(args.workdir or tempfile.mkdtemp(prefix="geoseg-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    figures: dict = {"size": args.size, "cpu_count": os.cpu_count()}

    def scene(size: int) -> Path:
        d = work / f"scene{size}"
        if not (d / "image.tif").exists():
            t = time.perf_counter()
            make_sample(d, size=size, bands=4, seed=0)
            print(f"generated {size}x{size} scene in {time.perf_counter() - t:.1f} s", flush=True)
        return d / "image.tif"

    model = Path(args.model) if args.model else work / "model"
    if not (model / "model.json").exists():
        init_model(model, n_bands=4, n_classes=5, encoder="resnet18", seed=0)
    card = read_card(model)
    figures["model"] = {"arch": card.arch, "encoder": card.encoder, "receptive_field": card.receptive_field,
                        "default_halo": card.default_halo, "exact_halo": card.exact_halo, "tile_size": card.tile_size}
    image = scene(args.size)

    t0 = time.perf_counter()
    with connect() as client:
        figures["cluster_start_s"] = round(time.perf_counter() - t0, 2)
        ref = ModelRef(str(model.resolve()), model_digest(model))
        rows = []
        for precision in args.precisions.split(","):
            bare = bare_throughput(client, ref, precision, args.bare_seconds)
            maps = {}
            for mode in ("default",) + (() if args.skip_exact else ("exact",)):
                out = work / f"out-{precision}-{mode}"
                halo = args.halo if mode == "default" else None
                rec = run_predict(client, image, model, out, precision=precision, exact=mode == "exact", halo=halo,
                                  vectors=mode == "default")
                t = rec["timings"]
                px = rec["parameters"]["shape"][0] * rec["parameters"]["shape"][1]
                pipeline = px / 1e6 / (t["segment_s"] + t.get("cog_s", 0.0))
                maps[mode] = open_prediction(out / "prediction.zarr")["class_id"].values
                row = {"precision": precision, "mode": mode, "halo": rec["parameters"]["halo"],
                       "tile_size": rec["parameters"]["tile_size"], "chunk_size": rec["parameters"]["chunk_size"],
                       "overhead": rec["parameters"]["overhead"], "geoseg_mpx_s": round(pipeline, 3),
                       "bare_mpx_s": round(bare, 3), "ratio": round(pipeline / bare, 3), **t}
                rows.append(row)
                print(json.dumps(row), flush=True)
            if "exact" in maps:
                valid = maps["exact"] != 255
                rate = float((maps["default"] != maps["exact"])[valid].mean())
                figures.setdefault("default_halo_disagreement", {})[precision] = rate
                print(f"{precision}: default halo disagrees with --exact on {rate:.4%} of valid pixels", flush=True)
        figures["runs"] = rows

    memory = {}
    for size in sorted({int(s) for s in args.memory_sizes.split(",") if s} | {args.size}):
        img = scene(size)
        with connect() as client:
            rec = run_predict(client, img, model, work / f"mem-{size}", precision=args.precisions.split(",")[0])
            memory[size] = {"worker_peak_rss_mb": round(worker_peak_rss(client) / 2**20, 1),
                            "vectorize_peak_rss_mb": round(rec["memory_client_bytes"].get("vectorize_peak_rss", 0) / 2**20, 1),
                            "vectorize_s": rec["timings"].get("vectorize_s")}
        print(f"{size}x{size}: {json.dumps(memory[size])}", flush=True)
    figures["memory"] = memory
    sizes = sorted(memory)
    if len(sizes) > 1:
        growth = memory[sizes[-1]]["worker_peak_rss_mb"] / memory[sizes[0]]["worker_peak_rss_mb"]
        figures["worker_memory_growth"] = round(growth, 3)
        print(f"segmentation peak memory grows {growth:.2f}x from {sizes[0]}² to {sizes[-1]}² "
              f"({(sizes[-1] / sizes[0]) ** 2:.0f}x pixels)")
    print("\nprecision mode     halo  geoseg Mpx/s  bare Mpx/s  ratio  segment_s  cog_s  vectorize_s")
    for r in figures["runs"]:
        print(f"{r['precision']:9} {r['mode']:8} {r['halo']:5} {r['geoseg_mpx_s']:12.3f} {r['bare_mpx_s']:11.3f} "
              f"{r['ratio']:6.3f} {r['segment_s']:10.1f} {r.get('cog_s', 0):6.1f} {r.get('vectorize_s', 0) or 0:12.1f}")
    print(f"cluster start {figures['cluster_start_s']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
