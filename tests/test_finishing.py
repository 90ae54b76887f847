"""Finishing on the cluster: the COG built from worker-made tiles, the STAC item, `geoseg info OUT`."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
import rasterio
import rasterio.transform
import zarr
from click.testing import CliRunner
from odc.geo.geobox import GeoBox
from rasterio.transform import from_origin

from geoseg.cli.main import cli
from geoseg.io.cog import validate_cog
from geoseg.io.cog_cluster import mode2, write_cog_cluster
from geoseg.model.card import ClassInfo

GRID = GeoBox((1100, 1337), from_origin(500000.0, 4000000.0, 10.0, 10.0), "EPSG:32617")
CLASSES = [ClassInfo(id=i, name=n, color=c) for i, n, c in
           [(0, "urban", "#d7191c"), (1, "crop", "#f2d680"), (2, "forêt", "#1a9641"), (3, "water", "#2b83ba")]]


@pytest.fixture(scope="module")
def class_store(tmp_path_factory):
    rng = np.random.default_rng(0)
    h, w = GRID.shape
    a = np.kron(rng.integers(0, 4, size=(h // 9 + 1, w // 9 + 1)), np.ones((9, 9), np.uint8))[:h, :w].astype(np.uint8)
    a[:50, :70] = 255
    a[rng.random(a.shape) < 0.01] = 255
    path = tmp_path_factory.mktemp("cog") / "a.zarr"
    z = zarr.open_array(str(path), mode="w", shape=a.shape, chunks=(512, 512), dtype="uint8")
    z[:] = a
    return z, a


def mode_reference(a: np.ndarray) -> np.ndarray:
    """MODE of 2x2 blocks written out pixel by pixel: most frequent valid value, ties to the first in row order."""
    h, w = a.shape
    p = np.full((h + h % 2, w + w % 2), 255, np.uint8)
    p[:h, :w] = a
    out = np.full((p.shape[0] // 2, p.shape[1] // 2), 255, np.uint8)
    for y in range(out.shape[0]):
        for x in range(out.shape[1]):
            vals = [int(v) for v in p[2 * y:2 * y + 2, 2 * x:2 * x + 2].ravel() if v != 255]
            if vals:
                out[y, x] = max(vals, key=lambda v: (vals.count(v), -vals.index(v)))
    return out


@pytest.mark.parametrize("p", [[0.3, 0.3, 0.2, 0.2], [0.1, 0.1, 0.1, 0.7], [0.5, 0.5, 0.0, 0.0]])
def test_mode_overview_kernel(p):
    """Ties (two of two, one of each), mostly nodata, no nodata: as counted pixel by pixel."""
    rng = np.random.default_rng(1)
    a = rng.choice(np.array([0, 1, 2, 255], np.uint8), size=(40, 38), p=p)
    np.testing.assert_array_equal(mode2(a), mode_reference(a))


@pytest.mark.parametrize("bigtiff", [None, True])
def test_cluster_cog_is_a_valid_cog_of_the_map(client, class_store, tmp_path, bigtiff):
    z, a = class_store
    out = tmp_path / "classes.tif"
    info = write_cog_cluster(client, z, out, grid=GRID, classes=CLASSES, tags={"GEOSEG_MODEL": "abc"}, bigtiff=bigtiff)
    assert info["bigtiff"] is bool(bigtiff)
    assert info["levels"] == [[1100, 1337], [550, 669], [275, 335]]
    ok, errors, warnings = validate_cog(out)
    assert ok, errors
    with rasterio.open(out) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"  # GDAL reads its own COG layout
        assert ds.tags(ns="IMAGE_STRUCTURE")["COMPRESSION"] == "DEFLATE"
        assert (ds.width, ds.height) == (1337, 1100) and ds.transform == GRID.affine and ds.crs.to_epsg() == 32617
        assert ds.nodata == 255 and ds.block_shapes == [(512, 512)] and ds.descriptions == ("class_id",)
        np.testing.assert_array_equal(ds.read(1), a)
        assert ds.overviews(1) == [2, 4]
        assert ds.colormap(1)[1] == (242, 214, 128, 255) and ds.colormap(1)[255][3] == 0
        assert json.loads(ds.tags()["CLASS_NAMES"])["2"] == "forêt" and ds.tags()["GEOSEG_MODEL"] == "abc"
    with rasterio.open(out, OVERVIEW_LEVEL=0) as ov:  # the first overview, as stored
        np.testing.assert_array_equal(ov.read(1), mode_reference(a))
    assert [p.name for p in tmp_path.iterdir()] == ["classes.tif"]


def test_the_cog_and_the_class_counts_run_plain_tasks_on_the_workers(class_store, tmp_path):
    """The COG's block tasks read the zarr store themselves, and so do the STAC item's class counts: a worker never
    imports dask.array (and with it xarray and pandas: 0.55 s of one core, most of an 8192 px COG stage). Checked on
    a worker process of its own, made for this test."""
    import sys

    from distributed import Client, LocalCluster

    from geoseg.io.stac import class_counts

    z, a = class_store
    values, n = np.unique(a, return_counts=True)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None) as cl, \
            Client(cl) as c:
        before = c.run(lambda: sorted(m for m in ("dask.array", "xarray", "pandas") if m in sys.modules))
        info = write_cog_cluster(c, z, tmp_path / "classes.tif", grid=GRID, classes=CLASSES, block=1024)
        counts = class_counts(z, c, block=512)
        after = c.run(lambda: sorted(m for m in ("dask.array", "xarray", "pandas") if m in sys.modules))
    assert list(before.values()) == [[]] and after == before
    assert info["blocks"] == 2 * 2 + 1  # levels 0-1 in 1024 px blocks, then level 2 from their mosaic
    assert counts == {int(v): int(k) for v, k in zip(values, n) if v != 255}
    with rasterio.open(tmp_path / "classes.tif") as ds:
        np.testing.assert_array_equal(ds.read(1), a)
        with rasterio.open(tmp_path / "classes.tif", OVERVIEW_LEVEL=1) as ov:
            np.testing.assert_array_equal(ov.read(1), mode2(_pad(mode2(_pad(a)))))


def _pad(a):
    from geoseg.io.cog_cluster import _even

    return _even(a)


def test_cluster_cog_blocks_make_the_same_file(client, tmp_path):
    """Tasks of one block at several levels, in rounds over the previous round's last level: the file does not
    depend on the block size, and each overview is the MODE of the level above, edges and nodata included."""
    from geoseg.io.cog_cluster import _even

    rng = np.random.default_rng(2)
    h, w = 2100, 1337  # four levels: with 1024 px blocks, three rounds
    a = np.kron(rng.integers(0, 4, size=(h // 7 + 1, w // 7 + 1)), np.ones((7, 7), np.uint8))[:h, :w].astype(np.uint8)
    a[rng.random(a.shape) < 0.02] = 255
    grid = GeoBox((h, w), from_origin(500000.0, 4000000.0, 10.0, 10.0), "EPSG:32617")
    z = zarr.open_array(str(tmp_path / "a.zarr"), mode="w", shape=a.shape, chunks=(700, 600), dtype="uint8")
    z[:] = a
    files, blocks = [], []
    for block, batch in ((1024, 64 << 20), (2048, 1), (4096, 20_000)):  # fetched: whole rows of blocks, a tile row, a few
        out = tmp_path / f"b{block}.tif"
        info = write_cog_cluster(client, z, out, grid=grid, classes=CLASSES, block=block, batch_bytes=batch)
        assert info["levels"] == [[2100, 1337], [1050, 669], [525, 335], [263, 168]]
        files.append(out.read_bytes())
        blocks.append(info["blocks"])
    assert blocks == [3 * 2 + 2 * 1 + 1, 2 * 1 + 1, 1]  # rounds: 1024 px blocks of levels 0, 1, 2
    assert files[0] == files[1] == files[2]
    assert validate_cog(tmp_path / "b1024.tif")[0]
    with rasterio.open(tmp_path / "b1024.tif") as ds:
        np.testing.assert_array_equal(ds.read(1), a)
        assert ds.overviews(1) == [2, 4, 8]
    level = a
    for i in range(3):
        level = mode2(_even(level))
        with rasterio.open(tmp_path / "b1024.tif", OVERVIEW_LEVEL=i) as ov:
            np.testing.assert_array_equal(ov.read(1), level)
    with pytest.raises(ValueError, match="power of two"):
        write_cog_cluster(client, z, tmp_path / "bad.tif", grid=grid, classes=CLASSES, block=1536)
    assert not (tmp_path / "bad.tif").exists()
    assert _held_tiles(client) == []  # every block's tiles left the workers once written
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError) as failed:  # the output's folder cannot be made: the tiles go all the same,
        write_cog_cluster(client, z, tmp_path / "file" / "x.tif", grid=grid, classes=CLASSES, block=1024)
    assert _held_tiles(client) == [] and failed.tb is not None  # even while the error (and its frames) is kept


def _held_tiles(client, wait: float = 10.0) -> list:
    """Keys of COG block tasks the scheduler still knows (it forgets released ones within moments)."""
    import time

    t = time.monotonic()
    while True:
        keys = client.run_on_scheduler(lambda dask_scheduler: [str(k) for k in dask_scheduler.tasks if "block_pyramid" in str(k)])
        if not keys or time.monotonic() - t > wait:
            return keys
        time.sleep(0.1)


def test_predict_finishes_with_cog_style_and_stac_item(client, random_model, scene_path, tmp_path):
    import pystac
    from pystac.validation import validate_dict

    from geoseg.io.zarr_store import open_prediction
    from geoseg.pipeline import PredictOptions, predict

    out = tmp_path / "out"
    rec = predict([scene_path], random_model, out, PredictOptions(chunk_size=128), client=client)
    assert set(rec["outputs"]) == {"prediction.zarr", "classes.tif", "classes.qml", "landuse.gpkg", "item.json"}
    assert validate_cog(out / "classes.tif")[0]
    a = open_prediction(out / "prediction.zarr")["class_id"].values
    with rasterio.open(out / "classes.tif") as ds:
        np.testing.assert_array_equal(ds.read(1), a)
    qml = (out / "classes.qml").read_text()
    assert 'type="paletted"' in qml and qml.count("<paletteEntry") == 4
    # the STAC item, as pystac reads it
    item = pystac.Item.from_file(str(out / "item.json"))
    assert item.properties["proj:code"] == "EPSG:32617" and item.properties["proj:shape"] == [300, 437]
    assert set(item.assets) == {"prediction", "classes", "classes-style", "polygons", "run"}
    assert item.assets["classes"].media_type.startswith("image/tiff; application=geotiff; profile=cloud-optimized")
    cls = item.assets["classes"].extra_fields["classification:classes"]
    counts = {c["value"]: c.get("count") for c in cls if not c.get("nodata")}
    ids, n = np.unique(a[a != 255], return_counts=True)
    assert {int(i): int(k) for i, k in zip(ids, n)} == {k: v for k, v in counts.items() if v}
    assert item.properties["geoseg:model"]["digest"] == rec["model"]["digest"]
    lon0, lat0, lon1, lat1 = item.bbox
    assert -84 < lon0 < lon1 < -80 and 36 < lat0 < lat1 < 37.1  # UTM 17N, 500 km E, 4000 km N
    # the core STAC schema (shipped with pystac) checked offline; extension schemas need the network
    core = {k: v for k, v in item.to_dict(include_self_link=False).items()}
    core["stac_extensions"] = []
    validate_dict(core)


def test_the_cog_s_tiles_are_made_beside_the_polygons_and_the_file_written_after(client, random_model, scene_path,
                                                                                 tmp_path):
    """The COG's block tasks go out before the polygons' and below their priority: the workers make its tiles
    while they would wait on the client (its join of the borders, its GeoPackage). The COG stage came first before,
    its tiles all fetched and written before the polygons' first chunk task started. The file equals the map."""
    from distributed import get_task_stream

    from geoseg.io.zarr_store import open_prediction
    from geoseg.pipeline import PredictOptions, predict

    out = tmp_path / "out"
    with get_task_stream(client) as ts:
        predict([scene_path], random_model, out, PredictOptions(chunk_size=128), client=client)
    spans: dict[str, list[tuple[float, float]]] = {}
    for task in ts.data:
        name = str(task["key"]).split("-")[0]
        for ss in task["startstops"]:
            if ss["action"] == "compute":
                spans.setdefault(name, []).append((ss["start"], ss["stop"]))
    blocks, chunks, fetched = spans["block_pyramid_read"], spans["chunk_phase"], spans["_tile_rows"]
    assert min(s for s, _ in blocks) < max(e for _, e in chunks)  # tiles made before the polygons were done
    assert max(s for s, _ in chunks) < min(s for s, _ in fetched)  # the file laid out after
    with rasterio.open(out / "classes.tif") as ds:
        np.testing.assert_array_equal(ds.read(1), open_prediction(out / "prediction.zarr")["class_id"].values)


