"""Cluster profiles: localhost-only embedded cluster, SLURM job scripts without SLURM, GPU
resources on the model tasks, Kubernetes manifests, clear errors for what is missing."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import dask.config
import pytest
import yaml

from geoseg.cluster import check_resources, connect_profile
from geoseg.errors import ConfigError
from geoseg.jobs import plan, validate_spec
from geoseg.jobs.config import packaged_defaults
from geoseg.jobs.profiles import DEFAULT_IMAGE, AddressProfile, KubernetesProfile, LocalProfile, SlurmProfile, TLSFiles
from geoseg.jobs.spec import Chunking, Outputs

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


def pipeline_profile(name: str, profile: str | None = None):
    spec = validate_spec(PIPELINES / f"{name}.yaml", env={}, config_files=[])
    return spec.cluster.profiles[profile or spec.cluster.profile]


def test_packaged_defaults_are_dask_defaults():
    assert dask.config.get("geoseg.cluster.profile") == "local"
    assert dask.config.get("geoseg.chunking.precision") == "auto"
    d = packaged_defaults()
    # The models' own defaults are the packaged ones: code and geoseg.yaml cannot drift apart.
    assert Chunking() == Chunking(**d["chunking"]) and Outputs() == Outputs(**d["outputs"])
    assert LocalProfile() == LocalProfile(**d["cluster"]["profiles"]["local"])


def test_embedded_cluster_listens_on_localhost_only(client):
    assert client.scheduler.address.startswith("tcp://127.0.0.1:")
    workers = client.scheduler_info(n_workers=-1)["workers"]
    assert workers and all(addr.startswith("tcp://127.0.0.1:") for addr in workers)
    assert all(w["host"] == "127.0.0.1" for w in workers.values())
    assert client.dashboard_link.startswith("http://127.0.0.1:")


def test_local_gpu_profile_gives_workers_the_resource():
    with connect_profile(LocalProfile(n_workers=1, model_resources={"GPU": 1}), "gpu") as c:
        assert c.scheduler.address.startswith("tcp://127.0.0.1:")
        (addr, worker), = c.scheduler_info(n_workers=-1)["workers"].items()
        assert addr.startswith("tcp://127.0.0.1:") and worker["resources"] == {"GPU": 1}
        check_resources(c, {"GPU": 1})
        # Tasks annotated with the resource run there (and would wait forever on a worker without).
        with dask.annotate(resources={"GPU": 1}):
            import dask.array as da

            total = da.ones((100,), chunks=50).sum()
        assert c.compute(total).result() == 100


def test_cluster_without_gpu_workers_is_refused(client):
    with pytest.raises(ConfigError, match=r"no worker .* offers GPU=1.*--resources GPU=1"):
        check_resources(client, {"GPU": 1})
    check_resources(client, None)


def test_gpu_profile_annotates_the_infer_layer(random_model, scene_path, tmp_path):
    from geoseg.graph import build_segmentation

    job = tmp_path / "gpu.yaml"
    job.write_text(yaml.safe_dump({
        "scenes": [str(scene_path)], "model": str(random_model), "output": str(tmp_path / "out"),
        "chunking": {"chunk_size": 128},
        "cluster": {"profile": "gpu", "profiles": {"gpu": {"kind": "slurm", "cores": 4, "memory": "16GiB",
                                                           "model_resources": {"GPU": 1}}}},
    }))
    (scene,) = plan(validate_spec(job, env={}, config_files=[])).scenes
    opts = scene.job.options
    assert opts.model_resources == {"GPU": 1}
    seg = build_segmentation(scene.job.stack, scene.job.plan, scene.job.ref, scene.job.settings("fp32"), opts.model_resources)
    assert seg.graph.layers[seg.infer_name].annotations == {"resources": {"GPU": 1}}
    others = [name for name in seg.graph.layers if name != seg.infer_name]
    assert others and all(not seg.graph.layers[name].annotations for name in others)


def test_slurm_job_script_renders_without_slurm():
    profile = pipeline_profile("slurm_gpu")
    script = profile.job_script()
    assert script.startswith("#!/usr/bin/env bash")
    for line in ("#SBATCH -p gpu", "#SBATCH -A geo-segmentation", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64G",
                 "#SBATCH -t 04:00:00", "#SBATCH --gres=gpu:1", 'source "$HOME/geoseg/.venv/bin/activate"'):
        assert line in script.splitlines(), line
    (command,) = [ln for ln in script.splitlines() if "distributed.cli.dask_worker" in ln]
    assert "--nthreads 8" in command and "--memory-limit 64.00GiB" in command
    assert "--resources GPU=1" in command and "--interface ib0" in command


def test_slurm_cluster_renders_the_same_script():
    """What SLURMCluster(...).job_script() renders, with its scheduler on localhost for the test."""
    from dask_jobqueue import SLURMCluster

    profile = pipeline_profile("slurm_gpu")
    kw = profile.jobqueue_kwargs()
    kw.pop("interface")  # a test machine has no ib0; the scheduler binds localhost below
    cluster = SLURMCluster(**kw, scheduler_options={"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"})
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    ours = profile.model_copy(update={"interface": None}).job_script()
    norm = lambda s: re.sub(r"tcp://\S+", "ADDRESS", s).replace("dummy-name", "NAME").replace("geoseg-worker", "NAME")
    assert norm(script) == norm(ours)


def test_slurm_without_sbatch_says_where_to_run(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert shutil.which("sbatch") is None
    with pytest.raises(ConfigError, match=r"sbatch, which is not on this machine's PATH.*--dry-run"):
        with connect_profile(pipeline_profile("slurm_gpu"), "slurm"):
            pass


def test_slurm_needs_cores_and_memory():
    with dask.config.set({"jobqueue.slurm.cores": None, "jobqueue.slurm.memory": None}):
        with pytest.raises(ConfigError, match="cores: and memory:"):
            SlurmProfile(queue="cpu").job_script()


def test_kubernetes_manifest_for_gpu_workers():
    profile = pipeline_profile("kubernetes_gpu")
    m = profile.manifest()
    assert (m["apiVersion"], m["kind"], m["metadata"]) == ("kubernetes.dask.org/v1", "DaskCluster",
                                                           {"name": "geoseg", "namespace": "geoseg"})
    (worker,) = m["spec"]["worker"]["spec"]["containers"]
    assert worker["image"] == DEFAULT_IMAGE and worker["command"] == ["dask"]
    assert worker["args"][:1] == ["worker"] and "--resources" in worker["args"]
    assert worker["args"][worker["args"].index("--resources") + 1] == "GPU=1"
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    (scheduler,) = m["spec"]["scheduler"]["spec"]["containers"]
    assert scheduler["command"] == ["dask"] and scheduler["args"][0] == "scheduler"
    assert KubernetesProfile().manifest()["spec"]["worker"]["spec"]["containers"][0].get("resources") is None


def test_kubernetes_create_needs_dask_kubernetes():
    try:
        import dask_kubernetes  # noqa: F401
        pytest.skip("dask-kubernetes is installed here")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match=r"create: true.*pip install dask-kubernetes"):
        with connect_profile(KubernetesProfile(create=True), "k8s"):
            pass


def test_kubernetes_address_from_the_profile_or_the_operator():
    with dask.config.set({"scheduler-address": None}):
        with pytest.raises(ConfigError, match="no scheduler address.*DASK_SCHEDULER_ADDRESS"):
            with connect_profile(KubernetesProfile(), "k8s"):
                pass
    with dask.config.set({"scheduler-address": "tcp://geoseg-scheduler.geoseg:8786"}):
        assert KubernetesProfile().scheduler_address() == "tcp://geoseg-scheduler.geoseg:8786"
        assert KubernetesProfile(address="tcp://other:8786").scheduler_address() == "tcp://other:8786"


def test_address_profile_checks(tmp_path):
    with pytest.raises(ValueError, match="unknown protocol"):
        AddressProfile(address="http://h:8786")
    with pytest.raises(ValueError, match="not a tls:// address"):
        AddressProfile(address="tcp://h:8786", tls=TLSFiles(ca_file="a", cert_file="b", key_file="c"))
    p = AddressProfile(address="tls://h:8786", tls=TLSFiles(ca_file=str(tmp_path / "ca.pem"), cert_file="b", key_file="c"))
    with pytest.raises(ConfigError, match=r"ca\.pem: no such file \(tls\.ca_file"):
        p.security()


def test_unreachable_scheduler_is_a_clear_error():
    with pytest.raises(ConfigError, match="cannot reach the dask scheduler at tcp://127.0.0.1:9"):
        with connect_profile(AddressProfile(address="tcp://127.0.0.1:9", timeout="1s")):
            pass


def test_scheduler_option_keeps_tls_files_of_the_profile():
    path = PIPELINES / "address_tls.yaml"
    spec = validate_spec(path, env={}, config_files=[], scheduler="tls://other.example.org:8786")
    assert spec.cluster.profile == "scheduler"
    assert spec.profile.address == "tls://other.example.org:8786"
    assert spec.profile.tls == spec.cluster.profiles["secure"].tls and spec.profile.model_resources == {"GPU": 1}
    spec = validate_spec(PIPELINES / "sample_local.yaml", env={}, config_files=[], scheduler="tcp://127.0.0.1:8786")
    assert spec.profile.kind == "address" and spec.profile.tls is None


def test_scheduler_option_keeps_resources_spelled_with_hyphens(tmp_path):
    """Job files may spell settings with hyphens (model-resources); --scheduler keeps them too (it kept only
    model_resources, so the model tasks lost their GPU annotation and ran on any worker)."""
    job = tmp_path / "job.yaml"
    job.write_text("name: j\nscenes: [a.tif]\nmodel: m\noutput: out\ncluster:\n  profile: gpu\n  profiles:\n"
                   "    gpu: {kind: local, model-resources: {GPU: 1}, device: cuda}\n")
    assert validate_spec(job, env={}, config_files=[]).profile.model_resources == {"GPU": 1}
    spec = validate_spec(job, env={}, config_files=[], scheduler="tcp://127.0.0.1:8786")
    assert spec.profile.kind == "address" and spec.profile.model_resources == {"GPU": 1} and spec.profile.device == "cuda"


def test_a_wrong_port_is_a_clear_error_within_the_timeout_not_a_hang():
    """Something else on the port: a service that never answers (a dashboard's HTTP server waits for a request)
    or one that greets first (read as a frame length of exabytes); a tls:// address without certificates."""
    import socket
    import threading
    import time

    from geoseg.cluster import connect
    from geoseg.errors import ConfigError

    def serve(greeting: bytes | None) -> tuple[socket.socket, str]:
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen()

        def loop():
            conns = []
            while True:
                try:
                    c, _ = srv.accept()
                except OSError:
                    return
                conns.append(c)
                if greeting:
                    c.sendall(greeting)

        threading.Thread(target=loop, daemon=True).start()
        return srv, f"tcp://127.0.0.1:{srv.getsockname()[1]}"

    for greeting, match in ((None, r"nothing answered as a dask scheduler at tcp://127.0.0.1:\d+ within 4 s"),
                            (b"SSH-2.0-OpenSSH_9.6\r\n" * 4, r"did not answer as a dask scheduler")):
        srv, address = serve(greeting)
        t0 = time.monotonic()
        try:
            with pytest.raises(ConfigError, match=match):
                with connect(address, timeout="2s"):
                    pass
        finally:
            srv.close()
        assert time.monotonic() - t0 < 15
    with pytest.raises(ConfigError, match=r"tls://127.0.0.1:9 is a TLS address and no certificate was given"):
        with connect("tls://127.0.0.1:9", timeout="2s"):
            pass


def test_slurm_workers_run_the_python_their_prologue_activates():
    """A prologue that activates an environment: the worker command is that environment's `python`, not this
    machine's interpreter by its absolute path (the activation would not choose what runs)."""
    import sys

    script = SlurmProfile(cores=4, memory="8GiB", job_script_prologue=["source /projects/geoseg/venv/bin/activate"]).job_script()
    (command,) = [ln for ln in script.splitlines() if "distributed.cli.dask_worker" in ln]
    assert command.startswith("python -m distributed.cli.dask_worker")
    assert sys.executable not in script
    # without one, or with python: set, dask-jobqueue's choice stands
    assert sys.executable in SlurmProfile(cores=4, memory="8GiB").job_script()
    assert "/opt/py/bin/python3 -m" in SlurmProfile(cores=4, memory="8GiB", python="/opt/py/bin/python3",
                                                    job_script_prologue=["conda activate geo"]).job_script()


def test_kubernetes_manifest_over_tls_mounts_the_certificates_and_speaks_tls():
    profile = KubernetesProfile(address="tls://geoseg-scheduler.geoseg.svc.cluster.local:8786",
                                tls={"ca_file": "ca.pem", "cert_file": "c.pem", "key_file": "k.pem"})
    spec = profile.manifest()["spec"]
    for part in ("scheduler", "worker"):
        pod = spec[part]["spec"]
        (container,) = pod["containers"]
        args = container["args"]
        for flag, file in (("--tls-ca-file", "ca.crt"), ("--tls-cert", "tls.crt"), ("--tls-key", "tls.key")):
            assert args[args.index(flag) + 1] == f"/etc/dask/tls/{file}"
        assert {"name": "tls", "secret": {"secretName": "geoseg-tls"}} in pod["volumes"]
        assert {"name": "tls", "mountPath": "/etc/dask/tls", "readOnly": True} in container["volumeMounts"]
    sched = spec["scheduler"]["spec"]["containers"][0]["args"]
    assert sched[sched.index("--protocol") + 1] == "tls"
    plain = KubernetesProfile().manifest()["spec"]["scheduler"]["spec"]["containers"][0]
    assert "--protocol" not in plain["args"] and "volumeMounts" not in plain
    # a cluster geoseg would create could not get the certificates: refused, saying what to do
    with pytest.raises(ValueError, match="create: true with tls: makes a cluster geoseg cannot give its certificates"):
        KubernetesProfile(create=True, tls={"ca_file": "ca.pem", "cert_file": "c.pem", "key_file": "k.pem"})
