"""Resumable jobs: a killed `geoseg predict` leaves nothing that looks finished, and --resume
recomputes only what it had not finished, never reusing chunks of another job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from geoseg.cli.main import cli
from geoseg.io.zarr_store import JOB_ATTR, MARKERS, create_store, open_prediction, reusable_chunks
from geoseg.pipeline import PredictOptions, plan_job, predict, run_job, run_segmentation

from conftest import blob_scene, write_raster, count_markers

GEOSEG = str(Path(sys.executable).with_name("geoseg"))
# 64 chunks of 64 px with a small halo: many short chunks, so a kill lands in the middle.
CLI_OPTS = ["--chunk-size", "64", "--halo", "16", "--no-cog", "--no-vectors"]
OPTIONS = PredictOptions(chunk_size=64, halo=16, cog=False, vectors=False)


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    image, _ = blob_scene(512, 512, 4, seed=17)
    return write_raster(tmp_path_factory.mktemp("resume") / "scene.tif", image, nodata=0)


def _visible(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if not p.name.startswith("."))


def _same_maps(a: Path, b: Path) -> None:
    da, db = open_prediction(a), open_prediction(b)
    assert da["class_id"].values.tobytes() == db["class_id"].values.tobytes()
    assert np.array_equal(da["confidence"].values, db["confidence"].values, equal_nan=True)


def test_killed_job_resumes(client, random_model, scene, tmp_path):
    out = tmp_path / "out"
    store = out / "prediction.zarr.partial"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DASK_TEMPORARY_DIRECTORY": str(tmp_path)}
    # the uninterrupted run, on the test session's cluster, while the job below starts
    pool = ThreadPoolExecutor(1)
    reference = pool.submit(predict, [scene], random_model, tmp_path / "ref", OPTIONS, client=client)
    pool.shutdown(wait=False)
    with open(tmp_path / "job.log", "wb") as log:
        # its own session: the kill takes the job process and its local cluster's workers at once
        proc = subprocess.Popen([GEOSEG, "-q", "predict", str(scene), "--model", str(random_model), "--out", str(out),
                                 *CLI_OPTS, "--workers", "1"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while count_markers(store) < 3:
                assert proc.poll() is None, f"the job ended before it was killed:\n{(tmp_path / 'job.log').read_text()}"
                assert time.monotonic() < deadline, "no chunk finished in time"
                time.sleep(0.02)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    # wait until every process of the group is gone (then no marker can appear any more)
    deadline = time.monotonic() + 30
    while True:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "processes of the killed job survive"
        time.sleep(0.05)

    done = count_markers(store)
    assert 3 <= done < 64
    # nothing that looks finished: no prediction.zarr, no run.json, only the partial store
    assert _visible(out) == ["prediction.zarr.partial"]

    # `geoseg predict --resume`, here on the test session's running cluster (--scheduler)
    result = CliRunner().invoke(cli, ["predict", str(scene), "--model", str(random_model), "--out", str(out), *CLI_OPTS,
                                      "--resume", "--scheduler", client.scheduler.address])
    assert result.exit_code == 0, result.output
    assert f"{64 - done} computed, {done} reused" in result.output
    assert "Mpx/s" not in result.output  # a speed over partly reused chunks would be no figure at all (it said 0.00)
    record = json.loads((out / "run.json").read_text())
    assert record["chunks"] == {"chunks": 64, "computed": 64 - done, "reused": done}
    assert _visible(out) == ["item.json", "prediction.zarr", "run.json"]

    reference.result(timeout=300)
    _same_maps(out / "prediction.zarr", tmp_path / "ref" / "prediction.zarr")


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> Path:
    """The random model's architecture with other weights: another digest."""
    from geoseg.model.store import init_model

    path = tmp_path_factory.mktemp("models") / "other"
    init_model(path, n_bands=4, n_classes=4, encoder_depth=3, seed=2, tile_size=128)
    return path


