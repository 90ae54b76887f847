"""The xarray API: lazy, georeferenced, and the same numbers as the CLI pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.transform

import geoseg
from geoseg.api import band_nodata
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
    assert plan.chunk_size % card.stride == 0 and plan.halo == card.exact_halo > card.receptive_field
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
    assert list(scene.coords["nodata"].values) == [0, 0, 0, 0] and scene.rio.nodata == 0  # per band, and rioxarray's
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

    from geoseg.errors import InputError

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
    # a multi-band asset (a "visual" RGB) gives its bands as key_1, key_2, ...
    visual = tmp_path / "visual.tif"
    with rasterio.open(visual, "w", **{**profile, "count": 3}) as dst:
        dst.write(data[:3])
    item.add_asset("visual", pystac.Asset(str(visual), media_type=pystac.MediaType.COG))
    scene = geoseg.open_scene(item, assets=["nir", "visual"])
    assert list(scene["band"].values) == ["nir", "visual_1", "visual_2", "visual_3"]
    np.testing.assert_array_equal(scene.values, data[[3, 0, 1, 2]])
    # a file given twice gives its bands twice, as the pipeline stacks it
    twice = geoseg.open_scene([hrefs["red"], hrefs["red"], hrefs["nir"]])
    np.testing.assert_array_equal(twice.values, data[[2, 2, 3]])
    # raster:bands nodata, scale and offset where the files leave them out (as odc-stac and stackstac read them)
    bare = pystac.Item("b", {"type": "Point", "coordinates": [0, 0]}, [0, 0, 0, 0], __import__("datetime").datetime(2024, 1, 1), {})
    for i, name in enumerate(["blue", "green", "red", "nir"]):
        p = tmp_path / f"bare_{name}.tif"
        with rasterio.open(p, "w", **{**profile, "count": 1, "nodata": None}) as dst:
            dst.write(data[i], 1)
        bare.add_asset(name, pystac.Asset(str(p), media_type=pystac.MediaType.COG, extra_fields={
            "raster:bands": [{"nodata": 0, "scale": 2.75e-5, "offset": -0.2}]}))
    with pytest.warns(UserWarning, match="raster:bands says scale 2.75e-05 and offset -0.2, the file 1 and 0"):
        scene = geoseg.open_scene(bare)
    # the nodata is taken; the scale is not (a model trained on these files records theirs), but said
    assert list(scene.coords["nodata"].values) == [0.0] * 4 and list(scene.coords["scale"].values) == [1.0] * 4
    phys = geoseg.physical(scene.assign_coords(scale=("band", [2.75e-5] * 4), offset=("band", [-0.2] * 4))).values
    have = data != 0
    np.testing.assert_allclose(phys[have], data[have] * 2.75e-5 - 0.2, rtol=1e-5)
    assert np.isnan(phys[~have]).all()
    # float files without a nodata whose raster:bands say "nan": NaN is their nodata already (it raised a TypeError)
    floats = pystac.Item("f", {"type": "Point", "coordinates": [0, 0]}, [0, 0, 0, 0], __import__("datetime").datetime(2024, 1, 1), {})
    for name in ("vv", "vh"):
        p = tmp_path / f"float_{name}.tif"
        with rasterio.open(p, "w", **{**profile, "count": 1, "dtype": "float32", "nodata": None}) as dst:
            dst.write(np.where(data[0] == 0, np.nan, data[0]).astype(np.float32), 1)
        floats.add_asset(name, pystac.Asset(str(p), media_type=pystac.MediaType.COG, extra_fields={
            "raster:bands": [{"nodata": "nan", "data_type": "float32"}]}))
    scene = geoseg.open_scene(floats)
    assert scene.sizes["band"] == 2 and np.isnan(scene.values[:, data[0] == 0]).all()
    # an item read without its file: relative hrefs have nothing to resolve against
    loose = pystac.Item("l", {"type": "Point", "coordinates": [0, 0]}, [0, 0, 0, 0], __import__("datetime").datetime(2024, 1, 1), {})
    loose.add_asset("red", pystac.Asset("./red.tif", media_type=pystac.MediaType.COG))
    with pytest.raises(InputError, match="asset red's href ./red.tif is relative"):
        geoseg.open_scene(loose)
    loose.add_asset("red", pystac.Asset(Path(hrefs["red"]).as_uri(), media_type=pystac.MediaType.COG))  # file://: absolute
    assert geoseg.open_scene(loose).sizes["band"] == 1


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
    # geoseg evaluate without a client too (its chunks ran with torch's default: a thread per core in each dask thread)
    from geoseg.evaluation import EvaluateOptions, evaluate

    with rasterio.open(scene_path) as src:
        profile = {**src.profile, "count": 1, "dtype": "uint8", "nodata": 255}
    labels = scene_path.parent / "threads-labels.tif"
    with rasterio.open(labels, "w", **profile) as dst:
        dst.write(a[None])
    seen.clear()
    real_chunk = geoseg.graph.segment_chunk_north_up

    def watched_chunk(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_chunk(*args, **kwargs)

    monkeypatch.setattr(geoseg.graph, "segment_chunk_north_up", watched_chunk)
    from concurrent.futures import ThreadPoolExecutor

    before = torch.get_num_threads()
    torch.set_num_threads(2)  # what new threads start with (torch's default: a thread per core)
    try:
        with ThreadPoolExecutor(2) as pool, dask.config.set(scheduler="threads", pool=pool):  # threads new to chunks
            result = evaluate([scene_path], random_model, labels, EvaluateOptions(chunk_size=128, precision="fp32"))
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {1} and result.metrics.miou == 1.0


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
    from geoseg.errors import InputError

    scene = geoseg.open_scene(scene_path)
    with pytest.raises(InputError, match=r"to_cog writes a class map .* 3-D uint16 .*predict it first"):
        scene.geoseg.to_cog(tmp_path / "scene.tif")  # a scene, not its class map
    assert not (tmp_path / "scene.tif").exists()
    per_band = scene.to_dataset(dim="band")  # odc-stac's layout: one variable per band
    np.testing.assert_array_equal(per_band.geoseg.predict(random_model, chunk_size=128).class_id.values,
                                  geoseg.predict(per_band, random_model, chunk_size=128).class_id.values)


def test_to_cog_of_a_class_raster_with_its_own_nodata_and_no_class_attributes(tmp_path, client):
    """A class raster opened with rioxarray (nodata 0, no class attributes): its nodata pixels were written as
    class 0, valid, under the COG's nodata 255; and its colour table was all black (every class (0, 0, 0))."""
    import rioxarray

    a = np.zeros((60, 70), np.uint8)
    a[10:30, 10:40] = 1
    a[35:50, 20:60] = 2
    src = tmp_path / "analyst.tif"
    with rasterio.open(src, "w", driver="GTiff", width=70, height=60, count=1, dtype="uint8", crs="EPSG:32632",
                       transform=rasterio.transform.from_origin(600000, 5000000, 10, 10), nodata=0) as dst:
        dst.write(a, 1)
    var = rioxarray.open_rasterio(src).squeeze("band", drop=True)
    out = geoseg.to_cog(var, tmp_path / "classes.tif", client=None)
    with rasterio.open(out) as ds:
        got, cmap = ds.read(1), ds.colormap(1)
        assert ds.nodata == 255
    np.testing.assert_array_equal(got, np.where(a == 0, 255, a))
    assert cmap[1][:3] != cmap[2][:3] and all(cmap[i][:3] != (0, 0, 0) for i in (1, 2)) and cmap[255][3] == 0
    signed = var.astype(np.int8).rio.write_nodata(0)  # 255 fits once widened (in int8 it wrapped to -1, refused)
    for where in (None, client):  # built here (no default client), and on the cluster (which took uint8 only)
        with rasterio.open(geoseg.to_cog(signed, tmp_path / "signed.tif", client=where)) as ds:
            np.testing.assert_array_equal(ds.read(1), got)
        (tmp_path / "signed.tif").unlink()
    # a map that carries its classes keeps their names and colours through the nodata change
    named = var.assign_attrs(flag_values=[1, 2], class_names=["water", "forest"], class_colors=["#0000ff", "#00aa00"])
    with rasterio.open(geoseg.to_cog(named, tmp_path / "named.tif", client=None)) as ds:
        assert ds.colormap(1)[1][:3] == (0, 0, 255) and "water" in ds.tags()["CLASS_NAMES"]
        np.testing.assert_array_equal(ds.read(1), got)


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
    assert band_nodata(scene) == [b_.nodata for b_ in open_stack([a, b]).bands] == [0, 65535]
    assert scene.isel(band=[1, 0]).pipe(band_nodata) == [65535, 0]  # each band's nodata follows its band
    # one band selected (a scalar coordinate): its own nodata, not none
    one = scene.isel(band=1)
    assert one.ndim == 2 and band_nodata(one.expand_dims(band=["b"])) == [65535]
    assert geoseg.open_scene(one).pipe(band_nodata) == [65535]
    assert scene.rio.nodata is None  # the bands disagree: no one value for rioxarray
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


