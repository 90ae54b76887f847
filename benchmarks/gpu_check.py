"""One command for a machine with a CUDA GPU: the GPU tests, the model's speed as geoseg loads it (folded), and geoseg end to end.

    python benchmarks/gpu_check.py [--size 16384] [--workdir DIR] [--model DIR] [--vectors] [--skip-pytest]
                                   [--gpu-threads 1,2]

Prints, in well under 10 minutes on one GPU and ~16 cores:
  (a) `pytest -m gpu -q` over the test files that hold gpu tests: its outcome;
  (b) model only: img/s and Mpx/s of a U-Net-resnet18 (random weights, init_model) as geoseg loads it
      (load_model's optimize=True: batch norms folded, U-Net skips not concatenated, geoseg.model.fold; not
      the network as stored) on 512x512 tiles, batch 8, bf16 autocast, channels_last, on cuda;
  (b2) geoseg's infer kernel on one default chunk's window (4352 px of uint16 bands) in this process:
      what an infer task computes, without dask;
  (b3) a network's LightGBM companion (`geoseg train`'s default ensemble): numpy features and LightGBM's predict
      on one core (a CPU worker's thread) against features and trees as tensors on the GPU (geoseg.methods.
      device_features, geoseg.methods.forest), and how far apart they are;
  (c) geoseg end to end on a generated --size scene (make_sample) on a dask cluster started here:
      a scheduler, N-1 CPU workers (`--nthreads 1`, no GPU visible) for reading and writing, and one
      GPU worker (`--resources GPU=1`, `--nthreads` each of --gpu-threads: one cluster each) for the model
      tasks (model_resources={"GPU": 1}); after a warm-up on a 2048 scene: the segment stage's Mpx/s, the
      whole call's Mpx/s (COG included; polygons only with --vectors: a random model's 16384^2 map holds
      millions of polygons), timings, run.json's numerics and the worker each infer task ran on;
  (d) the GPU's busy share during that run: nvidia-smi's utilization.gpu sampled every 0.5 s;
  (e) `geoseg predict` as a user runs it, with its embedded cluster (one GPU worker per device beside CPU
      workers, geoseg.cluster.connect): wall time, Mpx/s, the workers run.json records and what the
      model's workers computed on (--skip-embedded: not run).
On a machine without CUDA it says so and exits 0, having measured nothing, unless --rehearse:
then (c) runs on the CPU (the "GPU" worker is a CPU worker with the GPU resource), so the script
itself is known to work before a GPU machine's scarce minutes are spent on it:

    python benchmarks/gpu_check.py --rehearse --size 2048 --cpu-workers 1

A bare GPU machine without the project's packages: benchmarks/gpu_bundle.sh packs them here (~55 MB),
benchmarks/gpu_device.sh unpacks them there and runs this script.

Measured (H200, 16 cores, torch 2.11 cu130, random U-Net-resnet18, 16384^2 uint16 scene, 4096 px chunks, halo 128),
see the #7 note of 2026-12-04: (b) 2145-2278 img/s = 562-597 Mpx/s; (b2) 0.343 s = 55 Mpx/s; (c) segment stage
18.4 Mpx/s before the bands were normalised on the device and stages ran whole there, 24.1 after (GPU worker of
one thread), 31.1 with two threads; whole call 15.0 / 18.4 / 22.8 Mpx/s; (d) GPU busy 4% / 11% / 7%.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# `python -m dask`, not the `dask` script: works where the packages sit on PYTHONPATH and no script was installed
DASK = [sys.executable, "-m", "dask"]


def run_pytest(timeout: float) -> bool:
    # only the files that hold gpu tests: collecting the others imports what a GPU machine need not have (moto, nbclient)
    files = sorted(str(f.relative_to(REPO)) for f in (REPO / "tests").glob("test_*.py") if "pytest.mark.gpu" in f.read_text())
    try:
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *files]
        rc = subprocess.run(cmd, check=False, cwd=REPO, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        print(f"(a) pytest -m gpu: stopped after {timeout:.0f} s", flush=True)
        return False
    print("(a) pytest -m gpu: " + {0: "passed", 5: "no test is marked gpu (exit 5): fine"}.get(rc, f"FAILED (exit {rc})"), flush=True)
    return rc in (0, 5)


def model_only(model: Path, seconds: float, batch: int = 8, tile: int = 512) -> float:
    import torch

    from geoseg.model.store import load_model

    bundle = load_model(model, device="cuda")
    net = bundle.net.to(memory_format=torch.channels_last)
    x = torch.randn(batch, bundle.card.n_bands, tile, tile, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(5):
            net(x)
        torch.cuda.synchronize()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(10):
                net(x)
            torch.cuda.synchronize()
            n += 10
        wall = time.perf_counter() - t0
    del net, x, bundle
    torch.cuda.empty_cache()
    img_s = n * batch / wall
    print(f"(b) model only, geoseg's folded network (load_model optimize=True): {img_s:.0f} img/s = "
          f"{img_s * tile * tile / 1e6:.0f} Mpx/s ({tile}x{tile}, batch {batch}, "
          f"bf16 autocast, channels_last, {torch.cuda.get_device_name(0)})", flush=True)
    return img_s


def kernel_only(model: Path, side: int = 4352, runs: int = 5, profile: bool = False) -> None:
    """geoseg's infer kernel (``segment_window`` on an InputWindow: normalisation, the network, classes back on the
    host) on one default chunk's window of uint16 bands, in this process: the infer task's work without dask."""
    import numpy as np
    import torch

    from geoseg.infer import InferenceSettings, InputWindow, segment_window
    from geoseg.model.store import load_model
    from geoseg.tiling import Box, Tile

    bundle = load_model(model, device="cuda")
    net = bundle.net.to(memory_format=torch.channels_last)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 4000, (bundle.card.n_bands, side, side)).astype(np.uint16)
    valid = np.ones((side, side), bool)
    box = Box(0, side, 0, side)
    settings = InferenceSettings("bf16", 1, "cuda")
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        segment_window(net, bundle.card, InputWindow(data, valid, bundle.card), valid, box, [Tile(box, box)], box, settings)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    if profile:  # where the window's time goes: the kernel once more under torch's profiler, top operators
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            segment_window(net, bundle.card, InputWindow(data, valid, bundle.card), valid, box, [Tile(box, box)], box, settings)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), flush=True)
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12), flush=True)
    best = min(times[1:])
    print(f"(b2) geoseg kernel, one {side}x{side} window in process: {best:.3f} s = {side * side / 1e6 / best:.0f} Mpx/s "
          f"(first {times[0]:.2f} s); peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
    del net, bundle
    torch.cuda.empty_cache()


class GpuSampler(threading.Thread):
    """utilization.gpu of the first GPU every ``period`` s, until stopped."""

    def __init__(self, period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.period, self.samples, self.stopped = period, [], threading.Event()

    def run(self) -> None:
        cmd = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        while not self.stopped.is_set():
            try:
                out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=10).stdout.split()
                self.samples.append(float(out[0]))
            except (subprocess.SubprocessError, OSError, ValueError, IndexError):
                pass  # one sample missed
            self.stopped.wait(self.period)


def companion_trees(device: str = "cuda", side: int = 4096) -> None:
    """(b3) a network's per-pixel LightGBM companion as geoseg runs it on a GPU worker (geoseg.methods.pixel's
    predict_pixels with a TorchForest: features with torch there, geoseg.methods.device_features, then the trees
    as tensors) against what a CPU worker's thread runs (numpy features, LightGBM's predict on one core): 7 classes,
    45 rounds, the 14 features `geoseg train` picks for a 6-band scene with band roles, on a ``side``² window."""
    import lightgbm as lgb
    import numpy as np
    import torch

    from geoseg.methods import device_features
    from geoseg.methods.features import default_features, feature_stack
    from geoseg.methods.forest import TorchForest

    roles = ("blue", "green", "red", "nir", "swir1", "swir2")
    feats, scale = default_features(roles, 6), [400.0] * 6
    rng = np.random.default_rng(0)
    signatures = rng.uniform(200, 3000, size=(7, 6))

    def scene(n: int) -> tuple[np.ndarray, np.ndarray]:
        cover = np.kron(rng.integers(0, 7, size=(n // 32 + 1, n // 32 + 1)), np.ones((32, 32), int))[:n, :n]
        img = (signatures[cover].transpose(2, 0, 1) + rng.normal(0, 300, size=(6, n, n))).astype(np.float32)
        img[:, rng.random((n, n)) < 0.01] = np.nan
        return img, cover

    img, cover = scene(512)
    f = feature_stack(img, roles, feats, scale)
    booster = lgb.train({"objective": "multiclass", "num_class": 7, "num_leaves": 31, "verbose": -1, "seed": 0},
                        lgb.Dataset(f.reshape(len(feats), -1).T, cover.ravel()), num_boost_round=45)
    test, _ = scene(512)
    t = time.perf_counter()
    want = booster.predict(feature_stack(test, roles, feats, scale).reshape(len(feats), -1).T, num_threads=1)
    cpu = test[0].size / (time.perf_counter() - t) / 1e6
    forest = TorchForest(booster, device)

    def on_device(x: np.ndarray) -> tuple[np.ndarray, float, float]:
        sync = torch.cuda.synchronize if forest.device.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        with torch.inference_mode():
            g = device_features.feature_stack(torch.from_numpy(x).to(forest.device), roles, feats, scale)
            sync()
            t1 = time.perf_counter()
            p = forest.probabilities(g.reshape(len(feats), -1).T.contiguous()).cpu().numpy()
        return p, t1 - t0, time.perf_counter() - t1

    got, _, _ = on_device(test)  # warm-up, and the same 512² window as LightGBM's
    big, _ = scene(side)
    _, tf, tt = on_device(big)
    mpx = big[0].size / 1e6
    print(f"(b3) companion ({booster.num_trees()} trees, {len(feats)} features): a CPU worker's thread (numpy features, "
          f"LightGBM on one core) {cpu:.3f} Mpx/s; geoseg on {device} {mpx / (tf + tt):.3g} Mpx/s ({side}² window from "
          f"host memory: features {mpx / tf:.3g} Mpx/s, trees {mpx / tt:.3g} Mpx/s); on the same 512² window: "
          f"max |probability difference| {np.abs(got - want).max():.1e}, classes differ at "
          f"{np.count_nonzero(got.argmax(1) != want.argmax(1))} of {len(want)} px", flush=True)


def start_cluster(work: Path, cpu_workers: int, gpu_threads: int = 1) -> tuple[str, list[subprocess.Popen]]:
    """A scheduler, ``cpu_workers`` CPU workers and one GPU worker (``gpu_threads`` threads), each in its own process
    session."""
    sched_file = work / "scheduler.json"
    sched_file.unlink(missing_ok=True)
    with open(work / "dask.log", "w") as log:  # each child keeps its own copy of the descriptor
        common = {"start_new_session": True, "stdout": subprocess.DEVNULL, "stderr": log}
        procs = [subprocess.Popen([*DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                   "--scheduler-file", str(sched_file)], **common)]
        for _ in range(60):
            if sched_file.exists() and sched_file.stat().st_size:
                break
            time.sleep(0.5)
        worker = [*DASK, "worker", "--scheduler-file", str(sched_file), "--host", "127.0.0.1", "--nthreads",
                  "1", "--no-dashboard", "--local-directory", str(work / "dask-workers")]
        if cpu_workers:
            procs.append(subprocess.Popen(worker + ["--nworkers", str(cpu_workers), "--name", "cpu"],
                                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, **common))
        gpu = [a if a != "1" or worker[i - 1] != "--nthreads" else str(gpu_threads) for i, a in enumerate(worker)]
        procs.append(subprocess.Popen(gpu + ["--resources", "GPU=1", "--name", "gpu"], **common))
    return json.loads(sched_file.read_text())["address"], procs


def stop(procs: list[subprocess.Popen]) -> None:
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass


def end_to_end(args, model: Path, work: Path, gpu_threads: int = 1) -> bool:
    """(c) and (d); True if every infer task ran on the GPU worker."""
    from distributed import Client

    from geoseg.pipeline import PredictOptions, predict
    from geoseg.sample import make_sample

    scenes = {}
    for size in (2048, args.size):
        d = work / f"scene{size}"
        if not (d / "image.tif").exists():
            t = time.perf_counter()
            make_sample(d, size=size, bands=4, seed=0)
            print(f"    generated a {size}x{size} scene in {time.perf_counter() - t:.0f} s", flush=True)
        scenes[size] = d / "image.tif"
    cores = len(os.sched_getaffinity(0))
    cpu_workers = args.cpu_workers if args.cpu_workers is not None else max(1, cores - 1)
    address, procs = start_cluster(work, cpu_workers, gpu_threads)
    try:
        with Client(address) as client:
            client.wait_for_workers(cpu_workers + 1, timeout=120)
            gpu = {"GPU": 1}
            t = time.perf_counter()
            predict([scenes[2048]], model, work / "out-warmup", PredictOptions(model_resources=gpu, overwrite=True, cog=False,
                    vectors=False), client=client)
            print(f"    cluster of {cpu_workers} CPU workers + 1 GPU worker of {gpu_threads} thread(s); warm-up in {time.perf_counter() - t:.0f} s", flush=True)
            sampler = GpuSampler() if shutil.which("nvidia-smi") else None
            if sampler:
                sampler.start()
            from distributed import get_task_stream

            t0 = time.perf_counter()
            with get_task_stream(client) as stream:
                rec = predict([scenes[args.size]], model, work / "out", PredictOptions(model_resources=gpu, overwrite=True,
                              vectors=args.vectors), client=client)
            wall = time.perf_counter() - t0
            names = {addr: str(w.get("name")) for addr, w in client.scheduler_info()["workers"].items()}
            ran = [names.get(t["worker"], t["worker"]) for t in stream.data if "geoseg-infer" in str(t["key"])]
            if sampler:
                sampler.stopped.set()
                sampler.join()
    finally:
        stop(procs)
    h, w = rec["parameters"]["shape"]
    p = rec["parameters"]
    print(f"(c) geoseg {h}x{w}: segment stage {rec['throughput_mpx_s']} Mpx/s; whole predict call {wall:.1f} s = "
          f"{h * w / 1e6 / wall:.1f} Mpx/s; timings {rec['timings']}; chunk {p['chunk_size']}, halo {p['halo']}, "
          f"overhead {p['overhead']}, {p['precision']}", flush=True)
    print("    numerics: " + json.dumps(rec["numerics"]), flush=True)
    on_gpu = sum(1 for n in ran if n.startswith("gpu"))
    placed = bool(ran) and on_gpu == len(ran)
    print(f"    infer tasks on the GPU worker: {on_gpu} of {len(ran)}" + ("" if placed else "  <- PLACEMENT FAILED"), flush=True)
    if sampler is None:
        print("(d) GPU busy: nvidia-smi not found, not measured", flush=True)
    elif sampler.samples:
        s = sampler.samples
        busy = [i for i, v in enumerate(s) if v > 0]
        seg = s[busy[0]:busy[-1] + 1] if busy else []
        print(f"(d) GPU busy: mean {sum(s) / len(s):.0f}% over the whole call ({len(s)} samples, 0.5 s apart); "
              f"{(sum(seg) / len(seg)) if seg else 0:.0f}% from the first to the last busy sample (the segment stage)", flush=True)
    return placed


def embedded(args, model: Path, work: Path) -> bool:
    """(e) `geoseg predict` with its embedded cluster; True if the model ran on GPU workers only (cuda, or in a
    rehearsal the GPU worker GEOSEG_GPUS=0 names)."""
    scene = work / f"scene{args.size}" / "image.tif"
    out = work / "out-embedded"
    env = {**os.environ, **({"GEOSEG_GPUS": "0"} if args.rehearse else {})}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "geoseg", "predict", str(scene), "--model", str(model), "--out", str(out),
                           "--overwrite", "--no-vectors"], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(f"(e) geoseg predict, embedded cluster: FAILED (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}", flush=True)
        return False
    rec = json.loads((out / "run.json").read_text())
    h, w = rec["parameters"]["shape"]
    workers = rec["numerics"]["workers"]
    devices = sorted({str(c.get("device")) for c in workers.values()})
    print(f"(e) geoseg predict {h}x{w}, embedded cluster: {wall:.1f} s = {h * w / 1e6 / wall:.1f} Mpx/s (segment stage "
          f"{rec['throughput_mpx_s']} Mpx/s); cluster {json.dumps(rec['cluster'])}; model workers {len(workers)} on "
          f"{', '.join(devices)}; {rec['parameters']['precision']}", flush=True)
    gpus = rec["cluster"].get("gpu_workers", 0)
    ok = gpus >= 1 and len(workers) == gpus and (args.rehearse or devices == ["cuda"])
    if not ok:
        print("    <- the model did not run on GPU workers alone", flush=True)
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=16384, help="side of the end-to-end scene")
    ap.add_argument("--model", default=None, help="model directory (default: a U-Net-resnet18 with random weights)")
    ap.add_argument("--workdir", default=None, help="keep scenes, model and outputs here (default: a temp dir)")
    ap.add_argument("--cpu-workers", type=int, default=None, help="CPU workers (default: usable cores - 1)")
    ap.add_argument("--gpu-threads", default="1", help="threads of the GPU worker; several (1,2): one cluster each")
    ap.add_argument("--model-seconds", type=float, default=10.0)
    ap.add_argument("--vectors", action="store_true", help="also polygonize (slow on a random model's map)")
    ap.add_argument("--skip-pytest", action="store_true")
    ap.add_argument("--profile-kernel", action="store_true", help="(b2) once more under torch.profiler: the top operators")
    ap.add_argument("--pytest-timeout", type=float, default=180.0)
    ap.add_argument("--skip-embedded", action="store_true", help="skip (e), geoseg predict with its embedded cluster")
    ap.add_argument("--rehearse", action="store_true", help="without CUDA: run (c) on the CPU to check the script")
    args = ap.parse_args()

    import torch

    import platform

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), {gpu}, "
          f"{len(os.sched_getaffinity(0))} usable cores", flush=True)
    if not torch.cuda.is_available() and not args.rehearse:
        print("no CUDA device found (torch.cuda.is_available() is False): nothing was measured")
        return 0
    if args.rehearse:
        print("rehearsal: (a) the GPU tests and (b) the model-only figure skipped; (c) on the CPU", flush=True)
    ok = True if args.skip_pytest or args.rehearse else run_pytest(args.pytest_timeout)
    from geoseg.model.store import init_model

    work = Path(args.workdir or tempfile.mkdtemp(prefix="geoseg-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        model = Path(args.model) if args.model else work / "model"
        if not (model / "model.json").exists():
            init_model(model, n_bands=4, n_classes=5, encoder="resnet18", seed=0)
        if not args.rehearse:
            model_only(model, args.model_seconds)
        if not args.rehearse:
            kernel_only(model, profile=args.profile_kernel)
        companion_trees(*(("cpu", 256) if args.rehearse else ()))
        for threads in (int(t) for t in args.gpu_threads.split(",")):
            ok = end_to_end(args, model, work, threads) and ok
        if not args.skip_embedded:
            ok = embedded(args, model, work) and ok
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
