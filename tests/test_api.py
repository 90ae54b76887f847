"""The xarray API: lazy, georeferenced, and the same numbers as the CLI pipeline."""

from __future__ import annotations

import numpy as np

import geoseg
from geoseg.io.zarr_store import open_prediction
from geoseg.pipeline import PredictOptions, predict


def test_segment_is_lazy_and_matches_predict(client, random_model, scene_path, tmp_path):
    ds = geoseg.segment([scene_path], random_model, chunk_size=128)
    assert ds.class_id.chunks is not None  # dask-backed: nothing computed yet
    assert ds.rio.crs == "EPSG:32617"
    window = ds.class_id.isel(y=slice(100, 200), x=slice(150, 300)).compute()
    predict([scene_path], random_model, tmp_path / "out", PredictOptions(chunk_size=128, cog=False, vectors=False), client=client)
    stored = open_prediction(tmp_path / "out" / "prediction.zarr")
    assert np.array_equal(window.values, stored.class_id.values[100:200, 150:300])
    assert np.array_equal(window.x.values, stored.x.values[150:300])


def test_plan_is_inspectable_without_computing(random_model):
    from geoseg.model.store import read_card

    card = read_card(random_model)
    plan = geoseg.plan_tiling(card, (1000, 3000), chunk_size=250, exact=True)
    assert plan.chunk_size % card.stride == 0 and plan.halo == card.exact_halo >= card.receptive_field
    assert len(plan) == len(list(plan)) == plan.grid_shape[0] * plan.grid_shape[1]
    # Chunks tile the scene exactly once; inputs reach `halo` beyond the core wherever the scene continues.
    cover = np.zeros((1000, 3000), int)
    for ch in plan:
        cover[ch.core.y0 : ch.core.y1, ch.core.x0 : ch.core.x1] += 1
        assert ch.input.y0 == max(0, ch.core.y0 - plan.halo) and ch.input.x1 == min(3000, ch.core.x1 + plan.halo)
        assert ch.core.y0 % card.stride == 0 and ch.input.x0 % card.stride == 0
    assert (cover == 1).all()
    assert plan.overhead > 1


def test_open_scene_is_lazy_with_names_nodata_and_crs(scene_path):
    scene = geoseg.open_scene(scene_path)
    assert scene.dims == ("band", "y", "x") and scene.shape == (4, 300, 437)
    assert scene.chunks is not None and scene.rio.crs == "EPSG:32617"
    assert scene.attrs["nodata"] == [0, 0, 0, 0]
    assert list(scene["band"].values) == ["scene_1", "scene_2", "scene_3", "scene_4"]


def test_predict_from_files_arrays_and_accessor_agree(client, random_model, scene_path, tmp_path):
    import rioxarray

    predict([scene_path], random_model, tmp_path / "out", PredictOptions(chunk_size=128, cog=False, vectors=False), client=client)
    stored = open_prediction(tmp_path / "out" / "prediction.zarr")
    scene = geoseg.open_scene(scene_path)
    ds = geoseg.predict(scene, random_model, chunk_size=128)
    assert ds.class_id.data.dask is not None and ds.rio.crs == "EPSG:32617"
    assert ds.rio.transform() == stored.rio.transform()
    np.testing.assert_array_equal(ds.class_id.values, stored.class_id.values)
    # an in-memory DataArray (what rioxarray, odc-stac or stackstac hand over) gives the same
    eager = rioxarray.open_rasterio(scene_path).load()
    eager.attrs = {}
    eager = eager.rio.write_nodata(0)
    np.testing.assert_array_equal(geoseg.predict(eager, random_model, chunk_size=128).class_id.values, stored.class_id.values)
    # the accessor only delegates
    via = scene.geoseg.predict(random_model, chunk_size=128)
    np.testing.assert_array_equal(via.class_id.values, stored.class_id.values)
    np.testing.assert_allclose(via.confidence.values, stored.confidence.values, equal_nan=True, rtol=1e-6)


def test_prediction_attributes_survive_netcdf_and_zarr(client, random_model, scene_path, tmp_path):
    import xarray as xr

    ds = geoseg.predict(geoseg.open_scene(scene_path), random_model, chunk_size=128)
    names = [c.name for c in geoseg.Model.open(random_model).card.classes]
    ds.load().to_netcdf(tmp_path / "p.nc", engine="h5netcdf")
    ds.to_zarr(tmp_path / "p.zarr", consolidated=True)
    for back in (xr.open_dataset(tmp_path / "p.nc", decode_coords="all", engine="h5netcdf"),
                 xr.open_zarr(tmp_path / "p.zarr", decode_coords="all")):
        assert list(back.class_id.attrs["class_names"]) == names
        assert back.class_id.attrs["flag_meanings"].split() == [n.replace(" ", "_") for n in names]
        assert back.rio.crs == "EPSG:32617"
        assert [c.name for c in geoseg.classes_of(back)] == names


def test_open_scene_from_a_stac_item(scene_path, tmp_path, random_model):
    import pystac
    import rasterio

    with rasterio.open(scene_path) as src:
        profile, data = src.profile, src.read()
    hrefs = {}
    for i, name in enumerate(["blue", "green", "red", "nir"]):
        p = tmp_path / f"{name}.tif"
        with rasterio.open(p, "w", **{**profile, "count": 1}) as dst:
            dst.write(data[i], 1)
        hrefs[name] = str(p)
    item = pystac.Item("s", {"type": "Point", "coordinates": [0, 0]}, [0, 0, 0, 0], __import__("datetime").datetime(2024, 1, 1), {})
    for k, h in hrefs.items():
        item.add_asset(k, pystac.Asset(h, media_type=pystac.MediaType.COG))
    scene = geoseg.open_scene(item)
    assert list(scene["band"].values) == ["blue", "green", "red", "nir"]
    np.testing.assert_array_equal(scene.values, data)
    assert geoseg.open_scene(item, assets=["red", "nir"]).sizes["band"] == 2


