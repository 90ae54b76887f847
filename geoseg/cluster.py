"""Where the graph runs: an embedded LocalCluster (localhost only), an existing scheduler, or the
cluster a profile (geoseg.jobs.profiles) describes: SLURM through dask-jobqueue, Kubernetes."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from typing import Any, Callable, Iterator, Sequence

from geoseg.errors import ConfigError

log = logging.getLogger(__name__)


WORKER_ENVIRON = {"GDAL_CACHEMAX": "128"}  # MB


WORKER_MEMORY = 8 << 30  # a model worker's peak, with margin: 4096 px chunks of U-Net-resnet18 measured 6.0 GiB (ru_maxrss)


def default_workers() -> int:
    """One single-threaded worker per usable core, but no more than the machine's memory holds at
    WORKER_MEMORY each (a 16-core machine with 32 GiB gets 4, not 16 workers that would swap)."""
    from distributed.system import MEMORY_LIMIT  # the machine's memory or the container's limit, the lower

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, MEMORY_LIMIT // WORKER_MEMORY))


GPU_ENV = "GEOSEG_GPUS"  # the CUDA devices the embedded cluster gives a GPU worker each: "0,1"; "none" for none
# A GPU worker's threads: the second overlaps one window's CPU work (reading it in, class lookup, masks)
# with the next window's model (H200, 16384² scene, U-Net-resnet18: segment stage 24.1 Mpx/s with 1 thread, 31.1 with 2).
GPU_WORKER_THREADS = 2
GPU_RESOURCES = {"GPU": 1.0}
# methods whose tasks run no torch model: any worker takes them (not pixel: on a GPU worker its features and trees
# run as tensors there, geoseg.methods.forest; on any worker a job's chunks would take one path or the other)
TORCH_FREE_METHODS = ("threshold", "kmeans")
_EMBEDDED_GPU: set[str] = set()  # scheduler addresses of embedded clusters with GPU workers (GPU_RESOURCES each)


def torch_cuda_build(torch_dir: str | None = None) -> str | None:
    """The CUDA version the installed torch was built for (None: a CPU-only build, or no torch), read from
    torch/version.py without importing torch (an import here would slow every client and no worker needs it)."""
    if torch_dir is None:
        import importlib.util

        spec = importlib.util.find_spec("torch")  # finds the package without running it
        if spec is None or not spec.submodule_search_locations:
            return None
        torch_dir = list(spec.submodule_search_locations)[0]
    try:
        text = open(os.path.join(torch_dir, "version.py"), encoding="utf-8").read()
    except OSError:
        return None
    found = re.search(r"^cuda\b[^=\n]*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
    return found.group(1) if found else None


def nvidia_smi_listing() -> str | None:
    """``nvidia-smi -L`` (GPUs and their MIG devices), or None where it is not there or fails."""
    import subprocess

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def mig_devices(listing: str) -> dict[int, list[str]]:
    """GPU index -> the UUIDs of its MIG devices, from ``nvidia-smi -L`` (GPUs without MIG are left out)."""
    out: dict[int, list[str]] = {}
    gpu = None
    for line in listing.splitlines():
        head = re.match(r"\s*GPU (\d+):", line)
        if head:
            gpu = int(head.group(1))
            continue
        mig = re.search(r"\bMIG\b.*\(UUID: (MIG-[^)\s]+)\)", line)
        if mig and gpu is not None:
            out.setdefault(gpu, []).append(mig.group(1))
    return out


def local_gpus(*, driver_dir: str = "/proc/driver/nvidia/gpus", dev_dir: str = "/dev",
               torch_dir: str | None = None, listing: Callable[[], str | None] = nvidia_smi_listing) -> tuple[str, ...]:
    """The CUDA devices of this machine the embedded cluster gives a GPU worker each, as CUDA_VISIBLE_DEVICES names them.

    Found without torch and without starting CUDA in this process: ``GEOSEG_GPUS`` where set ("0,1";
    "none" or empty for no GPU worker), else the NVIDIA devices the driver lists (/proc/driver/nvidia/gpus,
    /dev/nvidiaN), narrowed by CUDA_VISIBLE_DEVICES as CUDA narrows them (up to the first id that is not a device);
    none where the installed torch is a CPU-only build (its one GPU worker would take every model task on the CPU).
    A GPU split into MIG devices (``nvidia-smi -L``) gives one worker per MIG device, named by its UUID: by index,
    CUDA would show each worker the same first slice.
    """
    chosen = os.environ.get(GPU_ENV)
    if chosen is not None:
        ids = tuple(t.strip() for t in chosen.split(",") if t.strip())
        return () if ids in ((), ("none",), ("-1",)) else ids
    count = 0
    with contextlib.suppress(OSError):
        count = len(os.listdir(driver_dir))
    if not count:
        with contextlib.suppress(OSError):
            count = sum(1 for d in os.listdir(dev_dir) if re.fullmatch(r"nvidia\d+", d))
    if not count:
        return ()
    if torch_cuda_build(torch_dir) is None:
        log.warning("this machine has %d NVIDIA GPU(s) but the installed torch is a CPU-only build: no GPU worker; "
                    "install a CUDA build of torch to run the model on them", count)
        return ()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        text = listing()
        migs = mig_devices(text) if text else {}
        return tuple(d for i in range(count) for d in migs.get(i, [str(i)]))
    ids: list[str] = []
    for token in (t.strip() for t in visible.split(",")):
        if not token or token.startswith("-") or (token.isdigit() and int(token) >= count):
            break
        ids.append(token)
    return tuple(ids)


def embedded_model_resources(client: Any) -> dict[str, float] | None:
    """What model tasks need on ``client``'s cluster when it is geoseg's embedded cluster with GPU workers, else None."""
    address = getattr(getattr(client, "scheduler", None), "address", None)
    return dict(GPU_RESOURCES) if address in _EMBEDDED_GPU else None


def model_resources(method: str, requested: dict[str, float] | None, client: Any) -> dict[str, float] | None:
    """The resources a job's model tasks are annotated with: the job's own (``model_resources``), else on an
    embedded cluster with GPU workers theirs for methods that run a torch model, else none (any worker)."""
    if requested:
        return dict(requested)
    if client is None or method in TORCH_FREE_METHODS:
        return None
    return embedded_model_resources(client)


def spawned_worker_config() -> dict[str, Any]:
    """The dask settings under which geoseg spawns its own worker processes (nannies)."""
    import dask

    from geoseg.workers import ALLOCATOR_ENVIRON, EMBEDDED_ENV

    # GDAL's block cache defaults to 5% of RAM per process; a read task reads each block once, so
    # a small cache keeps a worker's memory flat as scenes grow (remote workers: set it in their
    # image, as infra/docker does).
    # set in the worker process once spawned (pre-spawn variables also land in this process's environment)
    environ = {**dask.config.get("distributed.nanny.environ", {}), **WORKER_ENVIRON, EMBEDDED_ENV: "1"}
    # glibc's allocator set for large, reused buffers from the first allocation on (geoseg.workers;
    # the worker plugin sets the same at run time in workers started by someone else)
    pre_spawn = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), **ALLOCATOR_ENVIRON}
    config = {"distributed.worker.daemon": False, "distributed.nanny.environ": environ,
              "distributed.nanny.pre-spawn-environ": pre_spawn}
    # on Linux the workers are forked from a server that imported torch once (geoseg.forkserver)
    from geoseg import forkserver

    config.update(forkserver.cluster_config(environ, pre_spawn))
    return config


@contextlib.contextmanager
def connect(
    scheduler: str | None = None,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    security: object | None = None,
    memory_limit: str | float | None = "auto",
    *,
    resources: dict[str, float] | None = None,
    timeout: str = "30s",
    gpus: Sequence[str] | None = None,
    device: str = "auto",
) -> Iterator["distributed.Client"]:  # noqa: F821
    """A client on an existing scheduler (``scheduler`` address) or on a new local cluster.

    The local cluster runs worker processes with one thread each (one torch stream per core
    is the fastest way to run a CNN on CPU cores) and binds to 127.0.0.1 only; ``resources``
    are what each of its workers offers (``{"GPU": 1}`` for model tasks annotated so).

    On a machine with CUDA devices (``gpus``; None: ``local_gpus()``), unless ``device`` is "cpu" or ``resources`` are
    given, the cluster gets one GPU worker per device (that device alone visible, GPU_WORKER_THREADS
    threads, offering GPU=1) beside ``n_workers`` CPU workers that see no device (default: one per
    core left). Model tasks of torch methods then run on the GPU workers (``model_resources``), reads,
    writes and the other methods anywhere: one CUDA context per device, not one per core.
    """
    import dask
    from distributed import Client, LocalCluster

    from geoseg.workers import register

    if scheduler:
        from distributed.utils import LoopRunner

        # the connection's event loop, held here and stopped only after the client closed: a client's own loop
        # stops as the client closes, and a thread in a call on it just then (a job's scene, stopped) waited for ever
        runner = LoopRunner()
        runner.start()
        try:
            client = _client(scheduler, security, timeout, loop=runner.loop)
            try:
                register(client)
                yield client
            finally:
                close_client(client)
        finally:
            runner.stop()
        return
    gpus = () if resources or device == "cpu" else tuple(local_gpus() if gpus is None else gpus)
    n_cpu = n_workers or (max(1, default_workers() - len(gpus)) if gpus else default_workers())
    if memory_limit == "auto":
        # the machine's memory shared by the workers this cluster has: dask's "auto" is memory x threads / cores for
        # each worker whatever their number (a 16-core, 32 GiB machine's 4 workers got 2 GiB each; GPU workers more)
        from distributed.system import MEMORY_LIMIT

        memory_limit = MEMORY_LIMIT // (n_cpu + len(gpus))
    with dask.config.set(spawned_worker_config()):
        cluster = LocalCluster(
            n_workers=n_cpu,
            threads_per_worker=threads_per_worker,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            memory_limit=memory_limit,
            silence_logs=logging.WARNING,
            **({"resources": dict(resources)} if resources else {}),
            **({"env": {"CUDA_VISIBLE_DEVICES": ""}} if gpus else {}),  # CPU workers never open a CUDA context
        )
        if gpus:
            base = cluster.new_spec
            for gpu in gpus:
                options = {**base["options"], "nthreads": GPU_WORKER_THREADS, "resources": dict(GPU_RESOURCES),
                           "env": {"CUDA_VISIBLE_DEVICES": gpu}}
                cluster.worker_spec[f"gpu-{gpu}"] = {"cls": base["cls"], "options": options}
            cluster.scale(len(cluster.worker_spec))
            # scale() only queues them on the cluster's loop: waited for here, the GPU workers are made under these
            # settings too (made after, they were daemonic, unmarked as geoseg's own, and not forked from the server)
            try:
                cluster.wait_for_workers(len(cluster.worker_spec), timeout=120)
            except TimeoutError:
                cluster.close()
                raise ConfigError(f"the local cluster's GPU workers (devices {','.join(gpus)}) did not start; "
                                  f"set {GPU_ENV}=none to run on the CPU workers alone") from None
    address = cluster.scheduler_address
    try:
        with Client(cluster) as client:
            if gpus:
                _EMBEDDED_GPU.add(address)
            register(client)
            log.info("local cluster: %d workers (%d on GPUs), dashboard %s", len(cluster.workers), len(gpus),
                     client.dashboard_link)
            # dask.array's low-level fusion turns a graph into a plain dict and its layers' annotations go
            # with it: a lazy geoseg.api.predict computed here would run its model tasks on any worker
            with dask.config.set({"optimization.fuse.active": False} if gpus else {}):
                yield client
    finally:
        _EMBEDDED_GPU.discard(address)
        cluster.close()


def close_client(client: Any) -> None:
    """Close ``client``, and end the futures it still holds: a thread that submitted while it closed (a job's scene,
    stopped) made a future after the client had cancelled its own, and before it said it was closed; that future was
    never cancelled nor finished, and a wait on it (the scene's, holding its OUT's lock) lasted for ever. They are
    cancelled on the client's event loop, which its owner keeps running after (geoseg.cluster.connect, a job's
    connection on a given client's loop, an embedded cluster's)."""
    try:
        client.close()
    finally:
        def cancel() -> None:
            for state in list(client.futures.values()):
                state.cancel(reason="its client closed")

        with contextlib.suppress(RuntimeError, AttributeError):  # a loop already gone: nothing waits on it
            client.loop.add_callback(cancel)


def _client(scheduler: str, security: Any, timeout: str, loop: Any = None) -> Any:
    """A client on the scheduler at ``scheduler``, or a clear error within about ``timeout``: distributed's own
    timeout does not cover a handshake with something else on that port (an HTTP dashboard never answers;
    a service that greets with a banner is read as a message length of exabytes)."""
    import dask
    from dask.utils import parse_timedelta
    from distributed import Client

    if scheduler.startswith("tls://") and security is None and not dask.config.get("distributed.comm.tls.ca-file", None):
        raise ConfigError(
            f"{scheduler} is a TLS address and no certificate was given; run a job whose cluster profile has tls: "
            "{ca_file, cert_file, key_file} (geoseg run), or set DASK_DISTRIBUTED__COMM__TLS__CA_FILE, "
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT and DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY"
        )
    seconds = float(parse_timedelta(timeout, default="s"))
    _probe(scheduler, security, seconds)
    try:
        return Client(scheduler, security=security, timeout=timeout, loop=loop)
    except (OSError, TimeoutError) as exc:
        raise ConfigError(f"cannot reach the dask scheduler at {scheduler} ({exc}); check the address and that it runs") from None


def _probe(scheduler: str, security: Any, seconds: float) -> None:
    """Ask ``scheduler`` who it is, on an event loop of its own that is gone when this returns (a client left
    waiting on a port that never answers would keep the process from exiting); a clear error if it does not
    answer as a dask scheduler within ``seconds``."""
    import asyncio
    import threading

    from distributed.comm import connect as comm_connect
    from distributed.security import Security

    args = (security or Security()).get_connection_args("client")

    async def ask() -> Any:
        comm = await comm_connect(scheduler, timeout=seconds, **args)
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            comm.abort()

    outcome: dict[str, Any] = {}

    def run() -> None:  # a thread of its own: a notebook's thread already runs an event loop
        try:
            # past the connect timeout: a refused port is "cannot reach" (its retries end first), not "no answer"
            outcome["answer"] = asyncio.run(asyncio.wait_for(ask(), seconds * 1.5 + 1))
        except BaseException as exc:  # noqa: BLE001 - said below, in one line
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="geoseg-probe", daemon=True)
    thread.start()
    thread.join()
    exc = outcome.get("error")
    if exc is None and isinstance(outcome.get("answer"), dict) and outcome["answer"].get("type") == "Scheduler":
        return
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)) or (exc is None and "answer" not in outcome):
        raise ConfigError(f"nothing answered as a dask scheduler at {scheduler} within {seconds * 1.5 + 1:g} s; check the address "
                          "and port (the scheduler's, 8786 by default; 8787 is its dashboard)")
    if isinstance(exc, OSError):
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        plain = "://" not in scheduler or scheduler.startswith("tcp://")  # no scheme: tcp
        cut = "reset" in text.lower() or "closed" in text.lower()
        tls = ("; a scheduler that closes a plain connection at once may want TLS: tls://... with the profile's "
               "certificates" if plain and cut else "")
        raise ConfigError(f"cannot reach the dask scheduler at {scheduler} ({text}); check the address and that it runs{tls}")
    text = "it speaks another protocol" if exc is None or isinstance(exc, MemoryError) else (str(exc).splitlines() or [type(exc).__name__])[0]
    raise ConfigError(f"{scheduler} did not answer as a dask scheduler ({text[:200]}); check the address and port "
                      "(the scheduler's, 8786 by default)")


@contextlib.contextmanager
def connect_profile(profile: Any, name: str = "") -> Iterator["distributed.Client"]:  # noqa: F821
    """A client on the cluster a profile (geoseg.jobs.profiles) describes; the cluster closes after."""
    label = f"cluster profile {name!r}" if name else f"the {profile.kind} cluster profile"
    if profile.kind == "local":
        with connect(None, profile.n_workers, profile.threads_per_worker, None, profile.memory_limit,
                     resources=profile.resources, device=profile.device) as client:
            yield client
    elif profile.kind == "address":
        with connect(profile.address, security=profile.security(), timeout=profile.timeout) as client:
            yield client
    elif profile.kind == "kubernetes":
        address = profile.scheduler_address()
        if profile.create:
            with _kubernetes(profile, label) as client:
                yield client
        elif address:
            with connect(address, security=profile.security(), timeout=profile.timeout) as client:
                yield client
        else:
            raise ConfigError(
                f"{label} has no scheduler address; set address: to the DaskCluster's scheduler service "
                f"(tcp://{profile.name}-scheduler.NAMESPACE.svc.cluster.local:8786), run where "
                "DASK_SCHEDULER_ADDRESS is set (a DaskJob pod), or set create: true"
            )
    elif profile.kind == "slurm":
        with _slurm(profile, label) as client:
            yield client
    else:
        raise ConfigError(f"{label}: unknown kind {profile.kind!r}; use local, address, slurm or kubernetes")


@contextlib.contextmanager
def _slurm(profile: Any, label: str) -> Iterator["distributed.Client"]:  # noqa: F821
    from distributed import Client

    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise ConfigError(f"{label} needs dask-jobqueue: pip install dask-jobqueue") from None
    if shutil.which("sbatch") is None:
        raise ConfigError(
            f"{label} submits worker jobs with sbatch, which is not on this machine's PATH; run geoseg on a "
            "SLURM login node (geoseg run JOB --dry-run shows the worker job script)"
        )
    kw = profile.jobqueue_kwargs()
    if profile.scheduler_options:
        kw["scheduler_options"] = dict(profile.scheduler_options)
    if profile.tls:
        kw["security"] = True  # temporary certificates; workers get theirs through shared_temp_directory
        if profile.shared_temp_directory:
            kw["shared_temp_directory"] = profile.shared_temp_directory
    try:
        cluster = SLURMCluster(**kw)
    except ValueError as exc:
        raise ConfigError(f"{label}: {exc}") from None
    try:
        if profile.maximum_jobs:
            cluster.adapt(minimum_jobs=profile.jobs, maximum_jobs=profile.maximum_jobs)
        else:
            cluster.scale(jobs=profile.jobs)
        with Client(cluster) as client:
            log.info("slurm cluster: scheduler %s, %d job(s) requested", cluster.scheduler_address, profile.jobs)
            yield client
    finally:
        cluster.close()


@contextlib.contextmanager
def _kubernetes(profile: Any, label: str) -> Iterator["distributed.Client"]:  # noqa: F821
    from distributed import Client

    try:
        from dask_kubernetes.operator import KubeCluster
    except ImportError:
        raise ConfigError(
            f"{label} has create: true, which needs the Dask Kubernetes operator's client: pip install dask-kubernetes "
            "(or set address: to the scheduler service of a running DaskCluster, e.g. infra/kubernetes/daskcluster.yaml)"
        ) from None
    kw = {"namespace": profile.namespace} if profile.namespace else {}
    cluster = KubeCluster(custom_cluster_spec=profile.manifest(), **kw)
    try:
        with Client(cluster) as client:
            yield client
    finally:
        cluster.close()


def check_resources(client: Any, needed: dict[str, float] | None) -> None:
    """Refuse a cluster whose workers cannot run tasks that need ``needed`` (they would wait forever).

    A cluster with no worker yet (a SLURM or Kubernetes cluster still starting) passes.
    """
    if not needed:
        return
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    if not workers:
        return
    for w in workers.values():
        offered = w.get("resources") or {}
        if all(offered.get(k, 0) >= v for k, v in needed.items()):
            return
    want = ",".join(f"{k}={v:g}" for k, v in needed.items())
    raise ConfigError(
        f"no worker of the cluster at {client.scheduler.address} offers {want}, which the model tasks need "
        f"(model_resources of the cluster profile); start GPU workers with 'dask worker ... --resources {want}' "
        "or drop model_resources"
    )
