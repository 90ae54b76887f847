"""Where data live: local paths or URLs (s3://, gs://, http(s)://...), reached through fsspec and GDAL.

One place turns the standard environment into access settings, so a client and every worker
configure themselves the same way from the same variables:

* credentials: the usual chain of boto3/botocore and GDAL (``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, instance roles...);
* an S3-compatible endpoint: ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (botocore's names,
  a full URL), or GDAL's ``AWS_S3_ENDPOINT`` (``host:port``) with ``AWS_HTTPS=NO`` for plain
  HTTP; ``AWS_VIRTUAL_HOSTING`` (default FALSE with a custom endpoint: path-style requests,
  which MinIO, Ceph and moto expect).

Nothing here edits ``os.environ``: GDAL gets its options through :func:`gdal_env`, fsspec
through :func:`storage_options`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

#: Schemes that are files on this machine, not URLs.
_LOCAL_SCHEMES = ("", "file", "local")
_FALSE = ("0", "no", "false", "off")


def check_creatable(path: str | os.PathLike, what: str = "output") -> None:
    """Raise ConfigError unless the local ``path`` can be created or written: its nearest existing
    ancestor is a directory this process may write in. Checked before any cluster starts, so a bad
    output is one clear line, not a traceback after the work. URLs are checked where they are listed."""
    from geoseg.errors import ConfigError

    if is_url(path):
        return
    p = Path(os.path.abspath(path))
    if p.exists():
        target = p if p.is_dir() else p.parent
    else:
        target = p.parent
        while not target.exists() and target != target.parent:
            target = target.parent
        if not target.is_dir():
            raise ConfigError(f"{path}: cannot be created: {target} is a file, not a directory; choose another {what}")
    if not os.access(target, os.W_OK | os.X_OK):
        raise ConfigError(f"{path}: cannot be written: no permission to write in {target}; choose another {what}")


def is_url(location: str | os.PathLike) -> bool:
    """True for ``scheme://...`` locations other than local files (GDAL ``/vsi...`` paths are not URLs)."""
    s = str(location)
    if "://" not in s:
        return False
    return urlsplit(s).scheme.lower() not in _LOCAL_SCHEMES


def absolute(location: str | os.PathLike) -> str:
    """A URL as it is, a local path made absolute (os.path.abspath made s3://b/k a local s3:/b/k)."""
    return str(location) if is_url(location) else os.path.abspath(location)


def scheme(location: str | os.PathLike) -> str:
    return urlsplit(str(location)).scheme.lower() if is_url(location) else ""


def join(base: str | os.PathLike, *parts: str) -> str | Path:
    """``base/part/...``: a Path for a local base, a URL string for a URL base."""
    if not is_url(base):
        return Path(base).joinpath(*parts)
    return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])


def s3_endpoint() -> str | None:
    """The S3 endpoint URL from the environment (``None``: AWS itself)."""
    url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if url:
        return url.rstrip("/")
    host = os.environ.get("AWS_S3_ENDPOINT")
    if not host:
        return None
    if "://" in host:
        return host.rstrip("/")
    plain = os.environ.get("AWS_HTTPS", "YES").lower() in _FALSE
    return f"{'http' if plain else 'https'}://{host.rstrip('/')}"


def _virtual_hosting(endpoint: str | None) -> bool:
    default = "TRUE" if endpoint is None else "FALSE"
    return os.environ.get("AWS_VIRTUAL_HOSTING", default).lower() not in _FALSE


def _is_remote_raster(location: str | os.PathLike | None) -> bool:
    s = str(location or "")
    return is_url(s) or s.startswith(("/vsis3", "/vsicurl", "/vsigs", "/vsiaz", "/vsiadls", "/vsioss", "/vsiswift"))


def gdal_options(location: str | os.PathLike | None = None) -> dict[str, str]:
    """GDAL configuration options for /vsis3/ and /vsicurl/, derived from the environment."""
    opts: dict[str, str] = {}
    if _is_remote_raster(location):
        # A prefix can hold thousands of objects; listing it on every open costs more than the
        # read itself. Side-car files (.ovr, .msk, .aux.xml) of remote rasters are not looked for.
        opts["GDAL_DISABLE_READDIR_ON_OPEN"] = os.environ.get("GDAL_DISABLE_READDIR_ON_OPEN", "EMPTY_DIR")
        # Object stores answer 503 "slow down" under load: retry rather than fail the task.
        opts["GDAL_HTTP_MAX_RETRY"] = os.environ.get("GDAL_HTTP_MAX_RETRY", "3")
        opts["GDAL_HTTP_RETRY_DELAY"] = os.environ.get("GDAL_HTTP_RETRY_DELAY", "1")
    endpoint = s3_endpoint()
    if endpoint:
        parts = urlsplit(endpoint)
        opts["AWS_S3_ENDPOINT"] = parts.netloc + parts.path.rstrip("/")
        opts["AWS_HTTPS"] = "NO" if parts.scheme == "http" else "YES"
        opts["AWS_VIRTUAL_HOSTING"] = "TRUE" if _virtual_hosting(endpoint) else "FALSE"
    return opts


