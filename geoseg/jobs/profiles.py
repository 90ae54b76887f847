"""Cluster profiles: where a job runs, as validated settings (``cluster.profiles.NAME`` in a job).

* ``local``: an embedded LocalCluster on this machine, listening on 127.0.0.1 only (the default).
* ``address``: an existing scheduler, optionally over mutual TLS (``tls://`` + CA, cert, key).
* ``slurm``: a dask-jobqueue SLURMCluster; its job script renders without SLURM.
* ``kubernetes``: the scheduler service of a Dask operator ``DaskCluster`` (or one created
  from the rendered manifest with dask-kubernetes, imported only then).

``model_resources`` (for example ``{GPU: 1}``) annotates the model tasks with a dask worker
resource, so they run only on workers started with ``--resources GPU=1``; profiles that
start their own workers give them ``worker_resources``, by default the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, field_validator, model_validator

from geoseg.errors import ConfigError

KINDS = ("local", "address", "slurm", "kubernetes")
SCHEMES = ("tcp", "tls", "ucx", "ws", "wss", "inproc")
# The image infra/docker/Dockerfile builds; manifests and the kubernetes profile name it.
DEFAULT_IMAGE = "ghcr.io/geoseg/geoseg:0.1.0"
SCHEDULER_PORT, DASHBOARD_PORT, WORKER_DASHBOARD_PORT = 8786, 8787, 8788
DATA_MOUNT = "/data"
TLS_MOUNT = "/etc/dask/tls"  # where pods find the cluster's certificates under TLS (a Secret)
# The image's user (infra/docker/Dockerfile); fsGroup lets it write the shared volume.
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001}


def _takes_bool(annotation: Any) -> bool:
    """Whether a field of this annotation takes true/false (pydantic's lax mode would turn them into 1 and 0)."""
    import typing

    if annotation is bool or annotation is Any:
        return True
    return any(_takes_bool(a) for a in typing.get_args(annotation) if a is not type(None))


def _duration(v: str) -> str:
    """A dask duration ("30s", "2 minutes", 45): refused here rather than when the job runs."""
    from dask.utils import parse_timedelta

    try:
        seconds = parse_timedelta(v, default="s")
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"{v!r} is no duration; write for example 30s, 2m or 2 minutes") from None
    if seconds is None or seconds <= 0:
        raise ValueError(f"{v!r}: a timeout must be longer than 0 s")
    return v


class Settings(BaseModel):
    """Base of geoseg's settings models: frozen, unknown keys refused, ``a-b`` accepted for ``a_b``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _underscores(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out: dict[Any, Any] = {}
        for k, v in data.items():  # both spellings in one layer are refused where layers merge (geoseg.jobs.config)
            key = k.replace("-", "_") if isinstance(k, str) and k.replace("-", "_") in cls.model_fields else k
            field = cls.model_fields.get(key)
            if isinstance(v, bool) and field is not None and not _takes_bool(field.annotation):
                raise ValueError(f"{key}: {str(v).lower()} is a yes/no value, not what {key} takes")
            out[key] = v
        return out


Resources = dict[str, Annotated[float, Field(gt=0)]]


def _resource_args(resources: dict[str, float] | None) -> list[str]:
    if not resources:
        return []
    return ["--resources", ",".join(f"{k}={v:g}" for k, v in resources.items())]


class TLSFiles(Settings):
    """Mutual TLS: the CA that signed the cluster's certificates, and this client's certificate and key."""

    ca_file: str
    cert_file: str
    key_file: str

    def security(self) -> Any:
        from distributed.security import Security

        for field in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, field)
            if not Path(path).is_file():
                raise ConfigError(f"{path}: no such file (tls.{field} of the cluster profile); check the path")
        return Security(tls_ca_file=self.ca_file, tls_client_cert=self.cert_file, tls_client_key=self.key_file,
                        require_encryption=True)


class Profile(Settings):
    kind: str
    model_resources: Resources | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"


class LocalProfile(Profile):
    """An embedded LocalCluster: worker processes on this machine, bound to 127.0.0.1."""

    kind: Literal["local"] = "local"
    n_workers: PositiveInt | None = None
    threads_per_worker: PositiveInt = 1
    memory_limit: str | float | None = "auto"
    worker_resources: Resources | None = None

    @field_validator("memory_limit")
    @classmethod
    def _bytes(cls, v: str | float | None) -> str | float | None:
        if isinstance(v, str) and v != "auto":
            from dask.utils import parse_bytes

            try:
                parse_bytes(v)
            except ValueError:
                raise ValueError(f"{v!r} is no memory size; write for example 4GiB, 0.5 (of the machine) or auto") from None
        return v

    @property
    def resources(self) -> dict[str, float] | None:
        return self.worker_resources if self.worker_resources is not None else self.model_resources


def _check_address(v: str) -> str:
    scheme, sep, rest = v.partition("://")
    if sep and scheme not in SCHEMES:
        raise ValueError(f"{v!r}: unknown protocol {scheme}://; use tcp:// or tls://")
    if not (rest if sep else v).strip():
        raise ValueError("empty scheduler address; write for example tls://scheduler.example.org:8786")
    return v


class AddressProfile(Profile):
    """A running scheduler reached at ``address``; ``tls`` for a ``tls://`` address."""

    kind: Literal["address"] = "address"
    address: str
    tls: TLSFiles | None = None
    timeout: str = "30s"

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        return _check_address(v)

    @field_validator("timeout", mode="before")
    @classmethod
    def _timeout(cls, v: Any) -> str:
        return _duration(str(v))

    @model_validator(mode="after")
    def _tls_matches(self) -> "AddressProfile":
        _check_tls(self.address, self.tls)
        return self

    def security(self) -> Any:
        return self.tls.security() if self.tls else None