def _north_up(h: int = 64, w: int = 96, res: float = 10.0):
    import rioxarray  # noqa: F401
    import xarray as xr

    rng = np.random.default_rng(0)
    a = rng.integers(100, 3000, (4, h, w)).astype(np.uint16)
    a[:, :8, :8] = 0
    da_ = xr.DataArray(a, dims=("band", "y", "x"), coords={"band": ["b1", "b2", "b3", "b4"],
                       "y": 4000000.0 - res * (np.arange(h) + 0.5), "x": 500000.0 + res * (np.arange(w) + 0.5)})
    return da_.rio.write_crs("EPSG:32617").rio.write_transform(rasterio.transform.from_origin(500000.0, 4000000.0, res, res))


def test_strided_coarsened_and_south_up_scenes_keep_their_grid(random_model):
    """The grid comes from the coordinates, not rioxarray's cached transform: a strided selection, a coarsen or
    rows given south-up (y ascending) give results and polygons where the pixels are (they were placed at the
    cached 10 m transform: a quarter of the area, or 2 km off)."""
    import dask
    from rasterio.transform import from_origin

    scene = _north_up()
    assert scene.isel(y=slice(None, None, 2)).rio.transform() == scene.rio.transform()  # rioxarray's cache
    with dask.config.set(scheduler="synchronous"):
        for sub, res in ((scene.isel(y=slice(None, None, 2), x=slice(None, None, 2)), 20.0),
                         (scene.coarsen(y=2, x=2).mean().astype(np.uint16), 20.0)):
            ds = geoseg.predict(sub, random_model, chunk_size=64, precision="fp32")
            x0 = float(sub["x"][0]) - res / 2
            y0 = float(sub["y"][0]) + res / 2
            assert ds.rio.transform() == from_origin(x0, y0, res, res)
        ref = geoseg.predict(scene, random_model, chunk_size=64, precision="fp32")
        flipped = scene.isel(y=slice(None, None, -1))  # y ascending, the cached transform unchanged
        ds = geoseg.predict(flipped, random_model, chunk_size=64, precision="fp32")
        assert ds.rio.transform() == ref.rio.transform() and float(ds["y"][0]) > float(ds["y"][-1])
        np.testing.assert_array_equal(ds.class_id.values, ref.class_id.values)  # the model saw it north-up
        mirrored = scene.isel(x=slice(None, None, -1))  # x descending: columns east to west
        ds = geoseg.predict(mirrored, random_model, chunk_size=64, precision="fp32")
        assert ds.rio.transform() == ref.rio.transform()
        np.testing.assert_array_equal(ds.class_id.values, ref.class_id.values)  # ... and not mirrored


