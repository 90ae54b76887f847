"""Polygons of the class map: exact, 4-connected, with areas in square metres, written atomically."""

from __future__ import annotations

import importlib.util
from collections import deque

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import rasterio
import rasterio.transform
import shapely
from affine import Affine
from pyproj import CRS, Geod
from rasterio.features import rasterize

from geoseg.errors import ConfigError
from geoseg.model.card import NODATA_CLASS
from geoseg.sample import class_field, sample_classes, scene_spec, valid_mask
from geoseg.tiling import Box
from geoseg.vector.api import polygonize, write_vectors

CLASSES = sample_classes(5)
UTM = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4000000.0)


def components(a: np.ndarray, nodata: int = NODATA_CLASS) -> dict[int, list[int]]:
    """Sizes of the 4-connected regions of each class, by flood fill (independent of GDAL)."""
    seen = np.zeros(a.shape, bool)
    out: dict[int, list[int]] = {}
    h, w = a.shape
    for y in range(h):
        for x in range(w):
            if seen[y, x] or a[y, x] == nodata:
                continue
            value, size, queue = a[y, x], 0, deque([(y, x)])
            seen[y, x] = True
            while queue:
                cy, cx = queue.popleft()
                size += 1
                for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                    if 0 <= ny < h and 0 <= nx < w and not seen[ny, nx] and a[ny, nx] == value:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
            out.setdefault(int(value), []).append(size)
    return out


def burn(gdf: gpd.GeoDataFrame, shape: tuple[int, int], transform: Affine) -> np.ndarray:
    if len(gdf) == 0:
        return np.full(shape, NODATA_CLASS, np.uint8)
    pairs = zip(gdf.geometry, gdf["class_id"].astype(int))
    return rasterize(pairs, out_shape=shape, transform=transform, fill=NODATA_CLASS, all_touched=False, dtype="uint8")


def check_exact(a: np.ndarray, transform: Affine, gdf: gpd.GeoDataFrame) -> None:
    np.testing.assert_array_equal(burn(gdf, a.shape, transform), a)
    expected = components(a)
    got = gdf.groupby("class_id").size().to_dict()
    assert got == {k: len(v) for k, v in expected.items()}
    # polygons do not overlap: their areas add up to the valid pixels exactly
    assert shapely.area(gdf.geometry.values).sum() == pytest.approx((a != NODATA_CLASS).sum() * abs(transform.determinant))


@pytest.fixture(scope="module")
def blob_map() -> np.ndarray:
    spec = scene_spec(120, 150, seed=11)
    box = Box(0, 120, 0, 150)
    a = class_field(spec, box)
    a[~valid_mask(spec, box)] = NODATA_CLASS
    return a


def test_blob_map_round_trips_exactly(blob_map):
    gdf = polygonize(blob_map, UTM, "EPSG:32617", CLASSES)
    assert list(gdf.columns) == ["class_id", "class_name", "area_m2", "perimeter_m", "pixels", "geometry"]
    assert gdf.crs.to_epsg() == 32617
    assert gdf.geom_type.eq("Polygon").all() and gdf.is_valid.all()
    check_exact(blob_map, UTM, gdf)
    names = dict(zip(gdf["class_id"], gdf["class_name"]))
    assert names == {c.id: c.name for c in CLASSES if c.id in names}


def test_diagonals_and_holes_follow_4_connectivity():
    a = np.array(
        [
            [0, 1, 0, 2, 2, 2, 2, 2],
            [1, 0, 1, 2, 3, 3, 3, 2],
            [0, 1, 0, 2, 3, 255, 3, 2],
            [255, 255, 3, 2, 3, 3, 3, 2],
            [1, 1, 1, 2, 2, 2, 2, 2],
            [1, 7, 1, 0, 0, 255, 0, 0],
        ],
        np.uint8,
    )
    gdf = polygonize(a, UTM, "EPSG:32617", CLASSES)
    check_exact(a, UTM, gdf)
    counts = gdf.groupby("class_id").size().to_dict()
    # the 0s and 1s of the checkerboard touch only at corners: 5 + 2 zeros, 4 + 1 ones
    assert counts == {0: 7, 1: 5, 2: 1, 3: 2, 7: 1}
    ring = gdf[gdf["class_id"] == 2].geometry.iloc[0]
    assert len(ring.interiors) == 1  # the ring of 2s has the 3s (and their nodata pixel) inside
    assert ring.area == 16 * 100.0
    assert gdf.loc[gdf["class_id"] == 7, "class_name"].item() == "class_7"
    # the nodata pixel inside the 3s is in no polygon: a hole of the 3s' ring
    threes = gdf[(gdf["class_id"] == 3)].sort_values("area_m2").geometry.iloc[-1]
    assert len(threes.interiors) == 1
    nodata_centre = shapely.Point(UTM @ (5.5, 2.5))
    assert not gdf.geometry.covers(nodata_centre).any()


