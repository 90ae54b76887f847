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

    with connect(n_workers=1) as client:
        assert set(client.run(_marker).values()) == {"1"}
        assert os.environ.get("GEOSEG_EMBEDDED_WORKER") is None


_FORK_PROBE = """
import json, os, sys

def probe():
    import sys, os
    # the allocator setting as the process was started with it (the nanny also sets it in os.environ)
    with open("/proc/self/environ", "rb") as f:
        exec_env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\\0") if b"=" in kv)
    arena = exec_env.get(b"MALLOC_ARENA_MAX")
    return [os.getppid(), "torch" in sys.modules, "segmentation_models_pytorch" in sys.modules,
            os.environ.get("GEOSEG_PROBE"), arena and arena.decode(), os.environ.get("GEOSEG_EMBEDDED_WORKER"),
            os.environ.get("GEOSEG_GONE")]

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
    for _, torch_loaded, smp_loaded, probe, arena, marker, gone in workers:
        assert probe == "set after the server started" and arena == "1" and marker == "1"
        assert gone == "unset after the server started"
        assert torch_loaded is smp_loaded is (mode == "forkserver")
    if mode == "forkserver":
        assert len(parents) == 1 and report["client"] not in parents
    else:
        assert parents == {report["client"]}
    # a variable unset since the server started can only be kept from workers by spawning them
    ((parent, torch_loaded, _, probe, arena, _, gone),) = report["after_unset"]
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
