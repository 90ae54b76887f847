"""End-to-end `geoseg predict` on a real LocalCluster: seamless, georeferenced, nodata-exact."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
import rasterio.features
from rasterio.transform import from_origin

from geoseg.infer import InferenceSettings, segment_array
from geoseg.io.sources import open_stack, read_window
from geoseg.io.zarr_store import open_prediction
from geoseg.model.store import load_model
from geoseg.pipeline import PredictOptions, plan_job, predict
from geoseg.tiling import Box

from conftest import blob_scene, write_raster


def one_pass(model_dir, image_path):
    """The reference: one forward pass over the whole scene, no tiling."""
    bundle = load_model(model_dir)
    stack = open_stack([image_path])
    data, valid = read_window(stack, Box(0, stack.shape[0], 0, stack.shape[1]).window)
    return segment_array(bundle.net, bundle.card, data, valid, InferenceSettings(), bundle.companion)


@pytest.mark.parametrize("model", ["random_model", "trained_model"])
def test_exact_tiling_equals_one_pass(request, client, scene_path, tmp_path, model):
    model_dir = request.getfixturevalue(model)
    record = predict([scene_path], model_dir, tmp_path / "out", PredictOptions(chunk_size=256, exact=True, tile_size=128, cog=False, vectors=False), client=client)
    assert record["chunks"]["computed"] == record["chunks"]["chunks"] > 1
    ds = open_prediction(tmp_path / "out" / "prediction.zarr")
    tiled_class, tiled_conf = ds["class_id"].values, ds["confidence"].values
    ref_class, ref_conf = one_pass(model_dir, scene_path)
    assert tiled_class.dtype == np.uint8
    differing = np.count_nonzero(tiled_class != ref_class)
    assert differing <= 1e-5 * ref_class.size, f"{differing} pixels differ"
    valid = ref_class != 255
    assert np.array_equal(np.isnan(tiled_conf), ~valid)
    assert np.nanmax(np.abs(tiled_conf - ref_conf)) < 1e-4
    # The scene is not trivially one class: the comparison means something.
    assert len(np.unique(ref_class[valid])) > 1


def test_a_raster_stored_south_up_or_east_to_west_is_segmented_as_the_model_saw_its_imagery(client, random_model, scene_path,
                                                                                            tmp_path):
    """The same ground stored with rows south to north (positive pixel height) or columns east to west: the model
    sees it north-up (a mirror image is another image to a network), and the map lands on the file's own grid."""
    from affine import Affine

    with rasterio.open(scene_path) as src:
        data, t, nodata = src.read(), src.transform, src.nodata
    h, w = data.shape[1:]
    north = one_pass(random_model, scene_path)[0]
    for name, flipped, transform, back in (
            ("south-up", data[:, ::-1], Affine(t.a, 0, t.c, 0, -t.e, t.f + h * t.e), (slice(None, None, -1), slice(None))),
            ("east-west", data[:, :, ::-1], Affine(-t.a, 0, t.c + w * t.a, 0, t.e, t.f), (slice(None), slice(None, None, -1)))):
        path = write_raster(tmp_path / f"{name}.tif", np.ascontiguousarray(flipped), transform=transform, nodata=nodata)
        out = tmp_path / name
        predict([path], random_model, out, PredictOptions(chunk_size=128, exact=True, precision="fp32", vectors=False),
                client=client)
        got = open_prediction(out / "prediction.zarr")["class_id"].values
        np.testing.assert_array_equal(got[back], north, err_msg=name)
        with rasterio.open(out / "classes.tif") as cog:
            assert cog.transform == transform and np.array_equal(cog.read(1), got)


def test_small_halo_differs_from_exact(client, random_model, scene_path, tmp_path):
    """With a halo below the receptive field, chunk borders show: the exact halo is what removes them."""
    predict([scene_path], random_model, tmp_path / "out", PredictOptions(chunk_size=64, halo=0, tile_size=64, cog=False, vectors=False), client=client)
    tiled = open_prediction(tmp_path / "out" / "prediction.zarr")["class_id"].values
    ref, _ = one_pass(random_model, scene_path)
    assert np.count_nonzero(tiled != ref) > 0