def test_info_summarises_a_finished_output(client, random_model, scene_path, tmp_path):
    from geoseg.pipeline import PredictOptions, predict

    out = tmp_path / "out"
    rec = predict([scene_path], random_model, out, PredictOptions(chunk_size=128), client=client)
    res = CliRunner().invoke(cli, ["info", str(out), "--json"])
    assert res.exit_code == 0, res.output
    (summary,) = json.loads(res.output)
    assert summary["polygons"] == rec["polygons"] > 0
    table = summary["classes_table"]
    assert sum(c["share_pct"] for c in table) == pytest.approx(100.0, abs=0.01)
    con = sqlite3.connect(out / "landuse.gpkg")
    n_by_class = dict(con.execute("SELECT class_id, COUNT(*) FROM landuse GROUP BY class_id").fetchall())
    con.close()
    assert {c["id"]: c["polygons"] for c in table} == n_by_class
    text = CliRunner().invoke(cli, ["info", str(out)])
    assert text.exit_code == 0 and all(c["name"] in text.output for c in table) and "%" in text.output
    # the store itself: its CRS and grid as the scene's (GDAL alone reads no CRS from it)
    res = CliRunner().invoke(cli, ["info", str(out / "prediction.zarr"), "--json"])
    assert res.exit_code == 0, res.output
    (store,) = json.loads(res.output)
    with rasterio.open(scene_path) as src:
        assert store["crs"] == f"EPSG:{src.crs.to_epsg()}" and store["shape"] == [src.height, src.width]
        assert store["transform"] == list(src.transform)[:6]
    assert store["layers"] == ["class_id", "confidence"] and store["class_nodata"] == 255
    # its STAC item: the assets, not a raster without a CRS
    res = CliRunner().invoke(cli, ["info", str(out / "item.json"), "--json"])
    assert res.exit_code == 0, res.output
    (item,) = json.loads(res.output)
    assert item["stac_item"] == str(out / "item.json") and item["proj:code"] == f"EPSG:{src.crs.to_epsg()}"
    assert item["assets"]["classes"]["href"] == "classes.tif" and item["assets"]["prediction"]["href"] == "prediction.zarr"
    # the COG's layout and classes, its polygons as OGR reads them; a card or a plain folder points to what to give
    res = CliRunner().invoke(cli, ["info", str(out / "classes.tif"), str(out / "landuse.gpkg"), "--json"])
    assert res.exit_code == 0, res.output
    cog, gpkg = json.loads(res.output)
    assert cog["layout"]["cog"] and cog["layout"]["tiled"] and cog["layout"]["compression"] == "DEFLATE"
    assert {str(c["id"]): c["name"] for c in table} == {str(k): v for k, v in cog["classes"].items() if int(k) in
                                                        {c["id"] for c in table}}
    assert gpkg["layers"]["landuse"]["features"] == rec["polygons"] and "class_name" in gpkg["layers"]["landuse"]["fields"]
    for path, hint in ((out / "run.json", f"geoseg info {out}"), (random_model / "model.json", f"geoseg info {random_model}"),
                       (tmp_path, "a model directory (model.json)")):
        res = CliRunner().invoke(cli, ["info", str(path)])
        assert res.exit_code != 0 and hint in res.output and "not a raster" not in res.output, res.output
    # without the COG the item names no class: the store's names, not class_0, class_1, ...
    import shutil

    named = tmp_path / "named-model"
    shutil.copytree(random_model, named)
    card = json.loads((named / "model.json").read_text())
    for c in card["classes"]:
        c["name"] = f"land {c['id']}"
    (named / "model.json").write_text(json.dumps(card))
    bare = predict([scene_path], named, tmp_path / "bare", PredictOptions(chunk_size=128, cog=False, vectors=False),
                   client=client)
    res = CliRunner().invoke(cli, ["info", str(tmp_path / "bare"), "--json"])
    assert res.exit_code == 0 and bare["class_pixels"], res.output
    (summary,) = json.loads(res.output)
    assert summary["classes_table"] and all(c["name"] == f"land {c['id']}" for c in summary["classes_table"])
    # a GeoTIFF of square strips (a small file written with defaults) is not tiled
    strips = tmp_path / "strips.tif"
    with rasterio.open(strips, "w", driver="GTiff", width=16, height=16, count=1, dtype="uint8", crs="EPSG:32617",
                       transform=rasterio.transform.from_origin(500000, 4000000, 10, 10)) as ds:
        ds.write(np.zeros((1, 16, 16), np.uint8))
    res = CliRunner().invoke(cli, ["info", str(strips), "--json"])
    assert res.exit_code == 0 and json.loads(res.output)[0]["layout"]["tiled"] is False, res.output


