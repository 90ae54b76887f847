"""One exception root for geoseg, mixed with the stdlib types callers already catch.

Every message names the file or setting at fault and says what to do about it.
"""

from __future__ import annotations


class GeosegError(Exception):
    """Root of every error geoseg raises on purpose."""


class InputError(GeosegError, ValueError):
    """An input raster, label file or band list cannot be used as given."""


class InputNotFoundError(InputError, FileNotFoundError):
    """An input path does not exist."""


class GridMismatchError(InputError):
    """Rasters that must share one grid (CRS, transform, shape) do not."""


class ModelError(GeosegError, ValueError):
    """A model directory or model card is missing, corrupt or inconsistent."""


class OutputExistsError(GeosegError, FileExistsError):
    """The output location already holds something that would be overwritten."""


class ConfigError(GeosegError, ValueError):
    """A job file, cluster profile or option is invalid."""


SCENE_ATTR = "geoseg_scene"


def name_scene(exc: BaseException, name: str) -> None:
    """Say which scene of a job ``exc`` stopped: the CLI puts it before the message (with several scenes in flight, a
    cluster's error such as a worker killed by a task names no file), a traceback shows it as a note."""
    try:
        setattr(exc, SCENE_ATTR, name)
    except AttributeError:  # an exception type without a __dict__
        return
    exc.add_note(f"(while running scene {name})")


def scene_of(exc: BaseException) -> str | None:
    """The scene ``name_scene`` gave ``exc``, else None."""
    return getattr(exc, SCENE_ATTR, None)


def detached(fn):
    """Wrap a task run on dask workers so that geoseg's errors reach the client as themselves.

    A geoseg error raised while handling a GDAL error carries it as ``__context__``; distributed
    pickles the chain, and GDAL's error types do not unpickle, so the client would get a bare
    ``Exception``. The message already says what went wrong: drop the chain.
    """
    import functools

    @functools.wraps(fn)
    def task(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GeosegError as exc:
            exc.__cause__ = exc.__context__ = None
            exc.__suppress_context__ = True
            raise

    return task
