"""Numerics decided where the model runs: the workers that take model tasks say what they compute in.

``auto`` gives bf16 autocast only where every model worker computes bf16 natively (CUDA, or a
CPU with AVX512-BF16 or AMX), fp32 with ``--exact`` or when the model workers disagree (a job's
chunks all come from one precision). Forcing bf16 where a worker emulates it runs, with a
warning that gives the slowdown measured on that worker.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

from geoseg.errors import ConfigError
from geoseg.workers import bf16_slowdown, capabilities

log = logging.getLogger(__name__)


class SlowPrecisionWarning(UserWarning):
    """bf16 was asked for on hardware that emulates it."""


class WorkerVersionWarning(UserWarning):
    """A worker that joined while a job ran, and took its model tasks, runs other versions than the client."""


@dataclass(frozen=True)
class Numerics:
    precision: str  # fp32 | bf16
    device: str  # the kind the model workers compute on: cpu | cuda | mixed
    reason: str
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)
    bf16_slowdown: float | None = None

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"precision": self.precision, "device": self.device, "reason": self.reason,
                               "workers": self.workers}
        if self.bf16_slowdown is not None:
            out["bf16_slowdown"] = round(self.bf16_slowdown, 2)
        return out


def model_workers(client: Any, resources: dict[str, float] | None) -> dict[str, str]:
    """The workers that can take model tasks (those offering ``resources``, or all): address -> status
    ("running"; "paused": above distributed's memory pause threshold, it takes no task; ...)."""
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    return {a: str(w.get("status", "running")) for a, w in workers.items()
            if all((w.get("resources") or {}).get(k, 0) >= v for k, v in (resources or {}).items())}


def wait_for_model_workers(client: Any, resources: dict[str, float] | None, timeout: float = 30.0) -> list[str]:
    """The model workers, waiting up to ``timeout`` s for one to join; a clear error instead of a hang."""
    deadline = time.monotonic() + timeout
    while True:
        found = model_workers(client, resources)
        if found:
            return list(found)
        if time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    n = len(client.scheduler_info(n_workers=-1).get("workers", {}))
    if resources:
        want = ",".join(f"{k}={v:g}" for k, v in resources.items())
        raise ConfigError(
            f"no worker of the cluster at {client.scheduler.address} offers {want} after {timeout:g} s ({n} worker(s) "
            f"without it), and the model tasks need it (model_resources); start GPU workers with "
            f"'dask worker ... --resources {want}' or drop model_resources"
        )
    raise ConfigError(f"the cluster at {client.scheduler.address} has no worker after {timeout:g} s; start workers "
                      "('dask worker ADDRESS'), or give a job's cluster profile a longer 'timeout:' (geoseg run) for "
                      "workers a batch scheduler starts later")


def decide(requested: str, exact: bool, caps: dict[str, dict[str, Any]], method: str = "smp") -> tuple[str, str]:
    """(precision, reason) for ``requested`` given what each model worker said of itself. ``method``: the model's
    (geoseg.model.card): only a network ("smp") computes in bf16; the others compute in fp32 wherever they run."""
    if requested not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"--precision must be auto, fp32 or bf16, not {requested!r}")
    if method != "smp":  # threshold, kmeans, pixel: numpy, LightGBM, or the trees as tensors with autocast off
        said = "" if requested == "auto" else f"asked for {requested}; "
        return "fp32", f"{said}a {method} model has no network and computes in fp32"
    native = [c.get("bf16_native", False) for c in caps.values()]
    if requested != "auto":
        if exact and requested == "bf16":  # said in run.json: --exact is then exact to a bf16 pass only
            return requested, "asked for; with --exact the tiles equal one bf16 pass, which differs from an fp32 pass"
        return requested, "asked for"
    if exact:
        return "fp32", "--exact compares with one fp32 pass"
    if native and all(native):
        return "bf16", "every model worker computes bf16 natively"
    if any(native):
        return "fp32", "model workers disagree on native bf16; one precision for every chunk"
    return "fp32", "no model worker computes bf16 natively"


def _device_kind(caps: dict[str, dict[str, Any]]) -> str:
    kinds = {str(c.get("device", "cpu")).split(":")[0] for c in caps.values()}
    return kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "cpu")


def _warn_emulated(where: str, ratio: float | None) -> None:
    """One warning (the command line shows geoseg's warnings as one line: geoseg.cli.main)."""
    msg = (f"--precision bf16 on {where}, which has no native bf16: "
           + (f"bf16 took {ratio:.1f}x the fp32 time there" if ratio else "expect it to run slower than fp32")
           + "; use --precision auto or fp32")
    warnings.warn(msg, SlowPrecisionWarning, stacklevel=3)