def test_info_of_a_job_root_and_of_a_nan_nodata_scaled_raster_in_strict_json(tmp_path):
    import math

    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "job.json").write_text(json.dumps({"geoseg_job": 1, "job": "j", "status": "finished", "scenes": [
        {"name": "a", "status": "computed", "reason": "not run yet", "out_dir": str(tmp_path / "job" / "a")}]}))
    res = CliRunner().invoke(cli, ["info", str(tmp_path / "job"), "--json"])
    assert res.exit_code == 0, res.output
    (job,) = json.loads(res.output)
    assert job["status"] == "finished" and job["scenes"] == {"a": "computed (not run yet)"}
    path = tmp_path / "nan.tif"
    with rasterio.open(path, "w", driver="GTiff", width=8, height=8, count=2, dtype="float32", nodata=float("nan"),
                       crs="EPSG:32617", transform=rasterio.transform.from_origin(500000, 4000000, 10, 10)) as ds:
        ds.write(np.ones((2, 8, 8), np.float32))
        ds.scales, ds.offsets = (0.01, 1.0), (-1.0, 0.0)
    res = CliRunner().invoke(cli, ["info", str(path), "--json"])
    assert res.exit_code == 0, res.output
    (raster,) = json.loads(res.output, parse_constant=lambda c: math.nan if False else pytest.fail(f"not JSON: {c}"))
    b1, b2 = raster["bands"]
    assert b1["nodata"] is None and (b1["scale"], b1["offset"]) == (0.01, -1.0) and "scale" not in b2