@pytest.mark.parametrize("change", ["halo", "model"])
def test_other_job_never_reuses_chunks(client, random_model, other_model, scene_path, tmp_path, change):
    """Chunks finished for one job key are never taken for another, whatever the markers say."""
    out = tmp_path / "out"
    first = plan_job([scene_path], random_model, out, PredictOptions(chunk_size=128, resume=True, cog=False, vectors=False))
    out.mkdir()
    store = out / "prediction.zarr.partial"
    run_segmentation(first, client, store)  # every chunk finished and marked with the first key
    assert count_markers(store) == len(first.plan) == 12

    if change == "halo":
        options, model = PredictOptions(chunk_size=128, halo=first.plan.halo - 32, resume=True, cog=False, vectors=False), random_model
    else:
        options, model = PredictOptions(chunk_size=128, resume=True, cog=False, vectors=False), other_model
    second = plan_job([scene_path], model, out, options)
    assert second.key != first.key
    # Even a marker claiming the new key does not make the old job's store reusable.
    (store / MARKERS / "0_0").write_text(second.key)
    assert reusable_chunks(store, second.key, second.plan) == set()

    record = run_job(second, client)
    assert record["chunks"] == {"chunks": 12, "computed": 12, "reused": 0}
    fresh = predict([scene_path], model, tmp_path / "fresh", PredictOptions(chunk_size=128, halo=options.halo, cog=False, vectors=False),
                    client=client)
    assert fresh["job_key"] == record["job_key"]
    _same_maps(out / "prediction.zarr", tmp_path / "fresh" / "prediction.zarr")


def test_markers_of_another_key_are_ignored(random_model, scene_path, tmp_path):
    """In a store of this job, only markers holding this job's key count."""
    job = plan_job([scene_path], random_model, tmp_path / "out", PredictOptions(chunk_size=128, resume=True))
    store = tmp_path / "store.zarr"
    create_store(store, job.stack.grid, job.plan, {JOB_ATTR: job.key})
    (store / MARKERS / "0_0").write_text(job.key)
    (store / MARKERS / "0_1").write_text("0" * 64)  # another job's
    (store / MARKERS / "0_2").write_text(job.key[:20])  # a marker cut short
    (store / MARKERS / ".1_1.0a1b2c.tmp").write_text(job.key)  # one being written
    assert reusable_chunks(store, job.key, job.plan) == {(0, 0)}
    assert reusable_chunks(store, "f" * 64, job.plan) == set()


def test_a_store_is_removed_root_metadata_first(random_model, scene_path, tmp_path):
    """A store being removed stops being reusable before any chunk goes: what a removal cut short leaves (its
    chunks, without its root metadata) gives nothing to --resume; a whole delete in no set order (s3fs: sorted
    keys in batches, the root zarr.json last) left a finalized store's attributes over missing chunks, taken as
    written (nodata holes under a run.json)."""
    from geoseg.io.zarr_store import finalize_store, remove_store

    job = plan_job([scene_path], random_model, tmp_path / "out", PredictOptions(chunk_size=128, resume=True))
    store = tmp_path / "store.zarr"
    create_store(store, job.stack.grid, job.plan, {JOB_ATTR: job.key})
    finalize_store(store)
    every = {(ch.iy, ch.ix) for ch in job.plan}
    assert reusable_chunks(store, job.key, job.plan) == every
    (store / "zarr.json").unlink()  # what remove_store does first: the chunks and arrays are all still there
    assert (store / "class_id" / "zarr.json").exists() and reusable_chunks(store, job.key, job.plan) == set()
    create_store(store, job.stack.grid, job.plan, {JOB_ATTR: job.key})
    finalize_store(store)
    remove_store(store)
    assert not store.exists()
    remove_store(store)  # nothing there is fine


def test_chunk_killed_mid_write_is_rewritten(client, random_model, scene_path, tmp_path):
    """A chunk whose marker is missing is computed again and written whole, even over garbage."""
    opts = PredictOptions(chunk_size=128, resume=True, cog=False, vectors=False)
    out = tmp_path / "out"
    job = plan_job([scene_path], random_model, out, opts)
    out.mkdir()
    store = out / "prediction.zarr.partial"
    run_segmentation(job, client, store)
    # an interior chunk and the corner chunk (cut by the scene's edge): data destroyed, marker gone,
    # as if the worker died mid-write; plus the litter a killed writer leaves
    for iy, ix in ((1, 1), (2, 3)):
        (store / MARKERS / f"{iy}_{ix}").unlink()
        for var in ("class_id", "confidence"):
            chunk_file = store / var / "c" / str(iy) / str(ix)
            assert chunk_file.is_file()
            chunk_file.write_bytes(b"\x00garbage")
            (chunk_file.parent / f"{ix}.0123456789abcdef.partial").write_bytes(b"half a chunk")
    (store / MARKERS / ".1_1.0a1b2c.tmp").write_text(job.key[:10])

    record = run_job(job, client)
    assert record["chunks"] == {"chunks": 12, "computed": 2, "reused": 10}
    predict([scene_path], random_model, tmp_path / "ref", PredictOptions(chunk_size=128, cog=False, vectors=False), client=client)
    _same_maps(out / "prediction.zarr", tmp_path / "ref" / "prediction.zarr")
    assert not list((out / "prediction.zarr").rglob("*.partial"))


