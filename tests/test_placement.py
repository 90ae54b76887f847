"""Where tasks run on a real cluster: `dask scheduler`, one `dask worker --resources GPU=1` and one without.

Model tasks must run on the worker that offers the resource, reads and writes anywhere; what the
task stream recorded is checked, not the graph. Workers started by someone else get geoseg's
worker set-up (allocator thresholds, threads) through the plugin the client registers.
"""

from __future__ import annotations

import time

import pytest

from geoseg.errors import ConfigError
from geoseg.pipeline import PredictOptions, predict

from conftest import dask_cluster


@pytest.fixture
def gpu_and_cpu_workers(tmp_path):
    with dask_cluster(tmp_path, [["--resources", "GPU=1"], []]) as (address, procs, client):
        client.wait_for_workers(2, timeout=60)
        yield client


def _worker_with_gpu(client) -> str:
    workers = client.scheduler_info(n_workers=-1)["workers"]
    (gpu,) = [a for a, w in workers.items() if w.get("resources", {}).get("GPU")]
    return gpu


def test_model_tasks_run_only_on_the_gpu_worker(gpu_and_cpu_workers, random_model, scene_path, tmp_path):
    from distributed import get_task_stream

    client = gpu_and_cpu_workers
    gpu = _worker_with_gpu(client)
    opts = PredictOptions(chunk_size=64, halo=16, cog=False, vectors=False, model_resources={"GPU": 1})
    with get_task_stream(client) as ts:
        record = predict([scene_path], random_model, tmp_path / "out", opts, client=client)
    ran: dict[str, list[str]] = {}
    for t in ts.data:
        prefix = t["key"][0] if isinstance(t["key"], tuple) else str(t["key"])
        ran.setdefault(prefix.rsplit("-", 1)[0], []).append(t["worker"])
    n_chunks = record["chunks"]["chunks"]
    assert n_chunks == 35  # 300 x 437 in 64 px chunks
    assert len(ran["geoseg-infer"]) == n_chunks and set(ran["geoseg-infer"]) == {gpu}
    # reads and writes are not held to the GPU worker: they ran on both
    assert len(ran["geoseg-read"]) == n_chunks and len(ran["geoseg-write"]) == n_chunks
    assert len(set(ran["geoseg-read"]) | set(ran["geoseg-write"])) == 2
    # only the model's workers were asked what they compute in
    assert list(record["numerics"]["workers"]) == [gpu]


def test_each_infer_task_reads_one_block(random_model, scene_path, tmp_path):
    """One read per chunk: an infer task depends on exactly one read, which covers its haloed window."""
    from geoseg.graph import build_segmentation
    from geoseg.pipeline import plan_job

    job = plan_job([scene_path], random_model, tmp_path / "x", PredictOptions(chunk_size=64, halo=16))
    seg = build_segmentation(job.stack, job.plan, job.ref, job.settings("fp32"))
    reads, infers = seg.graph.layers[seg.read_name], seg.graph.layers[seg.infer_name]
    assert len(reads) == len(infers) == len(job.plan)
    for ch in job.plan:
        task = infers[(seg.infer_name, ch.iy, ch.ix)]
        deps = [a for a in task[1:] if isinstance(a, tuple) and a and a[0] == seg.read_name]
        assert deps == [(seg.read_name, ch.iy, ch.ix)]
        assert reads[deps[0]][2] == ch.input  # the read covers the chunk's core and halo


def test_missing_resource_is_a_clear_error_not_a_hang(gpu_and_cpu_workers, random_model, scene_path, tmp_path):
    client = gpu_and_cpu_workers
    opts = PredictOptions(chunk_size=128, cog=False, vectors=False, model_resources={"TPU": 1}, worker_timeout=2)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"no worker .* offers TPU=1 after 2 s.*--resources TPU=1"):
        predict([scene_path], random_model, tmp_path / "out", opts, client=client)
    assert time.monotonic() - t0 < 20
    assert not (tmp_path / "out" / "run.json").exists()