def test_threaded_scheduler_without_a_client(random_model, scene_path, monkeypatch):
    """dask's threaded scheduler: each dask thread runs its forward passes with one torch thread."""
    import dask
    import torch

    import geoseg.graph

    seen = []
    real = geoseg.graph.segment_chunk

    def watched(*args, **kwargs):
        seen.append(torch.get_num_threads())  # torch's thread count is per calling thread (OpenMP)
        return real(*args, **kwargs)

    monkeypatch.setattr(geoseg.graph, "segment_chunk", watched)
    ds = geoseg.predict(geoseg.open_scene(scene_path), random_model, chunk_size=128, precision="fp32")
    with dask.config.set(scheduler="threads", num_workers=2):
        a = ds.class_id.values
    assert seen == [1] * 12  # every chunk, one torch thread
    assert a.shape == (300, 437) and (a != 255).any()


def test_reprs_show_the_card_plan_and_metrics(random_model):
    from geoseg.training.metrics import Metrics

    m = geoseg.Model.open(random_model)
    html = m._repr_html_()
    for c in m.card.classes:
        assert c.name in html and c.color in html and c.name in repr(m)
    plan = geoseg.plan_tiling(m.card, (5000, 3000))
    assert "chunk_size" in plan._repr_html_() and "pixel overhead" in str(plan)
    metrics = Metrics((0, 1), ("water", "forest"), np.array([[8, 2], [1, 9]]))
    assert "water" in metrics._repr_html_() and "mIoU" in metrics._repr_html_() and "forest" in str(metrics)


def test_vectorize_a_dataset_and_cog_from_the_accessor(client, random_model, scene_path, tmp_path):
    import rasterio

    ds = geoseg.predict(geoseg.open_scene(scene_path), random_model, chunk_size=128)
    gdf = ds.geoseg.vectorize()
    ref = geoseg.vectorize(ds)
    assert len(gdf) == len(ref) > 0 and gdf.crs.to_epsg() == 32617
    assert set(gdf["class_name"]) <= {c.name for c in geoseg.Model.open(random_model).card.classes}
    assert "mean_confidence" in gdf
    path = ds.geoseg.to_cog(tmp_path / "c.tif")
    with rasterio.open(path) as src:
        np.testing.assert_array_equal(src.read(1), ds.class_id.values)
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"


def test_a_scalar_nodata_attribute_masks_every_band(random_model):
    """odc-geo and rioxarray write ``attrs["nodata"]`` as one number: it holds for every band."""
    import dask
    import rioxarray  # noqa: F401
    import xarray as xr

    for nd in (0, -9999):
        a = np.full((4, 64, 64), 500, np.int16)
        a[:, :, :32] = nd  # the left half has no data
        da_ = xr.DataArray(a, dims=("band", "y", "x"), coords={"y": 4000000.0 - 10 * np.arange(64) - 5,
                                                                "x": 500000.0 + 10 * np.arange(64) + 5}, attrs={"nodata": nd})
        ds = geoseg.predict(da_.rio.write_crs("EPSG:32617"), random_model, chunk_size=64, halo=0, precision="fp32")
        with dask.config.set(scheduler="synchronous"):
            cid = ds.class_id.values
        assert (cid[:, :32] == 255).all() and (cid[:, 32:] != 255).all()


def test_open_scene_stacks_what_the_pipeline_stacks(tmp_path):
    """Band files whose origins differ by float rounding stay one grid; an alpha band is a mask, not a band;
    each band keeps its own nodata (the CLI's open_stack reads the same)."""
    import rasterio
    from affine import Affine

    from geoseg.io.sources import open_stack

    from conftest import write_raster

    t = Affine(0.1, 0.0, 500000.1, 0.0, -0.1, 4000000.0)
    a = write_raster(tmp_path / "a.tif", np.ones((1, 32, 40), np.uint16), transform=t, nodata=0, block=16)
    b = write_raster(tmp_path / "b.tif", np.ones((1, 32, 40), np.uint16), nodata=65535, block=16,
                     transform=Affine(0.1, 0.0, np.nextafter(500000.1, 1e9), 0.0, -0.1, 4000000.0))
    scene = geoseg.open_scene([a, b])
    assert scene.shape == (2, 32, 40) and scene.dtype == np.uint16
    assert scene.attrs["nodata"] == [b_.nodata for b_ in open_stack([a, b]).bands] == [0, 65535]
    rgba = tmp_path / "rgba.tif"
    with rasterio.open(rgba, "w", driver="GTiff", width=40, height=32, count=4, dtype="uint8", crs="EPSG:32617",
                       transform=t, photometric="RGB", alpha="YES") as ds:
        data = np.full((4, 32, 40), 200, np.uint8)
        data[3, :, :20] = 0  # transparent: no data on the left
        ds.write(data)
    scene = geoseg.open_scene(rgba)
    assert scene.sizes["band"] == open_stack([rgba]).count == 3
    values = scene.values  # the pipeline's reads mask what GDAL's mask masks: so does the scene
    assert np.isnan(values[:, :, :20]).all() and (values[:, :, 20:] == 200).all()
