"""Chunk-parallel polygons on a real cluster equal GDAL's polygonize of the whole raster, for any chunk size.

The class map is built to be hard: many regions, rings with holes and islands in the holes,
regions crossing several chunk lines, regions touching only at corners, one region spanning
the whole raster, nodata holes.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import pytest
import rasterio
import rasterio.features
import shapely
from affine import Affine
from click.testing import CliRunner
from rasterio.features import shapes

from geoseg.cli.main import cli
from geoseg.model.card import ClassInfo
from geoseg.vector.api import vectorize

from conftest import write_raster

T = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4000000.0)
CLASSES = [ClassInfo(id=i, name=n, color=c) for i, n, c in
           [(0, "urban", "#d7191c"), (1, "crop", "#f2d680"), (2, "grass", "#a6d96a"), (3, "forest", "#1a9641"),
            (5, "water", "#2b83ba"), (6, "road", "#7b3294")]]


def hard_map(h: int = 300, w: int = 437, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = np.kron(rng.integers(0, 4, size=(h // 7 + 1, w // 7 + 1)), np.ones((7, 7), int))[:h, :w].astype(np.uint8)
    a[100:200, 50:400] = 5  # a ring across several chunk lines...
    a[120:180, 100:150] = 1  # ...with a hole...
    a[140:160, 120:130] = 5  # ...and an island of the ring's class inside it
    a[:, 220] = 6  # one region spanning the raster top to bottom
    a[40:45, 300:305] = 6
    a[45:50, 305:310] = 6  # touches the one above at a corner only
    a[63:65, 63:65] = 1  # a 2x2 block at a chunk corner (chunk 64)
    a[10:20, 10:20] = 255  # nodata
    a[150, 60] = 255
    return a


def gdal(a: np.ndarray, connectivity: int = 4) -> list[tuple[int, shapely.Polygon]]:
    out = []
    for g, v in shapes(a, mask=a != 255, connectivity=connectivity, transform=T):
        r = g["coordinates"]
        out.append((int(v), shapely.Polygon(r[0], r[1:])))
    return out


def canonical(pairs) -> list[tuple[int, bytes]]:
    return sorted((int(k), shapely.normalize(g).wkb) for k, g in pairs)


@pytest.fixture(scope="module")
def class_tif(tmp_path_factory):
    return write_raster(tmp_path_factory.mktemp("vec") / "classes.tif", hard_map(), nodata=255, block=64)


@pytest.mark.parametrize("chunk", [64, 100, 256, 1024])
def test_polygons_equal_gdal_for_every_chunk_size(client, class_tif, tmp_path, chunk):
    a = hard_map()
    out = tmp_path / "landuse.gpkg"
    result = vectorize(class_tif, [out], client=client, chunk_size=chunk, classes=CLASSES)
    got = gpd.read_file(out, layer="landuse")
    ref = gdal(a)
    assert result["polygons"] == len(got) == len(ref)
    if chunk < 300:
        assert result["merged"] > 0  # regions crossing chunk lines went through the join
    assert canonical(zip(got["class_id"], got.geometry)) == canonical(ref)
    # rasterized back (pixel centres) they give the class map again
    back = rasterio.features.rasterize(zip(got.geometry, got["class_id"].astype(int)), out_shape=a.shape, transform=T,
                                       fill=255, dtype="uint8")
    np.testing.assert_array_equal(back, a)
    assert (got["pixels"].sum()) == (a != 255).sum()


def test_polygons_equal_gdal_on_a_grid_whose_corners_are_not_exact_floats(client, tmp_path):
    # 1/10800 degree pixels at an origin off the float grid: a corner's map coordinates computed from two
    # chunks' own origins differ in the last bits; regions across chunk lines must still be one Polygon each
    t = Affine(1 / 10800, 0.0, -78.1234567, 0.0, -1 / 10800, 35.7654321)
    a = hard_map()
    src = write_raster(tmp_path / "geo.tif", a, nodata=255, crs="EPSG:4326", transform=t, block=64)
    outs = [tmp_path / "geo.gpkg", tmp_path / "geo.fgb"]
    result = vectorize(src, outs, client=client, chunk_size=100, classes=CLASSES)
    assert result["merged"] > 0
    ref = [(int(v), shapely.Polygon(g["coordinates"][0], g["coordinates"][1:]))
           for g, v in shapes(a, mask=a != 255, connectivity=4, transform=t)]
    for out in outs:
        got = gpd.read_file(out, layer="landuse")
        assert set(got.geom_type) == {"Polygon"}
        assert canonical(zip(got["class_id"], got.geometry)) == canonical(ref)


def test_eight_connectivity_joins_corners_like_gdal(client, class_tif, tmp_path):
    a = hard_map()
    out = tmp_path / "eight.gpkg"
    vectorize(class_tif, [out], client=client, chunk_size=64, connectivity=8, classes=CLASSES)
    got = gpd.read_file(out, layer="landuse")
    ref = gdal(a, 8)
    assert len(got) == len(ref) < len(gdal(a, 4))
    # each polygon covers exactly the pixels of one of GDAL's (corner joins across chunk lines are MultiPolygons)
    ours = rasterio.features.rasterize(((g, i + 1) for i, g in enumerate(got.geometry)), out_shape=a.shape, transform=T,
                                       dtype="int32")
    theirs = rasterio.features.rasterize(((g, i + 1) for i, (_, g) in enumerate(ref)), out_shape=a.shape, transform=T,
                                         dtype="int32")
    pairs = np.unique(np.stack([ours.ravel(), theirs.ravel()]), axis=1)
    assert len(pairs[0]) == len(set(pairs[0])) == len(set(pairs[1])) == len(ref) + 1  # a bijection (0: nodata)
    assert sorted(got["class_id"].astype(int)) == sorted(k for k, _ in ref)


def test_classes_filter_and_nodata(client, class_tif, tmp_path):
    out = tmp_path / "water.gpkg"
    vectorize(class_tif, [out], client=client, chunk_size=64, keep_classes=[5], classes=CLASSES)
    got = gpd.read_file(out, layer="landuse")
    assert set(got["class_id"]) == {5} and set(got["class_name"]) == {"water"}
    assert canonical(zip(got["class_id"], got.geometry)) == canonical([p for p in gdal(hard_map()) if p[0] == 5])


def test_square_has_the_same_area_in_every_crs():
    """One 1 km x 1 km UTM square, also drawn in EPSG:3857 and EPSG:4326: the same ellipsoidal area."""
    from pyproj import Transformer

    from geoseg.vector.measure import Measurer

    x0, y0 = 500000.0, 2650000.0  # UTM 17N at about 24 N
    square = shapely.box(x0, y0, x0 + 1000, y0 + 1000)
    areas = {}
    for crs in ("EPSG:32617", "EPSG:3857", "EPSG:4326"):
        t = Transformer.from_crs("EPSG:32617", crs, always_xy=True)
        geom = shapely.transform(shapely.segmentize(square, 10.0), lambda xy: np.column_stack(t.transform(xy[:, 0], xy[:, 1])))
        area, perim = Measurer(crs)(np.array([geom]))
        areas[crs] = area[0]
        assert perim[0] == pytest.approx(4000 / 0.99961, rel=2e-3)
    # UTM's planar area is off by its scale factor; the ellipsoidal ones agree
    assert areas["EPSG:3857"] == pytest.approx(areas["EPSG:32617"], rel=1e-3)
    assert areas["EPSG:4326"] == pytest.approx(areas["EPSG:32617"], rel=1e-3)
    planar_3857 = shapely.area(shapely.transform(square, lambda xy: np.column_stack(
        Transformer.from_crs("EPSG:32617", "EPSG:3857", always_xy=True).transform(xy[:, 0], xy[:, 1]))))
    assert planar_3857 > 1.19 * areas["EPSG:3857"]  # what a planar area in Web Mercator would have said


@pytest.mark.parametrize("crs,x0,y0", [("EPSG:27572", 600000.0, 2400000.0), ("EPSG:27561", 600000.0, 200000.0),
                                       ("EPSG:2154", 650000.0, 6860000.0)])
def test_a_projection_on_a_base_in_grads_from_paris_measures_in_metres(crs, x0, y0):
    """NTF's Lambert zones (EPSG:27561-27574, still on much French data) are projections of a base CRS that counts
    in grads from the Paris meridian: read as degrees, every area was 10% too large (a 30 m square 988 m²). Small
    squares (the projection's scale) and large ones (edge by edge) against the same squares taken to EPSG:4326."""
    from pyproj import Geod, Transformer

    from geoseg.vector.measure import Measurer

    to_wgs84 = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    geod = Geod(ellps="WGS84")
    for side in (30.0, 5000.0):
        square = shapely.box(x0, y0, x0 + side, y0 + side)
        lon, lat = to_wgs84.transform(*np.asarray(shapely.segmentize(square, side / 100).exterior.xy))
        true_area, true_perim = geod.polygon_area_perimeter(lon[:-1], lat[:-1])
        area, perim = Measurer(crs)(np.array([square]))
        # two datums' ellipsoids (Clarke 1880 IGN against WGS 84): within a few parts in 1e5
        assert area[0] == pytest.approx(abs(true_area), rel=2e-4), side
        assert perim[0] == pytest.approx(true_perim, rel=2e-4), side


def test_a_global_grid_whose_pixels_are_centred_on_the_poles_measures_the_earth():
    """ERA5/CMIP-style lon/lat grids put pixel centres on ±90: their first and last rows reach half a pixel past the
    poles, where the geodesic measure was NaN (102 of 1149 polygons of a 0.25° map, with no word) and --min-area
    in hectares was refused as "no CRS on an ellipsoid". The part past a pole holds no ground."""
    from pyproj import Geod

    from geoseg.vector.measure import Measurer

    rows = [shapely.box(-180.5, 90.5 - (i + 1) * 45, 179.5, 90.5 - i * 45) for i in range(4)]  # 90.5 N to 89.5 S
    area, perim = Measurer("EPSG:4326")(np.array(rows))
    assert np.isfinite(area).all() and np.isfinite(perim).all()
    cut = Measurer("EPSG:4326")(np.array([shapely.box(-180.5, 45.5, 179.5, 90.0)]))[0][0]
    assert area[0] == pytest.approx(cut, rel=1e-12)  # the half degree past the pole adds nothing
    # a zone of the ellipsoid by its authalic latitudes: 45.5 N to the pole holds 2 pi R_q^2 (1 - sin(beta)) of it
    geod = Geod(ellps="WGS84")
    e2 = geod.es
    e = np.sqrt(e2)

    def q(phi):
        s = np.sin(np.radians(phi))
        return (1 - e2) * (s / (1 - e2 * s * s) - np.log((1 - e * s) / (1 + e * s)) / (2 * e))

    zone = np.pi * geod.a**2 * (q(90.0) - q(45.5))
    assert cut == pytest.approx(zone, rel=1e-6)


def test_min_area_in_hectares_on_a_grid_past_the_poles(tmp_path):
    from geoseg.vector.api import min_area_limit
    from geoseg.vector.run import open_class_raster

    grid = write_raster(tmp_path / "era.tif", np.ones((181, 360), np.uint8), crs="EPSG:4326",
                        transform=Affine(1, 0, -180.5, 0, -1, 90.5))
    pixels, metres = min_area_limit("1ha", open_class_raster(grid))
    assert metres == 1e4 and pixels >= 1


def test_a_class_raster_s_own_colour_table_styles_its_polygons(client, tmp_path):
    """A class raster that is not geoseg's, with its own palette (what QGIS shows it with): its polygons were styled
    in geoseg's default colours, so layer and raster looked different."""
    a = np.zeros((40, 50), np.uint8)
    a[5:20, 5:30], a[25:35, 10:45] = 1, 2
    path = write_raster(tmp_path / "palette.tif", a, nodata=255)
    with rasterio.open(path, "r+") as ds:
        ds.write_colormap(1, {0: (10, 20, 30, 255), 1: (200, 0, 0, 255), 2: (0, 150, 250, 255)})
    vectorize(path, [tmp_path / "p.gpkg"], client=client, chunk_size=32)
    con = sqlite3.connect(tmp_path / "p.gpkg")
    (qml,) = con.execute("SELECT styleQML FROM layer_styles").fetchone()
    con.close()
    for rgb in ("10,20,30", "200,0,0", "0,150,250"):
        assert f'value="{rgb},255"' in qml, rgb


def test_every_class_a_raster_holds_gets_a_style_category(client, tmp_path):
    """A class raster whose CLASS_NAMES name only some of its ids: the others get a category too (QGIS draws nothing
    of a value its categorized style lacks), in the raster's own colours where its names give none. The .qml beside
    a .fgb is in place before the file: a failed style write publishes no file."""
    import json

    a = np.zeros((40, 50), np.uint8)
    a[5:20, 5:30], a[25:35, 10:45] = 1, 2
    path = write_raster(tmp_path / "named.tif", a, nodata=255)
    with rasterio.open(path, "r+") as ds:
        ds.write_colormap(1, {0: (10, 20, 30, 255), 1: (200, 0, 0, 255), 2: (0, 150, 250, 255)})
        ds.update_tags(CLASS_NAMES=json.dumps({"1": "water"}))
    vectorize(path, [tmp_path / "p.fgb"], client=client, chunk_size=32)
    qml = (tmp_path / "p.qml").read_text()
    for value, label, rgb in (("0", "class_0", "10,20,30"), ("1", "water", "200,0,0"), ("2", "class_2", "0,150,250")):
        assert f'value="{value}"' in qml and f'label="{label}"' in qml and f'value="{rgb},255"' in qml, value
    (tmp_path / "q.fgb").write_bytes(b"")  # stand-in for nothing: it must not be replaced
    (tmp_path / "q.qml").mkdir()  # the style cannot be written there
    with pytest.raises(OSError):
        vectorize(path, [tmp_path / "q.fgb"], client=client, chunk_size=32)
    assert (tmp_path / "q.fgb").read_bytes() == b""  # no new file without its style
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_geopackage_carries_its_style_and_other_formats_a_qml(client, class_tif, tmp_path):
    outs = [tmp_path / "l.gpkg", tmp_path / "l.parquet", tmp_path / "l.fgb"]
    result = vectorize(class_tif, outs, client=client, chunk_size=128, classes=CLASSES)
    n = result["polygons"]
    # OGR opens the GeoPackage and the FlatGeobuf, geopandas (pyarrow) the GeoParquet: the same polygons
    for p in (outs[0], outs[2]):
        assert pyogrio.list_layers(p)[0, 0] == "landuse"  # not the temporary file's name
        info = pyogrio.read_info(p, layer="landuse")
        assert info["features"] == n and info["crs"] == "EPSG:32617"
    pq_frame = gpd.read_parquet(outs[1])
    assert len(pq_frame) == n and pq_frame.crs.to_epsg() == 32617
    ref = gpd.read_file(outs[0], layer="landuse")
    assert canonical(zip(pq_frame["class_id"], pq_frame.geometry)) == canonical(zip(ref["class_id"], ref.geometry))
    assert pyogrio.read_info(outs[0], layer="landuse")["geometry_type"] == "Polygon"
    con = sqlite3.connect(outs[0])
    # the query QGIS loads a layer's default style with (QgsOgrUtils::loadStoredStyle): table and OGR's geometry column
    geometry_column = pyogrio.read_info(outs[0], layer="landuse")["geometry_name"]
    rows = con.execute("SELECT f_table_name, useAsDefault, styleQML FROM layer_styles WHERE f_table_schema = '' AND "
                       "f_table_name = 'landuse' AND f_geometry_column = ?", (geometry_column,)).fetchall()
    registered = con.execute("SELECT data_type FROM gpkg_contents WHERE table_name = 'layer_styles'").fetchall()
    rtree = con.execute("SELECT name FROM sqlite_master WHERE name LIKE 'rtree_landuse_%'").fetchall()
    con.close()
    assert registered == [("attributes",)] and rtree
    ((table, default, qml),) = rows
    assert table == "landuse" and default == 1
    assert 'type="categorizedSymbol" attr="class_id"' in qml
    for c in CLASSES:
        assert f'value="{c.id}"' in qml and f'label="{c.name}"' in qml
    r, g, b = (int(CLASSES[4].color[i:i + 2], 16) for i in (1, 3, 5))
    assert f'value="{r},{g},{b},255"' in qml
    # GeoParquet 1.1 with a bbox covering column
    import pyarrow.parquet as pq

    meta = json.loads(pq.read_schema(outs[1]).metadata[b"geo"])
    assert meta["version"] == "1.1.0"
    assert meta["columns"]["geometry"]["covering"]["bbox"]["xmin"] == ["bbox", "xmin"]
    for p in outs[1:]:
        assert p.with_suffix(".qml").read_text().count("<category ") == len(CLASSES)
    hidden = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert hidden == []


def test_cli_vectorize(class_tif, tmp_path):
    out = tmp_path / "cli.gpkg"
    res = CliRunner().invoke(cli, ["vectorize", str(class_tif), "--out", str(out), "--chunk-size", "128", "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert f"{len(gdal(hard_map()))} polygons" in res.output
    again = CliRunner().invoke(cli, ["vectorize", str(class_tif), "--out", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output
    bad = CliRunner().invoke(cli, ["vectorize", str(tmp_path / "nope.tif"), "--out", str(tmp_path / "x.gpkg")])
    assert bad.exit_code == 2 and "nope.tif: no such file" in bad.output
    wrong = CliRunner().invoke(cli, ["vectorize", str(class_tif), "--out", str(tmp_path / "x.shp")])
    assert wrong.exit_code == 2 and ".gpkg" in wrong.output
    negative = CliRunner().invoke(cli, ["vectorize", str(class_tif), "--out", str(tmp_path / "y.gpkg"), "--chunk-size", "-5"])
    assert negative.exit_code == 2 and "Invalid value for '--chunk-size'" in negative.output
    # polygons named like the class raster beside them: their style (classes.qml) would replace the raster's
    from geoseg.vector.style import raster_qml, write_qml

    raster = tmp_path / "classes.tif"
    style = write_qml(raster, raster_qml(CLASSES))
    before = style.read_text()
    clash = CliRunner().invoke(cli, ["vectorize", str(class_tif), "--out", str(tmp_path / "classes.parquet"), "--overwrite"])
    assert clash.exit_code == 2 and "classes.qml" in clash.output and "another layer's style" in clash.output
    assert style.read_text() == before and not (tmp_path / "classes.parquet").exists()


def test_predict_polygons_equal_gdal_on_its_class_map(client, random_model, scene_path, tmp_path):
    from geoseg.io.zarr_store import open_prediction
    from geoseg.pipeline import PredictOptions, predict

    rec = predict([scene_path], random_model, tmp_path / "out", PredictOptions(chunk_size=64), client=client)
    ds = open_prediction(tmp_path / "out" / "prediction.zarr")
    a = ds["class_id"].values
    with rasterio.open(scene_path) as src:
        transform = src.transform
    ref = [(int(v), shapely.Polygon(g["coordinates"][0], g["coordinates"][1:]))
           for g, v in shapes(a, mask=a != 255, connectivity=4, transform=transform)]
    got = gpd.read_file(tmp_path / "out" / "landuse.gpkg", layer="landuse")
    assert rec["polygons"] == len(got) == len(ref)
    assert canonical(zip(got["class_id"], got.geometry)) == canonical(ref)
    # mean confidence of each polygon from the store's confidence layer
    conf = ds["confidence"].values
    big = got.sort_values("pixels").iloc[-1]
    inside = rasterio.features.geometry_mask([big.geometry], a.shape, transform, invert=True)
    assert big["mean_confidence"] == pytest.approx(float(np.nanmean(conf[inside])), rel=1e-5)
    # a fresh interpreter (`geoseg vectorize prediction.zarr`, a resumed job that reuses every chunk) opens
    # the store with nothing else imported before it: its CRS and transform come back all the same
    probe = ("import sys; from geoseg.vector.run import open_class_raster; r = open_class_raster(sys.argv[1]); "
             "print(r.crs_wkt is not None, *r.affine[:6])")
    done = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "out" / "prediction.zarr")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", *map(str, transform[:6])]


@pytest.mark.parametrize("connectivity", [4, 8])
def test_one_pass_labelling_of_a_class_map_equals_one_label_per_class(connectivity):
    """A class map (uint8, nodata 255) is labelled in one pass over all its classes (cc3d); any other map one class
    at a time (ndimage.label). Both give the same regions, each label one class, nodata 0: on the hard map and on a
    speckled one (one region per pixel, regions touching at corners everywhere)."""
    from geoseg.vector.regions import label_regions

    speckle = np.random.default_rng(3).integers(0, 4, size=(97, 131)).astype(np.uint8)
    speckle[np.random.default_rng(4).random(speckle.shape) < 0.1] = 255
    for a in (hard_map(), speckle):
        one, one_classes = label_regions(a, 255, connectivity)
        each, each_classes = label_regions(a.astype(np.uint16), 255, connectivity)  # the per-class way
        assert one.dtype == each.dtype == np.int32
        np.testing.assert_array_equal(one == 0, a == 255)
        # the same partition: labels pair one to one
        pairs = np.unique(np.stack([one.ravel(), each.ravel()]), axis=1)
        assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1] == one.max() + 1
        assert len(one_classes) == one.max() + 1
        np.testing.assert_array_equal(one_classes[one][a != 255], a[a != 255])
        np.testing.assert_array_equal(each_classes[each][a != 255], a[a != 255])


def test_sieve_kernel():
    from geoseg.vector.sieve import sieve

    a = np.zeros((8, 8), np.uint8)
    a[2:4, 2:4] = 1  # 4 px island in class 0: goes
    a[5:8, 5:8] = 2  # 9 px: stays
    a[0, 7] = 3  # 1 px in the corner: goes
    a[6, 0] = 255  # nodata is never sieved
    a[7, 0] = 4  # 1 px touching only nodata and 0: becomes 0
    out = sieve(a, 255, 5)
    expected = a.copy()
    expected[2:4, 2:4] = 0
    expected[0, 7] = 0
    expected[7, 0] = 0
    np.testing.assert_array_equal(out, expected)
    # a small region at an edge the scene continues beyond is left to the window that holds it whole
    assert sieve(a, 255, 5, open_edges=(True, False, False, False))[0, 7] == 3


def test_small_regions_prefer_neighbours_at_or_above_the_limit():
    """A speck voted by its edges to specks that themselves changed class: pixel P (class 3) shares two edges with
    class-1 specks and one with the background, took class 1, and the specks went to the background: a new 1 px
    region of class 1. Small neighbours count only where there is no other; with 5% speckle no region stays
    under the limit (5 did), as with GDAL's sieve; a speck among specks keeps its class."""
    from geoseg.tiling import Box
    from geoseg.vector.regions import label_regions
    from geoseg.vector.sieve import sieve

    a = np.zeros((9, 9), np.uint8)
    a[4, 4], a[3, 4], a[4, 3], a[5, 4] = 3, 1, 1, 2
    np.testing.assert_array_equal(sieve(a, 255, 5), np.zeros_like(a))
    # a speck whose neighbours are all specks keeps its class (they take the background's, here its own)
    b = np.full((9, 9), 2, np.uint8)
    b[4, 4], b[3, 4], b[4, 3], b[5, 4], b[4, 5] = 2, 4, 3, 0, 0
    np.testing.assert_array_equal(sieve(b, 255, 5), np.full_like(b, 2))
    rng = np.random.default_rng(6)
    base = np.kron(rng.integers(0, 5, size=(10, 10)), np.ones((30, 30), int)).astype(np.uint8)
    noisy = base.copy()
    m = rng.random(noisy.shape) < 0.05
    noisy[m] = rng.integers(0, 5, m.sum())
    for connectivity in (4, 8):
        out = sieve(noisy, 255, 5, connectivity)
        labels, _ = label_regions(out, 255, connectivity)
        assert np.bincount(labels.ravel())[1:].min() >= 5
        np.testing.assert_array_equal(_joined_sieve(noisy, 64, 5, connectivity), out)
    # in windows: a small region reaches L - 1 px out of the core, so its neighbour seen reaching the window's side
    # spans L px only in a window grown by 2 L - 1 (grown by L, a 6 px line across a chunk line was split there)
    line = np.zeros((8, 192), np.uint8)
    line[2, 124:130] = 2  # 6 px across x = 128
    line[1, 123:131], line[3, 123:131], line[2, 123] = 3, 4, 5  # its other neighbours: all small
    line[2, 130:149] = 1  # 19 px, reaching x = 147: the last column of the core [64, 128) grown by 20
    rng = np.random.default_rng(1)
    for a, limit, chunk in [(line, 20, 64)] + [(noisy[:60, :70], int(rng.integers(2, 12)), int(c)) for c in (1, 3, 8)]:
        whole = sieve(a, 255, limit)
        for grow, equal in ((2 * limit - 1, True),) + (((limit, False),) if a is line else ()):
            out = np.empty_like(a)
            for y in range(0, a.shape[0], chunk):
                for x in range(0, a.shape[1], chunk):
                    core = Box(y, min(a.shape[0], y + chunk), x, min(a.shape[1], x + chunk))
                    win = core.grow(grow, a.shape)
                    opened = (win.y0 > 0, win.y1 < a.shape[0], win.x0 > 0, win.x1 < a.shape[1])
                    ys, xs = core.relative_to(win)
                    out[core.y0:core.y1, core.x0:core.x1] = sieve(a[win.y0:win.y1, win.x0:win.x1], 255, limit, 4, opened)[ys, xs]
            if equal:
                np.testing.assert_array_equal(out, whole, err_msg=f"grown by {grow}, chunk {chunk}")
            else:
                assert (out != whole).any()  # the case above: a window grown by L is not enough


@pytest.mark.parametrize("chunk", [64, 256])
def test_min_area_is_seamless(client, class_tif, tmp_path, chunk):
    """Sieving chunk by chunk (with its halo) gives the polygons of the whole map sieved at once."""
    from geoseg.vector.sieve import sieve

    a = hard_map()
    sieved = sieve(a, 255, 30)
    assert (sieved != a).sum() > 100  # the sieve did something
    out = tmp_path / "sieved.gpkg"
    vectorize(class_tif, [out], client=client, chunk_size=chunk, classes=CLASSES, min_area="30px")
    got = gpd.read_file(out, layer="landuse")
    assert canonical(zip(got["class_id"], got.geometry)) == canonical(gdal(sieved))
    assert (got["pixels"] < 30).sum() < (gpd.GeoSeries([g for _, g in gdal(a)]).area < 3000).sum()
    # in square metres: 30 px of 10 m x 10 m is 3000 m2 (the ellipsoidal pixel is a little larger)
    again = tmp_path / "m2.gpkg"
    vectorize(class_tif, [again], client=client, chunk_size=chunk, classes=CLASSES, min_area="2990m2")
    assert len(gpd.read_file(again, layer="landuse")) == len(got)


def _joined_sieve(a: np.ndarray, chunk: int, limit: float, connectivity: int, row_area=None) -> np.ndarray:
    """geoseg.vector.sieve's three steps, run here chunk by chunk on an array."""
    from geoseg.tiling import Box
    from geoseg.vector.regions import Edges, join_borders
    from geoseg.vector.sieve import border_facts, core_regions, joined_decisions, sieve_core

    h, w = a.shape
    ny, nx = -(-h // chunk), -(-w // chunk)
    found = {}
    for iy in range(ny):
        for ix in range(nx):
            core = Box(iy * chunk, min(h, (iy + 1) * chunk), ix * chunk, min(w, (ix + 1) * chunk))
            window = core.grow(1, (h, w))
            rows = None if row_area is None else row_area[core.y0:core.y1]
            regions = core_regions(a[window.y0:window.y1, window.x0:window.x1], core, window, 255, connectivity, rows)
            found[(iy, ix)] = (core, regions, (iy > 0, iy < ny - 1, ix > 0, ix < nx - 1))
    join = join_borders((ny, nx), {k: Edges.of(r.labels) for k, (_, r, _) in found.items()},
                        {k: r.classes for k, (_, r, _) in found.items()}, connectivity)
    facts = {}
    for (iy, ix), (_, r, facing) in found.items():
        facts[iy * nx + ix] = border_facts(r, facing, limit)
    decided = joined_decisions(join, facts, limit, nx)
    out = np.empty_like(a)
    for (iy, ix), (core, r, facing) in found.items():
        values = a[core.y0:core.y1, core.x0:core.x1]
        out[core.y0:core.y1, core.x0:core.x1] = sieve_core(r, facing, limit, values, decided[iy * nx + ix])
    return out


@pytest.mark.parametrize("connectivity", [4, 8])
def test_the_joined_sieve_equals_the_sieve_of_the_whole_map(connectivity):
    """--min-area beyond a window's reach: regions joined across chunks, as the polygons are, give the whole map's
    sieve for every chunk size, in pixels, in ground area (rows of different pixel areas) and per class."""
    from geoseg.vector.regions import label_regions
    from geoseg.vector.sieve import class_limits, sieve

    rng = np.random.default_rng(connectivity)
    maps = [hard_map(), np.kron(rng.integers(0, 4, (30, 40)), np.ones((3, 2), int)).astype(np.uint8)]
    speckled = hard_map(seed=2)[90:210, 150:300].copy()
    speckled[rng.random(speckled.shape) < 0.05] = 255
    speckled[rng.random(speckled.shape) < 0.05] = 3
    maps.append(speckled)
    for a in maps:
        area = np.linspace(1.0, 3.0, a.shape[0])  # pixels 3x larger at the bottom
        for limit in (2, 30, 400):
            whole = sieve(a, 255, limit, connectivity)
            weighted = sieve(a, 255, 0, connectivity, row_area=area, min_area=2.0 * limit)
            biggest = np.bincount(label_regions(a, 255, connectivity)[0].ravel())[1:].max()
            assert limit == 2 or (whole != a).any() or biggest < limit  # every region small: none has a large neighbour
            for chunk in (11, 32, 100):  # 11 px: ~1100 chunks, regions across many (coprime to the 3 x 2 blocks)
                np.testing.assert_array_equal(_joined_sieve(a, chunk, limit, connectivity), whole, err_msg=f"{limit} {chunk}")
                np.testing.assert_array_equal(_joined_sieve(a, chunk, 2.0 * limit, connectivity, area), weighted)
        # a minimum mapping unit per class (predict's --mmu 1=400,2=30): one limit for each class id
        per_class = {1: 400, 2: 30}
        whole = sieve(a, 255, 5, connectivity, class_min=per_class)
        assert (whole != sieve(a, 255, 5, connectivity)).any()
        for chunk in (11, 32, 100):
            np.testing.assert_array_equal(_joined_sieve(a, chunk, class_limits(5, per_class), connectivity), whole,
                                          err_msg=f"per class, chunk {chunk}")


def test_ground_areas_add_up_the_same_whole_and_by_chunk():
    """A region whose area is the limit to the last bit: float sums in another order (by chunk, then joined) differed
    from the whole map's, and the region was sieved whole but kept chunked. Areas on a fixed grid add up exactly."""
    from geoseg.vector.sieve import sieve

    a = np.array([[0, 1, 1, 0], [0, 1, 1, 0]], np.uint8)
    area = np.array([0.2, 0.1])
    for limit in (0.6, 0.6000000000000001, 0.5999999999999999):
        whole = sieve(a, 255, 0, 4, row_area=area, min_area=limit)
        np.testing.assert_array_equal(_joined_sieve(a, 2, limit, 4, area), whole, err_msg=str(limit))


def test_a_min_area_beyond_the_window_reach_is_sieved_across_chunks(client, class_tif, tmp_path):
    """The cluster runs the joined sieve when the area spans more pixels than a window may grow by (each task then
    reads its chunk and a one-pixel ring, not the scene): polygons of the whole map sieved at once."""
    from geoseg.vector.sieve import sieve
    from geoseg.vector.run import VectorizeOptions, iter_parts, open_class_raster, vectorize_parts

    a = hard_map()
    opts = VectorizeOptions(chunk_size=64, min_pixels=300, sieve_window_max=0)
    assert opts.sieve_joined
    parts = tmp_path / "parts"
    vectorize_parts(client, open_class_raster(class_tif), str(parts), opts)
    got = gpd.GeoDataFrame(pd.concat(list(iter_parts(str(parts))), ignore_index=True))
    assert canonical(zip(got["class_id"], got.geometry)) == canonical(gdal(sieve(a, 255, 300)))


@pytest.mark.parametrize("connectivity", [4, 8])
def test_simplified_polygons_still_partition_the_map(client, tmp_path, connectivity):
    """No gaps, no overlaps, valid geometries; with 8-connectivity too, whose regions touch themselves at corners
    (simplified as they came, they overlapped and left gaps there)."""
    yy, xx = np.mgrid[:300, :437]
    a = ((np.hypot(yy - 150, xx - 200) // 37) % 4).astype(np.uint8)  # rings: staircase borders everywhere
    a[(yy + 2 * xx) % 97 < 9] = 5  # diagonal bands
    speckle = np.random.default_rng(0).random(a.shape) < 0.03  # corner contacts everywhere inside (the outer
    a[40:-10, 10:-10][speckle[40:-10, 10:-10]] = 2                # boundary is simplified too: kept straight here)
    a[10:20, 10:20] = 255
    path = write_raster(tmp_path / "rings.tif", a, nodata=255, block=64)
    out = tmp_path / "simple.gpkg"
    vectorize(path, [out], client=client, chunk_size=64, classes=CLASSES, simplify="1.5px", connectivity=connectivity)
    got = gpd.read_file(out, layer="landuse")
    exact = gdal(a, connectivity)
    assert len(got) == len(exact) and got.geometry.is_valid.all()
    assert shapely.get_num_coordinates(got.geometry.values).sum() < 0.8 * sum(shapely.get_num_coordinates(g) for _, g in exact)
    # no gaps: together they cover what the exact polygons cover; no overlaps: their areas add up to it
    union = shapely.union_all(got.geometry.values)
    valid = shapely.union_all([g for _, g in exact])
    assert union.symmetric_difference(valid).area == pytest.approx(0.0, abs=1e-6)
    assert got.geometry.area.sum() == pytest.approx(union.area, rel=1e-9)


@pytest.mark.parametrize("crs, x0, y0, unit", [("EPSG:32617", 320000.0, 4100000.0, 1.0), ("EPSG:3857", -8.9e6, 4.3e6, 1.0),
                                               ("EPSG:2264", 2000000.0, 700000.0, 1200 / 3937)])
def test_fast_measures_agree_with_the_geodesic_ones(crs, x0, y0, unit):
    """Small polygons measured by the projection's scale at their centroid equal the edge-by-edge geodesic measures."""
    from geoseg.vector.measure import Measurer

    rng = np.random.default_rng(0)
    geoms = []
    for _ in range(50):
        w, h = rng.uniform(10, 1400, 2) / unit
        ring = shapely.box(x0, y0, x0 + w, y0 + h).difference(shapely.box(x0 + w / 4, y0 + h / 4, x0 + w / 2, y0 + h / 2))
        geoms.append(ring)
        x0 += 7000 / unit
    geoms = np.array(geoms, dtype=object)
    m = Measurer(crs)
    fast_area, fast_perim = m(geoms)
    assert m._fast_ok is (crs != "EPSG:3857")  # pseudo-Mercator: spherical factors, not the ellipsoid's
    exact_area, exact_perim = m._geodesic(geoms)
    np.testing.assert_allclose(fast_area, exact_area, rtol=2e-5)
    np.testing.assert_allclose(fast_perim, exact_perim, rtol=2e-5)


def test_a_mask_band_hides_pixels_as_gdal_polygonize_has_it_and_255_is_none(client, tmp_path):
    """A class map without nodata but with a mask band (per dataset): GDAL's polygonize leaves the hidden pixels out,
    so geoseg does too (it vectorized them). 255 in a uint8 map without nodata is none, as in every class map geoseg
    reads (it crashed after all the work, building a style for class 255)."""
    a = hard_map()
    a[a == 255] = 0
    mask = np.full(a.shape, 255, np.uint8)
    mask[:, 270:] = 0
    path = tmp_path / "masked.tif"
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
        with rasterio.open(path, "w", driver="GTiff", width=a.shape[1], height=a.shape[0], count=1, dtype="uint8",
                           crs="EPSG:32617", transform=T) as ds:
            ds.write(a, 1)
            ds.write_mask(mask)
    vectorize(path, [tmp_path / "masked.gpkg"], client=client, chunk_size=100)
    got = gpd.read_file(tmp_path / "masked.gpkg", layer="landuse")
    with rasterio.open(path) as ds:
        ref = [(int(v), shapely.geometry.shape(g)) for g, v in shapes(a, mask=ds.read_masks(1) > 0, transform=T)]
    assert canonical(zip(got["class_id"], got.geometry)) == canonical(ref)
    # a nodata value and a mask: both hide pixels (the mask was ignored beside a nodata value)
    both = tmp_path / "nodata-and-mask.tif"
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
        with rasterio.open(both, "w", driver="GTiff", width=a.shape[1], height=a.shape[0], count=1, dtype="uint8",
                           crs="EPSG:32617", transform=T, nodata=3) as ds:
            ds.write(a, 1)
            ds.write_mask(mask)
    vectorize(both, [tmp_path / "both.gpkg"], client=client, chunk_size=100)
    got = gpd.read_file(tmp_path / "both.gpkg", layer="landuse")
    ref = [(int(v), shapely.geometry.shape(g)) for g, v in shapes(a, mask=(mask > 0) & (a != 3), transform=T)]
    assert canonical(zip(got["class_id"], got.geometry)) == canonical(ref)
    b = a.copy()
    b[10:20, 10:30] = 255
    plain = write_raster(tmp_path / "no-nodata.tif", b, nodata=None)
    result = vectorize(plain, [tmp_path / "plain.gpkg"], client=client, chunk_size=100)
    got = gpd.read_file(tmp_path / "plain.gpkg", layer="landuse")
    assert result["polygons"] == len(got) and int(got["pixels"].sum()) == int((b != 255).sum())
    assert canonical(zip(got["class_id"], got.geometry)) == canonical(gdal(b))
    # the same map stored as uint16 without nodata: 255 is none there too (it was refused as an id out of 0-254)
    wide = write_raster(tmp_path / "no-nodata-u16.tif", b.astype(np.uint16), nodata=None)
    vectorize(wide, [tmp_path / "wide.gpkg"], client=client, chunk_size=100)
    got = gpd.read_file(tmp_path / "wide.gpkg", layer="landuse")
    assert canonical(zip(got["class_id"], got.geometry)) == canonical(gdal(b))


def test_min_area_on_the_ground_where_pixels_shrink_with_latitude(client, tmp_path):
    """0.1° pixels from the equator to 60°N: --min-area in m² judges each region by the ground area of its
    pixels (one pixel count from the central pixel removed a 246 km² island and kept a 198 km² one); chunked
    equals one chunk."""
    a = np.zeros((600, 100), np.uint8)
    a[595:597, 50] = 1  # 2 px near the equator: 246 km²
    a[20:23, 50] = 2  # 3 px near 58°N: 198 km²
    a[300:302, 20:22] = 3  # 4 px near 30°N: 4 x 106 km²
    t = Affine(0.1, 0, 0, 0, -0.1, 60)
    src = write_raster(tmp_path / "geo.tif", a, crs="EPSG:4326", transform=t, nodata=255, block=64)
    got = {}
    for chunk in (64, 1000):
        out = tmp_path / f"geo-{chunk}.gpkg"
        vectorize(src, [out], client=client, chunk_size=chunk, min_area="220000000m2")
        got[chunk] = gpd.read_file(out, layer="landuse")
    kept = got[64][got[64]["class_id"] != 0]
    assert sorted(kept["class_id"].astype(int)) == [1, 3] and (kept["area_m2"] >= 2.2e8).all()
    assert canonical(zip(got[64]["class_id"], got[64].geometry)) == canonical(zip(got[1000]["class_id"], got[1000].geometry))


def test_bad_options_are_refused_before_any_cluster_work(class_tif, tmp_path):
    """A bad --simplify was refused only after the whole map was polygonized on the cluster; class ids to keep
    outside 0-254 gave "0 polygons" and exit 0. Both stop before anything runs: no cluster is needed to refuse them
    (none is given, and none is started: the refusal comes first)."""
    from click.testing import CliRunner

    from geoseg.cli.main import cli
    from geoseg.errors import ConfigError

    with pytest.raises(ConfigError, match="--simplify"):
        vectorize(class_tif, [tmp_path / "a.gpkg"], client="not a client: never used", simplify="abc")
    with pytest.raises(ConfigError, match="0-254"):
        vectorize(class_tif, [tmp_path / "b.gpkg"], client="not a client: never used", keep_classes=[300, -4])
    r = CliRunner().invoke(cli, ["vectorize", str(class_tif), "--out", str(tmp_path / "c.gpkg"), "--classes", "300,-4"])
    assert r.exit_code == 2 and "0-254" in r.output, r.output
    assert not list(tmp_path.glob("*.gpkg"))


def test_mean_confidence_is_over_the_pixels_that_have_one(client, tmp_path):
    """A region's mean confidence is over its pixels that have a confidence: pixels without one (NaN in a store
    made elsewhere) counted as 0, so half of them missing halved the mean, and a region with none said 0 (sure
    of nothing) where it has no value. The same whole (polygonize) and chunk by chunk across chunk lines."""
    import zarr
    from pyproj import CRS

    from geoseg.vector.api import polygonize
    from geoseg.vector.run import ClassRaster, VectorizeOptions, iter_parts, vectorize_parts

    a = np.zeros((6, 8), np.uint8)
    a[:, 4:] = 1
    a[:, 7] = 2
    conf = np.full(a.shape, 0.9, np.float32)
    conf[:, :4] = 0.6
    conf[:3, 4:7] = np.nan  # half of class 1's pixels have no confidence
    conf[:, 7] = np.nan  # none of class 2's
    transform = Affine(10, 0, 500000, 0, -10, 4000000)
    whole = polygonize(a, transform, "EPSG:32617", [], confidence=conf).set_index("class_id")
    store = str(tmp_path / "map.zarr")
    g = zarr.open_group(store, mode="w")
    g.create_array("class_id", data=a, chunks=(4, 4))
    g.create_array("confidence", data=conf, chunks=(4, 4))
    src = ClassRaster(store, "zarr", a.shape, transform, CRS("EPSG:32617").to_wkt(), 255, (4, 4), has_confidence=True)
    vectorize_parts(client, src, str(tmp_path / "parts"), VectorizeOptions(chunk_size=4))
    chunked = pd.concat(list(iter_parts(str(tmp_path / "parts")))).set_index("class_id")
    for got in (whole, chunked):
        assert got.loc[0, "pixels"] == 24 and got.loc[0, "mean_confidence"] == pytest.approx(0.6)
        assert got.loc[1, "pixels"] == 18 and got.loc[1, "mean_confidence"] == pytest.approx(0.9)
        assert got.loc[2, "pixels"] == 6 and np.isnan(got.loc[2, "mean_confidence"])