def test_stac_footprint_and_bbox_of_a_scene_across_the_antimeridian():
    """RFC 7946 / STAC: a footprint crossing 180 degrees is split there, and its bbox has west > east."""
    import shapely.geometry
    from affine import Affine
    from odc.geo.geobox import GeoBox

    from geoseg.io.stac import make_item

    grid = GeoBox((1000, 1000), Affine(100, 0, 380000, 0, -100, 8100000), "EPSG:32601")  # UTM 1N at ~72N, across 180
    item = make_item("x", grid, [ClassInfo(id=0, name="a", color="#ff0000")], {"classes": "classes.tif"})
    assert item.geometry["type"] == "MultiPolygon"
    parts = shapely.geometry.shape(item.geometry).geoms
    assert all(-180 <= b <= 180 for p in parts for b in p.bounds[::2])
    west, south, east, north = item.bbox
    assert 179 < west <= 180 and -180 <= east < -177 and 72 < south < north < 73.1
    # a scene away from it keeps an ordinary bbox and a Polygon
    plain = make_item("y", GeoBox((100, 100), Affine(10, 0, 500000, 0, -10, 4000000), "EPSG:32617"),
                      [ClassInfo(id=0, name="a", color="#ff0000")], {"classes": "classes.tif"})
    assert plain.geometry["type"] == "Polygon" and plain.bbox[0] < plain.bbox[2]


