"""A minimum mapping unit (the card's sieve, ``geoseg train --mmu``) at predict time, three ways side by side:

- ``geoseg predict`` without a sieve (the model alone);
- ``geoseg predict`` with it: the model's halo is its own, and the sieve runs over the whole map after the segment
  stage, joined across chunks (geoseg.pipeline.sieve);
- the lazy Python API (``geoseg.api.predict``) with it: each chunk's window grown by 2 x mmu - 1 (the model
  computes the ring too), which is how ``geoseg predict`` sieved before (grown by the mmu, under the earlier rule).

The two sieved maps must be equal. Run: ``.venv/bin/python benchmarks/mmu_sieve.py --size 4096 --mmu 1000``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
from predict_throughput import GEOSEG, scene, trained  # noqa: E402


def with_mmu(model: Path, mmu: int) -> Path:
    from geoseg.model.card import ModelCard

    out = model.with_name(f"{model.name}-mmu{mmu}")
    out.mkdir(exist_ok=True)
    for f in model.iterdir():
        if f.is_file():
            (out / f.name).write_bytes(f.read_bytes())
    card = ModelCard.model_validate_json((model / "model.json").read_text())
    pp = {"majority_radius": 0, "min_pixels": mmu, "class_min_pixels": {}, "connectivity": 4}
    (out / "model.json").write_text(ModelCard.model_validate({**card.model_dump(), "postprocess": pp}).to_json())
    return out


def cli_predict(model: Path, image: Path, out: Path, workers: int) -> dict:
    t = time.perf_counter()
    subprocess.run([GEOSEG, "predict", str(image), "--model", str(model), "--out", str(out), "--overwrite",
                    "--workers", str(workers), "--no-vectors"], check=True, stdout=subprocess.DEVNULL)
    record = json.loads((out / "run.json").read_text())
    record["wall_s"] = time.perf_counter() - t
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--mmu", type=int, default=1000, help="minimum mapping unit in pixels (at most 2048: the windowed side)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="geoseg-mmu-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    model = trained(work, "mmu", 2, 20, 1.0, env)
    sieved = with_mmu(model, args.mmu)
    image = scene(work, args.size, 1)

    import numpy as np
    from distributed import Client, LocalCluster

    from geoseg import api
    from geoseg.io.zarr_store import open_prediction
    from geoseg.model.store import load_model
    from geoseg.tiling import plan_for

    plain = cli_predict(model, image, work / "plain", args.workers)
    joined = cli_predict(sieved, image, work / "joined", args.workers)
    card = load_model(sieved).card
    windowed_plan = plan_for(card, (args.size, args.size))
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, host="127.0.0.1", dashboard_address=None) as lc, \
            Client(lc):
        t = time.perf_counter()
        ds = api.predict(api.open_scene(image, chunks=windowed_plan.chunk_size), sieved)
        windowed = ds["class_id"].values
        api_s = time.perf_counter() - t
    got = open_prediction(work / "joined" / "prediction.zarr")["class_id"].values
    differ = int(np.count_nonzero(got != windowed))
    base = open_prediction(work / "plain" / "prediction.zarr")["class_id"].values
    mpx = args.size**2 / 1e6
    print(f"\n{args.size}² scene, {card.network}, mmu {args.mmu} px, {args.workers} workers")
    print(f"{'run':<44} {'halo':>5} {'model px':>9} {'segment':>8} {'sieve':>6} {'wall':>6}")
    for name, rec in (("geoseg predict, no sieve", plain), ("geoseg predict, sieve joined after the model", joined)):
        p = rec["parameters"]
        print(f"{name:<44} {p['halo']:>5} {p.get('overhead', float('nan')):>8.3f}x {rec['timings']['segment_s']:>7.1f}s "
              f"{rec['timings'].get('sieve_s', 0):>5.1f}s {rec['wall_s']:>5.1f}s")
    print(f"{'API, sieve in windows grown by 2 mmu - 1':<44} {windowed_plan.halo:>5} {windowed_plan.overhead:>8.3f}x "
          f"{api_s:>7.1f}s {'-':>6} {'-':>6}  (class map computed on a started cluster)")
    print(f"sieved maps differ on {differ} of {args.size**2} px; the sieve changed "
          f"{int(np.count_nonzero(got != base))} px ({mpx:.1f} Mpx)")


if __name__ == "__main__":
    main()