def test_area_is_pixel_count_times_pixel_area(blob_map):
    gdf = polygonize(blob_map, UTM, "EPSG:32617", CLASSES)
    expected = components(blob_map)
    for class_id, sizes in expected.items():
        got = sorted(gdf.loc[gdf["class_id"] == class_id, "area_m2"])
        # ellipsoidal: the planar UTM area over the point scale factor squared (0.9996 on the central meridian)
        assert got == pytest.approx(sorted(s * 100.0 for s in sizes), rel=1e-3)
        assert all(g > s * 100.0 for g, s in zip(got, sorted(sizes)))


def test_area_in_us_survey_feet():
    a = np.zeros((4, 5), np.uint8)
    a[1:3, 1:4] = 1
    feet = Affine(10.0, 0.0, 2000000.0, 0.0, -10.0, 700000.0)  # 10 ftUS pixels
    gdf = polygonize(a, feet, "EPSG:2264", CLASSES)  # NC State Plane, US survey feet
    assert CRS(gdf.crs).axis_info[0].unit_name == "US survey foot"
    ft = 1200 / 3937
    area = dict(zip(gdf["class_id"], gdf["area_m2"]))
    assert area[1] == pytest.approx(6 * 100 * ft * ft, rel=1e-3)
    assert area[0] == pytest.approx(14 * 100 * ft * ft, rel=1e-3)


def quadrangle_area(lon0: float, lon1: float, lat0: float, lat1: float) -> float:
    """Area (m²) between two meridians and two parallels on WGS84, in closed form (authalic latitude)."""
    geod = Geod(ellps="WGS84")
    e = np.sqrt(geod.es)

    def q(lat: float) -> float:
        s = np.sin(np.radians(lat))
        return (1 - e**2) * (s / (1 - e**2 * s**2) - np.log((1 - e * s) / (1 + e * s)) / (2 * e))

    return geod.a**2 / 2 * np.radians(lon1 - lon0) * (q(lat1) - q(lat0))


def test_geodesic_area_for_geographic_crs():
    a = np.full((30, 30), 1, np.uint8)
    a[10:20, 10:20] = 2  # 0.1 x 0.1 degrees: a hole in class 1's polygon
    t = Affine(0.01, 0.0, -79.0, 0.0, -0.01, 36.0)
    gdf = polygonize(a, t, "EPSG:4326", CLASSES)
    check_exact(a, t, gdf)
    inner = quadrangle_area(-78.9, -78.8, 35.8, 35.9)
    outer = quadrangle_area(-79.0, -78.7, 35.7, 36.0)
    area = dict(zip(gdf["class_id"], gdf["area_m2"]))
    assert area[2] == pytest.approx(inner, rel=1e-9)
    assert area[1] == pytest.approx(outer - inner, rel=1e-9)
    # top and bottom edges follow parallels: a wide region is larger than the polygon of geodesics through its corners
    wide = polygonize(np.ones((10, 60), np.uint8), Affine(1.0, 0.0, 0.0, 0.0, -1.0, 70.0), "EPSG:4326", CLASSES)
    corners, _ = Geod(ellps="WGS84").polygon_area_perimeter([0, 60, 60, 0], [70, 70, 60, 60])
    assert wide["area_m2"].iloc[0] == pytest.approx(quadrangle_area(0, 60, 60, 70), rel=1e-9)
    assert wide["area_m2"].iloc[0] > 1.1 * abs(corners)
    # the perimeter: two meridian arcs and two parallels (each 60 degrees of longitude x the parallel's radius)
    geod = Geod(ellps="WGS84")
    meridian = geod.line_length([0, 0], [60, 70])
    parallels = sum(np.radians(60) * geod.a * np.cos(np.radians(p)) / np.sqrt(1 - geod.es * np.sin(np.radians(p)) ** 2)
                    for p in (60, 70))
    assert wide["perimeter_m"].iloc[0] == pytest.approx(2 * meridian + parallels, rel=1e-7)
    # and plausible on its own: 0.1 degree of latitude ~ 11.1 km, of longitude ~ 11.1 km x cos(35.85)
    assert area[2] == pytest.approx(11.09e3 * 11.09e3 * np.cos(np.radians(35.85)), rel=0.01)