def test_stac_footprint_of_a_polar_scene_and_of_a_geographic_grid_past_180():
    """A grid around the South Pole has a footprint that holds the pole (bbox to -90, every longitude); a
    longitude/latitude grid written with longitudes past 180 is split at the antimeridian and brought
    into [-180, 180]; a south-up grid's outline winds as any other; curved edges are densified."""
    import shapely.geometry
    from affine import Affine
    from odc.geo.geobox import GeoBox
    from pyproj import Transformer

    from geoseg.io.stac import bbox_of, footprint

    polar = GeoBox((128, 128), Affine(1000, 0, -64000, 0, -1000, 64000), "EPSG:3031")  # 128 km around the pole
    geom = footprint(polar)
    shape = shapely.geometry.shape(geom)
    assert geom["type"] == "Polygon" and shape.is_valid
    west, south, east, north = bbox_of(geom)
    assert (west, south, east) == (-180.0, -90.0, 180.0)
    # the outline's northernmost point, a corner 90.5 km from the pole
    corner_lat = Transformer.from_crs(3031, 4326, always_xy=True).transform(64000, 64000)[1]
    assert north == pytest.approx(corner_lat, abs=1e-6)
    # off the pole: the edges are curves in longitude/latitude, so the outline has more than its 4 corners
    off = footprint(GeoBox((128, 128), Affine(1000, 0, 200000, 0, -1000, 64000), "EPSG:3031"))
    assert off["type"] == "Polygon" and len(off["coordinates"][0]) > 100

    past = GeoBox((100, 100), Affine(1e-3, 0, 179.95, 0, -1e-3, -16.0), "EPSG:4326")  # 179.95 to 180.05 E
    geom = footprint(past)
    assert geom["type"] == "MultiPolygon"
    lons = [x for poly in geom["coordinates"] for ring in poly for x, _ in ring]
    assert -180 <= min(lons) and max(lons) <= 180
    assert bbox_of(geom) == pytest.approx([179.95, -16.1, -179.95, -16.0])
    assert shapely.geometry.shape(geom).area == pytest.approx(0.1 * 0.1)

    south_up = footprint(GeoBox((10, 10), Affine(1, 0, 150, 0, 1, 10), "EPSG:4326"))
    assert south_up["type"] == "Polygon" and bbox_of(south_up) == pytest.approx([150, 10, 160, 20])


