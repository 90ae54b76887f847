"""The class map COG: valid, lossless, on the grid, with colours, names and MODE overviews."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
import zarr
from affine import Affine
from click.testing import CliRunner
from odc.geo.geobox import GeoBox
from rasterio.rio.main import main_group

from geoseg.errors import InputError
from geoseg.io.cog import validate_cog, write_cog
from geoseg.model.card import NODATA_CLASS, ClassInfo
from geoseg.sample import class_field, sample_classes, scene_spec, valid_mask
from geoseg.tiling import Box

H, W = 1300, 1100
CLASSES = sample_classes(5)


@pytest.fixture(scope="module")
def class_map() -> np.ndarray:
    spec = scene_spec(H, W, seed=7)
    box = Box(0, H, 0, W)
    a = class_field(spec, box)
    a[~valid_mask(spec, box)] = NODATA_CLASS
    return a


@pytest.fixture(scope="module")
def grid() -> GeoBox:
    return GeoBox((H, W), Affine(10.0, 0.0, 612340.0, 0.0, -10.0, 3987650.0), "EPSG:32617")


@pytest.fixture(scope="module")
def cog(tmp_path_factory, class_map, grid):
    out = tmp_path_factory.mktemp("cog") / "landuse.tif"
    write_cog(class_map, out, grid=grid, classes=CLASSES, tags={"MODEL_DIGEST": "abc123"})
    return out


def test_cog_is_valid(cog):
    is_valid, errors, warnings = validate_cog(cog)
    assert is_valid and errors == [] and warnings == []
    result = CliRunner().invoke(main_group, ["cogeo", "validate", str(cog)])
    assert result.exit_code == 0 and "is a valid cloud optimized GeoTIFF" in result.output
    with rasterio.open(cog) as src:
        # rio-cogeo also accepts plain tiled GeoTIFFs; GDAL's COG driver marks its own layout
        assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert src.block_shapes == [(512, 512)]
        assert src.compression.name == "deflate"
        assert src.overviews(1) == [2, 4]
        assert max(H, W) // src.overviews(1)[-1] < 512


def test_cog_matches_grid_and_data(cog, class_map, grid):
    with rasterio.open(cog) as src:
        assert (src.height, src.width) == grid.shape
        assert src.transform == grid.affine
        assert src.crs.to_epsg() == 32617
        assert src.crs == rasterio.crs.CRS.from_wkt(grid.crs.to_wkt())
        assert src.count == 1 and src.dtypes == ("uint8",)
        assert src.nodata == NODATA_CLASS
        np.testing.assert_array_equal(src.read(1), class_map)


def test_cog_carries_colours_and_names(cog):
    with rasterio.open(cog) as src:
        cmap = src.colormap(1)
        for c in CLASSES:
            assert cmap[c.id] == (*c.rgb, 255)
        assert cmap[NODATA_CLASS] == (0, 0, 0, 0)
        tags = src.tags()
        assert json.loads(tags["CLASS_NAMES"]) == {str(c.id): c.name for c in CLASSES}
        assert tags["MODEL_DIGEST"] == "abc123"
        band = src.tags(1)
        assert band["CLASS_3_NAME"] == "forest" and band["CLASS_3_COLOR"] == CLASSES[3].color
        assert src.descriptions == ("class_id",)


def test_no_temporary_files_left(cog):
    assert [p.name for p in cog.parent.iterdir()] == ["landuse.tif"]


def test_overviews_use_mode(tmp_path):
    # every 2x2 block holds three 0s and one 4. Averaging ids would give 1; on a paletted
    # raster GDAL averages colours and takes the nearest entry, which is class 1's colour here.
    # MODE keeps 0.
    classes = (
        ClassInfo(id=0, name="red", color="#ff0000"),
        ClassInfo(id=1, name="mostly red", color="#c00040"),
        ClassInfo(id=4, name="blue", color="#0000ff"),
    )
    a = np.zeros((1024, 1024), np.uint8)
    a[1::2, 1::2] = 4
    a[:64] = NODATA_CLASS
    grid = GeoBox((1024, 1024), Affine(5.0, 0.0, 0.0, 0.0, -5.0, 0.0), "EPSG:3857")
    out = write_cog(a, tmp_path / "m.tif", grid=grid, classes=classes)
    with rasterio.open(out, overview_level=0) as ov:
        o = ov.read(1)
    assert o.shape == (512, 512)
    assert set(np.unique(o[32:])) == {0}
    assert set(np.unique(o[:32])) == {NODATA_CLASS}


def test_reads_a_zarr_source_window_by_window(tmp_path, class_map, grid):
    z = zarr.create_array(tmp_path / "c.zarr", shape=class_map.shape, chunks=(700, 600), dtype="uint8")
    z[:] = class_map
    reads: list[tuple[int, int]] = []

    class Recording:
        shape = z.shape
        chunks = z.chunks

        def __getitem__(self, key):
            block = z[key]
            reads.append(block.shape)
            return block

    out = write_cog(Recording(), tmp_path / "z.tif", grid=grid, classes=CLASSES)
    with rasterio.open(out) as src:
        np.testing.assert_array_equal(src.read(1), class_map)
    assert len(reads) > 1 and max(h * w for h, w in reads) <= 1024 * 1024  # chunk rounded up to tiles
    assert validate_cog(out)[0]


def test_failing_source_leaves_nothing(tmp_path, class_map, grid):
    class Failing:
        shape = class_map.shape
        chunks = (256, 256)  # read in 512-pixel windows: six of them
        calls = 0

        def __getitem__(self, key):
            self.calls += 1
            if self.calls == 3:
                raise OSError("lost the store")
            return class_map[key]

    out = tmp_path / "landuse.tif"
    with pytest.raises(OSError, match="lost the store"):
        write_cog(Failing(), out, grid=grid, classes=CLASSES)
    assert list(tmp_path.iterdir()) == []

    # a previous result survives a failed rewrite untouched
    write_cog(class_map, out, grid=grid, classes=CLASSES)
    before = out.read_bytes()
    with pytest.raises(OSError):
        write_cog(Failing(), out, grid=grid, classes=CLASSES)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["landuse.tif"]


def test_rejects_wrong_shape_and_dtype(tmp_path, class_map, grid):
    with pytest.raises(InputError, match="shape"):
        write_cog(class_map[:-1], tmp_path / "a.tif", grid=grid, classes=CLASSES)
    with pytest.raises(InputError, match="uint8"):
        write_cog(class_map.astype(np.float32), tmp_path / "b.tif", grid=grid, classes=CLASSES)
    with pytest.raises(InputError, match="uint8"):
        write_cog(class_map.astype(np.int32) + 300, tmp_path / "c.tif", grid=grid, classes=CLASSES)
    assert list(tmp_path.iterdir()) == []


def test_geographic_grid_and_small_map(tmp_path):
    a = np.full((300, 200), 2, np.uint8)
    a[100:150, 50:120] = 9
    grid = GeoBox((300, 200), Affine(1e-4, 0.0, -79.0, 0.0, -1e-4, 36.0), "EPSG:4326")
    classes = (*CLASSES, ClassInfo(id=9, name="snow", color="#FFFFFF"))
    out = write_cog(a, tmp_path / "g.tif", grid=grid, classes=classes)
    assert validate_cog(out)[0]
    with rasterio.open(out) as src:
        assert src.crs.to_epsg() == 4326 and src.transform == grid.affine
        assert src.overviews(1) == []  # already smaller than one tile
        assert src.colormap(1)[9] == (255, 255, 255, 255)
        np.testing.assert_array_equal(src.read(1), a)