@pytest.fixture(scope="module")
def full_run(client, trained_model, scene_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "out"
    record = predict([scene_path], trained_model, out, PredictOptions(chunk_size=128), client=client)
    return out, record


def test_outputs_share_the_input_grid(full_run, scene_path):
    out, record = full_run
    with rasterio.open(scene_path) as src:
        crs, transform, shape = src.crs, src.transform, src.shape
    ds = open_prediction(out / "prediction.zarr")
    assert ds.rio.crs == crs
    assert ds.rio.transform() == transform
    assert ds["class_id"].shape == shape
    with rasterio.open(out / "classes.tif") as cog:
        assert cog.crs == crs and cog.transform == transform and cog.shape == shape
        assert cog.nodata == 255 and cog.dtypes[0] == "uint8"
        assert np.array_equal(cog.read(1), ds["class_id"].values)
    import geopandas as gpd

    gdf = gpd.read_file(out / "landuse.gpkg")
    assert gdf.crs == crs


def test_nodata_is_255_everywhere(full_run, scene_path):
    out, _ = full_run
    with rasterio.open(scene_path) as src:
        nodata = src.read(1) == 0
    assert nodata.any()
    class_id = open_prediction(out / "prediction.zarr")["class_id"].values
    assert (class_id[nodata] == 255).all()
    assert (class_id[~nodata] != 255).all()
    with rasterio.open(out / "classes.tif") as cog:
        assert (cog.read(1)[nodata] == 255).all()


def test_cog_is_valid_with_colours_and_names(full_run, trained_model):
    from rio_cogeo.cogeo import cog_validate

    from geoseg.model.store import read_card

    out, _ = full_run
    valid, errors, _ = cog_validate(str(out / "classes.tif"))
    assert valid, errors
    card = read_card(trained_model)
    with rasterio.open(out / "classes.tif") as cog:
        cmap = cog.colormap(1)
        for c in card.classes:
            assert cmap[c.id][:3] == c.rgb
        tags = json.dumps(cog.tags())
        for c in card.classes:
            assert c.name in tags


def test_polygons_rasterize_back_to_the_class_map(full_run, scene_path):
    import geopandas as gpd

    out, _ = full_run
    class_id = open_prediction(out / "prediction.zarr")["class_id"].values
    with rasterio.open(scene_path) as src:
        transform = src.transform
    gdf = gpd.read_file(out / "landuse.gpkg")
    assert {"class_id", "class_name", "area_m2"} <= set(gdf.columns)
    burned = rasterio.features.rasterize(zip(gdf.geometry, gdf.class_id.astype(int)), out_shape=class_id.shape,
                                         transform=transform, fill=255, dtype="uint8")
    assert np.array_equal(burned, class_id)
    # ellipsoidal areas: the planar UTM pixel area over the scale factor squared (about +0.08% here)
    assert np.isclose(gdf.area_m2.sum(), np.count_nonzero(class_id != 255) * 100.0, rtol=2e-3)
    assert gdf["pixels"].sum() == np.count_nonzero(class_id != 255)


def test_run_record(full_run, trained_model):
    from geoseg.model.store import model_digest

    out, record = full_run
    on_disk = json.loads((out / "run.json").read_text())
    assert on_disk["model"]["digest"] == model_digest(trained_model)
    assert on_disk["throughput_mpx_s"] > 0
    assert {"torch", "rasterio", "dask"} <= set(on_disk["versions"])
    assert not list(out.glob("*.partial"))


def test_geographic_crs(client, random_model, tmp_path):
    image, _ = blob_scene(100, 150, 4, seed=5)
    path = write_raster(tmp_path / "geo.tif", image, crs="EPSG:4326", transform=from_origin(-79.0, 36.0, 1e-4, 1e-4), nodata=0)
    out = tmp_path / "out"
    predict([path], random_model, out, PredictOptions(chunk_size=64), client=client)
    ds = open_prediction(out / "prediction.zarr")
    assert ds.rio.crs == "EPSG:4326"
    assert ds.rio.transform() == from_origin(-79.0, 36.0, 1e-4, 1e-4)
    import geopandas as gpd

    gdf = gpd.read_file(out / "landuse.gpkg")
    # ~ 9 m x 11 m pixels at 36 N: geodesic, not square degrees.
    px = gdf.area_m2.sum() / (100 * 150)
    assert 90 < px < 110


def test_band_files_are_stacked_in_order(client, random_model, scene_path, tmp_path):
    """Four single-band files give the same result as the multi-band file."""
    with rasterio.open(scene_path) as src:
        data, profile = src.read(), src.profile
    paths = []
    for i in range(4):
        profile.update(count=1)
        p = tmp_path / f"b{i}.tif"
        with rasterio.open(p, "w", **profile) as dst:
            dst.write(data[i : i + 1])
        paths.append(p)
    predict(paths, random_model, tmp_path / "a", PredictOptions(chunk_size=128, cog=False, vectors=False), client=client)
    predict([scene_path], random_model, tmp_path / "b", PredictOptions(chunk_size=128, cog=False, vectors=False), client=client)
    a = open_prediction(tmp_path / "a" / "prediction.zarr")["class_id"].values
    b = open_prediction(tmp_path / "b" / "prediction.zarr")["class_id"].values
    assert np.array_equal(a, b)


def test_precision_is_decided_on_the_workers(client, random_model, scene_path, tmp_path):
    """auto becomes one precision that the model's workers compute natively; run.json says which and why."""
    from geoseg.workers import capabilities

    native = all(c["bf16_native"] for c in client.run(capabilities).values())
    plan = plan_job([scene_path], random_model, tmp_path / "a", PredictOptions())
    assert plan.options.precision == "auto"  # nothing decided on the client
    rec = predict([scene_path], random_model, tmp_path / "a", PredictOptions(chunk_size=128, cog=False, vectors=False), client=client)
    num = rec["numerics"]
    assert set(num["workers"]) == set(client.scheduler_info(n_workers=-1)["workers"])
    assert all(w["device"] == "cpu" and w["torch_threads"] == 1 for w in num["workers"].values())
    assert num["precision"] == rec["parameters"]["precision"] == ("bf16" if native else "fp32")
    assert rec["parameters"]["precision_requested"] == "auto" and num["reason"]
    exact = predict([scene_path], random_model, tmp_path / "b", PredictOptions(exact=True, cog=False, vectors=False), client=client)
    assert exact["numerics"]["precision"] == "fp32"


def test_forced_bf16_warns_where_it_is_emulated(client, random_model, scene_path, tmp_path):
    from geoseg.numerics import SlowPrecisionWarning
    from geoseg.workers import capabilities

    native = all(c["bf16_native"] for c in client.run(capabilities).values())
    opts = PredictOptions(chunk_size=256, precision="bf16", cog=False, vectors=False)
    if native:
        rec = predict([scene_path], random_model, tmp_path / "o", opts, client=client)
        assert "bf16_slowdown" not in rec["numerics"]
    else:
        with pytest.warns(SlowPrecisionWarning, match=r"bf16 took \d+\.\d+x the fp32 time"):
            rec = predict([scene_path], random_model, tmp_path / "o", opts, client=client)
        assert rec["numerics"]["bf16_slowdown"] > 0
    assert rec["numerics"]["precision"] == "bf16"


def test_workers_that_disagree_get_fp32():
    from geoseg.numerics import decide

    assert decide("auto", False, {"a": {"bf16_native": True}, "b": {"bf16_native": True}})[0] == "bf16"
    precision, reason = decide("auto", False, {"a": {"bf16_native": True}, "b": {"bf16_native": False}})
    assert precision == "fp32" and "disagree" in reason
    assert decide("auto", True, {"a": {"bf16_native": True}})[0] == "fp32"
    assert decide("bf16", False, {"a": {"bf16_native": False}})[0] == "bf16"
    assert "equal one bf16 pass" in decide("bf16", True, {"a": {"bf16_native": True}})[1]  # run.json says what --exact meant


def test_workers_keep_the_last_models_and_see_a_model_rewritten_in_place(tmp_path, monkeypatch):
    """The per-process model cache (what a long-lived worker keeps between jobs): a model rewritten in place with the
    same size and its old mtime (cp -p) is a new model, not the one hashed before; the path's older model is
    dropped, and at most CACHE_SIZE models stay loaded; one model given by two paths is loaded once."""
    import os
    import shutil

    import torch

    from geoseg import runtime
    from geoseg.model.store import WEIGHTS_NAME, init_model, model_digest
    from geoseg.runtime import ModelRef, get_model

    runtime._CACHE.clear()
    monkeypatch.setattr(runtime, "CACHE_SIZE", 3)
    for seed in range(5):
        init_model(tmp_path / f"m{seed}", n_bands=2, n_classes=2, encoder_depth=2, seed=seed)
    path = tmp_path / "m0"
    first = get_model(ModelRef(str(path), model_digest(path), "cpu"))
    weights = path / WEIGHTS_NAME
    st = os.stat(weights)
    shutil.copyfile(tmp_path / "m1" / WEIGHTS_NAME, weights)  # same size, same inode
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(weights).st_size == st.st_size and os.stat(weights).st_mtime_ns == st.st_mtime_ns
    digest = model_digest(path)
    assert digest != first.digest
    second = get_model(ModelRef(str(path), digest, "cpu"))
    assert not torch.equal(next(first.net.parameters()), next(second.net.parameters()))
    assert list(runtime._CACHE) == [(digest, "cpu")]  # the path's earlier model dropped
    shutil.copytree(path, tmp_path / "copy")
    assert get_model(ModelRef(str(tmp_path / "copy"), digest, "cpu")) is second  # the same model by another path
    for seed in (2, 3, 4):
        get_model(ModelRef(str(tmp_path / f"m{seed}"), model_digest(tmp_path / f"m{seed}"), "cpu"))
    assert len(runtime._CACHE) == runtime.CACHE_SIZE and (digest, "cpu") not in runtime._CACHE
    runtime._CACHE.clear()


def test_relative_paths_reach_workers_that_run_elsewhere(client, random_model, scene_path, tmp_path, monkeypatch):
    """Inputs and OUT given relative to this process's directory: the cluster's workers run in another one (as
    workers of --scheduler do), and read the scene and wrote the store relative to theirs."""
    import os
    import shutil
    from pathlib import Path

    from geoseg.pipeline import PredictOptions, predict

    here = tmp_path / "here"
    here.mkdir()
    shutil.copy(scene_path, here / "scene.tif")
    monkeypatch.chdir(here)
    assert client.run(os.getcwd) and all(d != str(here) for d in client.run(os.getcwd).values())
    rec = predict(["scene.tif"], random_model, "out", PredictOptions(chunk_size=128, cog=False, vectors=False), client=client)
    assert rec["inputs"] == [str(here / "scene.tif")]
    assert (here / "out" / "run.json").exists() and not any(Path(d, "out").exists() for d in client.run(os.getcwd).values())
    assert open_prediction(here / "out" / "prediction.zarr")["class_id"].shape == rasterio.open(scene_path).shape