def test_workers_started_elsewhere_get_the_allocator_fix(gpu_and_cpu_workers):
    """`dask worker` processes carry distributed's MALLOC_TRIM_THRESHOLD_; the plugin sets geoseg's allocator."""
    import os

    from geoseg.workers import register

    client = gpu_and_cpu_workers
    register(client)
    env = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
    assert set(env.values()) == {"65536"}  # distributed's nanny set it in every worker
    # not geoseg's own workers: they exit the way their owner's processes always do
    assert set(client.run(lambda: os.environ.get("GEOSEG_EMBEDDED_WORKER")).values()) == {None}
    setups = client.run(lambda dask_worker: dask_worker.geoseg_setup)
    for s in setups.values():
        assert s["allocator"] == {"mmap_max": 0, "trim_threshold": -1, "arena_max": 1}


def test_model_task_threads_versions_and_workers_that_join(random_model, scene_path, tmp_path):
    """`dask worker --nthreads 2` (one started by someone else): each of its two concurrent model tasks ran with
    2 torch threads (4 on 2 cores); now one each, and a GPU worker's single model task takes both. run.json
    records what model tasks compute with, each worker's versions, and workers that joined while the job ran
    and took model tasks (they were missing, and their bf16 was never checked); a worker on other versions of
    geoseg or torch is refused."""
    from geoseg.model.store import model_digest
    from geoseg.numerics import check_versions, with_joined
    from geoseg.runtime import ModelRef
    from geoseg.workers import versions

    def threads_in_a_model_task(path, digest):
        import torch

        from geoseg.runtime import get_model

        get_model(ModelRef(path, digest))
        return torch.get_num_threads()

    digest = model_digest(random_model)
    with dask_cluster(tmp_path, [["--nthreads", "2", "--resources", "GPU=1"], ["--nthreads", "2"]]) as (address, procs, client):
        client.wait_for_workers(2, timeout=60)
        gpu = _worker_with_gpu(client)
        (cpu,) = [a for a in client.scheduler_info(n_workers=-1)["workers"] if a != gpu]
        on_cpu = [client.submit(threads_in_a_model_task, str(random_model), digest, workers=[cpu], pure=False) for _ in range(4)]
        on_gpu = [client.submit(threads_in_a_model_task, str(random_model), digest, resources={"GPU": 1}, pure=False)
                  for _ in range(2)]
        assert client.gather(on_cpu) == [1] * 4 and client.gather(on_gpu) == [2] * 2
        opts = PredictOptions(chunk_size=128, cog=False, vectors=False, model_resources={"GPU": 1})
        record = predict([scene_path], random_model, tmp_path / "out", opts, client=client)
        (asked,) = record["numerics"]["workers"].values()
        assert asked["torch_threads"] == 2 and asked["versions"] == versions()
        # a worker that held no model when the job began and took its model tasks (the cpu one, above)
        from geoseg.numerics import resolve_on_cluster

        numerics = resolve_on_cluster(client, "auto", resources={"GPU": 1})
        assert with_joined(client, numerics, digest, resources={"GPU": 1}) == numerics  # it cannot take them
        joined = with_joined(client, numerics, digest)
        assert set(joined.workers) == {gpu, cpu} and joined.workers[cpu]["joined"] and "joined" not in joined.workers[gpu]
        assert joined.workers[cpu]["torch_threads"] == 1  # its two threads each run a model task
    with pytest.raises(ConfigError, match=r"model worker tcp://w \(h\) runs torch 0.1 \(here .*\); install the client's"):
        check_versions({"tcp://w": {"host": "h", "versions": {**versions(), "torch": "0.1"}}})