def test_failure_after_segmentation_leaves_nothing_finished(client, random_model, scene_path, tmp_path, monkeypatch):
    """A run that dies while writing the COG publishes nothing; --resume then reuses the whole store."""
    import geoseg.io.cog_cluster

    def broken(*args, **kwargs):
        raise OSError("disk full (simulated)")

    out = tmp_path / "out"
    opts = PredictOptions(chunk_size=128, vectors=False)
    monkeypatch.setattr(geoseg.io.cog_cluster, "write_cog_cluster", broken)
    with pytest.raises(OSError, match="simulated"):
        predict([scene_path], random_model, out, opts, client=client)
    assert sorted(p.name for p in out.iterdir()) == ["prediction.zarr.partial"]  # staging folder gone too
    monkeypatch.undo()

    record = predict([scene_path], random_model, out, PredictOptions(chunk_size=128, vectors=False, resume=True), client=client)
    assert record["chunks"] == {"chunks": 12, "computed": 0, "reused": 12}
    assert _visible(out) == ["classes.qml", "classes.tif", "item.json", "prediction.zarr", "run.json"]


def test_a_band_file_rewritten_behind_a_vrt_is_a_new_input(tmp_path):
    """The job key (what --resume reuses chunks under) covers the files GDAL reads for an input, not
    only the input's own path: a VRT that did not change over band files that did is a new job."""
    import rasterio
    from affine import Affine

    from geoseg.pipeline.plan import job_key
    from geoseg.tiling import TilingPlan

    bands = []
    for i in range(2):
        p = tmp_path / f"b{i}.tif"
        bands.append(write_raster(p, np.full((1, 8, 8), 100 + i, np.uint16), transform=Affine(10, 0, 5e5, 0, -10, 6e6), block=16))
    with rasterio.open(bands[0]) as ds:
        srs = ds.crs.to_wkt()
    sources = "".join(f'<VRTRasterBand dataType="UInt16" band="{i + 1}"><SimpleSource><SourceFilename relativeToVRT="0">'
                      f"{p}</SourceFilename><SourceBand>1</SourceBand></SimpleSource></VRTRasterBand>"
                      for i, p in enumerate(bands))
    vrt = tmp_path / "stack.vrt"
    vrt.write_text(f'<VRTDataset rasterXSize="8" rasterYSize="8"><SRS>{srs}</SRS>'
                   f"<GeoTransform>500000, 10, 0, 6000000, 0, -10</GeoTransform>{sources}</VRTDataset>")
    plan = TilingPlan.make((8, 8), stride=32, chunk_size=64, halo=0)
    before = job_key([str(vrt)], "digest", plan, PredictOptions(resume=True))
    assert job_key([str(vrt)], "digest", plan, PredictOptions(resume=True)) == before
    vrt_stat = vrt.stat()
    write_raster(bands[1], np.full((1, 8, 8), 7, np.uint16), transform=Affine(10, 0, 5e5, 0, -10, 6e6), block=16)
    os.utime(bands[1], ns=(vrt_stat.st_atime_ns, vrt_stat.st_mtime_ns + 1_000_000_000))  # a later mtime, whatever the clock
    assert vrt.stat().st_mtime_ns == vrt_stat.st_mtime_ns
    assert job_key([str(vrt)], "digest", plan, PredictOptions(resume=True)) != before


