"""Small synthetic scenes for the train, labels and evaluate tests, written as real GeoTIFFs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import rasterio
from affine import Affine

CRS = "EPSG:32617"
ORIGIN = (500000.0, 4000000.0)
RES = 10.0
CLASS_IDS = (2, 5, 9)  # not 0..n-1 on purpose: ids keep the values the labels use
LABEL_NODATA = 0


def transform(origin: tuple[float, float] = ORIGIN, res: float = RES):
    return Affine(res, 0.0, origin[0], 0.0, -res, origin[1])


def write_tif(path: Path, data: np.ndarray, *, crs=CRS, transform_=None, nodata=None, descriptions=None) -> Path:
    """A tiled GeoTIFF of ``data`` (bands, h, w) or (h, w)."""
    data = data if data.ndim == 3 else data[None]
    profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0], dtype=data.dtype,
                   crs=crs, transform=transform_ or transform(), nodata=nodata, tiled=True, blockxsize=64,
                   blockysize=64)  # fmt: skip
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
        for i, d in enumerate(descriptions or []):
            ds.set_band_description(i + 1, d)
    return path


def _upsample(a: np.ndarray, h: int, w: int, cell: int) -> np.ndarray:
    """Bilinear interpolation of a coarse lattice (one value per ``cell`` px) onto ``h x w`` pixels."""
    y, x = (np.arange(h) + 0.5) / cell, (np.arange(w) + 0.5) / cell
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    a00, a01 = a[np.ix_(y0, x0)], a[np.ix_(y0, x0 + 1)]
    a10, a11 = a[np.ix_(y0 + 1, x0)], a[np.ix_(y0 + 1, x0 + 1)]
    return (a00 * (1 - fx) + a01 * fx) * (1 - fy) + (a10 * (1 - fx) + a11 * fx) * fy


def class_map(h: int, w: int, seed: int, ids: Sequence[int] = CLASS_IDS, cell: int = 24) -> np.ndarray:
    """Smooth class regions, like land cover: the arg-max of one smooth random field per class."""
    rng = np.random.default_rng(seed)
    fields = [_upsample(rng.random((h // cell + 2, w // cell + 2)), h, w, cell) for _ in ids]
    return np.asarray(ids, np.uint8)[np.argmax(np.stack(fields), axis=0)]


SIGNATURES = {2: (300.0, -40.0, 0.2), 5: (900.0, 40.0, 0.8), 9: (1500.0, 0.0, 0.5)}  # per band (uint16, int16, float32)
NOISE = (60.0, 6.0, 0.05)


@dataclass(frozen=True)
class Scene:
    bands: tuple[Path, ...]  # one file per band (uint16, int16, float32), like Landsat
    labels: Path  # uint8 class ids 2, 5, 9; nodata 0
    classes: Path  # classes.yaml
    image: np.ndarray  # (3, h, w) float32 as written
    valid: np.ndarray  # image valid mask
    truth: np.ndarray  # class ids (uint8), 0 where nodata in the label file


def make_scene(out: Path, h: int = 192, w: int = 192, seed: int = 0) -> Scene:
    """Three separable classes over three single-band files of different dtypes, with nodata:
    a corner wedge of the image is nodata in every band, a strip of the labels is nodata."""
    out.mkdir(parents=True, exist_ok=True)
    truth = class_map(h, w, seed)
    rng = np.random.default_rng(seed + 1)
    image = np.zeros((3, h, w), np.float32)
    for cid, sig in SIGNATURES.items():
        m = truth == cid
        for b in range(3):
            image[b][m] = sig[b] + rng.normal(0, NOISE[b], m.sum())
    yy, xx = np.mgrid[:h, :w]
    valid = (yy + xx) >= 24
    b1 = np.where(valid, np.clip(image[0], 1, 60000), 0).astype(np.uint16)
    b2 = np.where(valid, np.round(image[1]), -32768).astype(np.int16)
    b3 = np.where(valid, image[2], -9999.0).astype(np.float32)
    bands = (
        write_tif(out / "band_1.tif", b1, nodata=0, descriptions=["blue"]),
        write_tif(out / "band_2.tif", b2, nodata=-32768),
        write_tif(out / "band_3.tif", b3, nodata=-9999.0),
    )
    labels = truth.copy()
    labels[:, w - 8 :] = LABEL_NODATA
    lpath = write_tif(out / "labels.tif", labels, nodata=LABEL_NODATA)
    cpath = out / "classes.yaml"
    cpath.write_text(
        "- {id: 2, name: water, color: '#2b83ba'}\n- {id: 5, name: forest, color: '#1a9641'}\n"
        "- {id: 9, name: urban, color: '#d7191c'}\n"
    )
    written = np.stack([b1.astype(np.float32), b2.astype(np.float32), b3])
    return Scene(bands, lpath, cpath, written, valid, labels)


def write_polygons(path: Path, rows: Sequence[tuple[tuple[int, int, int, int], object]], *, crs=CRS, field="label",
                   origin=ORIGIN, res=RES) -> Path:  # fmt: skip
    """Rectangles given as pixel boxes ``(y0, y1, x0, x1)`` on the scene grid with a field value each."""
    import geopandas as gpd
    from shapely.geometry import box

    geoms = [box(origin[0] + x0 * res, origin[1] - y1 * res, origin[0] + x1 * res, origin[1] - y0 * res)
             for (y0, y1, x0, x1), _ in rows]  # fmt: skip
    gdf = gpd.GeoDataFrame({field: [v for _, v in rows]}, geometry=geoms, crs=CRS)
    if crs != CRS:
        gdf = gdf.to_crs(crs)
    gdf.to_file(path)
    return path


# -- one trained model per test run ------------------------------------------------------------

_BUILT: dict[str, object] = {}


def fixture_config():
    """A shallow U-Net trained briefly: enough to separate the scene's classes."""
    from geoseg.training import TrainConfig

    return TrainConfig(encoder_depth=3, epochs=6, chip_size=64, batch_size=8, steps_per_epoch=8, lr=3e-3,
                       patience=3, block_size=64, seed=0, tile_size=128, members=1)  # fmt: skip


def trained_model(tmp_path_factory) -> tuple[Scene, Path, object, float]:
    """(scene, model_dir, TrainResult, seconds): built once per run, shared by the test modules."""
    import time

    from geoseg.training import TrainInputs, train

    if "trained" not in _BUILT:
        root = tmp_path_factory.mktemp("trained")
        scene = make_scene(root / "scene")
        t0 = time.perf_counter()
        result = train(TrainInputs(scene.bands, scene.labels, classes_file=str(scene.classes)), root / "model",
                       fixture_config())  # fmt: skip
        _BUILT["trained"] = (scene, root / "model", result, time.perf_counter() - t0)
    return _BUILT["trained"]  # type: ignore[return-value]
