"""A cold whole predict on two embedded cluster layouts, alternating, side by side.

    python benchmarks/embedded_layouts.py [--image I] [--model M] [--runs 2]

Defaults: the 8192² scene and the trained model that ``benchmarks/predict_throughput.py --workdir
/tmp/bench`` leaves behind. Each run starts a fresh cluster on this machine (so the workers pay their
cold start: imports, model load, first-touch memory) and runs ``geoseg.pipeline.predict`` with the
default outputs (Zarr, COG, polygons). As `geoseg predict` does, geoseg.forkserver.start() runs first, so in both
layouts the workers are forked from geoseg's fork server (torch imported there once) where it starts (Linux,
GEOSEG_WORKER_START not "spawn"), else spawned; every line says which the workers were (their parent process):
  - ``default``: ``geoseg.cluster.connect()``, one single-threaded worker per core;
  - ``model+io``: a dask ``SpecCluster`` of two workers with geoseg's worker environment: one of a
    thread per core offering the resource ``MODEL=1`` (every infer task asks for it: one forward pass
    at a time, on all the cores), and one single-threaded worker for reads, writes, COG and polygons.
Prints the launch-to-exit seconds (the cluster's start included; the fork server's own start, once, before
the first run, is not) and the stage times of every run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def started(client) -> str:
    """How the workers started: forked from the fork server (their parent is not this process, which holds the
    nannies) or spawned by their nanny here."""
    parents = set(client.run(os.getppid).values())
    return "spawned workers" if parents == {os.getpid()} else "forked workers" if os.getpid() not in parents else "mixed"


def run(mode: str, image: str, model: str, out: str) -> str:
    import dask
    from distributed import Client, Nanny, Scheduler, SpecCluster

    from geoseg.cluster import connect, spawned_worker_config
    from geoseg.pipeline import PredictOptions, predict
    from geoseg.workers import register

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    if mode == "default":
        with connect() as client:
            how = started(client)
            rec = predict([image], model, out, PredictOptions(overwrite=True), client=client)
    else:
        cores = len(os.sched_getaffinity(0))
        with dask.config.set(spawned_worker_config()):
            workers = {"model": {"cls": Nanny, "options": {"nthreads": cores, "resources": {"MODEL": 1}, "host": "127.0.0.1"}},
                       "io": {"cls": Nanny, "options": {"nthreads": 1, "host": "127.0.0.1"}}}
            cluster = SpecCluster(workers=workers,
                                  scheduler={"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": ":0"}})
        with cluster, Client(cluster) as client:
            register(client)
            how = started(client)
            rec = predict([image], model, out, PredictOptions(overwrite=True, model_resources={"MODEL": 1}), client=client)
    t = rec["timings"]
    return (f"{mode:9} ({how}) whole {time.perf_counter() - t0:5.1f} s: segment {t['segment_s']:.1f} s, COG {t.get('cog_s', 0):.1f} s, "
            f"polygons {t.get('vectorize_s', 0):.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default="/tmp/bench/scene8192-seed0/image.tif")
    ap.add_argument("--model", default="/tmp/bench/model-well")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--out", default=None, help="output folder (default: next to the image)")
    args = ap.parse_args()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.image)), "out-layouts")
    from geoseg import forkserver

    t = time.perf_counter()
    forked = forkserver.start()  # what `geoseg predict` does before its cluster starts (geoseg/cli/predict.py)
    print(f"fork server: {'started' if forked else 'not started: workers are spawned'} "
          f"({time.perf_counter() - t:.1f} s; its imports go on in the background)", flush=True)
    for _ in range(args.runs):
        for mode in ("default", "model+io"):
            print(run(mode, args.image, args.model, out), flush=True)


if __name__ == "__main__":
    sys.exit(main())