def gdal_env(location: str | os.PathLike | None = None, **extra: Any) -> contextlib.AbstractContextManager:
    """A ``rasterio.Env`` that reaches ``location`` (credentials from boto3's chain).

    For a local file with nothing extra to set, no Env at all: a rasterio.Env builds a boto3
    session whenever AWS variables are set, which would cost more than reading a window.
    """
    # a local VRT may name /vsis3/ sources: they need the endpoint as much as a URL does
    local_vrt = str(location or "").lower().endswith(".vrt") and s3_endpoint() is not None
    if not _is_remote_raster(location) and not local_vrt and not extra:
        return contextlib.nullcontext()
    import rasterio

    return rasterio.Env(**{**gdal_options(location), **extra})


def storage_options(location: str | os.PathLike) -> dict[str, Any]:
    """fsspec options for ``location`` (empty for local paths and schemes that need none)."""
    sch = scheme(location)
    if sch in ("s3", "s3a"):
        endpoint = s3_endpoint()
        opts: dict[str, Any] = {
            # Listings must be fresh: markers and run.json are looked up while other
            # processes write them.
            "use_listings_cache": False,
        }
        if os.environ.get("AWS_NO_SIGN_REQUEST", "").lower() in ("yes", "true", "1"):
            opts["anon"] = True  # a public bucket, as GDAL reads it with the same variable
        if endpoint:
            opts["client_kwargs"] = {"endpoint_url": endpoint}
            if not _virtual_hosting(endpoint):
                opts["config_kwargs"] = {"s3": {"addressing_style": "path"}}
        return opts
    return {}


