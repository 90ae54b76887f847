"""Shared fixtures: real rasters written to disk, real models, one real LocalCluster of processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write_raster(path: Path, data: np.ndarray, *, crs="EPSG:32617", transform=None, nodata=None, block=256, **extra) -> Path:
    """A tiled GeoTIFF of ``data`` (bands, h, w) with a real CRS and transform."""
    data = data if data.ndim == 3 else data[None]
    transform = transform or from_origin(500000.0, 4000000.0, 10.0, 10.0)
    profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0], dtype=data.dtype,
                   crs=crs, transform=transform, nodata=nodata, tiled=True, blockxsize=block, blockysize=block,
                   compress="deflate", **extra)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
    return path


def blob_scene(h: int, w: int, bands: int, seed: int, n_classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Smooth class regions with a spectral signature each, plus noise: (image uint16, labels uint8)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, n_classes, size=(h // 24 + 2, w // 24 + 2))
    labels = np.kron(coarse, np.ones((24, 24), int))[:h, :w].astype(np.uint8)
    signature = rng.uniform(200, 3000, size=(n_classes, bands))
    image = signature[labels].transpose(2, 0, 1) + rng.normal(0, 120, size=(bands, h, w))
    return np.clip(image, 1, 65535).astype(np.uint16), labels


@pytest.fixture(scope="session")
def client():
    """One LocalCluster of two worker processes (localhost), shared by the whole run."""
    from geoseg.cluster import connect

    with connect(n_workers=2) as c:
        yield c


@pytest.fixture(scope="session")
def random_model(tmp_path_factory) -> Path:
    """A shallow U-Net (encoder_depth=3: stride 8, small receptive field) with seeded random weights."""
    from geoseg.model.store import init_model

    path = tmp_path_factory.mktemp("models") / "random"
    init_model(path, n_bands=4, n_classes=4, encoder_depth=3, seed=1, tile_size=128)
    return path


@pytest.fixture(scope="session")
def scene_path(tmp_path_factory) -> Path:
    """300 x 437 px (no multiple of the chunk or of 32), 4 bands uint16, nodata 0 in a corner wedge."""
    image, _ = blob_scene(300, 437, 4, seed=3)
    yy, xx = np.mgrid[:300, :437]
    image[:, yy + xx < 60] = 0
    return write_raster(tmp_path_factory.mktemp("scenes") / "scene.tif", image, nodata=0)


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory, scene_path) -> Path:
    """The shallow U-Net after a few AdamW steps on the scene's own classes: a model with structure."""
    import torch

    from geoseg.model.card import BandInfo, Normalization
    from geoseg.model.network import build_network
    from geoseg.model.store import default_classes, make_card, save_model

    image, labels = blob_scene(300, 437, 4, seed=3)
    x = image.astype(np.float32)
    mean, std = x.mean(axis=(1, 2)), x.std(axis=(1, 2))
    xn = torch.from_numpy((x - mean[:, None, None]) / std[:, None, None])
    y = torch.from_numpy(labels.astype(np.int64))
    torch.manual_seed(0)
    net = build_network("unet", "resnet18", 4, 4, encoder_depth=3)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    net.train()
    for step in range(12):
        y0, x0 = (step * 37) % (300 - 128), (step * 53) % (437 - 128)
        batch = xn[None, :, y0 : y0 + 128, x0 : x0 + 128]
        loss = torch.nn.functional.cross_entropy(net(batch), y[None, y0 : y0 + 128, x0 : x0 + 128])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    card = make_card(net, arch="unet", encoder="resnet18", encoder_depth=3,
                     bands=[BandInfo(name=f"b{i}") for i in range(4)], classes=default_classes(4),
                     normalization=Normalization(mean=tuple(map(float, mean)), std=tuple(map(float, std))),
                     tile_size=128, provenance={"source": "test fixture"})
    path = tmp_path_factory.mktemp("models") / "trained"
    save_model(net, card, path)
    return path


def count_markers(store: Path) -> int:
    """Finished-chunk markers in a prediction store (how far a running job has got)."""
    from geoseg.io.zarr_store import MARKERS

    root = store / MARKERS
    return sum(1 for m in root.iterdir() if "_" in m.name and not m.name.startswith(".")) if root.is_dir() else 0


DASK = str(Path(sys.executable).with_name("dask"))


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@contextlib.contextmanager
def dask_cluster(tmp_path: Path, worker_args: list[list[str]]):
    """``dask scheduler`` and one ``dask worker`` per item of ``worker_args`` (extra arguments), as
    separate processes on loopback, each in a session of its own; all killed afterwards.

    Yields (address, worker processes, a client); workers may still be starting.
    """
    from distributed import Client

    scheduler_file = tmp_path / "scheduler.json"
    # scratch space of scheduler and workers in this test's folder, not a shared /tmp one
    # as a deployment starts them: without the glibc settings an embedded cluster's nanny leaves in this
    # process's environment
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update({"HF_HUB_OFFLINE": "1", "DASK_TEMPORARY_DIRECTORY": str(tmp_path)})
    logs = []
    procs: list[subprocess.Popen] = []

    def spawn(name: str, *args: str) -> subprocess.Popen:
        log = open(tmp_path / f"{name}.log", "wb")
        logs.append(log)
        # A session per process: killing a worker's group takes its nanny too (the worker is gone
        # for good, as when a node is lost), and teardown leaves nothing behind.
        p = subprocess.Popen([DASK, *args], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        procs.append(p)
        return p

    try:
        spawn("scheduler", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
              "--scheduler-file", str(scheduler_file))
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() or not scheduler_file.read_text().strip():
            assert time.monotonic() < deadline, (tmp_path / "scheduler.log").read_text()
            assert procs[0].poll() is None, (tmp_path / "scheduler.log").read_text()
            time.sleep(0.05)
        time.sleep(0.05)  # the file is written in one go, but be sure it is complete JSON
        address = json.loads(scheduler_file.read_text())["address"]
        workers = [
            spawn(f"worker{i}", "worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1", "--nworkers", "1",
                  "--host", "127.0.0.1", "--no-dashboard", "--name", f"w{i}", *extra)
            for i, extra in enumerate(worker_args)
        ]
        with Client(address, timeout="30s") as monitor:
            yield address, workers, monitor
    finally:
        for p in reversed(procs):
            kill_group(p)
        for log in logs:
            log.close()


def lose_the_gpu_worker(tmp_path: Path, start, in_the_middle) -> tuple[BaseException | None, float]:
    """A `dask scheduler`, a worker offering GPU=1 and one without. ``start(address)`` runs a job (in a thread);
    once ``in_the_middle(monitor)`` the GPU worker and its nanny are killed for good. Returns what the job
    then raised (None: it finished) and the seconds it took after the kill."""
    from concurrent.futures import ThreadPoolExecutor

    with dask_cluster(tmp_path, [["--resources", "GPU=1"], []]) as (address, workers, monitor):
        monitor.wait_for_workers(2, timeout=120)
        pool = ThreadPoolExecutor(1)  # no `with`: on a failure the teardown must kill the processes, not wait on them
        try:
            job = pool.submit(start, address)
            deadline = time.monotonic() + 180
            while not in_the_middle(monitor):
                assert not job.done(), f"the job ended before its GPU worker could be killed: {job.exception()!r}"
                assert time.monotonic() < deadline, "the job did not get under way in time"
                time.sleep(0.02)
            os.killpg(workers[0].pid, signal.SIGKILL)
            t0 = time.monotonic()
            return job.exception(timeout=90), time.monotonic() - t0
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