def test_stac_footprints_of_global_grids_are_valid_and_on_the_globe():
    """A lon/lat grid round the globe in the 0..360 convention made a self-crossing MultiPolygon with a bbox
    0 degrees wide; an ERA5-like grid (721 rows centred on the poles) gave latitudes past 90; a MODIS polar
    tile (its top edge is the pole) an invalid outline of 24 parts."""
    import shapely
    import shapely.geometry
    from affine import Affine
    from odc.geo.geobox import GeoBox

    from geoseg.io.stac import bbox_of, footprint

    sinu = "+proj=sinu +lon_0=0 +x_0=0 +y_0=0 +R=6371007.181 +units=m +no_defs"
    t = 1111950.5197665554
    for grid, want in ((GeoBox((180, 360), Affine(1, 0, 0, 0, -1, 90), "EPSG:4326"), [-180, -90, 180, 90]),
                       (GeoBox((721, 1440), Affine(0.25, 0, -0.125, 0, -0.25, 90.125), "EPSG:4326"), [-180, -90, 180, 90]),
                       (GeoBox((160, 360), Affine(1, 0, -10, 0, -1, 80), "EPSG:4326"), [-180, -80, 180, 80]),
                       (GeoBox((60, 160), Affine(1, 0, 100, 0, -1, 30), "EPSG:4326"), [100, -30, -100, 30]),
                       (GeoBox((240, 240), Affine(t / 240, 0, 0, 0, -t / 240, 9 * t), sinu), None)):
        geom = footprint(grid)
        shape = shapely.geometry.shape(geom)
        lats = shapely.get_coordinates(shape)[:, 1]
        assert shape.is_valid and -90 <= lats.min() and lats.max() <= 90, (grid, geom["type"])
        if want:
            assert bbox_of(geom) == pytest.approx(want)
        else:  # the polar tile reaches the pole
            assert bbox_of(geom)[3] == pytest.approx(90) and bbox_of(geom)[1] == pytest.approx(80)


