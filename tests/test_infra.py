"""infra/: Dockerfiles, Kubernetes manifests and SLURM files parse, name the geoseg image and
command, and agree with the pipelines and profiles they run."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import dask.config
import pytest
import yaml

from geoseg.jobs import validate_spec
from geoseg.jobs.profiles import DEFAULT_IMAGE, POD_SECURITY, SlurmProfile, cluster_spec

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kubernetes_profile(name: str):
    spec = validate_spec(ROOT / "pipelines" / "kubernetes_gpu.yaml", env={}, config_files=[])
    return spec.cluster.profiles[name]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfiles(name):
    base = r"python:3\.11-slim"  # the Python constraints.txt was frozen on
    ins = dockerfile_instructions(INFRA / "docker" / name)
    args = dict(rest.split("=", 1) for word, rest in ins if word == "ARG" and "=" in rest)
    froms = [rest.split()[0] for word, rest in ins if word == "FROM"]
    images = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], f) for f in froms]
    assert images and all(re.match(base, i) for i in images), images
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    assert "-c constraints.txt" in runs and '".[cluster]"' in runs
    copies = [rest for word, rest in ins if word == "COPY"]
    assert any("constraints.txt" in c for c in copies)
    # The last stage runs as a named, non-root user and enters through geoseg.
    last = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    users = [rest for word, rest in ins[last:] if word == "USER"]
    assert users and users[-1] not in ("root", "0") and not users[-1].startswith("0:")
    assert ("ENTRYPOINT", '["geoseg"]') in ins[last:]
    for c in copies:  # what the images copy from the context exists
        if "--from=" not in c:
            for src in shlex.split(c)[:-1]:
                assert list(ROOT.glob(src.rstrip("/"))), (name, src)
    # LightGBM (pixel models) needs the system's OpenMP in the image that runs it
    assert "libgomp1" in " ".join(rest for word, rest in ins[last:] if word == "RUN")
    ignore = (INFRA / "docker" / f"{name}.dockerignore").read_text().split()
    assert "*" in ignore and "!geoseg/" in ignore and "!constraints.txt" in ignore


def test_gpu_image_states_the_driver_torch_s_cuda_needs():
    """torch's wheels bring their CUDA libraries: the image is no CUDA image, and says which driver the pinned build needs."""
    pins = dict(ln.split("#")[0].strip().split("==") for ln in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in ln.split("#")[0])
    major = pins["nvidia-cuda-runtime"].split(".")[0]
    text = (INFRA / "docker" / "Dockerfile").read_text()
    assert "nvidia/cuda" not in text and f"CUDA {major}.0" in text and f"cuda{major}" not in text
    assert "--user" in (INFRA / "README.md").read_text()  # the mounted folder is the host user's




def test_daskcluster_manifest_is_the_kubernetes_profile():
    (m,) = docs(INFRA / "kubernetes" / "daskcluster.yaml")
    assert m["apiVersion"] == "kubernetes.dask.org/v1" and m["kind"] == "DaskCluster"
    assert m == kubernetes_profile("kubernetes").manifest()
    (worker,) = m["spec"]["worker"]["spec"]["containers"]
    assert worker["image"] == DEFAULT_IMAGE and worker["command"] == ["dask"] and worker["args"][0] == "worker"
    assert "GPU=1" in worker["args"] and worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert m["spec"]["worker"]["spec"]["securityContext"]["runAsNonRoot"] is True
    # The `shared` profile's address is this cluster's scheduler service.
    service = f"tcp://{m['metadata']['name']}-scheduler.{m['metadata']['namespace']}.svc.cluster.local:8786"
    assert kubernetes_profile("shared").address == service


def _pipeline_in_args(args: list[str]) -> Path:
    assert args[:1] == ["run"] and args[1].startswith("/pipelines/")
    local = ROOT / "pipelines" / Path(args[1]).name
    assert local.is_file()
    return local


def _pipelines_mounted(pod: dict, container: dict) -> None:
    mounts = {v["name"]: v["mountPath"] for v in container["volumeMounts"]}
    assert mounts["pipelines"] == "/pipelines" and mounts["data"] == "/data"
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["pipelines"]["configMap"]["name"] == "geoseg-pipelines"
    assert vols["data"]["persistentVolumeClaim"]["claimName"] == kubernetes_profile("kubernetes").data_claim
    assert pod["securityContext"] == POD_SECURITY


def test_daskjob_runs_a_pipeline_on_its_own_cluster():
    (job,) = docs(INFRA / "kubernetes" / "daskjob.yaml")
    assert job["apiVersion"] == "kubernetes.dask.org/v1" and job["kind"] == "DaskJob"
    pod = job["spec"]["job"]["spec"]
    (runner,) = pod["containers"]
    assert runner["image"] == DEFAULT_IMAGE and "command" not in runner  # the image's geoseg entrypoint
    pipeline = _pipeline_in_args(runner["args"])
    profile = runner["args"][runner["args"].index("--profile") + 1]
    spec = validate_spec(pipeline, env={}, config_files=[], profile=profile)
    # The profile connects to $DASK_SCHEDULER_ADDRESS, which the operator sets in this pod.
    assert spec.profile.kind == "kubernetes" and spec.profile.address is None
    _pipelines_mounted(pod, runner)
    name = job["metadata"]["name"]
    assert job["spec"]["cluster"]["spec"] == cluster_spec(spec.profile.model_copy(update={"name": name}))