def test_all_nodata_gives_empty_frame_with_schema(tmp_path):
    gdf = polygonize(np.full((8, 8), NODATA_CLASS, np.uint8), UTM, "EPSG:32617", CLASSES)
    assert len(gdf) == 0
    assert list(gdf.columns) == ["class_id", "class_name", "area_m2", "perimeter_m", "pixels", "geometry"]
    assert gdf.crs.to_epsg() == 32617
    names = ["empty.gpkg"] + (["empty.parquet"] if importlib.util.find_spec("pyarrow") else [])
    for name in names:
        path = write_vectors(gdf, tmp_path / name)
        back = gpd.read_file(path) if name.endswith(".gpkg") else gpd.read_parquet(path)
        assert len(back) == 0
        assert list(back.columns) == ["class_id", "class_name", "area_m2", "perimeter_m", "pixels", "geometry"]
        assert back.crs.to_epsg() == 32617
    info = pyogrio.read_info(tmp_path / "empty.gpkg", layer="landuse")
    assert info["geometry_type"] == "Polygon"


@pytest.mark.parametrize("name", ["landuse.gpkg", "landuse.parquet"])
def test_files_round_trip(tmp_path, blob_map, name):
    if name.endswith(".parquet"):
        pytest.importorskip("pyarrow")
    gdf = polygonize(blob_map, UTM, "EPSG:32617", CLASSES)
    path = write_vectors(gdf, tmp_path / name)
    if name.endswith(".gpkg"):
        assert pyogrio.list_layers(path)[:, 0].tolist() == ["landuse", "layer_styles"]
        back = gpd.read_file(path, layer="landuse")
    else:
        back = gpd.read_parquet(path)
    assert back.crs == gdf.crs and back.crs.to_epsg() == 32617
    assert len(back) == len(gdf)
    assert back["class_id"].astype(int).tolist() == gdf["class_id"].astype(int).tolist()
    assert back["class_name"].tolist() == gdf["class_name"].tolist()
    np.testing.assert_allclose(back["area_m2"], gdf["area_m2"])
    assert shapely.equals(back.geometry.values, gdf.geometry.values).all()
    check_exact(blob_map, UTM, back)
    beside = [name] if name.endswith(".gpkg") else [name, "landuse.qml"]  # the style travels in the file or beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(beside)

    # writing again replaces the file in one step
    write_vectors(gdf.iloc[:3], path)
    again = gpd.read_file(path) if name.endswith(".gpkg") else gpd.read_parquet(path)
    assert len(again) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(beside)


def test_unknown_suffix_is_refused(tmp_path, blob_map):
    gdf = polygonize(blob_map, UTM, "EPSG:32617", CLASSES)
    with pytest.raises(ConfigError, match=r"\.gpkg"):
        write_vectors(gdf, tmp_path / "landuse.shp")
    assert list(tmp_path.iterdir()) == []


def test_chunks_follow_tiles_but_not_the_strips_of_a_striped_geotiff(tmp_path):
    from geoseg.vector.run import DEFAULT_CHUNK, open_class_raster, plan_chunks

    a = np.zeros((40, 5000), np.uint8)
    striped = tmp_path / "striped.tif"  # GDAL's default layout: blocks of a few rows, the raster's width wide
    with rasterio.open(striped, "w", driver="GTiff", width=5000, height=40, count=1, dtype="uint8", crs="EPSG:32617",
                       transform=rasterio.transform.from_origin(500000, 4000000, 10, 10)) as ds:
        ds.write(a, 1)
    src = open_class_raster(striped)
    assert max(src.chunks) == 5000  # what the file holds
    assert plan_chunks(src, None).chunk_size == DEFAULT_CHUNK and plan_chunks(src, None).grid_shape == (1, 3)
    tiled = tmp_path / "tiled.tif"
    with rasterio.open(tiled, "w", driver="GTiff", width=5000, height=40, count=1, dtype="uint8", crs="EPSG:32617",
                       transform=rasterio.transform.from_origin(500000, 4000000, 10, 10), tiled=True, blockxsize=4096,
                       blockysize=4096) as ds:
        ds.write(a, 1)
    assert plan_chunks(open_class_raster(tiled), None).chunk_size == 4096  # reads stay aligned to the tiles
