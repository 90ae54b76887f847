"""Storage a cluster can reach: input, model and outputs on S3 (a real moto server on loopback).

The workers get nothing but their environment (AWS_* variables, as on a real cluster): the
dedicated LocalCluster below is started after the variables are set, so its worker processes
inherit them; geoseg.io.storage turns them into GDAL options and fsspec storage options.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio

from geoseg.api import band_nodata
from geoseg.errors import InputNotFoundError, ModelError, OutputExistsError
from geoseg.io import storage
from geoseg.io.zarr_store import open_prediction
from geoseg.model.store import fetch_model_dir, model_digest
from geoseg.pipeline import PredictOptions, predict

BUCKET = "geoseg-test"


@dataclass
class S3:
    endpoint: str
    host: str
    client: Any  # distributed.Client of the dedicated cluster
    boto: Any
    cache: Path

    def keys(self, prefix: str) -> list[str]:
        pages = self.boto.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def get(self, key: str) -> bytes:
        return self.boto.get_object(Bucket=BUCKET, Key=key)["Body"].read()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    import boto3
    from moto.server import ThreadedMotoServer

    from geoseg.cluster import connect

    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    cache = tmp_path_factory.mktemp("cache")
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k in list(os.environ):
                if k.startswith(("AWS_", "GDAL_")):
                    mp.delenv(k)  # nothing of this machine's own cloud settings
            mp.setenv("AWS_ACCESS_KEY_ID", "testing")
            mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
            mp.setenv("AWS_ENDPOINT_URL", endpoint)  # the one variable boto3, s3fs and (through geoseg) GDAL use
            mp.setenv("GEOSEG_CACHE_DIR", str(cache / "workers"))
            boto = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
            boto.create_bucket(Bucket=BUCKET)
            with connect(n_workers=1) as client:  # its worker inherits the environment set above
                # the client process caches models elsewhere: the worker must fetch its own copy
                mp.setenv("GEOSEG_CACHE_DIR", str(cache / "client"))
                yield S3(endpoint, f"{host}:{port}", client, boto, cache)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def uploaded(s3, random_model, scene_path):
    s3.boto.upload_file(str(scene_path), BUCKET, "in/scene.tif")
    for f in ("model.json", "weights.safetensors"):
        s3.boto.upload_file(str(random_model / f), BUCKET, f"models/random/{f}")
    return f"s3://{BUCKET}/in/scene.tif", f"s3://{BUCKET}/models/random"


def _object_times(prefix: str) -> dict[str, Any]:
    """When moto stored each object under ``prefix`` (microseconds; S3's own listing gives seconds)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    bucket = s3_backends[DEFAULT_ACCOUNT_ID]["global"].buckets[BUCKET]
    return {name: key.last_modified for name, key in bucket.keys.items() if name.startswith(prefix)}


@pytest.fixture(scope="module")
def local_run(s3, random_model, scene_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "out"
    predict([scene_path], random_model, out, PredictOptions(chunk_size=128), client=s3.client)
    return out


def test_predict_from_and_to_s3(s3, uploaded, local_run, random_model, scene_path):
    scene_url, model_url = uploaded
    out_url = f"s3://{BUCKET}/runs/one"
    # the worker loaded this very model (same digest) from its local path for local_run: it would not fetch it
    s3.client.run(lambda: __import__("geoseg.runtime", fromlist=["_CACHE"])._CACHE.clear())
    record = predict([scene_url], model_url, out_url, PredictOptions(chunk_size=128), client=s3.client)
    assert record["chunks"] == {"chunks": 12, "computed": 12, "reused": 0}
    assert record["inputs"] == [scene_url] and record["model"]["path"] == model_url
    digest = model_digest(random_model)
    assert record["model"]["digest"] == digest

    # the model was fetched, verified and cached by digest: by the client and by the worker
    assert (s3.cache / "client" / "models" / digest / "weights.safetensors").is_file()
    assert (s3.cache / "workers" / "models" / digest / "weights.safetensors").is_file()

    keys = s3.keys("runs/one/")
    assert "runs/one/run.json" in keys and "runs/one/classes.tif" in keys and "runs/one/landuse.gpkg" in keys
    assert not [k for k in keys if "/.geoseg" in k or k.endswith((".partial", ".tmp"))]
    # run.json is the last object written
    times = _object_times("runs/one/")
    assert max(times, key=times.get) == "runs/one/run.json"
    assert json.loads(s3.get("runs/one/run.json"))["job_key"] == record["job_key"]

    # the Zarr store read back with plain xarray + s3fs: CRS and transform intact, same class map
    import xarray as xr

    ds = xr.open_zarr(f"{out_url}/prediction.zarr", decode_coords="all", consolidated=False,
                      storage_options={"client_kwargs": {"endpoint_url": s3.endpoint}})
    with rasterio.open(scene_path) as src:
        crs, transform = src.crs, src.transform
    assert ds.rio.crs == crs and ds.rio.transform() == transform
    local = open_prediction(local_run / "prediction.zarr")
    assert ds["class_id"].values.tobytes() == local["class_id"].values.tobytes()
    assert np.array_equal(ds["confidence"].values, local["confidence"].values, equal_nan=True)

    # the COG through GDAL's /vsis3/, configured the GDAL way (credentials: rasterio asks boto3)
    with rasterio.Env(AWS_S3_ENDPOINT=s3.host, AWS_HTTPS="NO", AWS_VIRTUAL_HOSTING="FALSE"):
        with rasterio.open(f"/vsis3/{BUCKET}/runs/one/classes.tif") as cog:
            assert cog.crs == crs and cog.transform == transform
            remote_cog = cog.read(1)
    with rasterio.open(local_run / "classes.tif") as cog:
        assert np.array_equal(remote_cog, cog.read(1))
    assert s3.get("runs/one/landuse.gpkg")[:16] == b"SQLite format 3\x00"

    # a finished prefix is refused without --overwrite, before anything runs
    with pytest.raises(OutputExistsError, match="--overwrite"):
        predict([scene_url], model_url, out_url, PredictOptions(chunk_size=128), client=s3.client)


def test_info_reads_models_outputs_stores_and_items_on_the_store(s3, uploaded, local_run):
    """geoseg info on URLs: each kind is found by the files geoseg writes, as for local paths (every URL was
    read as a raster: "not a raster GDAL can read" for a model, advice to assign a CRS for a store)."""
    from click.testing import CliRunner

    from geoseg.cli.main import cli

    for f in local_run.rglob("*"):
        if f.is_file():
            s3.boto.upload_file(str(f), BUCKET, f"info/out/{f.relative_to(local_run).as_posix()}")
    _, model_url = uploaded
    out_url = f"s3://{BUCKET}/info/out"
    res = CliRunner().invoke(cli, ["info", model_url, out_url, f"{out_url}/prediction.zarr", f"{out_url}/item.json",
                                   f"{out_url}/classes.tif", "--json"])
    assert res.exit_code == 0, res.output
    model, output, store, item, cog = json.loads(res.output)
    assert model["model"] == model_url and model["classes"]
    local = json.loads((local_run / "run.json").read_text())
    assert output["output"] == out_url and output["shape"] == local["grid"]["shape"]
    assert sum(c["pixels"] for c in output["classes_table"]) == sum(local["class_pixels"].values())
    with rasterio.open(local_run / "classes.tif") as src:
        assert store["crs"] == f"EPSG:{src.crs.to_epsg()}" and cog["crs"] == store["crs"]
        assert store["transform"] == list(src.transform)[:6]
    assert item["stac_item"] == f"{out_url}/item.json" and "classes" in item["assets"]
    assert cog["layout"]["cog"] and set(cog["classes"].values()) <= set(model["classes"].values())
    res = CliRunner().invoke(cli, ["info", f"{out_url}/run.json"])
    assert res.exit_code != 0 and f"geoseg info {out_url}" in res.output


def test_failed_run_publishes_no_run_json(s3, uploaded, local_run, monkeypatch):
    """A run that fails after its store is written leaves no run.json; --resume then finishes it."""
    import geoseg.io.cog_cluster

    def broken(*args, **kwargs):
        raise OSError("COG driver failed (simulated)")

    scene_url, model_url = uploaded
    out_url = f"s3://{BUCKET}/runs/two"
    opts = PredictOptions(chunk_size=128, vectors=False)
    monkeypatch.setattr(geoseg.io.cog_cluster, "write_cog_cluster", broken)
    with pytest.raises(OSError, match="simulated"):
        predict([scene_url], model_url, out_url, opts, client=s3.client)
    keys = s3.keys("runs/two/")
    assert "runs/two/prediction.zarr/zarr.json" in keys
    assert "runs/two/run.json" not in keys and "runs/two/classes.tif" not in keys
    monkeypatch.undo()

    record = predict([scene_url], model_url, out_url, PredictOptions(chunk_size=128, vectors=False, resume=True), client=s3.client)
    assert record["chunks"] == {"chunks": 12, "computed": 0, "reused": 12}
    times = _object_times("runs/two/")
    assert max(times, key=times.get) == "runs/two/run.json"
    ds = open_prediction(f"{out_url}/prediction.zarr")
    assert ds["class_id"].values.tobytes() == open_prediction(local_run / "prediction.zarr")["class_id"].values.tobytes()


def test_remote_model_is_verified(s3, uploaded, random_model):
    _, model_url = uploaded
    before = sorted(p.name for p in (s3.cache / "client" / "models").iterdir()) if (s3.cache / "client" / "models").exists() else []
    with pytest.raises(ModelError, match="model changed"):
        fetch_model_dir(model_url, "0" * 64)
    assert sorted(p.name for p in (s3.cache / "client" / "models").iterdir()) == sorted(set(before) | {model_digest(random_model)})
    with pytest.raises(ModelError, match=f"s3://{BUCKET}/models/nothing/model.json"):
        fetch_model_dir(f"s3://{BUCKET}/models/nothing")


def test_an_output_in_a_missing_bucket_is_refused_before_any_work(s3, uploaded, tmp_path):
    """s3fs lists a missing bucket as an empty prefix: the output is refused at planning, one clear error, not a
    traceback from the first worker that writes."""
    from geoseg.errors import ConfigError
    from geoseg.pipeline import plan_job

    scene_url, model_url = uploaded
    with pytest.raises(ConfigError, match="the bucket 'no-such-bucket' does not exist"):
        plan_job([scene_url], model_url, "s3://no-such-bucket/runs/x", PredictOptions(chunk_size=128))
    plan_job([scene_url], model_url, f"s3://{BUCKET}/runs/fresh", PredictOptions(chunk_size=128))  # a new prefix is fine


def test_a_killed_run_s_temporaries_under_a_prefix_are_swept_by_the_next(s3, uploaded):
    """A run killed while workers wrote polygon parts leaves them under the output prefix (no rename, no finally on
    SIGKILL); the next run removes them before it publishes, as a local run does."""
    scene_url, model_url = uploaded
    out_url = f"s3://{BUCKET}/runs/swept"
    storage.write_atomic(f"{out_url}/.geoseg-parts-0123456789ab/inner-0-1.parquet", b"left by a killed run")
    assert "runs/swept/.geoseg-parts-0123456789ab/inner-0-1.parquet" in s3.keys("runs/swept/")
    predict([scene_url], model_url, out_url, PredictOptions(chunk_size=128, cog=False, vectors=False), client=s3.client)
    keys = s3.keys("runs/swept/")
    assert "runs/swept/run.json" in keys and not [k for k in keys if "/.geoseg-parts" in k]


def test_missing_remote_input(s3, uploaded, tmp_path):
    _, model_url = uploaded
    with pytest.raises(InputNotFoundError, match=f"s3://{BUCKET}/in/nope.tif"):
        predict([f"s3://{BUCKET}/in/nope.tif"], model_url, tmp_path / "out", client=s3.client)
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputNotFoundError, match="no bucket 'no-such-bucket'"):
        predict(["s3://no-such-bucket/in/scene.tif"], model_url, tmp_path / "out", client=s3.client)


@pytest.mark.parametrize(
    "env, endpoint, gdal",
    [
        ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}, "http://127.0.0.1:9000",
         {"AWS_S3_ENDPOINT": "127.0.0.1:9000", "AWS_HTTPS": "NO", "AWS_VIRTUAL_HOSTING": "FALSE"}),
        ({"AWS_S3_ENDPOINT": "minio.lan:9000", "AWS_HTTPS": "NO"}, "http://minio.lan:9000",
         {"AWS_S3_ENDPOINT": "minio.lan:9000", "AWS_HTTPS": "NO", "AWS_VIRTUAL_HOSTING": "FALSE"}),
        ({"AWS_ENDPOINT_URL_S3": "https://s3.example.org", "AWS_VIRTUAL_HOSTING": "TRUE"}, "https://s3.example.org",
         {"AWS_S3_ENDPOINT": "s3.example.org", "AWS_HTTPS": "YES", "AWS_VIRTUAL_HOSTING": "TRUE"}),
        ({}, None, {}),
    ],
)
def test_settings_from_the_environment(monkeypatch, env, endpoint, gdal):
    for k in list(os.environ):
        if k.startswith("AWS_"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert storage.s3_endpoint() == endpoint
    opts = storage.gdal_options("s3://b/k.tif")
    assert {k: opts[k] for k in gdal} == gdal and ("AWS_S3_ENDPOINT" in opts) == bool(gdal)
    assert opts["GDAL_DISABLE_READDIR_ON_OPEN"] == "EMPTY_DIR"
    fs_opts = storage.storage_options("s3://b/prefix")
    assert fs_opts.get("client_kwargs", {}).get("endpoint_url") == endpoint
    # local files get no settings at all
    assert storage.storage_options("/data/scene.tif") == {} and storage.gdal_options("/data/scene.tif").keys() <= set(gdal)


def test_locations():
    assert storage.is_url("s3://b/k") and storage.is_url("https://h/x.tif")
    assert not storage.is_url("/data/x.tif") and not storage.is_url("/vsis3/b/k") and not storage.is_url("file:///data/x")
    assert storage.join("s3://b/run/", "prediction.zarr", ".geoseg/done") == "s3://b/run/prediction.zarr/.geoseg/done"
    assert storage.join("/data/run", "run.json") == Path("/data/run/run.json")


def test_remote_input_identity_follows_its_content(s3):
    """The job key sees a replaced object (its ETag), as it sees a local file's size and mtime."""
    url = f"s3://{BUCKET}/in/identity.bin"
    s3.boto.put_object(Bucket=BUCKET, Key="in/identity.bin", Body=b"first version")
    before = storage.identity(url)
    s3.boto.put_object(Bucket=BUCKET, Key="in/identity.bin", Body=b"other version")
    after = storage.identity(url)
    assert before[0] == after[0] == url and before[1] == after[1] == 13
    assert before != after


def _resident_share(path: Path) -> float:
    """Share of the file's pages in the page cache (mincore over a read-only mapping)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                                                             ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    with open(path, "rb") as f:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
    assert addr not in (None, ctypes.c_void_p(-1).value)
    try:
        vec = (ctypes.c_ubyte * pages)()
        assert libc.mincore(addr, size, vec) == 0
        return sum(v & 1 for v in vec) / pages
    finally:
        libc.munmap(addr, size)


def test_prefetch_reads_a_scene_and_the_files_behind_a_vrt_into_the_page_cache(tmp_path):
    """What the embedded cluster's client asks of the kernel before the workers read: the files behind the
    inputs (a VRT's sources too) are read into the page cache in the background; URLs and scenes larger
    than the share of available memory are left alone."""
    import time

    tif = tmp_path / "band.tif"
    data = np.random.default_rng(0).integers(0, 65535, (1, 4096, 4096), dtype=np.uint16)  # 32 MiB, stored as is
    from rasterio.transform import from_origin

    with rasterio.open(tif, "w", driver="GTiff", width=4096, height=4096, count=1, dtype="uint16", tiled=True,
                       crs="EPSG:32633", transform=from_origin(500000, 6000000, 10, 10)) as dst:
        dst.write(data)
    vrt = tmp_path / "mosaic.vrt"
    vrt.write_text('<VRTDataset rasterXSize="4096" rasterYSize="4096"><VRTRasterBand dataType="UInt16" band="1">'
                   '<SimpleSource><SourceFilename relativeToVRT="1">band.tif</SourceFilename><SourceBand>1</SourceBand>'
                   '</SimpleSource></VRTRasterBand></VRTDataset>')

    def evict() -> float:
        fd = os.open(tif, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return _resident_share(tif)

    if evict() > 0.1:
        pytest.skip(f"{tmp_path} keeps files in memory (tmpfs?): nothing to prefetch")
    assert storage.prefetch_local([str(vrt)], share=1e-9) == 0  # larger than the share: left alone
    time.sleep(0.5)
    assert _resident_share(tif) < 0.1
    assert storage.prefetch_local(["s3://bucket/scene.tif"]) == 0
    asked = storage.prefetch_local([str(vrt)])
    assert asked == tif.stat().st_size + vrt.stat().st_size
    deadline = time.time() + 10
    while _resident_share(tif) < 0.99 and time.time() < deadline:
        time.sleep(0.05)
    assert _resident_share(tif) >= 0.99


def test_open_scene_reads_an_object_behind_the_endpoint_on_the_workers(s3, uploaded, scene_path):
    """The xarray API on an s3:// input: opened and read (by the cluster's worker) through the endpoint
    geoseg derives from AWS_ENDPOINT_URL, the same pixels, grid and nodata as the local file."""
    import geoseg

    remote, local = geoseg.open_scene(uploaded[0], chunks=128), geoseg.open_scene(scene_path)
    assert remote.sizes == local.sizes and band_nodata(remote) == band_nodata(local) == [0, 0, 0, 0]
    assert remote.rio.crs == local.rio.crs and remote.rio.transform() == local.rio.transform()
    np.testing.assert_array_equal(remote["x"].values, local["x"].values)
    np.testing.assert_array_equal(s3.client.compute(remote.data).result(), local.values)


def test_an_unreachable_object_store_is_one_line(tmp_path, scene_path, random_model, monkeypatch):
    """botocore's EndpointConnectionError came out as a 40-line traceback with exit 1."""
    import socket

    from click.testing import CliRunner

    from geoseg.cli.main import cli

    with socket.socket() as sock:  # a loopback port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for k in ("AWS_ENDPOINT_URL_S3", "AWS_S3_ENDPOINT", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
                 "AWS_MAX_ATTEMPTS": "1", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    res = CliRunner().invoke(cli, ["predict", str(scene_path), "--model", "s3://bucket/model", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    assert f"the object store http://127.0.0.1:{port} could not be reached" in res.output
    assert "EndpointConnectionError" in res.output and "Traceback" not in res.output and not (tmp_path / "o").exists()


def test_only_errors_raised_from_the_object_store_are_said_to_be_its():
    """A bug or a Ctrl-C while a botocore error was being handled was reported as an unreachable object store."""
    from botocore.exceptions import EndpointConnectionError

    from geoseg.cli.main import _object_store_failure

    def raised(inner, outer, chain):
        try:
            try:
                raise inner
            except Exception as exc:
                if chain:
                    raise outer from exc
                raise outer
        except BaseException as exc:  # noqa: BLE001
            return exc

    lost = EndpointConnectionError(endpoint_url="http://127.0.0.1:1/b")
    assert "could not be reached" in _object_store_failure(lost)
    assert "could not be reached" in _object_store_failure(raised(lost, OSError("s3fs"), chain=True))
    assert _object_store_failure(raised(lost, KeyError("bug"), chain=False)) is None
    assert _object_store_failure(raised(lost, KeyboardInterrupt(), chain=False)) is None


def test_a_vrt_on_the_store_is_a_new_input_when_its_source_object_changes(s3, tmp_path, monkeypatch):
    """A VRT on the object store (or a local one naming /vsis3/ sources) whose source object was replaced: the job
    key did not change (the files behind a URL were never looked at), so --resume reused the old map's chunks."""
    from rasterio.transform import from_origin

    from geoseg.pipeline.plan import input_identity

    def put_source(value: int) -> None:
        src = tmp_path / f"src{value}.tif"
        with rasterio.open(src, "w", driver="GTiff", width=16, height=16, count=1, dtype="uint8", crs="EPSG:32633",
                           transform=from_origin(500000, 4000000, 10, 10)) as dst:
            dst.write(np.full((1, 16, 16), value, np.uint8))
        s3.boto.upload_file(str(src), BUCKET, "vrt/src.tif")

    put_source(1)
    vrt = ('<VRTDataset rasterXSize="16" rasterYSize="16"><SRS>EPSG:32633</SRS>'
           '<GeoTransform>500000, 10, 0, 4000000, 0, -10</GeoTransform><VRTRasterBand dataType="Byte" band="1">'
           f'<SimpleSource><SourceFilename relativeToVRT="0">/vsis3/{BUCKET}/vrt/src.tif</SourceFilename>'
           '<SourceBand>1</SourceBand></SimpleSource></VRTRasterBand></VRTDataset>')
    s3.boto.put_object(Bucket=BUCKET, Key="vrt/mosaic.vrt", Body=vrt.encode())
    (tmp_path / "local.vrt").write_text(vrt)
    url, local = f"s3://{BUCKET}/vrt/mosaic.vrt", str(tmp_path / "local.vrt")
    before = input_identity(url), input_identity(local)
    assert f"s3://{BUCKET}/vrt/src.tif" in json.dumps(before[0]) and f"s3://{BUCKET}/vrt/src.tif" in json.dumps(before[1])
    put_source(2)
    after = input_identity(url), input_identity(local)
    assert after[0] != before[0] and after[1] != before[1]


def test_an_unfinished_store_is_not_read_as_a_prediction(local_run, tmp_path):
    """Under a URL an interrupted run's store has its final name (object stores cannot rename): vectorize made
    polygons of the chunks it had (70,667 of 262,144 px) and exited 0."""
    import shutil

    import zarr
    from click.testing import CliRunner

    from geoseg.cli.main import cli
    from geoseg.io.zarr_store import COMPLETE_ATTR

    store = tmp_path / "prediction.zarr"
    shutil.copytree(local_run / "prediction.zarr", store)
    g = zarr.open_group(str(store), mode="r+")
    attrs = dict(g.attrs)
    del attrs[COMPLETE_ATTR]
    g.attrs.clear()
    g.attrs.update(attrs)
    r = CliRunner().invoke(cli, ["vectorize", str(store), "--out", str(tmp_path / "p.gpkg")], catch_exceptions=False)
    assert r.exit_code == 2 and "an unfinished prediction" in r.output and not (tmp_path / "p.gpkg").exists(), r.output
    from geoseg import api
    from geoseg.errors import InputError

    with pytest.raises(InputError, match="an unfinished prediction"):
        api.open_prediction(store)
    api.open_prediction(local_run / "prediction.zarr")  # a finished one still opens


def test_local_outputs_given_an_object_store_url_are_refused(tmp_path, scene_path, random_model, monkeypatch):
    """A report, a model directory or a polygon file given as s3://b/k was written to a local folder s3:/b/k and said
    to be in the bucket; they are written locally only, so a URL is refused."""
    from click.testing import CliRunner

    from geoseg.cli.main import cli

    monkeypatch.chdir(tmp_path)
    for args in (["evaluate", str(scene_path), "--model", str(random_model), "--labels", str(scene_path), "--json",
                  "s3://bkt/eval/scores.json"],
                 ["model", "init", "s3://bkt/models/m", "--bands", "4", "--classes", "3"],
                 ["train", str(scene_path), "--labels", str(scene_path), "--out", "s3://bkt/models/m"],
                 ["vectorize", str(scene_path), "--out", "s3://bkt/vec/p.gpkg"]):
        r = CliRunner().invoke(cli, args, catch_exceptions=False)
        assert r.exit_code == 2 and "locally" in r.output, (args, r.output)
    assert not (tmp_path / "s3:").exists()


def test_model_init_refuses_its_output_before_making_the_model(tmp_path):
    """The output is checked first: a URL or a folder with files in it was refused only after the network was built
    and its receptive field measured (~15 s), and a bad --encoder or --checkpoint was reported instead."""
    from click.testing import CliRunner

    from geoseg.cli.main import cli

    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    for out, says in (("s3://bkt/models/m", "locally"), (str(full), "already exists")):
        for extra in (["--encoder", "no-such-encoder"], ["--method", "sam", "--checkpoint", str(tmp_path / "bad.pth")]):
            args = ["model", "init", out, "--bands", "3", *([] if "sam" in extra else ["--classes", "3"]), *extra]
            r = CliRunner().invoke(cli, args, catch_exceptions=False)
            assert r.exit_code == 2 and says in r.output, (args, r.output)
    assert (full / "notes.txt").read_text() == "mine" and sorted(p.name for p in full.iterdir()) == ["notes.txt"]


def test_public_buckets_are_read_without_signing(monkeypatch):
    monkeypatch.setenv("AWS_NO_SIGN_REQUEST", "YES")
    assert storage.storage_options("s3://public/scene.tif")["anon"] is True
    monkeypatch.delenv("AWS_NO_SIGN_REQUEST")
    assert "anon" not in storage.storage_options("s3://private/scene.tif")


def test_a_subdataset_or_archive_member_is_a_new_input_when_its_file_changes(tmp_path):
    """Inputs GDAL names other than by a path (a GeoTIFF's subdataset GTIFF_DIR:1:f.tif, a member of a zip) are known
    by the files GDAL reads for them: by their name alone, a file rewritten under them was the same input, and a
    --resume reused the old chunks with the new data."""
    import os
    import zipfile

    from geoseg.pipeline.plan import input_identity

    from conftest import write_raster

    tif, zipped = tmp_path / "a.tif", tmp_path / "a.zip"

    def write(value: int, mtime: int) -> None:
        write_raster(tif, np.full((1, 16, 16), value, np.uint16), block=16)
        with zipfile.ZipFile(zipped, "w") as z:
            z.write(tif, "a.tif")
        for f in (tif, zipped):
            os.utime(f, ns=(mtime, mtime))

    names = [f"GTIFF_DIR:1:{tif}", f"/vsizip/{zipped}/a.tif", f"/vsizip/{{{zipped}}}/a.tif"]
    write(1, 10**18)
    before = [input_identity(n) for n in names]
    assert all(len(b) > 1 for b in before)  # the name and the file behind it
    write(2, 10**18 + 10**9)  # new pixels, a second later
    after = [input_identity(n) for n in names]
    assert all(a != b for a, b in zip(after, before))
    assert [input_identity(n) for n in names] == after  # unchanged files: the same input


def test_evaluate_s_report_names_inputs_on_the_store_by_their_urls(s3, uploaded, local_run):
    """A report of inputs on the object store names them by their URLs (os.path.abspath made s3://b/k a local
    path under the working directory)."""
    from geoseg.evaluation import EvaluateOptions, compare, evaluate

    scene_url, model_url = uploaded
    labels_url = f"s3://{BUCKET}/labels/classes.tif"
    s3.boto.upload_file(str(local_run / "classes.tif"), BUCKET, "labels/classes.tif")
    report = evaluate([scene_url], model_url, labels_url, EvaluateOptions(chunk_size=128)).to_dict()
    assert report["images"] == [scene_url] and report["labels"] == labels_url and report["model"] == model_url
    assert report["miou"] == 1.0  # the model's own map as labels
    side = compare([scene_url], [model_url], labels_url, EvaluateOptions(chunk_size=128)).to_dict()
    assert side["images"] == [scene_url] and side["labels"] == labels_url and side["models"][0]["model"] == model_url


def test_a_vector_file_s_identity_follows_the_files_beside_it(tmp_path):
    """SAM prompts in a Shapefile: a corrected .prj (or new attributes) makes another job, not a reused one."""
    import os

    import geopandas as gpd
    import shapely

    from geoseg.pipeline.plan import vector_identity

    shp = tmp_path / "prompts.shp"
    gpd.GeoDataFrame({"kind": [1]}, geometry=[shapely.Point(500005.0, 3999995.0)], crs="EPSG:32617").to_file(shp)
    before = vector_identity(str(shp))
    assert len(before) >= 4  # the .shp and its .shx, .dbf, .prj
    prj = tmp_path / "prompts.prj"
    prj.write_text(gpd.GeoSeries([], crs="EPSG:32618").crs.to_wkt())  # the CRS corrected: the .shp is untouched
    os.utime(prj, ns=(prj.stat().st_mtime_ns + 10**9,) * 2)
    assert vector_identity(str(shp)) != before
    assert vector_identity(str(shp)) == vector_identity(str(shp))
