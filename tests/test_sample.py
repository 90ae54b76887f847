"""The synthetic scene: deterministic, window-independent, with a consistent nodata border."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import yaml
from rasterio.windows import Window

from geoseg.errors import InputError, InputNotFoundError
from geoseg.model.card import NODATA_CLASS
from geoseg.sample import class_field, load_classes, make_sample, render_window, scene_spec, valid_mask
from geoseg.tiling import Box


def _read(scene):
    with rasterio.open(scene.image_path) as img, rasterio.open(scene.labels_path) as lab:
        return img.read(), lab.read(1)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return make_sample(tmp_path_factory.mktemp("scene"), size=600, width=700, seed=3)


@pytest.fixture(scope="module")
def arrays(scene):
    return _read(scene)


def test_same_seed_gives_identical_scene(scene, arrays, tmp_path):
    again = make_sample(tmp_path, size=600, width=700, seed=3)
    image, labels = _read(again)
    np.testing.assert_array_equal(image, arrays[0])
    np.testing.assert_array_equal(labels, arrays[1])
    assert again.labels_path.read_bytes() == scene.labels_path.read_bytes()
    assert again.classes_path.read_bytes() == scene.classes_path.read_bytes()
    assert again.classes == scene.classes


def test_different_seed_gives_different_scene(arrays, tmp_path):
    image, labels = _read(make_sample(tmp_path, size=600, width=700, seed=4))
    assert (labels != arrays[1]).mean() > 0.3
    assert not np.array_equal(image, arrays[0])


def test_windowing_does_not_change_pixels(arrays):
    spec = scene_spec(600, 700, seed=3)
    whole = class_field(spec, Box(0, 600, 0, 700))
    # windows of odd sizes that cut across the lattice cells and the 512 blocks
    pieced = np.empty_like(whole)
    for y0 in range(0, 600, 97):
        for x0 in range(0, 700, 131):
            box = Box(y0, min(600, y0 + 97), x0, min(700, x0 + 131))
            pieced[box.y0 : box.y1, box.x0 : box.x1] = class_field(spec, box)
    np.testing.assert_array_equal(pieced, whole)

    # the written files were produced block by block; any window renders the same pixels
    box = Box(250, 541, 333, 690)
    image, labels = render_window(spec, box)
    np.testing.assert_array_equal(image, arrays[0][:, 250:541, 333:690])
    np.testing.assert_array_equal(labels, arrays[1][250:541, 333:690])


def test_nodata_border_is_consistent(scene, arrays):
    image, labels = arrays
    nodata = (image == 0).all(axis=0)
    # nodata means all bands are 0; a valid pixel has no band at 0
    np.testing.assert_array_equal((image == 0).any(axis=0), nodata)
    np.testing.assert_array_equal(labels == NODATA_CLASS, nodata)
    assert 0.02 < nodata.mean() < 0.3
    # the tilted footprint leaves every corner empty and the middle (but for the hole) full
    for y, x in [(0, 0), (0, 699), (599, 0), (599, 699)]:
        assert nodata[y, x]
    assert (~nodata[150:450, 150:550]).mean() > 0.9
    # the hole is nodata surrounded by data
    spec = scene_spec(600, 700, seed=3)
    cy, cx = int(spec.hole[0]), int(spec.hole[1])
    assert nodata[cy, cx]
    assert not nodata[cy, cx + int(spec.hole[3]) + 3] and not nodata[cy, cx - int(spec.hole[3]) - 3]
    np.testing.assert_array_equal(valid_mask(spec, Box(0, 600, 0, 700)), ~nodata)
    # every class appears
    assert set(np.unique(labels)) == {0, 1, 2, 3, 4, NODATA_CLASS}


def test_files_share_one_grid_and_are_tiled(scene):
    with rasterio.open(scene.image_path) as img, rasterio.open(scene.labels_path) as lab:
        assert (img.height, img.width) == (lab.height, lab.width) == (600, 700)
        assert img.crs == lab.crs and img.crs.to_epsg() == 32617
        assert img.transform == lab.transform
        assert img.transform.a == 10.0 and img.transform.e == -10.0 and img.transform.b == 0.0
        assert (img.transform.c, img.transform.f) == (500000.0, 4000000.0)
        assert img.count == 4 and img.dtypes[0] == "uint16" and img.nodata == 0
        assert img.descriptions == ("blue", "green", "red", "nir")
        assert img.block_shapes[0] == (512, 512) and img.compression.name == "deflate"
        assert lab.dtypes[0] == "uint8" and lab.nodata == NODATA_CLASS
        assert lab.block_shapes[0] == (512, 512)
        cmap = lab.colormap(1)
        for c in scene.classes:
            assert cmap[c.id] == (*c.rgb, 255)


def test_classes_file_round_trips(scene):
    assert load_classes(scene.classes_path) == scene.classes
    assert [c.name for c in scene.classes] == ["urban", "agriculture", "grassland", "forest", "water"]
    assert [c.id for c in scene.classes] == [0, 1, 2, 3, 4]


def test_classes_are_separable_but_not_trivially(arrays):
    image, labels = arrays
    valid = labels != NODATA_CLASS
    x = image[:, valid].T.astype(np.float64)
    y = labels[valid]
    means = np.stack([x[y == c].mean(axis=0) for c in range(5)])
    nearest = np.argmin(((x[:, None, :] - means[None]) ** 2).sum(axis=-1), axis=1)
    accuracy = (nearest == y).mean()
    assert 0.7 < accuracy < 0.995
    assert means[4, 3] < means[:4, 3].min()  # water is darkest in the near infrared


def test_geographic_crs_and_more_bands(tmp_path):
    s = make_sample(tmp_path, size=300, bands=6, seed=1, n_classes=3, crs="EPSG:4326")
    with rasterio.open(s.image_path) as img, rasterio.open(s.labels_path) as lab:
        assert img.crs.is_geographic and img.crs == lab.crs
        assert img.transform == lab.transform
        assert img.transform.a == pytest.approx(1e-4) and img.transform.e == pytest.approx(-1e-4)
        assert (img.transform.c, img.transform.f) == (-79.0, 36.0)
        assert img.descriptions == ("blue", "green", "red", "nir", "band_5", "band_6")
        image, labels = img.read(window=Window(0, 0, 300, 300)), lab.read(1)
    assert set(np.unique(labels)) <= {0, 1, 2, NODATA_CLASS}
    np.testing.assert_array_equal((image == 0).all(axis=0), labels == NODATA_CLASS)
    assert len(load_classes(s.classes_path)) == 3


def test_bad_arguments(tmp_path):
    with pytest.raises(InputError, match="n_classes"):
        make_sample(tmp_path, size=64, n_classes=256)
    with pytest.raises(InputError, match="CRS"):
        make_sample(tmp_path, size=64, crs="EPSG:999999")
    with pytest.raises(InputError, match="degrees"):
        make_sample(tmp_path, size=64, crs="EPSG:4326", resolution=10.0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("- {id: 0, name: a\n", "not valid YAML"),
        ("{id: 0, name: a}\n", "list"),
        ("- {id: 255, name: a, color: '#000000'}\n", "entry 0"),
        ("- {id: 0, name: a}\n- {id: 1, name: b, color: red}\n", "entry 1"),
        ("- {id: 0, name: a}\n- {id: 0, name: b}\n", "unique"),
        ("- 3\n", "mapping"),
    ],
)
def test_load_classes_rejects_bad_content(tmp_path, content, match):
    path = tmp_path / "classes.yaml"
    path.write_text(content)
    with pytest.raises(InputError, match=match) as info:
        load_classes(path)
    assert str(path) in str(info.value)


def test_load_classes_missing_file(tmp_path):
    with pytest.raises(InputNotFoundError, match="not found"):
        load_classes(tmp_path / "nope.yaml")


def test_load_classes_defaults_colour(tmp_path):
    path = tmp_path / "classes.yaml"
    path.write_text(yaml.safe_dump([{"id": 7, "name": "roads"}]))
    (c,) = load_classes(path)
    assert (c.id, c.name, c.color) == (7, "roads", "#808080")


def test_load_classes_accepts_a_classes_key_and_sorts_by_id(tmp_path):
    path = tmp_path / "classes.yaml"
    path.write_text(yaml.safe_dump({"classes": [{"id": 9, "name": "b"}, {"id": 2, "name": "a", "color": "#ABCDEF"}]}))
    assert [(c.id, c.name, c.color) for c in load_classes(path)] == [(2, "a", "#abcdef"), (9, "b", "#808080")]
    path.write_text("- {id: yes, name: a}\n")
    with pytest.raises(InputError, match="integers"):
        load_classes(path)


def test_writing_the_same_scene_again_keeps_the_files_and_another_scene_needs_overwrite(tmp_path):
    """sample-data replaced the files of another scene without a word, and rewrote identical ones (a new mtime made
    outputs predicted from them look stale)."""
    from click.testing import CliRunner

    from geoseg.cli.main import cli

    args = ["sample-data", str(tmp_path), "--size", "64", "--bands", "2", "--classes", "3", "--seed", "1"]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0 and "wrote" in first.output
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and "unchanged" in again.output, again.output
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps
    other = CliRunner().invoke(cli, [*args[:-1], "2"])
    assert other.exit_code == 2 and "image.tif, labels.tif of another scene" in other.output and "--overwrite" in other.output
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps
    replaced = CliRunner().invoke(cli, [*args[:-1], "2", "--overwrite"])
    assert replaced.exit_code == 0 and "wrote" in replaced.output
    assert {p.name for p in tmp_path.iterdir()} == set(stamps)  # no temporary file left
    with rasterio.open(tmp_path / "image.tif") as ds:
        assert ds.tags()["GEOSEG_SAMPLE_SEED"] == "2"