def test_per_band_nodata_follows_band_selections_and_rioxarray_reads_the_scene(tmp_path, random_model):
    """Each band's nodata is a coordinate of the band dimension: a reordered selection keeps it with its band, and
    rioxarray's own calls (.rio.nodata, to_raster, reproject) work on an open_scene result (a list attribute broke
    them). A netCDF round trip (which reads a list attribute back as an array) still predicts."""
    import dask
    import xarray as xr

    from conftest import write_raster

    files = []
    for i, nd in enumerate((0, 0, 0, 65535)):
        a = np.full((1, 64, 64), 1000 + 300 * i, np.uint16)
        if nd:
            a[:, :16] = nd  # band 4 missing in the top rows
        files.append(write_raster(tmp_path / f"b{i + 1}.tif", a, nodata=nd, block=16))
    scene = geoseg.open_scene(files)
    assert band_nodata(scene) == [0, 0, 0, 65535] and scene.rio.nodata is None
    turned = scene.isel(band=[3, 0, 1, 2])
    assert band_nodata(turned) == [65535, 0, 0, 0]
    with dask.config.set(scheduler="synchronous"):
        ids = geoseg.predict(turned, random_model, chunk_size=64, precision="fp32").class_id.values
    assert (ids[:16] == 255).all() and (ids[16:] != 255).all()
    same = geoseg.open_scene(files[:3])
    assert same.rio.nodata == 0
    same.rio.to_raster(tmp_path / "out.tif")
    with rasterio.open(tmp_path / "out.tif") as ds:
        assert ds.nodata == 0 and ds.count == 3
    assert same.rio.reproject("EPSG:4326").rio.crs == "EPSG:4326"
    legacy = scene.drop_vars("nodata").assign_attrs(nodata=np.array([0, 0, 0, 65535]))  # as netCDF reads a list back
    with dask.config.set(scheduler="synchronous"):
        again = geoseg.predict(legacy, random_model, chunk_size=64, precision="fp32").class_id.values
    assert (again[:16] == 255).all()
    ds_ = xr.Dataset({str(b): scene.sel(band=b).drop_vars(["band", "nodata"]) for b in scene["band"].values})
    for v, nd in zip(ds_.data_vars, (0, 0, 0, 65535)):
        ds_[v].attrs["_FillValue"] = nd
    from_dataset = geoseg.open_scene(ds_)  # odc-stac's load: one variable per band
    assert list(from_dataset["band"].values) == ["b1", "b2", "b3", "b4"] and band_nodata(from_dataset) == [0, 0, 0, 65535]
    # a Dataset read decoded (xr.open_zarr of uint16 stored with a scale_factor): its values are physical and its
    # stored fill value is NaN now; to_array dropped both, so the model's scale check passed values 1e4 times off
    stored = xr.Dataset({v: ds_[v].astype(np.uint16) for v in ds_.data_vars})
    for v in stored.data_vars:
        stored[v].attrs = {}
        stored[v].encoding = {"dtype": "uint16", "scale_factor": 1e-4, "_FillValue": 0}
    stored.to_zarr(tmp_path / "scaled.zarr", mode="w")
    decoded = geoseg.open_scene(xr.open_zarr(tmp_path / "scaled.zarr").rio.write_crs(scene.rio.crs))
    assert list(decoded["scale"].values) == [1.0] * 4 and band_nodata(decoded) == [None] * 4
    import json
    import shutil

    from geoseg.errors import InputError

    model = tmp_path / "stored-values-model"  # a model trained on the values as stored (scale 1e-4 in its card)
    shutil.copytree(random_model, model)
    card = json.loads((model / "model.json").read_text())
    for b in card["bands"]:
        b["scale"], b["offset"] = 1e-4, 0.0
    (model / "model.json").write_text(json.dumps(card))
    with pytest.raises(InputError, match="scale"):
        geoseg.predict(decoded, model, chunk_size=64)