def test_an_unfinished_output_is_said_so_and_a_cut_short_store_is_recomputed(client, random_model, scene_path, tmp_path):
    """`geoseg info` on an output without run.json says it is not finished and how to finish it (it said "not a raster
    GDAL can read"); --resume over a store whose metadata a power loss cut short starts it again, not a traceback."""
    out = tmp_path / "out"
    opts = PredictOptions(chunk_size=128, cog=False, vectors=False)
    predict([scene_path], random_model, out, opts, client=client)
    (out / "run.json").unlink()
    res = CliRunner().invoke(cli, ["info", str(out)])
    assert res.exit_code == 2 and "not finished (no run.json)" in res.output and "--resume" in res.output, res.output
    os.replace(out / "prediction.zarr", out / "prediction.zarr.partial")
    meta = out / "prediction.zarr.partial" / "zarr.json"
    meta.write_text(meta.read_text()[:40])  # cut short
    record = predict([scene_path], random_model, out, PredictOptions(chunk_size=128, cog=False, vectors=False, resume=True),
                     client=client)
    assert record["chunks"]["computed"] == record["chunks"]["chunks"] > 0 and (out / "run.json").is_file()


def test_two_runs_on_one_output_folder(client, random_model, scene_path, tmp_path):
    """A second run on an OUT another is writing (a job resubmitted while the first still runs) deleted the
    first's store under it: a FileNotFoundError traceback. It is refused in one line now, and a run killed
    outright (SIGKILL, no clean-up) holds nothing: the kernel drops its lock."""
    import signal
    import subprocess
    import sys

    from geoseg.errors import OutputExistsError

    out = tmp_path / "out"
    out.mkdir()
    # a run in another process, as far as OUT can tell: it holds the lock on OUT/.geoseg.lock (flock)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               "fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR)\nfcntl.flock(fd, fcntl.LOCK_EX)\n"
                               "print('locked', flush=True)\ntime.sleep(120)\n", str(out / ".geoseg.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        opts = PredictOptions(chunk_size=128, cog=False, vectors=False)
        with pytest.raises(OutputExistsError, match="another geoseg run is writing it now"):
            predict([scene_path], random_model, out, opts, client=client)
        assert not (out / "prediction.zarr.partial").exists() and not (out / "run.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    assert (out / ".geoseg.lock").exists()  # left by the killed run, held by no one
    record = predict([scene_path], random_model, out, PredictOptions(chunk_size=128, cog=False, vectors=False), client=client)
    assert record["chunks"]["computed"] == 12 and not (out / ".geoseg.lock").exists()


def test_a_run_finished_in_out_after_planning_is_not_replaced(client, random_model, scene_path, tmp_path):
    """A job planned, then another process finishes a run in its OUT (geoseg run plans every scene first): the job
    refuses OUT once it holds the lock, as planning would have, and leaves the other run's outputs as they are (it
    deleted them and wrote its own without --overwrite)."""
    from geoseg.errors import OutputExistsError

    out = tmp_path / "out"
    planned = plan_job([scene_path], random_model, out, PredictOptions(chunk_size=128, cog=False, vectors=False))
    other = predict([scene_path], random_model, out, PredictOptions(chunk_size=256, cog=False, vectors=False), client=client)
    with pytest.raises(OutputExistsError, match="finished prediction"):
        run_job(planned, client)
    assert json.loads((out / "run.json").read_text())["job_key"] == other["job_key"]


def test_a_filesystem_that_cannot_lock_is_named_not_taken_for_another_run(tmp_path, monkeypatch):
    """flock failing for a reason other than a lock held (ENOLCK: NFS without its lock daemon) was reported as
    "another geoseg run is writing it now": on such a filesystem every run was refused, with a message that sends
    the user looking for a run that does not exist. (flock is made to fail as that filesystem's does.)"""
    import errno
    import fcntl

    from geoseg.errors import ConfigError, OutputExistsError
    from geoseg.pipeline.commit import out_lock

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(ConfigError, match=r"out: its filesystem cannot lock files \(No locks available\)") as exc:
        with out_lock(tmp_path / "out"):
            pass
    assert not isinstance(exc.value, OutputExistsError)

    def held(fd, op):
        raise BlockingIOError(errno.EWOULDBLOCK, "Resource temporarily unavailable")

    monkeypatch.setattr(fcntl, "flock", held)
    with pytest.raises(OutputExistsError, match="another geoseg run is writing it now"):
        with out_lock(tmp_path / "out"):
            pass
