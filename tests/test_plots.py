"""Plots render to PNG with what a reader needs: the legend's class names, the metrics' classes; maps are offline."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import xarray as xr  # noqa: E402

import geoseg  # noqa: E402
from geoseg.plot import composite_bands, explore, plot_classes, plot_confusion, plot_history, plot_iou, plot_scene  # noqa: E402
from geoseg.training.metrics import Metrics  # noqa: E402


@pytest.fixture(scope="module")
def prediction(random_model, scene_path):
    import dask

    with dask.config.set(scheduler="threads"):
        return geoseg.predict(geoseg.open_scene(scene_path), random_model, chunk_size=128).compute()


def _png(fig, path) -> None:
    fig.savefig(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    plt.close(fig)


def test_composite_bands_follow_band_names():
    assert composite_bands(["blue", "green", "red", "nir"]) == [2, 1, 0]
    assert composite_bands(["blue", "green", "red", "nir"], false_colour=True) == [3, 2, 1]
    assert composite_bands(["SR_B2", "SR_B3", "SR_B4", "SR_B5"]) == [2, 1, 0]
    assert composite_bands(["lsat7_2000_10", "lsat7_2000_20", "lsat7_2000_30", "lsat7_2000_40"]) == [2, 1, 0]
    assert composite_bands(["a", "b", "c", "d"]) == [0, 1, 2]


def test_scene_and_class_map_with_legend(prediction, scene_path, tmp_path):
    scene = geoseg.open_scene(scene_path)
    ax = plot_scene(scene)
    img = ax.get_images()[0].get_array()
    assert img.shape[2] == 4 and img[..., 3].min() == 0 and img[..., 3].max() == 1  # nodata corner transparent
    _png(ax.figure, tmp_path / "scene.png")
    polygons = prediction.geoseg.vectorize()
    ax = prediction.geoseg.plot(polygons=polygons)
    present = {int(v) for v in np.unique(prediction.class_id.values) if v != 255}
    names = {c.id: c.name for c in geoseg.classes_of(prediction)}
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [names[i] for i in sorted(present)]
    assert ax.collections  # the polygons' outlines
    _png(ax.figure, tmp_path / "classes.png")
    assert plot_classes(prediction.class_id, legend=False).get_legend() is None


def test_metric_plots(tmp_path):
    m = Metrics((1, 2, 3), ("developed", "forest", "water"), np.array([[50, 5, 0], [4, 80, 1], [0, 2, 30]]))
    ax = plot_confusion(m)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["developed", "forest", "water"]
    _png(ax.figure, tmp_path / "confusion.png")
    other = Metrics((1, 2, 3), ("developed", "forest", "water"), np.array([[40, 15, 0], [10, 70, 5], [0, 12, 20]]))
    ax = plot_iou(m, others={"pixel model": other})
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0].startswith("model (mIoU") and labels[1].startswith("pixel model (mIoU")
    _png(ax.figure, tmp_path / "iou.png")
    ax = plot_history([{"epoch": i, "loss": 1 / i, "val_loss": 1.2 / i, "val_miou": 0.1 * i} for i in range(1, 6)])
    assert [line.get_label() for line in ax.get_lines()] == ["loss", "val_loss"]
    _png(ax.figure, tmp_path / "history.png")
    # a model of two networks: one curve per network and series, each series in the legend once
    two = [{"member": k, "epoch": i, "loss": 1 / i + k, "val_loss": 1.2 / i, "val_miou": 0.1 * i} for k in (0, 1) for i in (1, 2, 3)]
    ax = plot_history(two)
    lines = ax.get_lines()
    assert len(lines) == 4 and [list(line.get_xdata()) for line in lines[:2]] == [[1, 2, 3], [1, 2, 3]]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["loss", "val_loss"]
    assert len(ax.figure.axes[1].get_lines()) == 2


def test_interactive_map_is_offline(prediction, tmp_path):
    m = explore(prediction, polygons=prediction.geoseg.vectorize())
    html = m.get_root().render()
    assert "data:image/png;base64," in html  # the class map travels inside the page
    assert "tile.openstreetmap" not in html  # no basemap fetched
    assert "class_name" in html


def test_interactive_map_places_the_class_map_where_it_is(prediction):
    """A scene 40 degrees tall in lon/lat: each row of the embedded image, placed as Leaflet places an overlay
    (linearly in Web Mercator between its corners), shows the class of its latitude."""
    import base64
    import io
    import re

    from matplotlib.colors import to_rgba
    from PIL import Image

    attrs = prediction["class_id"].attrs
    a, b = [c.id for c in geoseg.api.classes_of(prediction)][:2]
    lat = 60.0 - (np.arange(400) + 0.5) * 0.1  # 60N to 20N, stripes 4 degrees tall
    ids = np.where((np.floor((60.0 - lat) / 4.0) % 2) == 0, a, b).astype(np.uint8)
    da_ = xr.DataArray(np.repeat(ids[:, None], 20, axis=1), dims=("y", "x"), coords={"y": lat, "x": 0.05 + np.arange(20) * 0.1},
                       attrs=attrs).rio.write_crs("EPSG:4326").rio.write_nodata(255)
    html = explore(da_).get_root().render()
    png = re.search(r'"data:image/png;base64,([^"]+)"', html).group(1)
    rgba = np.asarray(Image.open(io.BytesIO(base64.b64decode(png))))
    (south, west), (north, east) = (tuple(map(float, p)) for p in
                                    re.findall(r"\[(-?[\d.]+), (-?[\d.]+)\]", html.split(png)[1])[:2])
    merc = lambda d: np.log(np.tan(np.pi / 4 + np.radians(d) / 2))  # noqa: E731
    rows = np.arange(rgba.shape[0]) + 0.5
    y = merc(north) - rows / rgba.shape[0] * (merc(north) - merc(south))
    shown_lat = np.degrees(2 * np.arctan(np.exp(y)) - np.pi / 2)
    want = np.where((np.floor((60.0 - shown_lat) / 4.0) % 2) == 0, a, b)
    colour = {c.id: tuple((np.array(to_rgba(c.color)) * 255).astype(np.uint8)[:3]) for c in geoseg.api.classes_of(prediction)}
    got = rgba[:, rgba.shape[1] // 2, :3]
    right = [tuple(got[i]) == colour[want[i]] for i in range(len(rows))]
    assert np.mean(right) > 0.97, f"{np.mean(right):.3f} of the rows show their latitude's class"


def test_a_raw_rioxarray_array_plots_as_its_scene(scene_path):
    """``.geoseg.plot()`` on what rioxarray.open_rasterio returns, in any dim order: nodata transparent as for
    open_scene; a decimated image spans the scene from its own edge."""
    import rioxarray


    scene = geoseg.open_scene(scene_path)
    raw = rioxarray.open_rasterio(scene_path)
    images = []
    for da_ in (scene, raw, raw.transpose("y", "x", "band")):
        ax = da_.geoseg.plot()
        images.append(ax.get_images()[0].get_array())
        plt.close(ax.figure)
    assert (images[0][..., 3] == 0).any()  # the sample scene has nodata
    for img in images[1:]:
        np.testing.assert_array_equal(img, images[0])
    ax = plot_scene(scene, max_size=100)
    left, right, bottom, top = ax.get_images()[0].get_extent()
    x0, y0, x1, y1 = scene.rio.bounds()
    assert left == x0 and top == y1 and right >= x1 and bottom <= y0  # 300 x 437 px taken every 5th: 88 x 60 cells
    assert right - x1 < 5 * 30 and y0 - bottom < 5 * 30
    plt.close(ax.figure)


def test_class_maps_south_up_with_their_own_nodata_one_column_and_many_classes(prediction):
    """Drawn north-up like plot_scene; a class map's own nodata (rio.nodata 0) is transparent, not a class; one
    column spans its pixel's width; 200 classes' legend takes columns."""
    import xarray as xr

    var = prediction.class_id
    fig, (a, b) = plt.subplots(1, 2)
    plot_classes(prediction, ax=a)
    plot_classes(prediction.isel(y=slice(None, None, -1)), ax=b)
    assert a.get_ylim() == b.get_ylim() and a.images[0].get_extent() == b.images[0].get_extent()
    np.testing.assert_array_equal(a.images[0].get_array(), b.images[0].get_array())
    plt.close(fig)

    zero = xr.DataArray(np.where(var.values == 255, 0, var.values + 1).astype(np.uint8), dims=("y", "x"),
                        coords={"y": var.y, "x": var.x}).rio.write_nodata(0)
    fig, ax = plt.subplots()
    plot_classes(zero, ax=ax)
    shown = ax.images[0].get_array()
    assert np.array_equal(np.ma.getmaskarray(shown), zero.values == 0)
    assert "class_0" not in [t.get_text() for t in ax.get_legend().get_texts()]
    plt.close(fig)

    one = var.isel(x=slice(10, 11))
    fig, ax = plt.subplots()
    plot_classes(one, ax=ax)
    left, right = ax.images[0].get_extent()[:2]
    res = float(var.x[1] - var.x[0])
    assert (left, right) == pytest.approx((float(one.x[0]) - res / 2, float(one.x[0]) + res / 2))
    plt.close(fig)

    many = xr.DataArray(np.arange(200, dtype=np.uint8).reshape(10, 20), dims=("y", "x"),
                        coords={"y": np.arange(10)[::-1] * 10.0, "x": np.arange(20) * 10.0})
    fig, ax = plt.subplots()
    plot_classes(many, ax=ax)
    assert len(ax.get_legend().get_texts()) == 200 and ax.get_legend()._ncols == 8
    plt.close(fig)


def test_a_class_map_without_coordinates_is_drawn_as_it_is():
    import xarray as xr

    ids = np.zeros((20, 30), np.uint8)
    ids[:5] = 1  # the first rows: drawn at the top, not turned
    fig, ax = plt.subplots()
    plot_classes(xr.DataArray(ids, dims=("y", "x")), ax=ax)
    shown = ax.images[0].get_array()
    assert np.array_equal(np.asarray(shown), ids)
    plt.close(fig)
