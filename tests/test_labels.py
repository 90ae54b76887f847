"""Labels onto the image grid: rasters, vectors, CRS equivalence, class names and bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pyproj
import pytest
from affine import Affine

from _scenes import ORIGIN, RES, write_polygons, write_tif
from geoseg.errors import GridMismatchError, InputError, InputNotFoundError
from geoseg.io.sources import open_stack
from geoseg.model.card import ClassInfo
from geoseg.tiling import Box
from geoseg.training.labels import LabelGridWarning, crs_equivalent, load_classes, open_labels, read_labels

H, W = 40, 50
ALL = Box(0, H, 0, W)


@pytest.fixture
def grid(tmp_path):
    img = write_tif(tmp_path / "img.tif", np.ones((2, H, W), np.uint16))
    return open_stack([img]).grid


def test_raster_labels_keep_their_ids_nodata_and_ignore_become_255(tmp_path, grid):
    lab = np.full((H, W), 3, np.int16)
    lab[:10] = 7
    lab[0, :5] = -1  # nodata
    lab[5, :3] = 99  # ignored
    path = write_tif(tmp_path / "lab.tif", lab, nodata=-1)
    ids = read_labels(open_labels(path, grid, ignore=[99]), ALL)
    assert ids.dtype == np.uint8
    assert (ids[0, :5] == 255).all() and (ids[5, :3] == 255).all()
    assert ids[1, 0] == 7 and ids[20, 20] == 3
    assert set(np.unique(ids)) == {3, 7, 255}


def test_a_label_band_s_own_mask_band_masks_its_labels(tmp_path, grid):
    """A VRT label band with its own <MaskBand> (GDAL's flags say neither per-dataset nor nodata): masked pixels
    are no label, as for the image's bands."""
    import rasterio

    lab = write_tif(tmp_path / "lab.tif", np.full((H, W), 3, np.uint8))
    mask = np.full((H, W), 255, np.uint8)
    mask[:, :20] = 0
    write_tif(tmp_path / "mask.tif", mask)
    with rasterio.open(lab) as ds:
        wkt, t = ds.crs.to_wkt(), ds.transform
    (tmp_path / "lab.vrt").write_text(f"""<VRTDataset rasterXSize="{W}" rasterYSize="{H}"><SRS>{wkt}</SRS>
<GeoTransform>{t.c}, {t.a}, 0, {t.f}, 0, {t.e}</GeoTransform><VRTRasterBand dataType="Byte" band="1">
<SimpleSource><SourceFilename relativeToVRT="1">lab.tif</SourceFilename><SourceBand>1</SourceBand></SimpleSource>
<MaskBand><VRTRasterBand dataType="Byte"><SimpleSource><SourceFilename relativeToVRT="1">mask.tif</SourceFilename>
<SourceBand>1</SourceBand></SimpleSource></VRTRasterBand></MaskBand></VRTRasterBand></VRTDataset>""")
    ids = read_labels(open_labels(str(tmp_path / "lab.vrt"), grid), ALL)
    assert (ids[:, :20] == 255).all() and (ids[:, 20:] == 3).all()


def test_float_label_raster_with_integer_values_is_fine(tmp_path, grid):
    lab = np.where(np.arange(W)[None] < 25, 1.0, 6.0).repeat(H, 0).astype(np.float32)
    lab[3, 3] = np.nan
    ids = read_labels(open_labels(write_tif(tmp_path / "f.tif", lab, nodata=-99999.0), grid), ALL)
    assert ids[0, 0] == 1 and ids[0, 40] == 6 and ids[3, 3] == 255


# 1.9999999 was said as "label value 2 is not an integer"
@pytest.mark.parametrize("value, hint", [(300, "--ignore-index 300"), (255, "--ignore-index 255"), (2.5, "integer"),
                                         (np.float32(1.9999999).item(), r"value 1\.99999\d+ .*round them")])
def test_values_that_are_no_class_id_are_a_clear_error(tmp_path, grid, value, hint):
    dtype = np.float32 if isinstance(value, float) else np.int16
    lab = np.ones((H, W), dtype)
    lab[7, 7] = value
    path = write_tif(tmp_path / "bad.tif", lab)
    with pytest.raises(InputError, match=hint) as exc:
        read_labels(open_labels(path, grid), ALL)
    assert str(path) in str(exc.value)


def test_crs_equivalence_ignores_only_the_datum_realisation():
    assert crs_equivalent(pyproj.CRS(32119), pyproj.CRS(3358))  # NAD83 vs NAD83(HARN), North Carolina
    assert crs_equivalent("EPSG:32617", "EPSG:32617")
    assert not crs_equivalent(pyproj.CRS(32119), pyproj.CRS(32118))  # another state plane zone
    assert not crs_equivalent(pyproj.CRS(32617), pyproj.CRS(32618))  # another UTM zone
    assert not crs_equivalent(pyproj.CRS(4326), pyproj.CRS(3857))
    assert not crs_equivalent(pyproj.CRS(32617), pyproj.CRS(26917))  # WGS84 vs GRS80 ellipsoid: not the same


def test_label_raster_on_an_equivalent_crs_is_accepted_with_a_warning(tmp_path):
    t = Affine(28.5, 0.0, 630534.0, 0.0, -28.5, 228114.0)
    img = write_tif(tmp_path / "img.tif", np.ones((1, H, W), np.uint8), crs="EPSG:32119", transform_=t)
    lab = write_tif(tmp_path / "lab.tif", np.full((H, W), 4, np.uint8), crs="EPSG:3358", transform_=t)
    grid = open_stack([img]).grid
    with pytest.warns(LabelGridWarning, match="datum realisation"):
        src = open_labels(lab, grid)
    assert (read_labels(src, ALL) == 4).all()


def test_label_raster_on_another_grid_is_refused_or_reprojected_on_request(tmp_path, grid):
    # Labels on a larger, aligned grid: 3 px more on every side.
    big = np.zeros((H + 6, W + 6), np.uint8)
    big[3:-3, 3:-3] = np.arange(W)[None] % 5 + 1
    t = Affine(RES, 0.0, ORIGIN[0] - 3 * RES, 0.0, -RES, ORIGIN[1] + 3 * RES)
    path = write_tif(tmp_path / "big.tif", big, transform_=t, nodata=0)
    with pytest.raises(GridMismatchError, match="--reproject-labels") as exc:
        open_labels(path, grid)
    assert str(path) in str(exc.value)
    ids = read_labels(open_labels(path, grid, reproject=True), ALL)
    assert np.array_equal(ids, big[3:-3, 3:-3])


def test_a_label_raster_a_micrometre_off_the_grid_says_how(tmp_path, grid):
    """Labels whose origin is 1e-6 m off the image's: refused (the grids must agree to 1e-9 of a pixel), and the
    message says it is the transform; it said "label grid differs ... ()" with no reason."""
    t = Affine(RES, 0.0, ORIGIN[0] + 1e-6, 0.0, -RES, ORIGIN[1])
    path = write_tif(tmp_path / "off.tif", np.ones((H, W), np.uint8), transform_=t, nodata=0)
    with pytest.raises(GridMismatchError, match=r"label grid differs from the grid of .* \(transform \(") as exc:
        open_labels(path, grid)
    assert "()" not in str(exc.value)


def test_label_raster_in_another_crs_is_refused(tmp_path, grid):
    path = write_tif(tmp_path / "utm18.tif", np.ones((H, W), np.uint8), crs="EPSG:32618")
    with pytest.raises(GridMismatchError, match="CRS"):
        open_labels(path, grid)


def test_missing_label_file_is_named(tmp_path, grid):
    with pytest.raises(InputNotFoundError, match="nope.tif"):
        open_labels(tmp_path / "nope.tif", grid)


# -- vectors ---------------------------------------------------------------------------------


POLYS = [((2, 10, 3, 12), "water"), ((20, 30, 30, 45), "Forest"), ((12, 18, 0, 6), "water")]


def test_polygons_rasterize_onto_the_right_pixels_with_names_mapped(tmp_path, grid):
    path = write_polygons(tmp_path / "p.gpkg", POLYS)
    classes = [ClassInfo(id=4, name="water"), ClassInfo(id=11, name="forest")]
    ids = read_labels(open_labels(path, grid, classes=classes), ALL)
    expect = np.full((H, W), 255, np.uint8)
    expect[2:10, 3:12] = 4
    expect[20:30, 30:45] = 11  # names match case-insensitively
    expect[12:18, 0:6] = 4
    assert np.array_equal(ids, expect)
    # windows read the same pixels as the whole
    assert np.array_equal(read_labels(open_labels(path, grid, classes=classes), Box(5, 25, 8, 40)), expect[5:25, 8:40])


def test_polygons_in_another_crs_are_reprojected(tmp_path, grid):
    path = write_polygons(tmp_path / "p.geojson", [((10, 30, 10, 40), 3)], crs="EPSG:4326", field="class_id")
    ids = read_labels(open_labels(path, grid), ALL)
    assert (ids[11:29, 11:39] == 3).all()  # the interior: edges may move a fraction of a pixel
    assert (ids[:9] == 255).all() and (ids[31:] == 255).all()


def test_polygons_on_another_realisation_of_the_datum_are_transformed(tmp_path):
    """GDA94 polygons on a GDA2020 image (one projection, datums 1.5 m apart): PROJ's transformation, not a relabel."""
    import geopandas as gpd
    from shapely.geometry import box

    t = Affine(0.5, 0, 320000, 0, -0.5, 5810000)
    grid = open_stack([write_tif(tmp_path / "img.tif", np.ones((1, 128, 128), np.uint16), crs="EPSG:7855", transform_=t)]).grid
    ground = box(320010, 5809970, 320030, 5809990)  # rows 20-60, cols 20-60 of the image, in its CRS
    gpd.GeoDataFrame({"class_id": [1]}, geometry=[ground], crs="EPSG:7855").to_crs("EPSG:28355").to_file(tmp_path / "gda94.gpkg")
    ids = read_labels(open_labels(str(tmp_path / "gda94.gpkg"), grid), Box(0, 128, 0, 128))
    expect = np.full((128, 128), 255, np.uint8)
    expect[20:60, 20:60] = 1
    assert np.array_equal(ids, expect)


def test_a_file_of_several_layers_needs_the_layer_named(tmp_path, grid):
    import geopandas as gpd
    from shapely.geometry import box

    path = tmp_path / "project.gpkg"
    x0, y0 = ORIGIN
    gpd.GeoDataFrame({"name": ["study area"]}, geometry=[box(x0, y0 - H * RES, x0 + W * RES, y0)], crs="EPSG:32617").to_file(
        path, layer="aoi")
    gpd.GeoDataFrame({"class_id": [3]}, geometry=[box(x0, y0 - 10 * RES, x0 + 10 * RES, y0)], crs="EPSG:32617").to_file(
        path, layer="labels")
    with pytest.raises(InputError, match=r"holds 2 layers \(aoi, labels\); pass --label-layer") as exc:
        open_labels(str(path), grid)
    assert str(path) in str(exc.value)
    ids = read_labels(open_labels(str(path), grid, layer="labels"), ALL)
    assert (ids[:10, :10] == 3).all() and (ids[10:] == 255).all()
    assert np.array_equal(read_labels(open_labels(str(path), grid, layer="Labels"), ALL), ids)  # as GDAL: case aside


def test_ids_written_as_decimal_text_are_ids_and_an_empty_file_says_so(tmp_path, grid):
    p = write_polygons(tmp_path / "dec.geojson", [((0, 5, 0, 5), "10.0"), ((5, 10, 0, 5), "2.0"), ((10, 15, 0, 5), "1")],
                       field="code")
    ids = read_labels(open_labels(p, grid, field="code"), ALL)
    assert ids[2, 2] == 10 and ids[7, 2] == 2 and ids[12, 2] == 1
    empty = write_polygons(tmp_path / "empty.gpkg", [((0, 5, 0, 5), 1)])
    import geopandas as gpd

    gpd.read_file(empty).iloc[:0].to_file(empty)
    with pytest.raises(InputError, match="holds no features") as exc:
        open_labels(str(empty), grid)
    assert str(empty) in str(exc.value)


def test_integer_field_and_names_without_a_class_list(tmp_path, grid):
    p = write_polygons(tmp_path / "ints.shp", [((0, 5, 0, 5), 7), ((5, 10, 0, 5), 0)], field="code")
    ids = read_labels(open_labels(p, grid, field="code"), ALL)
    assert ids[2, 2] == 7 and ids[7, 2] == 0 and ids[20, 20] == 255
    src = open_labels(write_polygons(tmp_path / "names.gpkg", POLYS), grid)
    assert [(c.id, c.name) for c in src.classes] == [(1, "Forest"), (2, "water")]  # sorted names get 1, 2, ...
    # ids written as text (CSV, some exports) are ids, not names to number 1, 2, ... ("10" would sort before "2")
    p = write_polygons(tmp_path / "text.geojson", [((0, 5, 0, 5), "10"), ((5, 10, 0, 5), "0"), ((10, 15, 0, 5), "2")],
                       field="code")
    ids = read_labels(open_labels(p, grid, field="code"), ALL)
    assert ids[2, 2] == 10 and ids[7, 2] == 0 and ids[12, 2] == 2
    # unless the class list names classes so
    named = open_labels(p, grid, field="code", classes=[ClassInfo(id=i, name=n) for i, n in ((1, "10"), (2, "0"), (3, "2"))])
    assert read_labels(named, ALL)[2, 2] == 1


def test_unknown_class_name_is_a_clear_error(tmp_path, grid):
    path = write_polygons(tmp_path / "p.gpkg", POLYS + [((0, 2, 0, 2), "lava")])
    with pytest.raises(InputError, match="'lava'") as exc:
        open_labels(path, grid, classes=[ClassInfo(id=1, name="water"), ClassInfo(id=2, name="forest")], classes_from="c.yaml")
    assert str(path) in str(exc.value) and "c.yaml" in str(exc.value)


def test_missing_field_lists_the_fields(tmp_path, grid):
    path = write_polygons(tmp_path / "p.gpkg", POLYS, field="kind")
    with pytest.raises(InputError, match="kind"):
        open_labels(path, grid, field="landuse")


def test_polygons_outside_the_image_are_an_error(tmp_path, grid):
    path = write_polygons(tmp_path / "far.gpkg", [((-500, -400, 0, 10), "water")])
    with pytest.raises(InputError, match="overlaps"):
        open_labels(path, grid)


# -- classes files ---------------------------------------------------------------------------


def test_classes_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("- {id: 9, name: urban, color: '#FF0000'}\n- {id: 2, name: water}\n")
    classes = load_classes(p)
    assert [(c.id, c.name) for c in classes] == [(2, "water"), (9, "urban")]
    assert classes[1].color == "#ff0000"
    p.write_text("classes:\n  - {id: 1, name: a}\n")
    assert load_classes(p)[0].name == "a"


@pytest.mark.parametrize("text, match", [
    ("- {id: 255, name: x}\n", "0-254"),
    ("- {id: 1, name: a}\n- {id: 1, name: b}\n", "more than once"),
    ("- {id: 1, name: a, color: red}\n", "colour"),
    ("just text\n", "list"),
])  # fmt: skip
def test_bad_classes_file(tmp_path, text, match):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(InputError, match=match):
        load_classes(p)


def test_no_warning_when_crs_is_identical(tmp_path, grid):
    path = write_tif(tmp_path / "lab.tif", np.ones((H, W), np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", LabelGridWarning)
        open_labels(path, grid)


@pytest.mark.shared_data
def test_nc_strata_labels_are_accepted_on_the_landsat_grid():
    from conftest import SHARED_DATA

    d = SHARED_DATA / "grass-nc-landsat7"
    if not (d / "strata.tif").exists():
        pytest.skip("shared NC data not present")
    stack = open_stack([d / f"lsat7_2000_{b}.tif" for b in (10, 20, 30, 40, 50, 70)])
    with pytest.warns(LabelGridWarning):
        src = open_labels(d / "strata.tif", stack.grid)
    ids = read_labels(src, Box(0, 443, 0, 489))
    assert set(np.unique(ids)) <= {1, 2, 3, 4, 5, 6, 7, 255}
    polys = open_labels(d / "landsat96_polygons.shp", stack.grid, field="id")
    pids = read_labels(polys, Box(0, 443, 0, 489))
    m = pids != 255
    assert m.sum() > 1000 and (pids[m] == ids[m]).mean() > 0.99  # the polygons agree with the map


def test_ignored_polygons_mask_their_pixels_over_the_background_and_earlier_polygons(tmp_path, grid):
    """--ignore-index on vector labels: the ignored features burn as no label (they were dropped, and their pixels
    took the background class, or the class of a polygon they were drawn over, in the loss and the scores)."""
    path = write_polygons(tmp_path / "p.gpkg", [((0, 20, 0, 25), 3), ((5, 10, 5, 10), 9), ((30, 35, 30, 35), 9),
                                                ((25, 40, 40, 50), 1000)])
    ids = read_labels(open_labels(path, grid, background=0, ignore=[9, 1000]), ALL)
    expect = np.zeros((H, W), np.uint8)  # the background
    expect[0:20, 0:25] = 3
    expect[5:10, 5:10] = 255  # drawn over class 3
    expect[30:35, 30:35] = 255  # over the background
    expect[25:40, 40:50] = 255  # an ignored value that is no class id
    assert np.array_equal(ids, expect)


def test_two_layers_of_one_file_are_two_label_sources_in_one_compute(tmp_path, grid):
    """Dask names label blocks by their features: two layers with the same ids must not share keys."""
    import dask
    import geopandas as gpd
    from dask.base import tokenize
    from shapely.geometry import box

    path = tmp_path / "two.gpkg"
    x0, y0 = ORIGIN
    gpd.GeoDataFrame({"class_id": [3]}, geometry=[box(x0, y0 - H * RES, x0 + W * RES, y0)], crs="EPSG:32617").to_file(
        path, layer="train")
    gpd.GeoDataFrame({"class_id": [3]}, geometry=[box(x0, y0 - 5 * RES, x0 + 5 * RES, y0)], crs="EPSG:32617").to_file(
        path, layer="test")
    a, b = (open_labels(str(path), grid, layer=n) for n in ("train", "test"))
    assert tokenize(a) != tokenize(b)
    assert tokenize(a) == tokenize(open_labels(str(path), grid, layer="train"))
    counts = dask.compute(*(dask.delayed(lambda s: int((read_labels(s, ALL) != 255).sum()))(s) for s in (a, b)))
    assert counts == (H * W, 25)


def test_geoparquet_labels_are_read(tmp_path, grid):
    import geopandas as gpd

    src = write_polygons(tmp_path / "p.gpkg", POLYS)
    gpd.read_file(src).to_parquet(tmp_path / "p.parquet")
    classes = [ClassInfo(id=4, name="water"), ClassInfo(id=11, name="forest")]
    assert np.array_equal(read_labels(open_labels(str(tmp_path / "p.parquet"), grid, classes=classes), ALL),
                          read_labels(open_labels(src, grid, classes=classes), ALL))


def test_names_differing_only_in_case_are_one_class_without_a_class_list(tmp_path, grid, caplog):
    p = write_polygons(tmp_path / "case.gpkg", [((0, 5, 0, 5), "Water"), ((5, 10, 0, 5), "water"), ((10, 15, 0, 5), "WATER"),
                                                ((15, 20, 0, 5), "Forest"), ((20, 25, 0, 5), "  ")])
    with caplog.at_level("WARNING"):
        src = open_labels(p, grid)
    assert [(c.id, c.name) for c in src.classes] == [(1, "Forest"), (2, "WATER")]  # the first spelling sorted
    ids = read_labels(src, ALL)
    assert ids[2, 2] == ids[7, 2] == ids[12, 2] == 2 and ids[17, 2] == 1
    assert ids[22, 2] == 255  # a blank name is no class: left out, with a warning
    assert "differ only in case" in caplog.text and "have no value" in caplog.text


def test_layers_without_geometries_are_not_labels(tmp_path, grid):
    """A QGIS project GeoPackage: one polygon layer and the layer_styles table."""
    import geopandas as gpd
    import pandas as pd
    import pyogrio

    path = write_polygons(tmp_path / "styled.gpkg", POLYS)
    pyogrio.write_dataframe(pd.DataFrame({"styleName": ["s"]}), path, layer="layer_styles", append=True)
    assert len(pyogrio.list_layers(path)) == 2
    src = open_labels(str(path), grid, classes=[ClassInfo(id=4, name="water"), ClassInfo(id=11, name="forest")])
    assert read_labels(src, ALL)[3, 4] == 4
    with pytest.raises(InputError, match="'layer_styles' is a table without geometries; the layers with geometries are styled"):
        open_labels(str(path), grid, layer="layer_styles")
    with pytest.raises(InputError, match="no layer 'zzz'; its layers are styled"):
        open_labels(str(path), grid, layer="zzz")
    del gpd


def test_a_field_without_values_is_named(tmp_path, grid):
    import geopandas as gpd

    p = write_polygons(tmp_path / "nan.gpkg", [((0, 5, 0, 5), 1.0), ((5, 10, 0, 5), 2.0)], field="code")
    gdf = gpd.read_file(p)
    gdf["code"] = np.nan
    gdf.to_file(p)
    with pytest.raises(InputError, match="no feature with a geometry has a value in field 'code'"):
        open_labels(str(p), grid, field="code")


def test_only_the_features_that_can_meet_the_image_are_read(tmp_path, grid):
    """A file whose features lie mostly far from the image (a region's footprints, one scene): only those that can
    meet the image are read (scene_bbox, in the file's CRS), and class ids from names are still the whole file's: a
    class found only far away keeps its place, so every scene of one file gets the same ids."""
    from geoseg.training.labels import _read_vector, scene_bbox

    near = [((0, 10, 0, 10), "forest"), ((10, 20, 0, 10), "water")]
    far = [((5000 + 3 * k, 5002 + 3 * k, 0, 2), "crops" if k % 2 else "forest") for k in range(300)]  # 50 km south
    path = str(write_polygons(tmp_path / "region.gpkg", near + far, crs="EPSG:4326"))
    bbox = scene_bbox(path, None, grid)
    assert len(_read_vector(path, None, bbox=bbox)) == 2 and len(_read_vector(path, None)) == 302
    src = open_labels(path, grid)
    assert len(src.geoms) == 2
    assert [(c.id, c.name) for c in src.classes] == [(1, "crops"), (2, "forest"), (3, "water")]
    ids = read_labels(src, ALL)
    assert ids[5, 5] == 2 and ids[15, 5] == 3
    # a feature without a geometry names no class (as in a whole read), and text ids are decided over the whole file
    import geopandas as gpd

    gdf = gpd.read_file(path)
    gpd.GeoDataFrame({"label": ["aaa"]}, geometry=[None], crs=gdf.crs).pipe(lambda g: gpd.pd.concat([gdf, g])).to_file(
        tmp_path / "nogeom.gpkg")
    assert [c.name for c in open_labels(str(tmp_path / "nogeom.gpkg"), grid).classes] == ["crops", "forest", "water"]
    digits = str(write_polygons(tmp_path / "digits.gpkg", [((0, 10, 0, 10), "10"), ((10, 20, 0, 10), "5")]
                                + [((5000, 5002, 0, 2), "water")]))
    assert [(c.id, c.name) for c in open_labels(digits, grid).classes] == [(1, "10"), (2, "5"), (3, "water")]
    # none near: every feature is read, and the error says none overlaps
    only_far = str(write_polygons(tmp_path / "far.gpkg", far))
    with pytest.raises(InputError, match="overlaps"):
        open_labels(only_far, grid)