def test_cronjob_runs_a_pipeline_on_the_shared_cluster():
    (cron,) = docs(INFRA / "kubernetes" / "cronjob.yaml")
    assert cron["apiVersion"] == "batch/v1" and cron["kind"] == "CronJob"
    assert len(cron["spec"]["schedule"].split()) == 5 and cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == DEFAULT_IMAGE and "command" not in c
    pipeline = _pipeline_in_args(c["args"])
    profile = c["args"][c["args"].index("--profile") + 1]
    spec = validate_spec(pipeline, env={}, config_files=[], profile=profile)
    assert spec.profile.kind == "kubernetes" and spec.profile.address.endswith(".svc.cluster.local:8786")
    _pipelines_mounted(pod, c)


def test_jobqueue_config_fills_a_bare_slurm_profile():
    (cfg,) = docs(INFRA / "slurm" / "jobqueue.yaml")
    slurm = cfg["jobqueue"]["slurm"]
    assert "--resources" not in " ".join(slurm.get("worker-extra-args") or [])  # geoseg adds it
    import dask_jobqueue  # noqa: F401  (its defaults first; the file's values go over them)

    with dask.config.set({f"jobqueue.slurm.{k}": v for k, v in slurm.items()}):
        script = SlurmProfile(model_resources={"GPU": 1}).job_script()
        assert f"#SBATCH -p {slurm['queue']}" in script and "#SBATCH --gres=gpu:1" in script
        assert f"#SBATCH --cpus-per-task={slurm['cores']}" in script and "#SBATCH --mem=64G" in script
        assert "--resources GPU=1" in script and script.count("--resources") == 1
        # A profile's own fields win over the config file.
        assert "#SBATCH -p debug" in SlurmProfile(queue="debug").job_script()


def test_sbatch_script_runs_geoseg_with_a_slurm_profile():
    path = INFRA / "slurm" / "geoseg.sbatch"
    text = path.read_text()
    assert text.startswith("#!/bin/bash") and re.search(r"^#SBATCH --time=", text, re.M)
    if shutil.which("bash"):
        subprocess.run(["bash", "-n", str(path)], check=True)
    (cmd,) = [ln for ln in text.splitlines() if ln.startswith("exec geoseg run")]
    assert "--profile" in shlex.split(cmd)
    default_job = re.search(r"JOB_FILE=\$\{1:-([^}]+)\}", text).group(1)
    default_profile = re.search(r"PROFILE=\$\{GEOSEG_PROFILE:-([^}]+)\}", text).group(1)
    spec = validate_spec(ROOT / default_job, env={}, config_files=[], profile=default_profile)
    assert spec.profile.kind == "slurm"
    assert "infra/slurm" in text  # dask-jobqueue's config comes from jobqueue.yaml


def test_readme_explains_every_file():
    readme = (INFRA / "README.md").read_text()
    for p in INFRA.rglob("*"):
        if p.is_file() and p.name != "README.md" and not p.name.endswith(".dockerignore"):
            assert p.name in readme, p


def test_slurm_files_agree_and_start_on_any_node():
    """One venv for client and workers; no CUDA module (torch brings CUDA); scratch that exists where SLURM sets no TMPDIR."""
    sbatch = (INFRA / "slurm" / "geoseg.sbatch").read_text()
    venv = re.search(r"VENV=\$\{GEOSEG_VENV:-([^}]+)\}", sbatch).group(1)
    (cfg,) = docs(INFRA / "slurm" / "jobqueue.yaml")
    slurm = cfg["jobqueue"]["slurm"]
    profile = validate_spec(ROOT / "pipelines" / "slurm_gpu.yaml", env={}, config_files=[]).profile
    for prologue, scratch in ((slurm["job-script-prologue"], slurm["local-directory"]),
                              (profile.job_script_prologue, profile.local_directory)):
        assert any(venv in line and "activate" in line for line in prologue), prologue
        assert not any("module load cuda" in line for line in prologue)
        assert scratch in ("${TMPDIR:-/tmp}",) or "$" not in scratch
    script = profile.job_script()
    line = next(ln for ln in script.splitlines() if "dask_worker" in ln or "dask-worker" in ln)
    env = {"PATH": "/usr/bin:/bin"}  # no TMPDIR: the worker's arguments still parse as meant
    words = subprocess.run(["bash", "-c", 'printf "%s\\n" ' + line.split(" ", 1)[1].replace("<scheduler-address>", "host")], env=env, capture_output=True,
                           text=True, check=True).stdout.split()
    assert words[words.index("--local-directory") + 1] == "/tmp" and words[words.index("--resources") + 1] == "GPU=1"


def test_pipeline_paths_start_at_the_job_file_s_folder():
    """Relative paths in pipelines/ resolve from pipelines/: none may land inside it (a read-only ConfigMap in Kubernetes)."""
    inside = ROOT / "pipelines"
    for job in sorted(inside.glob("*.yaml")):
        spec = validate_spec(job, env={}, config_files=[])
        tls = getattr(spec.profile, "tls", None)
        paths = [spec.model, spec.output, *(p for sc in spec.scenes for p in ([sc.path] if sc.path else sc.bands))]
        paths += [getattr(tls, f) for f in ("ca_file", "cert_file", "key_file")] if tls and not isinstance(tls, bool) else []
        for p in paths:
            assert not Path(str(p)).resolve().is_relative_to(inside), (job.name, p)


def test_dry_run_of_a_profile_that_reaches_a_running_cluster_prints_no_manifest():
    from click.testing import CliRunner

    from geoseg.cli.main import cli

    job = str(ROOT / "pipelines" / "kubernetes_gpu.yaml")
    shared = CliRunner().invoke(cli, ["run", job, "--profile", "shared", "--dry-run"])
    own = CliRunner().invoke(cli, ["run", job, "--profile", "kubernetes", "--dry-run"])
    assert "kind: DaskCluster" not in shared.output and "makes none" in shared.output
    assert "kind: DaskCluster" in own.output