def _check_tls(address: str | None, tls: TLSFiles | None) -> None:
    if not address:
        return
    if address.startswith("tls://") and tls is None:
        raise ValueError(f"{address} is a TLS address; add tls: {{ca_file: ..., cert_file: ..., key_file: ...}}")
    if tls is not None and not address.startswith("tls://"):
        raise ValueError(f"tls files given but {address} is not a tls:// address; write tls://HOST:PORT")


class SlurmProfile(Profile):
    """A dask-jobqueue SLURMCluster; unset fields come from dask-jobqueue's config (``jobqueue.slurm``)."""

    kind: Literal["slurm"] = "slurm"
    queue: str | None = None
    account: str | None = None
    cores: PositiveInt | None = None
    memory: str | None = None
    processes: PositiveInt | None = None
    walltime: str | None = None
    job_name: str | None = None
    job_extra_directives: list[str] = []
    job_script_prologue: list[str] = []
    worker_extra_args: list[str] = []
    interface: str | None = None
    local_directory: str | None = None
    python: str | None = None
    scheduler_options: dict[str, Any] = {}
    jobs: PositiveInt = 1
    maximum_jobs: PositiveInt | None = None  # set: adapt between `jobs` and this many jobs
    worker_resources: Resources | None = None
    tls: bool = False  # temporary certificates, handed to workers through shared_temp_directory
    shared_temp_directory: str | None = None

    @property
    def resources(self) -> dict[str, float] | None:
        return self.worker_resources if self.worker_resources is not None else self.model_resources

    @model_validator(mode="after")
    def _jobs(self) -> "SlurmProfile":
        if self.maximum_jobs is not None and self.maximum_jobs < self.jobs:
            raise ValueError(f"maximum_jobs ({self.maximum_jobs}) is below jobs ({self.jobs}); raise it or drop it")
        return self

    def jobqueue_kwargs(self) -> dict[str, Any]:
        """Keywords for ``SLURMCluster``: the fields set here; the rest come from dask-jobqueue's config."""
        import dask.config

        fields = ("queue", "account", "cores", "memory", "processes", "walltime", "job_name", "interface",
                  "local_directory", "python")
        kw: dict[str, Any] = {f: getattr(self, f) for f in fields if getattr(self, f) is not None}
        if self.job_extra_directives:
            kw["job_extra_directives"] = list(self.job_extra_directives)
        if self.job_script_prologue:
            kw["job_script_prologue"] = list(self.job_script_prologue)
        prologue = self.job_script_prologue or dask.config.get("jobqueue.slurm.job-script-prologue", None) or []
        if self.python is None and not dask.config.get("jobqueue.slurm.python", None) and any("activate" in line for line in prologue):
            # dask-jobqueue would start workers with this machine's interpreter by its absolute path, and the
            # environment the prologue activates (a venv, conda) would not be the one that runs them
            kw["python"] = "python"
        base_args = list(self.worker_extra_args or dask.config.get("jobqueue.slurm.worker-extra-args", None) or [])
        extra = base_args + ([] if "--resources" in base_args else _resource_args(self.resources))
        if extra:
            kw["worker_extra_args"] = extra
        return kw

    def job_script(self) -> str:
        """The sbatch script of one worker job, as SLURMCluster(...).job_script() renders it (no SLURM needed).

        Rendered from the job class with a placeholder scheduler address, as dask-jobqueue does
        before its scheduler starts, so nothing listens on a port for a dry run.
        """
        try:
            from dask_jobqueue.slurm import SLURMJob
        except ImportError:
            raise ConfigError("the slurm profile needs dask-jobqueue: pip install dask-jobqueue") from None
        scheme = "tls" if self.tls else "tcp"
        try:
            job = SLURMJob(f"{scheme}://<scheduler-address>:{SCHEDULER_PORT}", name="geoseg-worker",
                           protocol=f"{scheme}://" if self.tls else None, **self.jobqueue_kwargs())
        except ValueError as exc:
            raise ConfigError(f"slurm profile: {exc}; set cores: and memory: in the profile (or jobqueue.slurm)") from None
        return job.job_script()