def check_versions(caps: dict[str, dict[str, Any]]) -> None:
    """Model workers must run the client's geoseg, torch, smp and LightGBM: another version normalises, pads or
    blends otherwise, and its chunks would differ from the others' without a word."""
    from geoseg.workers import versions

    here = versions()
    for addr, c in sorted(caps.items()):
        theirs = c.get("versions") or {}
        differ = [f"{pkg} {theirs.get(pkg, 'none')} (here {v})" for pkg, v in here.items() if theirs.get(pkg, v) != v]
        if differ and theirs:
            raise ConfigError(f"model worker {addr} ({c.get('host')}) runs {', '.join(differ)}; install the client's "
                              "versions on every worker (one environment or container image for client and workers)")


def resolve_on_cluster(client: Any, requested: str, device: str = "auto", exact: bool = False,
                       resources: dict[str, float] | None = None, timeout: float = 30.0, method: str = "smp") -> Numerics:
    """Ask the model workers what they compute in and decide the job's precision there."""
    addrs = wait_for_model_workers(client, resources, timeout)
    caps = client.run(capabilities, device, resources, workers=addrs, on_error="return")
    caps = {a: c if isinstance(c, dict) else {"error": f"{type(c).__name__}: {c}"} for a, c in caps.items()}
    failed = {a: c["error"] for a, c in caps.items() if c.get("error")}
    if failed:
        raise ConfigError(f"{len(failed)} of {len(caps)} model worker(s) ({', '.join(sorted(failed))}): "
                          + next(iter(failed.values())))
    check_versions(caps)
    precision, reason = decide(requested, exact, caps, method)
    slowdown = None
    if precision == "bf16":
        emulated = [a for a, c in caps.items() if not c.get("bf16_native")]
        if emulated:
            c = caps[emulated[0]]
            slowdown = client.run(bf16_slowdown, c.get("device", "cpu"), workers=[emulated[0]])[emulated[0]]
            _warn_emulated(f"{len(emulated)} model worker(s) ({c.get('cpu') or c.get('gpu') or c.get('device')})", slowdown)
    return Numerics(precision, _device_kind(caps), reason, caps, slowdown)


def with_joined(client: Any, numerics: Numerics, digest: str, device: str = "auto",
                resources: dict[str, float] | None = None) -> Numerics:
    """``numerics`` with the workers that joined while the job ran and took its model tasks (they hold its
    model): recorded beside those asked at the start, and said where they emulate the bf16 the job computes in."""
    from geoseg.runtime import loaded_digests

    try:
        held = client.run(loaded_digests, on_error="return")
        able = model_workers(client, resources)  # a worker without the model tasks' resources took none of them
        joined = [a for a, d in held.items() if isinstance(d, list) and digest in d and a in able and a not in numerics.workers]
        if not joined:
            return numerics
        caps = client.run(capabilities, device, resources, workers=joined, on_error="return")
    except Exception:  # the cluster is going away, a worker left: the record keeps the workers asked at the start
        return numerics
    caps = {a: {**c, "joined": True} for a, c in caps.items() if isinstance(c, dict)}
    emulated = [a for a, c in caps.items() if numerics.precision == "bf16" and not c.get("bf16_native")]
    if emulated:
        _warn_emulated(f"{len(emulated)} model worker(s) that joined while the job ran "
                       f"({caps[emulated[0]].get('cpu') or caps[emulated[0]].get('device')})", None)
    try:
        check_versions(caps)
    except ConfigError as exc:
        warnings.warn(f"{exc} (it took model tasks of this job)", WorkerVersionWarning, stacklevel=2)
    return replace(numerics, workers={**numerics.workers, **caps})


def resolve_here(requested: str, device: str = "auto", exact: bool = False, method: str = "smp") -> Numerics:
    """The same decision for a process that runs the model itself (no distributed client)."""
    caps = {"local": capabilities(device)}
    if caps["local"].get("error"):
        raise ConfigError(caps["local"]["error"])
    precision, reason = decide(requested, exact, caps, method)
    slowdown = None
    if precision == "bf16" and not caps["local"]["bf16_native"]:
        slowdown = bf16_slowdown(caps["local"]["device"])
        _warn_emulated(f"this machine ({caps['local'].get('cpu') or caps['local']['device']})", slowdown)
    return Numerics(precision, _device_kind(caps), reason, caps, slowdown)


def resolve_current(requested: str, device: str = "auto", exact: bool = False,
                    resources: dict[str, float] | None = None, method: str = "smp") -> Numerics:
    """Decided on the current distributed client's model workers if there is one, else here."""
    try:
        from distributed import default_client

        client = default_client()
    except (ImportError, ValueError):
        return resolve_here(requested, device, exact, method)
    from geoseg.workers import register

    register(client)
    return resolve_on_cluster(client, requested, device, exact, resources, method=method)