def test_the_api_refuses_bands_in_another_order_as_the_cli_does(tmp_path, random_model):
    """A model whose card names its bands: the same bands in another order are refused, not silently swapped; the
    named bands are picked out of more."""
    import json
    import shutil

    from geoseg.errors import InputError

    model = tmp_path / "model"
    shutil.copytree(random_model, model)
    card = json.loads((model / "model.json").read_text())
    for i, b in enumerate(card["bands"]):
        b["description"] = f"b{i + 1}"
    (model / "model.json").write_text(json.dumps(card))
    scene = _north_up()
    with pytest.raises(InputError, match=r"another order.*scene.sel\(band="):
        geoseg.predict(scene.isel(band=[3, 0, 1, 2]), model, chunk_size=64)
    more = scene.isel(band=[0, 1, 2, 3, 0]).assign_coords(band=["b1", "b2", "b3", "b4", "extra"])
    ds = geoseg.predict(more.isel(band=[4, 3, 2, 1, 0]), model, chunk_size=64, precision="fp32")
    import dask

    with dask.config.set(scheduler="synchronous"):
        np.testing.assert_array_equal(ds.class_id.values,
                                      geoseg.predict(scene, model, chunk_size=64, precision="fp32").class_id.values)



def test_a_stac_items_bands_are_matched_by_description_or_common_name(tmp_path, random_model, scene_path):
    """An item keys its assets by band id (B02..B08) or common name; the card records the files' descriptions
    or names. The item's bands out of the model's order were fed as they came (named by key, nothing to match);
    now they are matched by the files' descriptions and the items' common names (eo:bands, STAC 1.1 bands), and
    refused in another order as files are. STAC 1.1's nodata (on the asset or its bands) is read; an item's JSON
    file or dict opens; a collection of items is refused with what to pass; the CLI says what to do with one."""
    import json
    import shutil

    import pystac
    import xarray as xr
    from click.testing import CliRunner

    from geoseg.cli.main import cli
    from geoseg.errors import InputError
    from geoseg.io.sources import open_stack

    with rasterio.open(scene_path) as src:
        profile, data = src.profile, src.read()
    roles = {"B02": "blue", "B03": "green", "B04": "red", "B08": "nir"}
    model = tmp_path / "model"
    shutil.copytree(random_model, model)
    card = json.loads((model / "model.json").read_text())
    for b, name in zip(card["bands"], roles.values()):
        b["description"] = name
    (model / "model.json").write_text(json.dumps(card))

    def item(key_by, described, band_field, order=("B08", "B04", "B03", "B02")):
        folder = tmp_path / f"{key_by}-{described}-{band_field}"
        folder.mkdir()
        it = pystac.Item("s", {"type": "Point", "coordinates": [0, 0]}, [0, 0, 0, 0], __import__("datetime").datetime(2024, 1, 1), {})
        for k in order:
            i = list(roles).index(k)
            with rasterio.open(folder / f"{k}.tif", "w", **{**profile, "count": 1, "nodata": None}) as dst:
                dst.write(data[i], 1)
                if described:
                    dst.set_band_description(1, roles[k])
            band = {"name": k, "common_name": roles[k]} if band_field == "eo:bands" else {"name": k, "eo:common_name": roles[k]}
            it.add_asset(k if key_by == "id" else roles[k], pystac.Asset(
                f"./{k}.tif", media_type=pystac.MediaType.COG, roles=["data"],
                extra_fields={band_field: [band], **({"nodata": 0} if band_field == "bands" else {})}))
        it.add_asset("thumbnail", pystac.Asset("./B02.tif", media_type=pystac.MediaType.COG, roles=["thumbnail"]))
        it.set_self_href(str(folder / "item.json"))
        it.save_object(include_self_link=False)
        return folder / "item.json"

    for key_by, described, field in (("id", True, "eo:bands"), ("id", False, "eo:bands"), ("id", False, "bands")):
        path = item(key_by, described, field)
        scene = geoseg.open_scene(pystac.Item.from_file(str(path)))  # the thumbnail is no band
        assert list(scene["band"].values) == ["B08", "B04", "B03", "B02"]
        with pytest.raises(InputError, match=r"in another order.*scene.sel\(band=\['B02', 'B03', 'B04', 'B08'\]\)"):
            geoseg.predict(scene, model, chunk_size=64)
        opened = geoseg.open_scene(str(path))  # a JSON path opens
        extra = opened.isel(band=[0]).assign_coords(band=["extra"], description=("band", ["x"]), common_name=("band", ["x"]))
        ds = geoseg.predict(xr.concat([opened, extra], "band"), model, chunk_size=64)  # the named four picked out
        assert ds.sizes["y"] == data.shape[1] and ds.attrs["geoseg_model"] == str(model)
        if field == "bands":  # STAC 1.1: nodata declared on the asset, the files say none
            assert list(scene.coords["nodata"].values) == [0.0] * 4
    # keyed by common name, a card of file names (B02.tif...): matched by the files' names
    path = item("common", False, "eo:bands")
    by_file = tmp_path / "by-file"
    shutil.copytree(model, by_file)
    card = json.loads((by_file / "model.json").read_text())
    for b, k in zip(card["bands"], roles):
        b["description"], b["file"] = None, f"{k}.tif"
    (by_file / "model.json").write_text(json.dumps(card))
    with pytest.raises(InputError, match="in another order"):
        geoseg.predict(json.loads(path.read_text()) | {"links": [{"rel": "self", "href": str(path)}]}, by_file)
    # many items: one scene is one item
    items = pystac.ItemCollection([pystac.Item.from_file(str(path))])
    for many in (items, list(items), items.to_dict()):
        with pytest.raises(InputError, match=r"one STAC item, not 1 \(s\).*open_scene\(items\[i\]\)"):
            geoseg.open_scene(many)
    r = CliRunner().invoke(cli, ["predict", str(path), "--model", str(model), "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "a STAC item, not a raster" in r.output and "(it has blue, red" not in r.output
    assert "geoseg.open_scene('ITEM.json')" in r.output, r.output
    # the acquisition time GDAL's IMAGERY domain gives (the STAC item of the output takes it)
    dated = tmp_path / "dated.tif"
    with rasterio.open(dated, "w", **profile) as dst:
        dst.write(data)
        dst.update_tags(ns="IMAGERY", ACQUISITIONDATETIME="2020-06-15T10:30:00Z")
    assert open_stack([dated]).acquired == "2020-06-15T10:30:00+00:00" and open_stack([scene_path]).acquired is None


def test_geoseg_cluster_stays_the_api_function_once_its_submodule_is_imported():
    """``geoseg.cluster`` is also a submodule's name: importing the submodule (every cluster start does) must not
    turn the API's function into the module (a second ``with geoseg.cluster():`` in a notebook failed)."""
    import subprocess
    import sys

    code = ("import geoseg, geoseg.api; from geoseg.cluster import connect, local_gpus; "
            "assert geoseg.cluster is geoseg.api.cluster, type(geoseg.cluster); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_the_api_refuses_values_scaled_otherwise_than_the_training_bands(tmp_path, random_model, scene_path):
    """A model trained on bands stored with a GDAL scale and offset (DN, 1e-4, -0.1): a scene read as stored is
    taken, from files or from rioxarray; one whose values were scaled on reading (rioxarray's mask_and_scale) or
    stored otherwise is refused naming the band, as the CLI refuses such files. A bare array says nothing: taken."""
    import json
    import shutil

    import rioxarray

    from geoseg.errors import InputError

    model = tmp_path / "model"
    shutil.copytree(random_model, model)
    card = json.loads((model / "model.json").read_text())
    for b in card["bands"]:
        b["scale"], b["offset"] = 1e-4, -0.1
    (model / "model.json").write_text(json.dumps(card))
    scaled = tmp_path / "scaled.tif"
    shutil.copy(scene_path, scaled)
    with rasterio.open(scaled, "r+") as ds:
        ds.scales, ds.offsets = (1e-4,) * 4, (-0.1,) * 4

    for taken in (geoseg.open_scene(scaled), rioxarray.open_rasterio(scaled, chunks=128),
                  geoseg.open_scene(scaled).isel(band=[0, 1, 2, 3])):
        assert geoseg.predict(taken, model, chunk_size=64).class_id.shape == (300, 437)
    bare = rioxarray.open_rasterio(scaled).copy()
    bare.attrs = {}
    geoseg.predict(bare, model, chunk_size=64)
    with pytest.raises(InputError, match=r"band '1' holds values with scale 1 and offset 0.*scale 0.0001 and offset "
                                         r"-0.1.*mask_and_scale=False"):
        geoseg.predict(rioxarray.open_rasterio(scaled, mask_and_scale=True), model, chunk_size=64)
    with pytest.raises(InputError, match=r"band 'scene_1' holds values with scale 1 and offset 0"):
        geoseg.predict(geoseg.open_scene(scene_path), model, chunk_size=64)
    # rioxarray's per-band tuples beside a single value of the other, and one coordinate for every band
    import xarray as xr

    from geoseg.api import band_scales

    bare = xr.DataArray(np.zeros((2, 2, 2)), dims=("band", "y", "x"))
    for attrs, want in (({"scales": (1e-4, 1.0), "add_offset": 0.0}, [(1e-4, 0.0), (1.0, 0.0)]),
                        ({"scale_factor": 2.75e-5, "offsets": (-0.2, 0.0)}, [(2.75e-5, -0.2), (2.75e-5, 0.0)])):
        assert band_scales(bare.assign_attrs(attrs)) == want
    assert band_scales(bare.assign_coords(scale=1.0, offset=0.0)) == [(1.0, 0.0)] * 2


def test_cog_and_polygons_of_a_strided_or_south_up_prediction_are_where_its_pixels_are(random_model, tmp_path):
    """A prediction Dataset subsampled or flipped south-up keeps rioxarray's cached transform; to_cog and vectorize
    place the pixels by their coordinates (they wrote 10 m pixels for 20 m ones, and the south-up map upside down)."""
    import dask
    from rasterio.features import rasterize

    with dask.config.set(scheduler="synchronous"):
        ds = geoseg.predict(_north_up(), random_model, chunk_size=64, precision="fp32").compute()
    for name, sub in (("strided", ds.isel(y=slice(0, None, 2), x=slice(1, None, 3))), ("south-up", ds.isel(y=slice(None, None, -1)))):
        yy, xx = np.meshgrid(sub["y"].values, sub["x"].values, indexing="ij")
        want = sub.class_id.values
        path = geoseg.to_cog(sub, tmp_path / f"{name}.tif", client=None)
        with rasterio.open(path) as src:
            got = np.array([v[0] for v in src.sample(zip(xx.ravel(), yy.ravel()))]).reshape(want.shape)
        np.testing.assert_array_equal(got, want, err_msg=name)
        gdf = geoseg.vectorize(sub)
        with rasterio.open(path) as src:  # the polygons burnt on the COG's (north-up) grid give the COG back
            burnt = rasterize(zip(gdf.geometry, gdf.class_id.astype(int)), out_shape=src.shape, transform=src.transform,
                              fill=255, dtype="uint8")
            np.testing.assert_array_equal(burnt, src.read(1), err_msg=name)


def test_a_store_saved_from_a_strided_coarsened_or_south_up_prediction_is_read_where_its_pixels_are(random_model, tmp_path):
    """xarray's to_zarr keeps rioxarray's stale GeoTransform beside the right coordinates: geoseg info and
    vectorize of the store follow the coordinates (they placed the polygons 950 m south and mirrored)."""
    import dask
    from rasterio.features import rasterize

    from geoseg.cli.info import store_summary

    with dask.config.set(scheduler="synchronous"):
        ds = geoseg.predict(_north_up(), random_model, chunk_size=64, precision="fp32").compute()
    assert geoseg.vectorize(ds).geometry.notna().all()
    for name, sub in (("strided", ds.isel(y=slice(0, None, 2), x=slice(1, None, 3))), ("south-up", ds.isel(y=slice(None, None, -1))),
                      ("coarsened", ds[["class_id"]].coarsen(y=2, x=2).max())):
        store = tmp_path / f"{name}.zarr"
        sub.to_zarr(store)
        assert store_summary(str(store))["transform"] == list(sub.rio.transform(recalc=True))[:6], name
        cog = geoseg.to_cog(sub, tmp_path / f"{name}.tif", client=None)
        gdf = geoseg.vectorize(str(store))
        with rasterio.open(cog) as src:
            burnt = rasterize(zip(gdf.geometry, gdf.class_id.astype(int)), out_shape=src.shape, transform=src.transform,
                              fill=255, dtype="uint8")
            np.testing.assert_array_equal(burnt, src.read(1), err_msg=name)


def test_a_scene_masked_and_scaled_by_rioxarray_keeps_valid_pixels_equal_to_the_stored_nodata(tmp_path, random_model,
                                                                                               scene_path):
    """open_rasterio(mask_and_scale=True) turns the stored nodata into NaN; its _FillValue (stored units) stays in
    the encoding and must not mask a valid physical value equal to it (a model trained on physical values)."""
    import shutil

    import dask
    import rioxarray

    scaled = tmp_path / "scaled.tif"
    shutil.copy(scene_path, scaled)
    with rasterio.open(scaled, "r+") as ds:
        block = ds.read(window=((150, 151), (200, 201)))
        block[:] = 1000  # 1000 x 0.5 - 500 = 0.0: the stored nodata's value, but a valid pixel
        ds.write(block, window=((150, 151), (200, 201)))
        ds.scales, ds.offsets = (0.5,) * 4, (-500.0,) * 4
    scene = rioxarray.open_rasterio(scaled, mask_and_scale=True)
    assert scene.encoding["_FillValue"] == 0 and float(scene[0, 150, 200]) == 0.0
    with dask.config.set(scheduler="synchronous"):
        ids = geoseg.predict(scene, random_model, chunk_size=128, precision="fp32").class_id.values
    assert ids[150, 200] != 255
    assert (ids[:20, :20] == 255).all() and (ids[100:, 100:] != 255).all()  # the nodata wedge, and valid pixels


def test_physical_converts_values_and_says_so(tmp_path, random_model, scene_path):
    """geoseg.physical: value x scale + offset per band, nodata as NaN, and scale/offset coordinates of 1 and 0, so a
    model trained on physical values takes it and refuses the stored values (converting by hand kept the stored
    values' coordinates: refused, or wrongly taken by a model trained on the stored values)."""
    import json
    import shutil

    from geoseg.errors import InputError

    model = tmp_path / "model"
    shutil.copytree(random_model, model)
    card = json.loads((model / "model.json").read_text())
    for b in card["bands"]:
        b["scale"], b["offset"] = 1.0, 0.0
    (model / "model.json").write_text(json.dumps(card))
    scaled = tmp_path / "scaled.tif"
    shutil.copy(scene_path, scaled)
    with rasterio.open(scaled, "r+") as ds:
        ds.scales, ds.offsets = (1e-4, 1e-4, 2e-4, 2e-4), (-0.1, -0.1, 0.0, 0.0)
        stored = ds.read()
    scene = geoseg.open_scene(scaled)
    values = geoseg.physical(scene)
    want = stored * np.array([1e-4, 1e-4, 2e-4, 2e-4])[:, None, None] + np.array([-0.1, -0.1, 0, 0])[:, None, None]
    want[stored == 0] = np.nan  # the scene's nodata
    np.testing.assert_allclose(values.values, want, rtol=1e-6, atol=1e-7)  # float32
    assert list(values["scale"].values) == [1.0] * 4 and values.rio.crs == scene.rio.crs
    assert geoseg.predict(values, model, chunk_size=64).class_id.shape == (300, 437)
    with pytest.raises(InputError, match=r"geoseg.physical\(scene\)"):
        geoseg.predict(scene, model, chunk_size=64)
    # rioxarray's scale attributes of the stored values do not follow: written and reopened, the values were scaled twice
    import rioxarray  # noqa: F401
    import xarray as xr

    tagged = xr.DataArray(np.full((1, 4, 4), 2, np.uint16), dims=("band", "y", "x"), attrs={"scale_factor": 1e-4, "add_offset": 0.0},
                          coords={"y": 4000000.0 - 10 * np.arange(4) - 5, "x": 500000.0 + 10 * np.arange(4) + 5}).rio.write_crs("EPSG:32617")
    phys = geoseg.physical(tagged)
    assert float(phys[0, 0, 0]) == pytest.approx(2e-4) and "scale_factor" not in phys.attrs
    phys.rio.to_raster(tmp_path / "phys.tif")
    again = geoseg.open_scene(tmp_path / "phys.tif")
    assert float(again[0, 0, 0]) == pytest.approx(2e-4) and list(again["scale"].values) == [1.0]


def test_model_init_makes_a_plain_u_net_or_one_with_the_input_skip(tmp_path):
    """geoseg.Model.init, as `geoseg model init [--input-skip]`: the card says which network the weights are for."""
    import geoseg
    from geoseg.model.network import has_input_skip
    from geoseg.model.store import load_model

    plain = geoseg.Model.init(tmp_path / "plain", bands=3, classes=2, encoder_depth=3)
    skip = geoseg.Model.init(tmp_path / "skip", bands=3, classes=2, encoder_depth=3, input_skip=True)
    assert plain.card.arch_params == {} and skip.card.arch_params == {"input_skip": True}
    assert "input skip" in skip.card.network and "input skip" not in plain.card.network
    assert not has_input_skip(load_model(tmp_path / "plain").net) and has_input_skip(load_model(tmp_path / "skip").net)


def test_a_vrt_whose_bands_differ_in_dtype_is_read_band_by_band(tmp_path):
    """A VRT of reflectance bands (uint16) and a float index band: rasterio reads one dtype per call, so the
    bands of such a file are read one by one, each with its own nodata (it raised "more than one 'dtype'")."""
    from rasterio.windows import Window

    from geoseg.io.sources import open_stack, read_window

    from conftest import write_raster

    rng = np.random.default_rng(0)
    refl = rng.integers(1, 3000, (2, 24, 32)).astype(np.uint16)
    refl[:, :4, :4] = 0
    index = rng.uniform(-1, 1, (1, 24, 32)).astype(np.float32)
    index[0, -3:, -5:] = -9999.0
    u = write_raster(tmp_path / "u.tif", refl, nodata=0, block=16)
    g = write_raster(tmp_path / "g.tif", index, nodata=-9999.0, block=16)
    with rasterio.open(u) as ds:
        srs, gt = ds.crs.to_wkt(), ", ".join(repr(v) for v in ds.transform.to_gdal())

    def band(n: int, kind: str, path: Path, src: int, nodata: float) -> str:
        return (f'<VRTRasterBand dataType="{kind}" band="{n}"><NoDataValue>{nodata}</NoDataValue><SimpleSource>'
                f'<SourceFilename relativeToVRT="1">{path.name}</SourceFilename><SourceBand>{src}</SourceBand>'
                '</SimpleSource></VRTRasterBand>')

    vrt = tmp_path / "stack.vrt"
    vrt.write_text(f'<VRTDataset rasterXSize="32" rasterYSize="24"><SRS>{srs}</SRS><GeoTransform>{gt}</GeoTransform>'
                   + band(1, "UInt16", u, 1, 0) + band(2, "Float32", g, 1, -9999) + band(3, "UInt16", u, 2, 0)
                   + "</VRTDataset>")
    stack = open_stack([str(vrt)])
    assert [b.dtype for b in stack.bands] == ["uint16", "float32", "uint16"] and stack.dtype == "float32"
    data, valid = read_window(stack, Window(0, 0, 32, 24))
    assert np.array_equal(data[[0, 2]], refl.astype(np.float32)) and np.array_equal(data[1], index[0])
    expected = (refl[0] != 0) & (refl[1] != 0) & (index[0] != -9999.0)
    assert np.array_equal(valid, expected)
    scene = geoseg.open_scene(str(vrt))  # the lazy API reads it with the same reader (rioxarray takes one dtype)
    assert scene.dtype == np.float32 and band_nodata(scene) == [0, -9999, 0]
    stored = np.stack([refl[0], index[0], refl[1]]).astype(np.float32)
    each = np.stack([refl[0] != 0, index[0] != -9999.0, refl[1] != 0])  # each band's own nodata, NaN as read_bands gives it
    assert np.array_equal(scene.values, np.where(each, stored, np.nan), equal_nan=True)