def test_stac_item_names_dates_and_the_store_asset(tmp_path):
    """classification names pass the extension's pattern (ASCII letters, digits, - and _; they were written
    with accents and CJK letters); datetime is the imagery's acquisition where the input says it (it was the
    run's end), with the run's end as created; the Zarr asset is described, not given one uint8 band."""
    import re
    from datetime import datetime, timezone

    from affine import Affine
    from odc.geo.geobox import GeoBox

    from geoseg.io.stac import make_item

    grid = GeoBox((10, 10), Affine(10, 0, 500000, 0, -10, 4000000), "EPSG:32617")
    classes = [ClassInfo(id=1, name="Forêt", color="#00ff00"), ClassInfo(id=2, name="Foret", color="#00aa00"),
               ClassInfo(id=3, name="水田", color="#0000ff"), ClassInfo(id=4, name="Area_km²", color="#ff0000")]
    made = datetime(2026, 12, 5, 10, 0, tzinfo=timezone.utc)
    item = make_item("x", grid, classes, {"classes": "classes.tif", "prediction": "prediction.zarr"}, when=made,
                     acquired=datetime(2020, 6, 15, 10, 30, tzinfo=timezone.utc))
    d = item.to_dict(include_self_link=False)
    names = [c["name"] for c in d["assets"]["classes"]["classification:classes"]]
    assert all(re.fullmatch(r"[0-9A-Za-z\-_]+", n) for n in names), names
    assert names[:4] == ["Foret", "Foret_2", "class_3", "Area_km2"] and len(set(names)) == len(names)
    assert d["properties"]["datetime"] == "2020-06-15T10:30:00Z" and d["properties"]["created"] == "2026-12-05T10:00:00Z"
    assert d["properties"]["geoseg:datetime"] == "acquired"
    assert "raster:bands" not in d["assets"]["prediction"] and "classification:classes" not in d["assets"]["prediction"]
    assert "class_id" in d["assets"]["prediction"]["description"]
    plain = make_item("y", grid, classes, {"classes": "classes.tif"}, when=made).to_dict()
    assert plain["properties"]["datetime"] == plain["properties"]["created"] == "2026-12-05T10:00:00Z"
    assert plain["properties"]["geoseg:datetime"] == "created"
    # an acquisition time with its local offset, as a GeoTIFF's IMAGERY/ACQUISITIONDATETIME may give it: in UTC, as
    # STAC's core schema requires ('Z' or +00:00; the item was refused with +02:00)
    from datetime import timedelta

    local = make_item("z", grid, classes, {"classes": "classes.tif"}, when=made,
                      acquired=datetime(2020, 6, 15, 10, 30, tzinfo=timezone(timedelta(hours=2)))).to_dict()
    assert local["properties"]["datetime"] == "2020-06-15T08:30:00Z"
    assert re.search(r"(\+00:00|Z)$", local["properties"]["datetime"])
