"""Run a job: every scene checked and planned first, then the work runs on one client.

A scene whose output folder holds a ``run.json`` with the planned job key (same inputs, model,
tiling and numerics) and the outputs asked for is finished and reused; one finished with
anything else is refused unless ``--overwrite`` (or ``--resume``) is given, so a changed
model never silently replaces results. ``job.json`` in the output root records what ran.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from geoseg.cluster import close_client
from geoseg.errors import ConfigError, GeosegError, OutputExistsError, name_scene
from geoseg.io import storage
from geoseg.jobs.spec import JobSpec, Scene, resolve
from geoseg.pipeline import COG_NAME, PARTIAL, RUN_NAME, VECTOR_NAME, ZARR_NAME, Job, plan_job

log = logging.getLogger(__name__)

JOB_NAME = "job.json"
Report = Callable[[str], None]


@dataclass(frozen=True)
class ScenePlan:
    """One scene, checked and planned: what will happen to it and why."""

    scene: Scene
    job: Job
    action: str  # compute | reuse
    reason: str
    previous: dict[str, Any] | None  # the run.json found in its output folder


@dataclass(frozen=True)
class JobPlan:
    spec: JobSpec
    scenes: tuple[ScenePlan, ...]
    refused: tuple[tuple[Scene, str], ...] = ()  # scenes that cannot run, left out by keep_going (with why)

    @property
    def todo(self) -> tuple[ScenePlan, ...]:
        return tuple(s for s in self.scenes if s.action == "compute")


def load_job(path: str | os.PathLike, *, check_inputs: bool = False, **layers: Any) -> JobSpec:
    """The job file validated with every settings layer; ``check_inputs`` also plans every scene
    (globs match, rasters open, bands fit the model, output folders can be written)."""
    spec = resolve(path, **layers)
    if check_inputs:
        plan(spec)
    return spec


def _read_run(out_dir: Path | str) -> dict[str, Any] | None:
    """The run.json of a finished output folder (``{}`` if unreadable), None if unfinished."""
    p = storage.join(out_dir, RUN_NAME)
    if not storage.isfile(p):
        return None
    try:
        record = json.loads(storage.read_bytes(p))
    except (OSError, ValueError):
        return {}  # unreadable: finished by something we cannot vouch for
    return record if isinstance(record, dict) else {}


def _interrupted(out_dir: Path | str) -> bool:
    # Locally the store grows under a .partial name; under a URL in place (no rename there).
    name = ZARR_NAME if storage.is_url(out_dir) else ZARR_NAME + PARTIAL
    return storage.exists(storage.join(out_dir, name))


def _wanted(spec: JobSpec, job: Job | None = None) -> list[str]:
    if job is not None and job.card.finds_objects:
        from geoseg.pipeline.plan import INSTANCE_COG, OBJECTS_NAME

        return [ZARR_NAME] + [COG_NAME, INSTANCE_COG] * spec.outputs.cog + [OBJECTS_NAME] * spec.outputs.vectors
    return [ZARR_NAME] + [COG_NAME] * spec.outputs.cog + [VECTOR_NAME] * spec.outputs.vectors


def _decide(spec: JobSpec, job: Job, previous: dict[str, Any] | None, overwrite: bool, resume: bool) -> tuple[str, str, bool]:
    """(action, reason, replace finished outputs) for a planned scene, or OutputExistsError."""
    # an object model's run is made whole again (geoseg.instances.outputs.run_instance_job): its objects are
    # joined across the scene, and no chunk of an earlier run is reused
    objects = job.card.finds_objects
    if previous is None:
        if resume and _interrupted(job.out_dir):
            if objects:
                return "compute", "interrupted; recomputing it (an object model's run is not resumed)", True
            return "compute", "resuming an interrupted run", False
        return "compute", "not run yet", False
    missing = [n for n in _wanted(spec, job) if n not in (previous.get("outputs") or [])]
    if previous.get("job_key") == job.key and not missing:
        if overwrite:
            return "compute", "finished; recomputing (--overwrite)", True
        return "reuse", f"finished {previous.get('finished', '')}".strip(), False
    if previous.get("job_key") != job.key:
        why = "with a different model, input or parameters"
        detail = f" (job key {str(previous.get('job_key') or 'unknown')[:12]}, now {job.key[:12]})"
    else:
        why, detail = "without " + ", ".join(missing), ", which the job now asks for"
    if resume and not overwrite and previous.get("job_key") == job.key and not objects:
        # the same key: the finished store's chunks are this job's; only the outputs it lacks are made
        return "compute", f"finished {why}; making them from its chunks (--resume)", False
    if overwrite or resume:
        how = "--overwrite" if overwrite else "--resume: an object model's run is not resumed" if objects else "--resume"
        return "compute", f"finished {why}; recomputing ({how})", True
    raise OutputExistsError(f"{job.out_dir}: holds a prediction finished {why}{detail}; pass --overwrite to "
                            "recompute it (or --resume)")


def _combine(spec: JobSpec, n: int, errors: list[tuple[str, GeosegError]]) -> GeosegError:
    cls = type(errors[0][1]) if len({type(e) for _, e in errors}) == 1 else ConfigError
    if len(errors) == 1:
        name, exc = errors[0]
        return cls(f"{spec.source}: scene {name}: {exc}")
    lines = "\n".join(f"  - {name}: {exc}" for name, exc in errors)
    return cls(f"{spec.source}: {len(errors)} of {n} scenes cannot run:\n{lines}")


def plan(spec: JobSpec, *, overwrite: bool = False, resume: bool = False, keep_going: bool = False) -> JobPlan:
    """Check and plan every scene (nothing runs); raises one error naming every scene that cannot run, or with
    ``keep_going`` leaves them out (``JobPlan.refused``) unless none can run."""
    from geoseg.model.store import check_model_dir, local_model_dir

    scenes = spec.expand_scenes()
    try:
        check_model_dir(local_model_dir(spec.model_dir))
    except GeosegError as exc:
        raise type(exc)(f"{spec.source}: model: {exc}") from None
    try:
        storage.check_creatable(spec.output_root, "output")  # job.json goes there
    except GeosegError as exc:
        raise type(exc)(f"{spec.source}: {exc}") from None
    # Plan as if overwriting, so a finished folder is not refused before its job key is known.
    probe = spec.predict_options(overwrite=True, resume=resume)
    planned: list[ScenePlan] = []
    errors: list[tuple[str, GeosegError]] = []
    for scene in scenes:
        try:
            job = plan_job(scene.inputs, spec.model_dir, scene.out_dir, probe)
            previous = _read_run(scene.out_dir)
            action, reason, replace_outputs = _decide(spec, job, previous, overwrite, resume)
        except GeosegError as exc:
            errors.append((scene.name, exc))
            continue
        job = replace(job, options=replace(job.options, overwrite=replace_outputs))
        planned.append(ScenePlan(scene, job, action, reason, previous))
    if errors and (not keep_going or not planned):
        raise _combine(spec, len(scenes), errors)
    by_name = {s.name: s for s in scenes}
    return JobPlan(spec, tuple(planned), tuple((by_name[name], str(exc)) for name, exc in errors))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _scene_entry(sp: ScenePlan, status: str, record: dict[str, Any] | None, wall_s: float | None,
                 error: str | None = None) -> dict[str, Any]:
    record = record or {}
    entry: dict[str, Any] = {
        "name": sp.scene.name,
        "status": status,
        "reason": sp.reason,
        "inputs": list(sp.scene.inputs),
        "out_dir": str(sp.scene.out_dir),
        "job_key": sp.job.key,
        "chunks": record.get("chunks"),
        "timings": record.get("timings", {}),
        "wall_s": None if wall_s is None else round(wall_s, 3),
        "finished": record.get("finished"),
    }
    if error:
        entry["error"] = error
    return entry


@contextlib.contextmanager
def _client(spec: JobSpec, client: Any) -> Iterator[tuple[Any, dict[str, Any]]]:
    from geoseg.cluster import check_resources, connect_profile
    from geoseg.pipeline import cluster_info

    name, profile = spec.cluster.profile, spec.profile
    if client is not None:
        if getattr(client, "_asynchronous", False):  # Client(..., asynchronous=True)
            # its event loop runs in the caller's thread, which the job blocks while it waits: it waited for ever
            raise ConfigError(f"{spec.source}: the client given is asynchronous (Client(..., asynchronous=True)), and a "
                              "job waits for its scenes in the caller's thread, which runs that client's event loop; give "
                              "a client made without asynchronous=True on the same scheduler, or none (geoseg connects "
                              "itself)")
        if client.status != "running":
            raise ConfigError(f"{spec.source}: the client given is {client.status}; give a running one, or none")
        check_resources(client, profile.model_resources)
        # the job's own connection to the given cluster: closed when the job ends or is stopped, and the scheduler
        # then drops the tasks of the scenes in flight (the given client and its other work stay); on the given
        # client itself they ran on to the end after a Ctrl-C, published run.json and held their output's lock
        from distributed import Client

        # on the given client's event loop, which runs on after this connection closes: on a loop of its own, which
        # closing it stops, a scene's thread that called the client just then (fut.result(), cancel) waited for ever
        # and held its OUT's lock (a --resume was refused)
        own = Client(client.scheduler.address, security=client.security, set_as_default=False, name="geoseg-job",
                     loop=client.loop)
        try:
            yield own, {**cluster_info(own), "profile": "(given client)"}
        finally:
            close_client(own)
        return
    t0 = time.perf_counter()
    with connect_profile(profile, name) as c:
        check_resources(c, profile.model_resources)
        yield c, {**cluster_info(c), "profile": name, "kind": profile.kind, "start_s": round(time.perf_counter() - t0, 3)}


def _refused_entry(scene: Scene, error: str) -> dict[str, Any]:
    return {"name": scene.name, "status": "failed", "reason": "cannot run", "inputs": list(scene.inputs),
            "out_dir": str(scene.out_dir), "job_key": None, "chunks": None, "timings": {}, "wall_s": None, "error": error}


class ScenesFailed(GeosegError):
    """Scenes of a job run with keep_going failed; the others ran (job.json says which)."""


def execute(jp: JobPlan, *, client: Any = None, progress: bool = False, report: Report | None = None,
            keep_going: bool = False) -> dict[str, Any]:
    """Run the scenes a plan computes on one client, ``scenes_in_flight`` at a time; returns the job summary.

    Scenes overlap: while one scene's last chunks and its finishing (COG, polygons, on the
    client) run, the next scene's chunks are already on the cluster, earlier scenes first
    (dask priorities). At most ``scenes_in_flight`` scenes hold memory at once. Nothing to
    compute: no cluster starts, no file is touched. Otherwise ``job.json`` is written to the
    output root before the cluster starts (status "running", so an earlier run's "finished" never stands for
    this one) and at the end, also when a scene fails or the job is stopped (scenes not started then are skipped).
    ``keep_going``: a scene that fails (or was refused when planned: ``plan(keep_going=True)``) does not stop the
    others; the job then ends with ``ScenesFailed`` naming every failed scene.
    """
    from concurrent.futures import FIRST_COMPLETED, wait

    from geoseg.pipeline import import_client_modules, prepare_cluster, run_job

    # dask.array, zarr, xarray...: imported here, while the workers start, and once, not by two scene threads at once
    import_client_modules()

    say = report or (lambda _msg: None)
    spec, started, t0 = jp.spec, _now(), time.perf_counter()
    entries: dict[str, dict[str, Any]] = {
        sp.scene.name: _scene_entry(sp, "reused", sp.previous, 0.0) for sp in jp.scenes if sp.action == "reuse"
    }

    def summary(status: str, cluster: dict[str, Any] | None) -> dict[str, Any]:
        scenes = [entries.get(sp.scene.name) or _scene_entry(sp, "skipped", None, None) for sp in jp.scenes]
        scenes += [_refused_entry(scene, error) for scene, error in jp.refused]
        totals = {k: sum(e["status"] == k for e in scenes) for k in ("computed", "reused", "skipped", "failed")}
        return {
            "geoseg_job": 1,
            "job": spec.job_name,
            "job_file": str(spec.source.resolve()),
            "status": status,
            "started": started,
            "finished": _now(),
            "wall_s": round(time.perf_counter() - t0, 3),
            "cluster": cluster,
            "settings": spec.settings(),
            "scenes": scenes,
            "totals": {"scenes": len(scenes), **totals},
        }

    todo = jp.todo
    if not todo:
        if jp.refused:  # every scene that can run is finished: the refused ones are still failures
            result = summary("failed", None)
            write_summary(spec.output_root, result)
            raise _failed(spec, result)
        return summary("nothing to do", None)
    info: dict[str, Any] | None = None
    errors: list[BaseException] = []
    # an earlier run's "finished" must not stand while this one runs, nor after it is killed (SIGKILL)
    running = summary("running", None)
    running["scenes"] = [{**e, "status": "running" if e["status"] == "skipped" else e["status"]} for e in running["scenes"]]
    running["finished"] = None
    running["totals"] = {"scenes": len(running["scenes"]), **{k: sum(e["status"] == k for e in running["scenes"])
                                                              for k in ("computed", "reused", "skipped", "failed", "running")}}
    write_summary(spec.output_root, running)
    try:
        with _client(spec, client) as (c, info):
            say(f"cluster: {info['workers']} workers, {info['threads']} threads at {info['scheduler']}"
                + (f" (dashboard {info['dashboard']})" if info.get("dashboard") else ""))
            numerics = prepare_cluster(c, todo[0].job)  # waits the profile's timeout (its worker_timeout)
            info = {**info, "numerics": numerics.record()}

            stopping = threading.Event()  # the job was stopped: what its scenes say after that is not theirs

            def one(i: int, sp: ScenePlan) -> None:
                say(f"{sp.scene.name}: {sp.reason}")
                s0 = time.perf_counter()
                try:
                    record = run_job(sp.job, c, progress, info, numerics=numerics, priority=len(todo) - i)
                except BaseException as exc:
                    if not stopping.is_set():
                        entries[sp.scene.name] = _scene_entry(sp, "failed", None, time.perf_counter() - s0,
                                                              f"{type(exc).__name__}: {exc}")
                        name_scene(exc, sp.scene.name)
                    raise
                if not stopping.is_set():
                    entries[sp.scene.name] = _scene_entry(sp, "computed", record, time.perf_counter() - s0)
                say(f"{sp.scene.name}: finished in {time.perf_counter() - s0:.1f} s")

            queue = list(enumerate(todo))
            running: dict[Any, tuple[ScenePlan, float]] = {}
            try:
                while queue or running:
                    while queue and (keep_going or not errors) and len(running) < spec.scenes_in_flight:
                        i, sp = queue.pop(0)
                        running[_in_thread(one, i, sp, name=f"geoseg-scene-{i}")] = (sp, time.perf_counter())
                    finished, _ = wait(set(running), return_when=FIRST_COMPLETED)
                    for f in finished:
                        running.pop(f)
                        if f.exception() is not None:
                            errors.append(f.exception())
                    if errors and not keep_going:
                        for _, rest in queue:
                            entries[rest.scene.name] = _scene_entry(rest, "skipped", None, None)
                        queue = []
            except BaseException as exc:
                # Ctrl-C (or anything else here): the scenes in flight stop with the job's client (closed below),
                # not run to their end first
                stopping.set()
                for sp, s0 in (v for f, v in running.items() if not f.done()):  # a scene done says itself
                    entries[sp.scene.name] = _scene_entry(sp, "failed", None, time.perf_counter() - s0,
                                                          f"{type(exc).__name__}: stopped before it finished")
                for _, rest in queue:
                    entries[rest.scene.name] = _scene_entry(rest, "skipped", None, None)
                stopped = [f for f in running if not f.done()]
                if stopped:
                    # the job's connection closed first (the scheduler drops its tasks, and the scenes' waits on them
                    # end), on an event loop that runs on (the given client's, the embedded cluster's, the one
                    # geoseg.cluster.connect holds for a scheduler's address); then their threads unwind, waited for
                    # (bounded) so that none still holds its OUT's lock when the job returns: a --resume right after,
                    # in a notebook, was refused
                    with contextlib.suppress(Exception):
                        close_client(c)
                    wait(stopped, timeout=30)
                raise
            if errors and not (keep_going and all(isinstance(e, Exception) for e in errors)):
                raise errors[0]
    except BaseException:
        try:  # also when it stopped before any scene began (Ctrl-C while the cluster started)
            write_summary(spec.output_root, summary("failed", info))
        except OSError as exc:  # the error being raised says more than this one would
            log.warning("%s: cannot write the job summary: %s", spec.output_root, exc)
        raise
    result = summary("failed" if errors or jp.refused else "finished", info)
    write_summary(spec.output_root, result)
    if errors or jp.refused:
        raise _failed(spec, result)
    return result


def _in_thread(fn: Callable[..., Any], *args: Any, name: str) -> Future:
    """``fn(*args)`` in a daemon thread of its own; its future. A scene's thread that still waits on a cluster when
    the command exits (stopped, and its client's event loop gone under a call it made) does not keep the process
    from exiting, as a pool's threads, which the interpreter joins at exit, did; the kernel then releases its lock."""
    fut: Future = Future()
    fut.set_running_or_notify_cancel()

    def run() -> None:
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - the caller reads it from the future
            fut.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return fut


def _failed(spec: JobSpec, result: dict[str, Any]) -> ScenesFailed:
    failed = [s for s in result["scenes"] if s["status"] == "failed"]
    lines = "\n".join(f"  - {s['name']}: {s.get('error')}" for s in failed)
    return ScenesFailed(f"{spec.source}: {len(failed)} of {len(result['scenes'])} scenes failed (the others "
                        f"finished or were reused: {storage.join(spec.output_root, JOB_NAME)} says which):\n{lines}")


def write_summary(root: Path | str, summary: dict[str, Any]) -> Path | str:
    """``job.json`` in the output root (a folder or a URL prefix), replaced atomically."""
    if not storage.is_url(root):
        Path(root).mkdir(parents=True, exist_ok=True)
    final = storage.join(root, JOB_NAME)
    storage.write_atomic(final, (json.dumps(summary, indent=2) + "\n").encode())
    return final


def run(path: str | os.PathLike, *, overwrite: bool = False, resume: bool = False, client: Any = None,
        progress: bool = False, report: Report | None = None, keep_going: bool = False, **layers: Any) -> dict[str, Any]:
    """Load, check and plan a job file, then run it (see ``execute``)."""
    spec = resolve(path, **layers)
    return execute(plan(spec, overwrite=overwrite, resume=resume, keep_going=keep_going), client=client,
                   progress=progress, report=report, keep_going=keep_going)


def format_summary(summary: dict[str, Any]) -> str:
    """The job summary as a table, one line per scene."""
    rows = [("scene", "status", "chunks", "segment", "cog", "vectors", "wall", "output")]
    for s in summary["scenes"]:
        ch, t = s.get("chunks") or {}, s.get("timings") or {}

        def sec(key: str) -> str:
            return f"{t[key]:.1f} s" if key in t else "-"

        chunks = f"{ch.get('computed', 0)}/{ch.get('chunks', 0)}" if ch else "-"
        wall = "-" if s.get("wall_s") is None or s["status"] == "reused" else f"{s['wall_s']:.1f} s"
        rows.append((s["name"], s["status"], chunks, sec("segment_s"), sec("cog_s"), sec("vectorize_s"), wall, _rel(s["out_dir"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    tot = summary["totals"]
    lines.append(f"{tot['scenes']} scenes: {tot['computed']} computed, {tot['reused']} reused, "
                 f"{tot['skipped']} skipped, {tot['failed']} failed in {summary['wall_s']:.1f} s")
    return "\n".join(lines)


def _rel(p: str) -> str:
    if storage.is_url(p):
        return p
    try:
        r = os.path.relpath(p)
    except ValueError:
        return p
    return p if r.startswith("..") else r