def zarr_kwargs(location: str | os.PathLike) -> dict[str, Any]:
    """Keyword arguments for zarr/xarray to open ``location`` (zarr refuses storage_options for paths)."""
    return {"storage_options": storage_options(location)} if is_url(location) else {}


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` and the path within it."""
    from fsspec.core import url_to_fs

    return url_to_fs(url, **storage_options(url))


BUCKET_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")


def missing_bucket(url: str) -> str | None:
    """The bucket (container) of an object-store URL where it does not exist, else None: an output under it would
    fail only when the first worker writes (s3fs lists a missing bucket as empty)."""
    if scheme(url) not in BUCKET_SCHEMES:
        return None
    fs, path = filesystem(url)
    bucket = path.strip("/").split("/", 1)[0]
    if not bucket:
        return None
    try:
        return None if fs.exists(bucket) else bucket
    except PermissionError:  # may not list the bucket but may write in it: the write says
        return None


def exists(location: str | os.PathLike) -> bool:
    """Whether a file or object exists; an OSError where its server cannot be reached."""
    if not is_url(location):
        return os.path.exists(location)
    fs, path = filesystem(str(location))
    if scheme(location) in ("http", "https"):  # fsspec's exists() GETs the whole file: info() asks with HEAD first
        try:
            fs.info(path)
        except FileNotFoundError as exc:
            if isinstance(exc.__cause__, OSError):  # connection refused, no such host: not an answer
                raise ConnectionError(str(exc.__cause__)) from None
            return False
        return True
    return fs.exists(path)


def isdir(location: str | os.PathLike) -> bool:
    """A directory, or a prefix with objects under it."""
    if not is_url(location):
        return os.path.isdir(location)
    fs, path = filesystem(str(location))
    return fs.isdir(path)


def isfile(location: str | os.PathLike) -> bool:
    if not is_url(location):
        return os.path.isfile(location)
    fs, path = filesystem(str(location))
    return fs.isfile(path)


def list_names(location: str | os.PathLike) -> list[str]:
    """Names directly under a directory or prefix (empty when there is none)."""
    if not is_url(location):
        p = Path(location)
        return sorted(c.name for c in p.iterdir()) if p.is_dir() else []
    fs, path = filesystem(str(location))
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != path.rstrip("/")})


def read_bytes(location: str | os.PathLike) -> bytes:
    if not is_url(location):
        return Path(location).read_bytes()
    fs, path = filesystem(str(location))
    return fs.cat_file(path)


def write_atomic(location: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` so that readers see the old content or all of the new, never a part.

    Locally a temporary sibling is renamed into place; an object store's single PUT is atomic.
    """
    if not is_url(location):
        p = Path(location)
        tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, p)
        finally:
            tmp.unlink(missing_ok=True)
        return
    fs, path = filesystem(str(location))
    fs.pipe_file(path, data)


def remove(location: str | os.PathLike, recursive: bool = False) -> None:
    """Remove a file, object, directory or prefix; nothing there is fine."""
    if not is_url(location):
        p = Path(location)
        if p.is_dir() and not p.is_symlink():
            if recursive:
                shutil.rmtree(p)
            else:
                p.rmdir()
        else:
            p.unlink(missing_ok=True)
        return
    fs, path = filesystem(str(location))
    try:
        if recursive:
            fs.rm(path, recursive=True)
        elif fs.isfile(path):
            fs.rm_file(path)
    except FileNotFoundError:
        pass


def upload(local: str | os.PathLike, location: str | os.PathLike) -> None:
    """Copy a finished local file to ``location``.

    An object appears only when its upload completes (multipart uploads included), so a
    reader never sees part of it.
    """
    if not is_url(location):
        dst = Path(location)
        tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            shutil.copyfile(local, tmp)
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
        return
    fs, path = filesystem(str(location))
    fs.put_file(str(local), path)


def download(location: str | os.PathLike, local: str | os.PathLike) -> None:
    """Copy ``location`` to the local file ``local``; FileNotFoundError when it is not there."""
    if not is_url(location):
        shutil.copyfile(location, local)
        return
    fs, path = filesystem(str(location))
    fs.get_file(path, str(local))


def identity(location: str | os.PathLike) -> list[Any]:
    """What tells two versions of an input apart: path and size plus mtime (files) or ETag (objects)."""
    s = str(location)
    if not is_url(s):
        try:
            st = os.stat(s)
        except OSError:
            return [s]  # a GDAL /vsi... path or similar: only its name is known
        return [os.path.abspath(s), st.st_size, st.st_mtime_ns]
    try:
        fs, path = filesystem(s)
        info = fs.info(path)
    except (OSError, ValueError):
        return [s]
    version = next((info[k] for k in ("ETag", "etag", "LastModified", "last_modified", "mtime", "updated") if info.get(k)), None)
    return [s, info.get("size"), str(version) if version is not None else None]


def cache_dir(kind: str) -> Path:
    """A local cache directory for ``kind`` (``GEOSEG_CACHE_DIR``, else ``$XDG_CACHE_HOME/geoseg``)."""
    root = os.environ.get("GEOSEG_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "geoseg"
    )
    path = Path(root) / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def local_staging(prefix: str = "geoseg-") -> Iterator[Path]:
    """A private local temporary directory, removed afterwards (outputs bound for a URL are built here)."""
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


PREFETCH_SHARE = 0.25  # of the memory available: scenes larger than that are read as the tasks reach them
PREFETCH_PIECE = 2 << 20  # bytes per read-ahead request


def prefetch_local(paths: list[str], share: float = PREFETCH_SHARE) -> int:
    """Ask the kernel to start reading the local files behind ``paths`` (a VRT's or a band stack's too) into
    the page cache now, in the background (``posix_fadvise(WILLNEED)``), where they fit ``share`` of the
    memory available; returns the bytes asked for (0: not local, too large, or no such call here).

    For workers on this machine (the embedded cluster): the disk reads while the workers are prepared and
    the first windows are segmented, so read tasks find their blocks in memory (a scene not read for a while
    is cold: measured on the development VM, a cold 4240 px window of a deflate GeoTIFF took 2.0-9.6 s
    to read against 0.7 s cached)."""
    if not hasattr(os, "posix_fadvise") or not paths or any(is_url(p) or str(p).startswith("/vsi") for p in paths):
        return 0
    try:
        import psutil
        import rasterio

        files: dict[str, int] = {}
        for p in paths:
            with rasterio.open(p) as src:
                for f in src.files:
                    if not is_url(f) and os.path.isfile(f):
                        files[os.path.realpath(f)] = os.path.getsize(f)
        if sum(files.values()) > share * psutil.virtual_memory().available:
            return 0
        for f, size in files.items():
            fd = os.open(f, os.O_RDONLY)
            try:  # a piece at a time: the kernel caps one call at the disk's read-ahead size
                for offset in range(0, size, PREFETCH_PIECE):
                    os.posix_fadvise(fd, offset, PREFETCH_PIECE, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
    except Exception:  # a hint only: reads find the files as they are
        return 0
    return sum(files.values())
