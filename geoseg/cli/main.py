"""The `geoseg` command group: logging, error reporting and the subcommands."""

from __future__ import annotations

import errno
import gc
import logging
import warnings
import os
import sys

import click

from geoseg import __version__
from geoseg.errors import GeosegError, scene_of


class GeosegGroup(click.Group):
    """Turns geoseg's own errors into one clear line and a non-zero exit, not a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except GeosegError as exc:
            if ctx.obj and ctx.obj.get("verbosity", 0) > 1:
                raise
            click.echo(f"geoseg: error: {_scene_of(exc)}{exc}", err=True)
            sys.exit(2)
        except BaseException as exc:
            # the machine's, not geoseg's: a full disk, a read-only or forbidden place (from a worker too); or the
            # cluster's: a task that kept killing its workers, a scheduler lost
            sub = self.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else None
            said = _cluster_failure(exc, ctx.invoked_subcommand or "", {o for p in getattr(sub, "params", []) for o in p.opts})
            if said is None:
                said = _object_store_failure(exc)
            if said is None and isinstance(exc, OSError) and exc.errno in _STORAGE_ERRORS:
                said = f"{exc.filename}: " if exc.filename else ""
                said += f"{exc.strerror or exc}; {_STORAGE_ERRORS[exc.errno]}"
            if said is None or (ctx.obj and ctx.obj.get("verbosity", 0) > 1):
                raise
            click.echo(f"geoseg: error: {_scene_of(exc)}{said}", err=True)
            sys.exit(2)


def _scene_of(exc: BaseException) -> str:
    """``scene NAME: `` where a job's scene raised ``exc`` (geoseg.errors.name_scene), else nothing."""
    name = scene_of(exc)
    return f"scene {name}: " if name else ""


def _cluster_failure(exc: BaseException, command: str = "", options: set[str] = frozenset()) -> str | None:
    """One line for what distributed raises when the cluster, not geoseg, failed; None for anything else.
    ``command`` and its ``options`` say what to try (--resume, --chunk-size where it has them)."""
    from distributed.client import FutureCancelledError
    from distributed.comm.core import CommClosedError
    from distributed.scheduler import KilledWorker

    resume = ("the chunks written are kept: run the same command again with --resume" if "--resume" in options
              else "run the command again")
    chunks = (" or smaller chunks (--chunk-size)" if "--chunk-size" in options
              else " or smaller chunks (the job file's chunking: chunk_size)" if command == "run" else "")
    if isinstance(exc, KilledWorker):
        return (f"a task ({exc.task}) took down every worker that ran it ({exc.last_worker.address if exc.last_worker else 'the last'}"
                " among them): a worker killed mid-task is most often out of memory. Give the workers more memory "
                f"(dask worker --memory-limit, a profile's memory_limit){chunks}; {resume}")
    if isinstance(exc, CommClosedError) or isinstance(exc, FutureCancelledError) and "scheduler" in str(exc).lower():
        return f"the connection to the cluster's scheduler was lost ({str(exc).splitlines()[0][:200]}); {resume} once it is back"
    return None


def _object_store_failure(exc: BaseException) -> str | None:
    """One line for an object store (S3) that could not be reached or refused the request; None for anything else."""
    seen: BaseException | None = exc
    for _ in range(8):  # the error itself, or what it was raised from (s3fs wraps botocore's): never what it interrupted
        if seen is None or not isinstance(seen, Exception):
            return None
        module = type(seen).__module__ or ""
        if module.startswith(("botocore", "aiobotocore")):
            break
        seen = seen.__cause__
    else:
        return None
    from geoseg.io.storage import s3_endpoint

    return (f"the object store {s3_endpoint() or '(AWS S3)'} could not be reached or refused the request "
            f"({type(seen).__name__}: {str(seen).splitlines()[0][:200]}); check the URL, AWS_ENDPOINT_URL and the "
            "credentials (AWS_ACCESS_KEY_ID, AWS_PROFILE)")