class KubernetesProfile(Profile):
    """A Dask operator cluster: reach its scheduler service, or create it from the manifest."""

    kind: Literal["kubernetes"] = "kubernetes"
    address: str | None = None  # None: dask's scheduler-address ($DASK_SCHEDULER_ADDRESS in DaskJob pods)
    tls: TLSFiles | None = None
    timeout: str = "60s"
    create: bool = False
    name: str = Field("geoseg", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    namespace: str | None = None
    image: str = DEFAULT_IMAGE
    n_workers: PositiveInt = 2
    threads_per_worker: PositiveInt = 1
    worker_resources: Resources | None = None
    gpus_per_worker: NonNegativeInt | None = None  # None: worker_resources' GPU count
    worker_cpu: str | None = None
    worker_memory: str | None = None
    data_claim: str | None = None  # a PersistentVolumeClaim mounted at /data in every pod
    # with tls: the Secret (ca.crt, tls.crt, tls.key) the scheduler and workers take their certificates from
    tls_secret: str | None = None

    @field_validator("timeout", mode="before")
    @classmethod
    def _timeout(cls, v: Any) -> str:
        return _duration(str(v))

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        return v if v is None else _check_address(v)

    @model_validator(mode="after")
    def _tls_matches(self) -> "KubernetesProfile":
        _check_tls(self.address, self.tls)
        if self.tls is not None and self.create:
            # the cluster would come up without the Secret, and dask-kubernetes connects to it over tcp://
            raise ValueError("create: true with tls: makes a cluster geoseg cannot give its certificates; create the Secret "
                             "and apply the manifest (geoseg run JOB --dry-run prints it), then set address: to its "
                             "tls:// service and drop create:")
        if self.tls_secret and self.tls is None:
            raise ValueError("tls_secret: is for a cluster over TLS; add tls: {ca_file, cert_file, key_file} (the client's)")
        return self

    @property
    def secret(self) -> str:
        """The Secret with the cluster's own certificates (ca.crt, tls.crt, tls.key), under TLS."""
        return self.tls_secret or f"{self.name}-tls"

    @property
    def resources(self) -> dict[str, float] | None:
        return self.worker_resources if self.worker_resources is not None else self.model_resources

    @property
    def gpus(self) -> int:
        if self.gpus_per_worker is not None:
            return self.gpus_per_worker
        return int((self.resources or {}).get("GPU", 0))

    def scheduler_address(self) -> str | None:
        import dask.config

        return self.address or dask.config.get("scheduler-address", None)



    def security(self) -> Any:
        return self.tls.security() if self.tls else None

    def manifest(self) -> dict[str, Any]:
        """The ``DaskCluster`` resource (kubernetes.dask.org/v1) of this profile."""
        return {
            "apiVersion": "kubernetes.dask.org/v1",
            "kind": "DaskCluster",
            "metadata": {"name": self.name, **({"namespace": self.namespace} if self.namespace else {})},
            "spec": cluster_spec(self),
        }


def _volumes(claim: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    if not claim:
        return {}, {}
    return ({"volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}]},
            {"volumeMounts": [{"name": "data", "mountPath": DATA_MOUNT}]})


def cluster_spec(p: KubernetesProfile) -> dict[str, Any]:
    """The ``spec`` of a DaskCluster (also the ``cluster.spec`` of a DaskJob).

    The geoseg image's entrypoint is ``geoseg``, so the scheduler and worker containers set
    ``command: [dask]``.
    """
    pod_volumes, mounts = _volumes(p.data_claim)
    limits: dict[str, Any] = {}
    if p.gpus:
        limits["nvidia.com/gpu"] = p.gpus
    if p.worker_cpu:
        limits["cpu"] = p.worker_cpu
    if p.worker_memory:
        limits["memory"] = p.worker_memory
    # under TLS every pod takes the cluster's certificates from a Secret, and speaks tls:// only
    tls_args = ["--tls-ca-file", f"{TLS_MOUNT}/ca.crt", "--tls-cert", f"{TLS_MOUNT}/tls.crt", "--tls-key", f"{TLS_MOUNT}/tls.key"]
    tls_args = tls_args if p.tls else []
    if p.tls:
        pod_volumes = {"volumes": [*pod_volumes.get("volumes", []), {"name": "tls", "secret": {"secretName": p.secret}}]}
        mounts = {"volumeMounts": [*mounts.get("volumeMounts", []), {"name": "tls", "mountPath": TLS_MOUNT, "readOnly": True}]}
    worker_args = ["worker", "--name", "$(DASK_WORKER_NAME)", "--nthreads", str(p.threads_per_worker),
                   "--dashboard", "--dashboard-address", str(WORKER_DASHBOARD_PORT), *_resource_args(p.resources), *tls_args]
    worker = {
        "name": "worker",
        "image": p.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["dask"],
        "args": worker_args,
        "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}],
        "ports": [{"name": "http-dashboard", "containerPort": WORKER_DASHBOARD_PORT, "protocol": "TCP"}],
        # Requests equal limits: extended resources (GPUs) cannot be overcommitted anyway.
        **({"resources": {"limits": limits, "requests": dict(limits)}} if limits else {}),
        **mounts,
    }
    scheduler = {
        "name": "scheduler",
        "image": p.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["dask"],
        "args": ["scheduler", "--port", str(SCHEDULER_PORT), "--dashboard-address", f":{DASHBOARD_PORT}",
                 *(["--protocol", "tls", *tls_args] if p.tls else [])],
        "ports": [{"name": "tcp-comm", "containerPort": SCHEDULER_PORT, "protocol": "TCP"},
                  {"name": "http-dashboard", "containerPort": DASHBOARD_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"port": "http-dashboard", "path": "/health"}, "initialDelaySeconds": 5, "periodSeconds": 10},
        "livenessProbe": {"httpGet": {"port": "http-dashboard", "path": "/health"}, "initialDelaySeconds": 15, "periodSeconds": 20},
    }
    # GPU nodes are usually tainted so that only pods asking for GPUs land there.
    tolerations = {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]} if p.gpus else {}
    return {
        "worker": {"replicas": p.n_workers,
                   "spec": {"securityContext": dict(POD_SECURITY), "containers": [worker], **pod_volumes, **tolerations}},
        "scheduler": {
            "spec": {"securityContext": dict(POD_SECURITY), "containers": [{**scheduler, **mounts}] if p.tls else [scheduler],
                     **(pod_volumes if p.tls else {})},
            "service": {
                "type": "ClusterIP",
                "selector": {"dask.org/cluster-name": p.name, "dask.org/component": "scheduler"},
                "ports": [{"name": "tcp-comm", "protocol": "TCP", "port": SCHEDULER_PORT, "targetPort": "tcp-comm"},
                          {"name": "http-dashboard", "protocol": "TCP", "port": DASHBOARD_PORT, "targetPort": "http-dashboard"}],
            },
        },
    }


PROFILE_CLASSES = (LocalProfile, AddressProfile, SlurmProfile, KubernetesProfile)
AnyProfile = Annotated[Union[LocalProfile, AddressProfile, SlurmProfile, KubernetesProfile], Field(discriminator="kind")]


def scheduler_profile(address: str, like: dict[str, Any] | None) -> dict[str, Any]:
    """``--scheduler ADDRESS`` as a profile: TLS files, resources and device kept from ``like`` where it has them."""
    like = like if isinstance(like, dict) else {}
    like = {k.replace("-", "_") if isinstance(k, str) else k: v for k, v in like.items()}  # model-resources is model_resources
    out: dict[str, Any] = {"kind": "address", "address": address}
    for key in ("model_resources", "device", "timeout"):
        if like.get(key) is not None:
            out[key] = like[key]
    if address.startswith("tls://") and like.get("tls") is not None:
        out["tls"] = like["tls"]
    return out