@pytest.mark.gpu
def test_model_tasks_run_on_a_cuda_worker(random_model, scene_path, tmp_path):
    """Where a CUDA device exists: the model workers say cuda, compute bf16 natively, and the job runs there."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from geoseg.cluster import connect

    with connect(n_workers=1, resources={"GPU": 1}) as client:
        rec = predict([scene_path], random_model, tmp_path / "out",
                      PredictOptions(chunk_size=128, model_resources={"GPU": 1}, cog=False, vectors=False), client=client)
    (worker,) = rec["numerics"]["workers"].values()
    assert worker["device"].startswith("cuda") and worker["gpu"]
    assert rec["numerics"]["device"] == "cuda"
    assert rec["numerics"]["precision"] == ("bf16" if worker["bf16_native"] else "fp32")


def _marker() -> str | None:
    import os

    return os.environ.get("GEOSEG_EMBEDDED_WORKER")


def test_embedded_workers_are_marked_as_geoseg_s_own():
    """Workers geoseg spawns carry the marker that lets them leave at once when closed (geoseg.workers);
    the client's own environment does not (processes it starts later would inherit it)."""
    import os

    from geoseg.cluster import connect

    from distributed.system import MEMORY_LIMIT

    with connect(n_workers=1) as client:
        assert set(client.run(_marker).values()) == {"1"}
        assert os.environ.get("GEOSEG_EMBEDDED_WORKER") is None
        # the machine's memory shared by its workers (dask's "auto" gave each memory x threads / cores: a lone worker
        # half of it on 2 cores, 4 workers of 16 cores 2 GiB of 32)
        assert [w["memory_limit"] for w in client.scheduler_info(n_workers=-1)["workers"].values()] == [MEMORY_LIMIT]


def _exit_hook(path: str) -> None:
    import atexit

    atexit.register(lambda: open(path, "w").write("finalized"))


def test_embedded_workers_leave_at_once_when_closed(tmp_path):
    """A closed embedded worker skips the interpreter's shutdown (its plugin's teardown makes the exit
    immediate): an exit handler registered while it ran never runs. A worker of someone else's shuts down
    as usual (control: the handler runs)."""
    from distributed import Client, LocalCluster

    from geoseg.cluster import connect
    from geoseg.workers import register

    with connect(n_workers=1) as client:
        client.run(_exit_hook, str(tmp_path / "embedded"))
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, Client(cluster) as client:
        register(client)
        client.run(_exit_hook, str(tmp_path / "other"))
    import time

    deadline = time.monotonic() + 20
    while not (tmp_path / "other").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (tmp_path / "other").read_text() == "finalized"
    assert not (tmp_path / "embedded").exists()


_FORK_PROBE = """
import json, os, sys

def probe():
    import sys, os
    # the allocator setting as the process was started with it (the nanny also sets it in os.environ)
    with open("/proc/self/environ", "rb") as f:
        exec_env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\\0") if b"=" in kv)
    arena = exec_env.get(b"MALLOC_ARENA_MAX")
    import gc
    return [os.getppid(), "torch" in sys.modules, "segmentation_models_pytorch" in sys.modules,
            os.environ.get("GEOSEG_PROBE"), arena and arena.decode(), os.environ.get("GEOSEG_EMBEDDED_WORKER"),
            os.environ.get("GEOSEG_GONE"), gc.get_freeze_count()]

if __name__ == "__main__":
    from geoseg import forkserver
    from geoseg.cluster import connect

    os.environ["GEOSEG_GONE"] = "unset after the server started"
    started = forkserver.start()
    os.environ["GEOSEG_PROBE"] = "set after the server started"
    with connect(n_workers=2) as client:
        seen = client.run(probe)
    del os.environ["GEOSEG_GONE"]
    with connect(n_workers=1) as client:
        after = client.run(probe)
    print(json.dumps({"client": os.getpid(), "started": started, "workers": list(seen.values()),
                      "after_unset": list(after.values())}))
"""