_STORAGE_ERRORS = {
    errno.ENOSPC: "free some space or choose another output (predict, run and train go on with --resume)",
    errno.EDQUOT: "free some of your quota or choose another output (predict, run and train go on with --resume)",
    errno.EROFS: "choose an output on a writable file system",
    errno.EACCES: "choose an output you may write to, or fix its permissions",
}


@click.group(cls=GeosegGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More output: -v geoseg's debug messages and dask's; -vv everything, with tracebacks.")
@click.option("-q", "--quiet", count=True, help="Less output: no progress bar, warnings only.")
@click.version_option(__version__, prog_name="geoseg")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: int) -> None:
    """Segment very large satellite and aerial rasters into land-use maps.

    \b
    Start here:
      geoseg sample-data demo/data            # a synthetic scene and its labels
      geoseg model init demo/model --bands 4 --classes 5
      geoseg predict demo/data/image.tif --model demo/model --out demo/out
      geoseg info demo/out/classes.tif
    """
    verbosity = verbose - quiet
    ctx.obj = {"verbosity": verbosity}
    level = logging.DEBUG if verbosity >= 1 else logging.INFO if verbosity >= 0 else logging.WARNING
    # geoseg speaks at the chosen level; dask and the rest only when something is wrong (or -vv).
    logging.basicConfig(level=logging.DEBUG if verbosity > 1 else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("geoseg").setLevel(level)
    # distributed configures its own loggers at INFO when first imported, and the embedded
    # scheduler runs in this process: import it now, then quieten it.
    try:
        import distributed  # noqa: F401
    except ValueError as exc:  # dask reads its YAML config files on first import: one of them is malformed
        from geoseg.errors import ConfigError

        raise ConfigError(f"{exc}\nFix or remove that file (dask reads every YAML file in ~/.config/dask, "
                          "/etc/dask and $DASK_CONFIG).") from None

    logging.getLogger("distributed").setLevel(logging.DEBUG if verbosity > 1 else logging.INFO if verbosity == 1 else logging.WARNING)
    if verbosity <= 1:  # dask's errors in one line each (its tracebacks with -vv): the command says what failed
        for handler in logging.getLogger("distributed").handlers + logging.getLogger().handlers:
            if not any(isinstance(f, _NoDaskTraceback) for f in handler.filters):
                handler.addFilter(_NoDaskTraceback())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # geoseg's own warnings (SlowPrecisionWarning, ...) as one plain line, not Python's two with a source line
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
        if category.__module__.startswith("geoseg"):
            click.echo(f"geoseg: warning: {message}", err=True)
        else:
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    ctx.call_on_close(lambda: setattr(warnings, "showwarning", original))


class _NoDaskTraceback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.name.startswith("distributed"):
            record.exc_info, record.exc_text = None, None
        return True


def _register() -> None:
    from geoseg.cli import info, model, predict, sample_data, vectorize

    cli.add_command(predict.predict)
    cli.add_command(vectorize.vectorize)
    cli.add_command(model.model)
    cli.add_command(info.info)
    cli.add_command(sample_data.sample_data)
    for mod, name in (("geoseg.cli.train", "train"), ("geoseg.cli.evaluate", "evaluate"), ("geoseg.cli.run", "run"),
                      ("geoseg.cli.objects", "evaluate_objects")):
        try:
            module = __import__(mod, fromlist=[name])
        except ImportError:
            continue
        cli.add_command(getattr(module, name))


_register()


def main() -> None:
    """The ``geoseg`` command (and ``python -m geoseg``): ``cli`` in this process, which then exits.

    Its objects are frozen (``gc.freeze``) as the command ends: the interpreter's exit searches every object it
    holds for cycles several times over, and with torch, segmentation-models-pytorch and geopandas loaded (400 k
    objects) that took 1-1.9 s after the command had finished. Objects still go as their last reference does, and
    atexit handlers run; only cycles are left to the process's end (the command has closed its outputs by then)."""
    try:
        cli()  # click's standalone mode: ends in SystemExit, with the command's exit code
    finally:
        gc.freeze()