@pytest.mark.parametrize("mode", ["forkserver", "spawn"])
def test_embedded_workers_fork_from_a_server_that_imported_torch(tmp_path, mode):
    """After geoseg.forkserver.start() (what `geoseg predict` does first) the embedded cluster's workers are
    children of the fork server, not of the client, with torch and smp imported before any task ran;
    the client's environment as it is when the cluster starts reaches them, and so do geoseg's allocator
    settings. A variable unset since the server started would still reach forked workers, so then
    they are spawned. GEOSEG_WORKER_START=spawn: the client spawns them, nothing imported."""
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "probe.py"
    script.write_text(_FORK_PROBE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["GEOSEG_WORKER_START"] = mode
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    workers = report["workers"]
    assert len(workers) == 2
    assert report["started"] is (mode == "forkserver")
    assert report["started"] is (mode == "forkserver")
    parents = {w[0] for w in workers}
    for _, torch_loaded, smp_loaded, probe, arena, marker, gone, frozen in workers:
        assert probe == "set after the server started" and arena == "1" and marker == "1"
        assert gone == "unset after the server started"
        assert torch_loaded is smp_loaded is (mode == "forkserver")
        # what the server loaded is frozen before the forks: a worker's full collections skip it (and the
        # server's exit does not search it for cycles, about 1 s of a core after every command)
        assert (frozen > 100_000) is (mode == "forkserver")
    if mode == "forkserver":
        assert len(parents) == 1 and report["client"] not in parents
    else:
        assert parents == {report["client"]}
    # a variable unset since the server started can only be kept from workers by spawning them
    ((parent, torch_loaded, _, probe, arena, _, gone, _),) = report["after_unset"]
    assert parent == report["client"] and not torch_loaded
    assert gone is None and probe == "set after the server started" and arena == "1"


_BROKEN_PRELOAD_PROBE = """
import json, os, sys

def probe():
    import sys
    pre = sys.modules.get("geoseg._preload")
    return [os.getppid(), "torch" in sys.modules, None if pre is None else pre.failed]

if __name__ == "__main__":
    from geoseg import forkserver
    from geoseg.cluster import connect

    started = forkserver.start()
    with connect(n_workers=1) as client:
        seen = client.run(probe)
    print(json.dumps({"client": os.getpid(), "started": started, "workers": list(seen.values())}))
"""


def test_a_preload_that_fails_with_any_error_leaves_the_fork_server_running(tmp_path):
    """multiprocessing's fork server dies on a preload that raises anything but ImportError; a broken
    library (an OSError from a shared object, here a package that raises one) must not cost the
    cluster its workers: the rest is preloaded and the workers still fork from the server."""
    import json
    import os
    import subprocess
    import sys

    broken = tmp_path / "shadow" / "segmentation_models_pytorch"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise OSError('libbroken.so: cannot open shared object file')\n")
    script = tmp_path / "probe.py"
    script.write_text(_BROKEN_PRELOAD_PROBE)
    env = {**os.environ, "GEOSEG_WORKER_START": "forkserver",
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "shadow"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["started"] is True
    ((parent, torch_loaded, failed),) = report["workers"]
    assert parent != report["client"]  # forked from the server, which lived through the failure
    assert torch_loaded  # the modules after the broken one were still preloaded
    assert list(failed) == ["segmentation_models_pytorch"] and "OSError" in failed["segmentation_models_pytorch"]


def test_local_gpus_as_the_driver_lists_them_and_cuda_narrows_them(tmp_path, monkeypatch, caplog):
    import functools
    import importlib

    cluster = importlib.import_module("geoseg.cluster")  # geoseg.cluster the attribute is the API function
    from geoseg.cluster import GPU_ENV

    cuda_torch, cpu_torch = tmp_path / "torch-cu", tmp_path / "torch-cpu"
    for folder, line in ((cuda_torch, "cuda: Optional[str] = '13.0'"), (cpu_torch, "cuda: Optional[str] = None")):
        folder.mkdir()
        (folder / "version.py").write_text(f"from typing import Optional\n__version__ = '2.14.1'\n{line}\n")
    local_gpus = functools.partial(cluster.local_gpus, torch_dir=str(cuda_torch), listing=lambda: None)
    monkeypatch.delenv(GPU_ENV, raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    driver, dev = tmp_path / "gpus", tmp_path / "dev"
    driver.mkdir()
    dev.mkdir()
    assert local_gpus(driver_dir=str(tmp_path / "absent"), dev_dir=str(dev)) == ()  # no NVIDIA driver: no GPU worker
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"):  # the device nodes a container gets
        (dev / name).touch()
    assert local_gpus(driver_dir=str(driver), dev_dir=str(dev)) == ("0", "1")
    for bus in ("0000:3b:00.0", "0000:5e:00.0", "0000:86:00.0"):
        (driver / bus).mkdir()
    assert local_gpus(driver_dir=str(driver), dev_dir=str(dev)) == ("0", "1", "2")
    # GPU 1 split into two MIG devices (nvidia-smi -L): a worker each, by UUID (by index both would get the first)
    smi = ("GPU 0: NVIDIA H200 (UUID: GPU-0a)\nGPU 1: NVIDIA H200 (UUID: GPU-1b)\n"
           "  MIG 3g.71gb     Device  0: (UUID: MIG-1b-0)\n  MIG 3g.71gb     Device  1: (UUID: MIG-1b-1)\n"
           "GPU 2: NVIDIA H200 (UUID: GPU-2c)\n")
    assert cluster.local_gpus(driver_dir=str(driver), dev_dir=str(dev), torch_dir=str(cuda_torch),
                              listing=lambda: smi) == ("0", "MIG-1b-0", "MIG-1b-1", "2")
    # a CPU-only torch beside the driver: no GPU worker (it would take every model task, on the CPU), and says why
    assert cluster.local_gpus(driver_dir=str(driver), dev_dir=str(dev), torch_dir=str(cpu_torch)) == ()
    assert "CPU-only build" in caplog.text
    # CUDA_VISIBLE_DEVICES as CUDA reads it: the ids in order, up to the first that names no device
    for visible, want in (("2,0", ("2", "0")), ("1,7,0", ("1",)), ("", ()), ("-1", ()), ("0,-1,1", ("0",)),
                          ("GPU-8f6e2c1a", ("GPU-8f6e2c1a",))):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert local_gpus(driver_dir=str(driver), dev_dir=str(dev)) == want, visible
    # the user's choice wins, also on a machine without a driver; "none" turns the GPU workers off
    monkeypatch.setenv(GPU_ENV, "1, 0")
    assert local_gpus(driver_dir=str(tmp_path / "absent")) == ("1", "0")
    monkeypatch.setenv(GPU_ENV, "none")
    assert local_gpus(driver_dir=str(driver), dev_dir=str(dev)) == ()


def test_embedded_cluster_on_a_gpu_machine_runs_model_tasks_on_its_gpu_worker(random_model, scene_path, tmp_path):
    """The embedded cluster on a machine with one CUDA device: one GPU worker (that device alone visible, GPU=1,
    two threads) beside CPU workers that see none. Predict, evaluate and the lazy API put every model task
    on the GPU worker without being asked (as recorded by the task stream), reads and writes anywhere.
    No CUDA here: the GPU worker's torch finds no device and computes on the CPU, the placement is the same."""
    import os

    from distributed import get_task_stream

    from _scenes import LABEL_NODATA
    from conftest import blob_scene, write_raster
    from geoseg import api
    from geoseg.cluster import connect
    from geoseg.evaluation import EvaluateOptions, evaluate

    _, labels = blob_scene(300, 437, 4, seed=3)
    labels_path = write_raster(tmp_path / "labels.tif", (labels[None] + 1).astype("uint8"), nodata=LABEL_NODATA)

    def ran_on(ts, prefix):
        return [t["worker"] for t in ts.data
                if (t["key"][0] if isinstance(t["key"], tuple) else str(t["key"])).startswith(prefix)]

    from distributed.system import MEMORY_LIMIT

    from click.testing import CliRunner

    from geoseg.cli.main import cli

    pixel = tmp_path / "pixel"  # a pixel model: its trees run on a GPU worker's device, so its tasks go there too
    r = CliRunner().invoke(cli, ["-q", "train", str(scene_path), "--labels", str(labels_path), "--out", str(pixel),
                                 "--method", "pixel"])
    assert r.exit_code == 0, r.output
    with connect(n_workers=1, gpus=("0",)) as client:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        gpu = _worker_with_gpu(client)
        assert len(workers) == 2 and workers[gpu]["nthreads"] == 2 and workers[gpu]["resources"] == {"GPU": 1}
        # the GPU worker is made with geoseg's worker settings, as the CPU workers are (it was made after they were
        # lifted: daemonic, and not marked as geoseg's own)
        assert set(client.run(_marker).values()) == {"1"}
        assert set(client.run(lambda: __import__("multiprocessing").current_process().daemon).values()) == {False}
        assert sorted(w["memory_limit"] for w in workers.values()) == [MEMORY_LIMIT // 2] * 2
        assert client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES")) == {
            a: ("0" if a == gpu else "") for a in workers}
        opts = PredictOptions(chunk_size=64, halo=16, cog=False, vectors=False)
        with get_task_stream(client) as ts:
            record = predict([scene_path], random_model, tmp_path / "out", opts, client=client)
        assert record["cluster"]["gpu_workers"] == 1
        infers = ran_on(ts, "geoseg-infer")
        assert len(infers) == record["chunks"]["chunks"] == 35 and set(infers) == {gpu}
        assert len(set(ran_on(ts, "geoseg-read")) | set(ran_on(ts, "geoseg-write"))) == 2
        assert list(record["numerics"]["workers"]) == [gpu]

        with get_task_stream(client) as ts:
            result = evaluate([scene_path], random_model, labels_path, EvaluateOptions(chunk_size=64, halo=16))
        infers = ran_on(ts, "geoseg-infer")
        assert len(infers) == 35 and set(infers) == {gpu}
        assert result.metrics.pixels > 0

        with get_task_stream(client) as ts:
            lazy = api.predict(str(scene_path), random_model, chunk_size=64, halo=16).compute()
        infers = ran_on(ts, "geoseg-infer")
        assert len(infers) == 35 and set(infers) == {gpu}
        assert lazy["class_id"].shape == (300, 437)

        with get_task_stream(client) as ts:
            record = predict([scene_path], pixel, tmp_path / "out-pixel", opts, client=client)
        infers = ran_on(ts, "geoseg-infer")
        assert len(infers) == record["chunks"]["chunks"] and set(infers) == {gpu}


def test_geoseg_predict_makes_gpu_workers_unless_told_cpu(random_model, scene_path, tmp_path, monkeypatch):
    """`geoseg predict` on a machine with a CUDA device (GEOSEG_GPUS names it here) asks only its GPU worker
    what the model computes in; --device cpu starts no GPU worker."""
    import json

    from click.testing import CliRunner

    from geoseg.cli.main import cli
    from geoseg.cluster import GPU_ENV

    monkeypatch.setenv(GPU_ENV, "0")
    for device, gpu_workers in (("auto", 1), ("cpu", 0)):
        out = tmp_path / device
        res = CliRunner().invoke(cli, ["predict", str(scene_path), "--model", str(random_model), "--out", str(out),
                                       "--workers", "1", "--chunk-size", "128", "--no-cog", "--no-vectors",
                                       "--device", device])
        assert res.exit_code == 0, res.output
        rec = json.loads((out / "run.json").read_text())
        assert rec["cluster"]["workers"] == 1 + gpu_workers and rec["cluster"]["gpu_workers"] == gpu_workers
        assert len(rec["numerics"]["workers"]) == 1  # the GPU worker alone, or the one CPU worker


def test_cuda_asked_for_on_workers_without_a_gpu_is_refused(gpu_and_cpu_workers, random_model, scene_path, tmp_path):
    """A job that names cuda must not run on the CPU because the GPU's driver is missing (many times slower, silent)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    client = gpu_and_cpu_workers
    gpu = _worker_with_gpu(client)
    opts = PredictOptions(chunk_size=64, halo=16, cog=False, vectors=False, model_resources={"GPU": 1}, device="cuda")
    with pytest.raises(ConfigError, match=r"1 of 1 model worker\(s\) \(" + gpu.replace(".", r"\.") + r"\).*device cuda was "
                       r"asked for, but torch sees no CUDA GPU.*nvidia-smi.*device auto"):
        predict([scene_path], random_model, tmp_path / "out", opts, client=client)
    assert not (tmp_path / "out" / "run.json").exists()
    from geoseg.runtime import pick_device

    with pytest.raises(ConfigError, match="no CUDA GPU on this process"):  # training and one-process runs too
        pick_device("cuda")
    assert pick_device("auto") == "cpu"


def test_the_modules_of_a_segment_task_leave_dask_array_and_xarray_to_the_client():
    """A worker's first read, infer and write tasks import geoseg.graph, geoseg.io.zarr_store and the sieve: with
    dask.array (0.6 s of one core, every worker, every job, on the segment stage's first task) only the client's
    graph building needs it; xarray (0.4 s, also in the fork server's preload before every cluster starts) only
    the client's store making. Checked in a fresh interpreter after what the fork server preloads."""
    import subprocess
    import sys

    code = ("import sys, geoseg._preload, geoseg.graph, geoseg.io.zarr_store, geoseg.pipeline.sieve, geoseg.infer\n"
            "print('dask.array' in sys.modules, 'xarray' in sys.modules, geoseg._preload.failed)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False False {}"


def test_the_geoseg_command_leaves_its_loaded_objects_to_the_process_s_exit():
    """With torch, segmentation-models-pytorch and geopandas loaded (400 k objects), the interpreter's exit searched
    them all for cycles several times over: 1-1.9 s after `geoseg predict` had finished. The `geoseg` command and
    `python -m geoseg` freeze them (gc.freeze) as the command ends, whatever its exit code; atexit handlers still run."""
    import subprocess
    import sys
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "geoseg"]
    assert script.value == "geoseg.cli.main:main"
    hook = "import atexit, gc, sys\natexit.register(lambda: print('frozen', gc.get_freeze_count() > 1000))\n"
    for args, code in ((["--version"], 0), (["info", "/nonexistent.tif"], 2)):
        run = hook + f"sys.argv = ['geoseg', *{args!r}]\nimport runpy\nrunpy.run_module('geoseg', run_name='__main__')"
        out = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, timeout=120)
        assert out.returncode == code, out.stderr[-2000:]
        assert out.stdout.strip().splitlines()[-1] == "frozen True"


def test_the_accessor_is_there_whichever_of_geoseg_and_xarray_is_imported_first():
    """``import geoseg`` leaves xarray unimported (the CLI starts its workers 0.3 s sooner); the ``.geoseg``
    accessor is registered the moment xarray is imported, before or after geoseg, also when something only looked
    for xarray first (torch._dynamo and odc-geo do, at import), and ``geoseg`` alone runs."""
    import subprocess
    import sys

    after = ("import importlib.util, sys, geoseg\nprint('xarray' in sys.modules)\nimportlib.util.find_spec('xarray')\n"
             "import xarray as xr\n"
             "print(type(xr.DataArray([1.0]).geoseg).__name__, type(xr.Dataset().geoseg).__name__)")
    before = "import xarray as xr, geoseg\nprint(type(xr.DataArray([1.0]).geoseg).__name__)"
    cli = "import sys, geoseg.cli.main\nprint('xarray' in sys.modules)"
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout.split()
            for code in (after, before, cli)]
    assert outs == [["False", "SceneAccessor", "PredictionAccessor"], ["SceneAccessor"], ["False"]]
