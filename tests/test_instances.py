"""Instances (#11): Mask R-CNN trained from polygons, detected per chunk on the cluster, joined across chunk lines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner
from rasterio.transform import from_origin

from geoseg.cli.main import cli
from geoseg.instances import merge
from geoseg.instances.metrics import object_scores
from geoseg.tiling import Box

from conftest import write_raster

SIZE, RES = 512, 1.0
ORIGIN = (600000.0, 4100000.0)


def run(*args, code=0):
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == code, res.output
    return res


def object_scene(seed: int = 3):
    """Bright rectangles (8-28 px) on a noisy textured ground; a row of them straddles the lines
    x = 256 and y = 256 (chunk lines at chunk 256). Returns image, instance ids and boxes."""
    rng = np.random.default_rng(seed)
    img = rng.normal(300, 40, (3, SIZE, SIZE)) + 60 * np.sin(np.arange(SIZE) / 17.0)[None, None, :]
    ids = np.zeros((SIZE, SIZE), np.uint32)
    boxes = []

    def put(y, x, hh, ww):
        if y < 0 or x < 0 or y + hh > SIZE or x + ww > SIZE or ids[max(0, y - 4):y + hh + 4, max(0, x - 4):x + ww + 4].any():
            return
        boxes.append((y, x, y + hh, x + ww))
        ids[y:y + hh, x:x + ww] = len(boxes)
        img[:, y:y + hh, x:x + ww] += np.array([500.0, 420.0, 330.0])[:, None, None]

    for k in range(6):  # across the chunk lines
        put(256 - 9, 20 + 80 * k, 18, 14 + 2 * k)
        put(30 + 80 * k, 256 - 7, 12 + 2 * k, 16)
    while len(boxes) < 45:
        hh, ww = (int(v) for v in rng.integers(8, 29, 2))
        put(int(rng.integers(0, SIZE - hh)), int(rng.integers(0, SIZE - ww)), hh, ww)
    return np.clip(img, 0, 65535).astype(np.uint16), ids, boxes


@pytest.fixture(scope="module")
def objects_data(tmp_path_factory):
    import geopandas as gpd
    import shapely

    d = tmp_path_factory.mktemp("objects")
    img, ids, boxes = object_scene()
    t = from_origin(*ORIGIN, RES, RES)
    image = write_raster(d / "scene.tif", img, crs="EPSG:32633", transform=t)
    polys = [shapely.box(ORIGIN[0] + x0, ORIGIN[1] - y1, ORIGIN[0] + x1, ORIGIN[1] - y0) for y0, x0, y1, x1 in boxes]
    # labels in another CRS: they are reprojected onto the image
    gpd.GeoDataFrame({"kind": ["building"] * len(polys)}, geometry=polys, crs="EPSG:32633").to_crs(4326).to_file(d / "objects.gpkg")
    model = d / "model"
    run("-q", "train", image, "--task", "instance", "--labels", d / "objects.gpkg", "--label-field", "kind", "--out", model, "--epochs", 3,
        "--steps-per-epoch", 20, "--chip-size", 128, "--batch-size", 4)
    return {"dir": d, "image": image, "labels": d / "objects.gpkg", "model": model, "ids": ids, "boxes": boxes}


# -- kernels ---------------------------------------------------------------------------------


def _client_side(meta):
    """What resolve gets in the pipeline: boxes, scores, labels and windows; the masks stay on the workers."""
    return {k: {kk: v for kk, v in m.items() if kk != "masks"} for k, m in meta.items()}


def _dets(masks_boxes, scores):
    return {"boxes": np.array([b for _, b in masks_boxes], np.int64).reshape(-1, 4), "masks": [m for m, _ in masks_boxes],
            "scores": np.array(scores, np.float32), "labels": np.ones(len(scores), np.uint8)}


def test_merge_joins_cut_and_whole_views_once():
    shape = (100, 200)
    a_core, b_core = Box(0, 100, 0, 100), Box(0, 100, 100, 200)
    wa, wb = a_core.grow(30, shape), b_core.grow(30, shape)  # A sees x < 130, B sees x >= 70
    # object 1: x 90..110 (centre 100: B's core); both see it whole
    # object 2: x 120..140: A cuts it at 130, B sees it whole
    # object 3: x 20..40, only in A; object 4: x 75..85 seen whole by B only in its halo, A (whose core holds it) missed it
    full = np.ones((10, 20), bool)
    a = _dets([(full, (10, 90, 20, 110)), (np.ones((10, 10), bool), (40, 120, 50, 130)), (full, (60, 20, 70, 40))], [0.9, 0.8, 0.7])
    b = _dets([(full, (10, 90, 20, 110)), (full, (40, 120, 50, 140)), (np.ones((10, 10), bool), (80, 75, 90, 85))], [0.95, 0.85, 0.6])
    meta = {(0, 0): {**a, "window": wa, "core": a_core}, (0, 1): {**b, "window": wb, "core": b_core}}
    pairs = [(((0, 0), i), ((0, 1), j)) for i, j in merge.match(a, wa, b, wb, 0.5)]
    assert sorted((p[0][1], p[1][1]) for p in pairs) == [(0, 0), (1, 1)]
    objs = merge.resolve(meta, pairs, shape)
    assert [o.box for o in objs] == [(10, 90, 20, 110), (40, 120, 50, 140), (60, 20, 70, 40)]  # row-major ids, 4 dropped
    assert [o.members[0][0] for o in objs] == [(0, 1), (0, 1), (0, 0)]  # whole views from the core that holds the centre
    painted = merge.paint(objs, meta, Box(0, 100, 0, 200))
    assert set(np.unique(painted)) == {0, 1, 2, 3} and (painted == 2).sum() == 200


def test_merge_unions_an_object_larger_than_the_halo():
    shape = (60, 200)
    a_core, b_core = Box(0, 60, 0, 100), Box(0, 60, 100, 200)
    wa, wb = a_core.grow(10, shape), b_core.grow(10, shape)
    a = _dets([(np.ones((10, 60), bool), (20, 50, 30, 110))], [0.9])  # cut at A's edge x = 110
    b = _dets([(np.ones((10, 80), bool), (20, 90, 30, 170))], [0.8])  # cut at B's edge x = 90
    meta = {(0, 0): {**a, "window": wa, "core": a_core}, (0, 1): {**b, "window": wb, "core": b_core}}
    pairs = [(((0, 0), i), ((0, 1), j)) for i, j in merge.match(a, wa, b, wb, 0.5)]
    (obj,) = merge.resolve(meta, pairs, shape)
    assert obj.box == (20, 50, 30, 170) and not obj.whole and obj.score == pytest.approx(0.9)
    assert (merge.paint([obj], meta, Box(0, 60, 0, 200)) == obj.id).sum() == 10 * 120


def test_merge_drops_cut_pieces_seen_only_in_a_halo():
    """An object x 118..138 (centre in B's core) B sees whole; A cuts it at its edge (x 130) and its mask
    there (x 125..130) matches B's too poorly to join. A also finds a piece at its edge (rows 70..80)
    that B, whose core holds it, does not. Neither piece is an object: B had the better view."""
    shape = (100, 200)
    a_core, b_core = Box(0, 100, 0, 100), Box(0, 100, 100, 200)
    wa, wb = a_core.grow(30, shape), b_core.grow(30, shape)
    a = _dets([(np.ones((10, 5), bool), (40, 125, 50, 130)), (np.ones((10, 6), bool), (70, 124, 80, 130))], [0.95, 0.6])
    b = _dets([(np.ones((10, 20), bool), (40, 118, 50, 138))], [0.9])
    meta = {(0, 0): {**a, "window": wa, "core": a_core}, (0, 1): {**b, "window": wb, "core": b_core}}
    pairs = [(((0, 0), i), ((0, 1), j)) for i, j in merge.match(a, wa, b, wb, 0.5)]
    assert pairs == []
    (obj,) = merge.resolve(_client_side(meta), pairs, shape)
    assert obj.box == (40, 118, 50, 138) and obj.members == (((0, 1), 0),)
    painted = merge.paint([obj], meta, Box(0, 100, 0, 200))
    assert (painted == obj.id).sum() == 200 and set(np.unique(painted)) == {0, obj.id}


def test_merge_unions_a_large_non_convex_object_whose_box_centre_no_window_sees():
    """An L larger than the halo on 3 x 3 chunks of 100 px (halo 30): the centre of its box lies in the middle
    chunk, which never sees it; its pieces reach into their own windows' cores, so it is one object."""
    shape = (300, 300)
    truth = np.zeros(shape, bool)
    truth[:, 0:20] = True
    truth[280:300, :] = True
    meta, n = {}, 0
    for iy in range(3):
        for ix in range(3):
            core = Box(100 * iy, 100 * iy + 100, 100 * ix, 100 * ix + 100)
            window = core.grow(30, shape)
            piece = truth[window.y0:window.y1, window.x0:window.x1]
            if piece.any():
                rows, cols = np.flatnonzero(piece.any(1)), np.flatnonzero(piece.any(0))
                box = (window.y0 + rows[0], window.x0 + cols[0], window.y0 + rows[-1] + 1, window.x0 + cols[-1] + 1)
                mask = piece[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
                # one L-shaped piece where both arms meet, else a bar
                meta[(iy, ix)] = {**_dets([(mask, box)], [0.9]), "window": window, "core": core}
                n += 1
            else:
                meta[(iy, ix)] = {**_dets([], []), "window": window, "core": core}
    pairs = []
    for a in meta:
        for b in meta:
            if a < b:
                pairs += [((a, i), (b, j)) for i, j in merge.match(meta[a], meta[a]["window"], meta[b], meta[b]["window"], 0.5)]
    (obj,) = merge.resolve(_client_side(meta), pairs, shape)
    assert obj.box == (0, 0, 300, 300) and not obj.whole and len(obj.members) == n
    assert ((merge.paint([obj], meta, Box(0, 300, 0, 300)) == obj.id) == truth).all()


def test_merge_keeps_an_object_whose_views_disagree_on_the_centre():
    """At a chunk line (x = 256) A's mask is x 248..265 (centre 256: B's core) and B's 246..265 (centre
    255: A's core): one object, not none."""
    shape = (100, 512)
    a_core, b_core = Box(0, 100, 0, 256), Box(0, 100, 256, 512)
    wa, wb = a_core.grow(64, shape), b_core.grow(64, shape)
    a = _dets([(np.ones((10, 17), bool), (40, 248, 50, 265))], [0.9])
    b = _dets([(np.ones((10, 19), bool), (40, 246, 50, 265))], [0.8])
    meta = {(0, 0): {**a, "window": wa, "core": a_core}, (0, 1): {**b, "window": wb, "core": b_core}}
    pairs = [(((0, 0), i), ((0, 1), j)) for i, j in merge.match(a, wa, b, wb, 0.5)]
    (obj,) = merge.resolve(meta, pairs, shape)
    assert obj.members == (((0, 1), 0),)  # the best view's centre (256) lies in B's core: B's view


def test_merge_matches_one_to_one():
    """B sees two touching objects of A as one blob: it joins one of them, never both into one group."""
    shape = (100, 200)
    a_core, b_core = Box(0, 100, 0, 100), Box(0, 100, 100, 200)
    wa, wb = a_core.grow(40, shape), b_core.grow(40, shape)
    a = _dets([(np.ones((10, 10), bool), (20, 95, 30, 105)), (np.ones((10, 10), bool), (30, 95, 40, 105))], [0.9, 0.8])
    b = _dets([(np.ones((20, 10), bool), (20, 95, 40, 105))], [0.7])
    assert merge.match(a, wa, b, wb, 0.45) == [(0, 0)]


def test_object_scores_by_hand():
    truth = np.zeros((20, 40), np.uint32)
    pred = np.zeros_like(truth)
    truth[0:10, 0:10] = 1  # matched exactly
    pred[0:10, 0:10] = 7
    truth[0:10, 20:30] = 2  # IoU 50/150 = 0.33: no match
    pred[0:10, 25:35] = 8
    pred[15:20, 0:5] = 9  # a false object
    s = object_scores(pred, truth)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 2, 1)
    assert s["precision"] == pytest.approx(1 / 3) and s["recall"] == pytest.approx(0.5)
    assert s["f1"] == pytest.approx(2 / 5) and s["pq"] == pytest.approx(1.0 / (1 + 1 + 0.5))


# -- through the cluster ---------------------------------------------------------------------


def _objects(out: Path):
    import pyogrio

    return pyogrio.read_dataframe(out / "objects.gpkg", layer="objects")


def test_instances_tiled_equal_one_pass_and_join_across_chunk_lines(objects_data, client, tmp_path):
    from geoseg.pipeline import PredictOptions, predict

    runs = {}
    for chunk in (1024, 256, 320):  # 1024: one chunk holds the whole 512 px scene
        out = tmp_path / f"c{chunk}"
        rec = predict([objects_data["image"]], objects_data["model"], out, PredictOptions(chunk_size=chunk), client=client)
        assert rec["task"] == "instance" and rec["parameters"]["halo"] == 64
        runs[chunk] = (rec, _objects(out), out)
    _, one, _ = runs[1024]
    truth = len(objects_data["boxes"])
    assert abs(len(one) - truth) <= 2, (len(one), truth)
    for chunk in (256, 320):
        rec, gdf, _ = runs[chunk]
        assert len(gdf) == len(one), chunk  # never counted twice, never lost
        assert rec["matched_pairs"] > 0
        # the same objects: every tiled polygon is one of the one-pass polygons (IoU > 0.5), most nearly exactly
        best = [max(g.intersection(h).area / g.union(h).area for h in one.geometry) for g in gdf.geometry]
        assert min(best) > 0.5 and np.median(best) > 0.9, sorted(best)[:5]
    # objects straddling the chunk lines of chunk 256 are one polygon each
    import shapely

    for line in (shapely.LineString([(ORIGIN[0] + 256, ORIGIN[1]), (ORIGIN[0] + 256, ORIGIN[1] - SIZE)]),
                 shapely.LineString([(ORIGIN[0], ORIGIN[1] - 256), (ORIGIN[0] + SIZE, ORIGIN[1] - 256)])):
        crossing_truth = sum(1 for y0, x0, y1, x1 in objects_data["boxes"]
                             if shapely.box(ORIGIN[0] + x0, ORIGIN[1] - y1, ORIGIN[0] + x1, ORIGIN[1] - y0).intersects(line))
        gdf = runs[256][1]
        assert gdf.geometry.intersects(line).sum() == pytest.approx(crossing_truth, abs=1)
        assert crossing_truth >= 6


def test_an_instance_job_whose_only_gpu_worker_is_lost_stops_with_a_clear_error(objects_data, tmp_path):
    """As for semantic jobs: the detections wait for a worker offering GPU=1; once none has been in the cluster
    for the timeout, the job stops with one clear error (the scheduler would keep them waiting forever)."""
    import re

    from conftest import lose_the_gpu_worker
    from geoseg.errors import ConfigError
    from geoseg.pipeline import PredictOptions, predict

    out = tmp_path / "out"
    opts = PredictOptions(chunk_size=128, model_resources={"GPU": 1}, worker_timeout=3, vectors=False)

    def detecting(monitor) -> bool:  # a detection is running: the job is in the middle
        running = monitor.run(lambda dask_worker: [str(ts.key) for ts in dask_worker.state.executing])
        return any("geoseg-detect" in k for keys in running.values() for k in keys)

    error, waited = lose_the_gpu_worker(tmp_path, lambda address: predict([objects_data["image"]], objects_data["model"],
                                                                          out, opts, scheduler=address), detecting)
    assert isinstance(error, ConfigError), repr(error)
    assert re.search(r"no worker offering GPU=1 for 3 s.*--resume", str(error))
    assert waited < 60
    assert not (out / "run.json").exists()


def test_instance_outputs_are_georeferenced_and_scored(objects_data, client, tmp_path):
    from geoseg.io.cog import validate_cog
    from geoseg.pipeline import PredictOptions, predict

    out = tmp_path / "out"
    predict([objects_data["image"]], objects_data["model"], out, PredictOptions(chunk_size=256), client=client)
    record = json.loads((out / "run.json").read_text())
    assert record["outputs"] == ["prediction.zarr", "classes.tif", "instances.tif", "objects.gpkg", "item.json"]
    import pyogrio

    assert pyogrio.read_info(out / "objects.gpkg")["geometry_type"] == "MultiPolygon"  # a declared type, as landuse.gpkg
    import pystac

    item = pystac.Item.from_file(str(out / "item.json"))
    assert {"prediction", "classes", "instances", "objects", "run"} <= set(item.assets)
    assert item.properties["proj:code"] == "EPSG:32633" and item.properties["geoseg:run"]["objects"] == record["objects"]
    assert item.assets["instances"].extra_fields["raster:bands"][0]["data_type"] == "uint32"
    # run.json and the item name the network as a class map's do (arch_params and depth were missing for objects)
    card = json.loads((objects_data["model"] / "model.json").read_text())
    for said in (record["model"], item.properties["geoseg:model"]):
        assert {k: said[k] for k in ("method", "arch", "encoder", "encoder_depth", "arch_params", "receptive_field")} == \
            {k: card[k] for k in ("method", "arch", "encoder", "encoder_depth", "arch_params", "receptive_field")}
    with rasterio.open(objects_data["image"]) as src, rasterio.open(out / "instances.tif") as inst, \
            rasterio.open(out / "classes.tif") as cls:
        assert inst.crs == src.crs and inst.transform == src.transform and inst.dtypes[0] == "uint32"
        assert cls.crs == src.crs and cls.transform == src.transform
        ids, classes = inst.read(1), cls.read(1)
    assert validate_cog(out / "instances.tif")[0]
    import xarray as xr

    ds = xr.open_zarr(out / "prediction.zarr", decode_coords="all")
    assert ds.rio.crs.to_epsg() == 32633 and np.array_equal(ds["instance_id"].values, ids)
    gdf = _objects(out)
    assert gdf.crs.to_epsg() == 32633
    assert list(gdf.columns) == ["instance_id", "class_id", "class_name", "score", "area_m2", "pixels", "geometry"]
    assert set(gdf["class_name"]) == {"building"} and (gdf["score"] >= 0.5).all()
    assert sorted(gdf["instance_id"]) == sorted(int(v) for v in np.unique(ids) if v)
    # polygons are the raster's objects: area = pixels (1 m pixels; UTM scale ~0.9996² at this easting)
    np.testing.assert_allclose(gdf["area_m2"], gdf["pixels"], rtol=2e-3)
    np.testing.assert_allclose(gdf.geometry.area, gdf["pixels"], rtol=1e-9)
    assert ((classes == 1) == (ids > 0)).all() and ((classes == 0) == (ids == 0)).all()
    # scored against the true objects
    res = run("evaluate-objects", out, "--labels", objects_data["labels"], "--json", tmp_path / "scores.json")
    scores = json.loads((tmp_path / "scores.json").read_text())["all"]
    assert scores["true_objects"] == len(objects_data["boxes"])
    assert scores["f1"] >= 0.85 and scores["pq"] >= 0.7, res.output
    # --no-vectors / --no-cog leave out what they name, as for a class map
    for flag, left_out in (("--no-vectors", {"objects.gpkg"}), ("--no-cog", {"classes.tif", "instances.tif"})):
        o = tmp_path / flag
        run("predict", objects_data["image"], "--model", objects_data["model"], "--out", o, "--chunk-size", 256, flag)
        written = set(json.loads((o / "run.json").read_text())["outputs"])
        assert not written & left_out and not any((o / n).exists() for n in left_out)
        assert written == {"prediction.zarr", "classes.tif", "instances.tif", "objects.gpkg", "item.json"} - left_out
        assert set(pystac.Item.from_file(str(o / "item.json")).assets) >= {"prediction", "run"}


def test_a_job_of_instance_scenes_without_cogs_is_reused_when_run_again(objects_data, tmp_path):
    """geoseg run with outputs {cog: false}: the finished instance scene is what the job asks for, so running
    the job again reuses it (it asked for the COGs it was told not to write, and refused or recomputed)."""
    out = tmp_path / "jobout"
    (tmp_path / "job.yaml").write_text(
        f"name: objs\nscenes:\n  - name: a\n    path: {objects_data['image']}\nmodel: {objects_data['model']}\noutput: {out}\n"
        "chunking: {chunk_size: 256}\noutputs: {cog: false, vectors: true}\ncluster: {profile: local, profiles: {local: {n_workers: 1}}}\n")
    run("run", tmp_path / "job.yaml")
    assert json.loads((out / "a" / "run.json").read_text())["outputs"] == ["prediction.zarr", "objects.gpkg", "item.json"]
    res = run("run", tmp_path / "job.yaml")
    assert "nothing to do" in res.output and "0 computed, 1 reused" in res.output


def test_instance_bad_inputs_exit_clearly(objects_data, tmp_path, trained_model, scene_path, client):
    """A bad object size stops before anything is written; scoring a class map says what to run instead."""
    res = run("predict", objects_data["image"], "--model", objects_data["model"], "--out", tmp_path / "o",
              "--max-object-size", "big", code=2)
    assert "--max-object-size" in res.output and not (tmp_path / "o").exists()
    from geoseg.pipeline import predict

    semantic = tmp_path / "semantic"
    predict([scene_path], trained_model, semantic, client=client)
    res = run("evaluate-objects", semantic, "--labels", objects_data["labels"], code=2)
    assert "instance model" in res.output
    # and the other way round: a class-map score of an instance model, alone or beside a semantic one
    for models in (["--model", objects_data["model"]], ["--model", trained_model, "--model", objects_data["model"]]):
        res = run("evaluate", objects_data["image"], *models, "--labels", objects_data["labels"], "--label-field", "kind", code=2)
        assert "finds objects" in res.output and "evaluate-objects" in res.output


def test_panoptic_objects_lie_in_their_class_area(objects_data, client, tmp_path):
    """A semantic model and an instance model in one job: one class map with the objects laid over it,
    instance ids beside it, both polygon layers, every object inside the landuse polygons of its class."""
    import pyogrio
    import shapely
    import xarray as xr

    from geoseg.model.card import ClassInfo
    from geoseg.model.store import init_model
    from geoseg.pipeline import PredictOptions, predict

    semantic = tmp_path / "semantic"
    # both number their classes from 1: the objects' "building" (1) must not become "agriculture" (1)
    init_model(semantic, n_bands=3, encoder_depth=3, classes=[ClassInfo(id=0, name="ground"), ClassInfo(id=1, name="agriculture"),
                                                               ClassInfo(id=2, name="water")])
    out = tmp_path / "pan"
    rec = predict([objects_data["image"]], semantic, out, PredictOptions(chunk_size=256, instance_model=str(objects_data["model"])),
                  client=client)
    assert {"instances.tif", "objects.gpkg", "landuse.gpkg", "classes.tif"} <= set(rec["outputs"])
    assert rec["objects"] >= len(objects_data["boxes"]) - 2
    ds = xr.open_zarr(out / "prediction.zarr", decode_coords="all")
    ids, classes = ds["instance_id"].values, ds["class_id"].values
    assert ((ids > 0) == (classes == 3)).all()  # object pixels take the object's class (a free id); none elsewhere
    assert set(np.unique(classes[ids == 0])) <= {0, 1, 2}
    objects = pyogrio.read_dataframe(out / "objects.gpkg", layer="objects")
    landuse = pyogrio.read_dataframe(out / "landuse.gpkg", layer="landuse")
    assert set(objects["class_name"]) == {"building"} and set(objects["class_id"]) == {3}
    assert dict(zip(landuse["class_id"], landuse["class_name"]))[3] == "building"  # the instance model's class joins the legend
    area = shapely.union_all(landuse[landuse["class_id"] == 3].geometry.values)
    assert all(area.buffer(1e-6).contains(g) for g in objects.geometry)
    assert objects["pixels"].sum() == (ids > 0).sum()


# -- Segment Anything (a small random SAM: the plumbing, not the masks) -------------------------


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory):
    import torch

    from geoseg.instances.sam import build_sam

    d = tmp_path_factory.mktemp("sam")
    torch.manual_seed(1)
    torch.save(build_sam("tiny").state_dict(), d / "sam_tiny.pth")  # a checkpoint as SAM's authors ship them
    run("-q", "model", "init", d / "model", "--method", "sam", "--sam-type", "tiny", "--checkpoint", d / "sam_tiny.pth",
        "--bands", 3, "--max-object-size", 40)
    return d


def test_sam_checkpoint_recorded_and_unsafe_ones_refused(tiny_sam, tmp_path):
    import hashlib

    import torch
    from safetensors.torch import load_file

    card = json.loads((tiny_sam / "model" / "model.json").read_text())
    assert card["method"] == "sam" and card["default_halo"] == 48  # 40 px rounded up to the patch size
    assert card["method_params"]["checkpoint_sha256"] == hashlib.sha256((tiny_sam / "sam_tiny.pth").read_bytes()).hexdigest()
    saved, original = load_file(tiny_sam / "model" / "weights.safetensors"), torch.load(tiny_sam / "sam_tiny.pth", weights_only=True)
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)

    class Payload:  # a pickle that would run code on load
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": Payload()}, tmp_path / "evil.pth")
    res = run("model", "init", tmp_path / "m", "--method", "sam", "--sam-type", "tiny", "--checkpoint", tmp_path / "evil.pth", code=2)
    assert "evil.pth" in res.output and "pwned" not in res.output and not (tmp_path / "m").exists()
    res = run("model", "init", tmp_path / "m", "--method", "sam", "--sam-type", "vit_b", "--checkpoint", tiny_sam / "sam_tiny.pth", code=2)
    assert "--sam-type" in res.output


def test_sam_prompts_in_map_coordinates_land_on_their_pixels(objects_data, tiny_sam, client, tmp_path):
    """Points (in EPSG:4326) and a box prompt: each is segmented by the chunk whose core holds it, on
    the pixels the prompt names; the masks equal SAM run by hand on that chunk's window."""
    import geopandas as gpd
    import shapely
    import xarray as xr
    from segment_anything import SamPredictor

    from geoseg.instances.sam import build_sam, to_rgb
    from geoseg.model.card import ModelCard

    picks = [objects_data["boxes"][i] for i in (0, 7, 20, 30)]
    pts = [shapely.Point(ORIGIN[0] + (x0 + x1) / 2 + 0.25, ORIGIN[1] - (y0 + y1) / 2 - 0.25) for y0, x0, y1, x1 in picks]
    y0, x0, y1, x1 = objects_data["boxes"][40]
    box = shapely.box(ORIGIN[0] + x0, ORIGIN[1] - y1, ORIGIN[0] + x1, ORIGIN[1] - y0)
    gpd.GeoDataFrame({"n": range(5)}, geometry=[*pts, box], crs="EPSG:32633").to_crs(4326).to_file(tmp_path / "prompts.gpkg")
    out = tmp_path / "out"
    run("-q", "predict", objects_data["image"], "--model", tiny_sam / "model", "--out", out, "--chunk-size", 256,
        "--prompts", tmp_path / "prompts.gpkg")
    record = json.loads((out / "run.json").read_text())
    stretch = record["scene_parameters"]["stretch"]
    ids = xr.open_zarr(out / "prediction.zarr")["instance_id"].values
    objects = _objects(out)
    assert set(objects["instance_id"]) <= {1, 2, 3, 4, 5} and len(objects) >= 3
    card = ModelCard.read(tiny_sam / "model" / "model.json")
    sam = build_sam("tiny")
    from safetensors.torch import load_file

    sam.load_state_dict(load_file(tiny_sam / "model" / "weights.safetensors"))
    img = rasterio.open(objects_data["image"]).read().astype(np.float32)
    prompts = [("point", ((b[1] + b[3]) / 2 + 0.25, (b[0] + b[2]) / 2 + 0.25)) for b in picks] + \
        [("box", (x0, y0, x1, y1))]
    by_score = sorted(objects.itertuples(), key=lambda o: -o.score)
    for n, (kind, c) in enumerate(prompts, start=1):
        if n not in set(objects["instance_id"]):
            continue
        cy, cx = (c[1] + c[-1]) / 2, (c[0] + c[-2]) / 2
        core = Box(int(cy) // 256 * 256, min(SIZE, int(cy) // 256 * 256 + 256), int(cx) // 256 * 256, min(SIZE, int(cx) // 256 * 256 + 256))
        win = core.grow(48, (SIZE, SIZE))
        pred = SamPredictor(sam)
        pred.set_image(to_rgb(img[:, win.y0:win.y1, win.x0:win.x1], np.ones(win.shape, bool), card, stretch))
        shift = np.array([win.x0, win.y0] * 2, np.float64)
        if kind == "point":
            m, _, _ = pred.predict(point_coords=(np.array(c) - shift[:2])[None], point_labels=np.array([1]), multimask_output=False)
        else:
            m, _, _ = pred.predict(box=np.array(c) - shift, multimask_output=False)
        ref = np.zeros((SIZE, SIZE), bool)
        ref[win.y0:win.y1, win.x0:win.x1] = m[0]
        mine = ids == n
        assert mine.any() and not (mine & ~ref).any()  # never outside SAM's mask for this prompt
        if by_score[0].instance_id == n:
            assert np.array_equal(mine, ref)  # the top-scoring one is drawn whole


def test_sam_automatic_masks_through_the_cluster(objects_data, client, tmp_path):
    from geoseg.instances.sam import init_sam_model
    from geoseg.pipeline import PredictOptions, predict

    model = tmp_path / "sam"
    init_sam_model(model, model_type="tiny", n_bands=3, params={"max_object_px": 32, "stability_threshold": 0.0,
                                                                "score_threshold": 0.0, "points_per_side": 6})
    out = tmp_path / "out"
    rec = predict([objects_data["image"]], model, out, PredictOptions(chunk_size=256), client=client)
    assert rec["model"]["method"] == "sam" and rec["objects"] >= 1
    with rasterio.open(out / "instances.tif") as ds, rasterio.open(objects_data["image"]) as src:
        assert ds.crs == src.crs and ds.transform == src.transform
        ids = ds.read(1)
    objects = _objects(out)
    assert sorted(objects["instance_id"]) == sorted(int(v) for v in np.unique(ids) if v)
    assert (objects["pixels"].values == [int((ids == i).sum()) for i in objects["instance_id"]]).all()


def test_python_api_objects(objects_data, client, tmp_path):
    from geoseg import api
    from geoseg.errors import ConfigError

    ds, gdf = api.objects([objects_data["image"]], objects_data["model"], tmp_path / "api", client=client, chunk_size=256)
    assert ds.rio.crs.to_epsg() == 32633 and int(ds["instance_id"].max()) == gdf["instance_id"].max() == len(gdf)
    with pytest.raises(ConfigError, match="api.objects"):
        api.predict(api.open_scene([str(objects_data["image"])]), objects_data["model"])


@pytest.mark.shared_data
def test_spacenet_buildings_as_objects(client, tmp_path):
    """Real data: the SpaceNet chip's building polygons (GeoJSON, EPSG:32616; uint16 panchromatic, nodata 0)
    train a Mask R-CNN briefly; predict and score run on it and count its 43 buildings."""
    from conftest import SHARED_DATA

    d = SHARED_DATA / "spacenet-solaris"
    if not (d / "sample_geotiff.tif").is_file():
        pytest.skip("shared SpaceNet data not present")
    model, out = tmp_path / "model", tmp_path / "out"
    run("-q", "train", d / "sample_geotiff.tif", "--task", "instance", "--labels", d / "geotiff_labels.geojson", "--out", model,
        "--epochs", 1, "--steps-per-epoch", 10, "--chip-size", 128, "--batch-size", 2)
    card = json.loads((model / "model.json").read_text())
    assert card["training"]["objects"] == 43 and card["bands"][0]["resolution_m"] == pytest.approx(0.5)
    run("-q", "predict", d / "sample_geotiff.tif", "--model", model, "--out", out, "--chunk-size", 256, "--max-object-size", "40m")
    assert json.loads((out / "run.json").read_text())["parameters"]["halo"] == 96  # 40 m at 0.5 m = 80 px, to the stride
    run("-q", "evaluate-objects", out, "--labels", d / "geotiff_labels.geojson", "--json", tmp_path / "s.json")
    scores = json.loads((tmp_path / "s.json").read_text())["all"]
    assert scores["true_objects"] == 43 and scores["tp"] + scores["fn"] == 43


def test_panoptic_sam_prompts_labelled_by_the_class_map(objects_data, tiny_sam, client, tmp_path):
    import geopandas as gpd
    import shapely
    import xarray as xr

    from geoseg.model.card import ClassInfo
    from geoseg.model.store import init_model
    from geoseg.pipeline import PredictOptions, predict

    semantic = tmp_path / "semantic"
    init_model(semantic, n_bands=3, encoder_depth=3, classes=[ClassInfo(id=3, name="grass"), ClassInfo(id=4, name="roofs")])
    pts = [shapely.Point(ORIGIN[0] + (b[1] + b[3]) / 2, ORIGIN[1] - (b[0] + b[2]) / 2) for b in objects_data["boxes"][:6]]
    gpd.GeoDataFrame({"n": range(6)}, geometry=pts, crs="EPSG:32633").to_file(tmp_path / "p.gpkg")
    alone = predict([objects_data["image"]], semantic, tmp_path / "alone", PredictOptions(chunk_size=256, vectors=False), client=client)
    rec = predict([objects_data["image"]], semantic, tmp_path / "pan", client=client,
                  options=PredictOptions(chunk_size=256, instance_model=str(tiny_sam / "model"), prompts=str(tmp_path / "p.gpkg")))
    assert rec["objects"] >= 1 and alone["class_pixels"] == rec["class_pixels"]  # the class map is left as it was
    ds = xr.open_zarr(tmp_path / "pan" / "prediction.zarr")
    ids, classes = ds["instance_id"].values, ds["class_id"].values
    objects = _objects(tmp_path / "pan")
    for o in objects.itertuples():
        under = classes[ids == o.instance_id]
        assert o.class_id == np.bincount(under).argmax() and o.class_name == {3: "grass", 4: "roofs"}[o.class_id]


@pytest.mark.gpu
def test_instances_train_and_run_on_a_cuda_worker(tmp_path):
    """Where a CUDA device exists: Mask R-CNN trains on it and the detect tasks run on the GPU worker."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    import geopandas as gpd
    import shapely

    from geoseg.cluster import connect
    from geoseg.instances.train import InstanceConfig, train_instances
    from geoseg.pipeline import PredictOptions, predict

    img, _, boxes = object_scene()
    image = write_raster(tmp_path / "scene.tif", img, crs="EPSG:32633", transform=from_origin(*ORIGIN, RES, RES))
    polys = [shapely.box(ORIGIN[0] + x0, ORIGIN[1] - y1, ORIGIN[0] + x1, ORIGIN[1] - y0) for y0, x0, y1, x1 in boxes]
    gpd.GeoDataFrame(geometry=polys, crs="EPSG:32633").to_file(tmp_path / "objects.gpkg")
    card = train_instances([str(image)], str(tmp_path / "objects.gpkg"), tmp_path / "model", InstanceConfig(steps=120, chip_size=128))
    assert card.training["device"].startswith("cuda")
    with connect(n_workers=1, resources={"GPU": 1}) as client:
        rec = predict([image], tmp_path / "model", tmp_path / "out", PredictOptions(chunk_size=256, model_resources={"GPU": 1}),
                      client=client)
    (worker,) = rec["numerics"]["workers"].values()
    assert worker["device"].startswith("cuda") and abs(rec["objects"] - len(boxes)) <= 3


def test_box_local_masks_equal_torchvisions_full_window_paste(objects_data):
    """detect pastes each mask into its box only: the same detections as torchvision's own forward."""
    import torch

    from geoseg.instances.net import DEFAULTS, detect, detections
    from geoseg.infer import normalize
    from geoseg.io.sources import open_stack, read_bands
    from geoseg.model.store import load_model

    bundle = load_model(objects_data["model"])
    stack = open_stack([objects_data["image"]])
    data, valid = read_bands(stack, Box(100, 420, 60, 400).window)
    ok = valid.all(axis=0)
    x = normalize(data, ok, bundle.card, valid)
    p = {**DEFAULTS, **bundle.card.method_params}
    mine = detect(bundle.net, x, ok, bundle.card.class_ids, p, offset=(100, 60))
    with torch.no_grad():
        out = bundle.net([torch.from_numpy(x)])[0]
    keep = out["scores"] >= p["score_threshold"]
    full = (out["masks"][keep, 0] >= p["mask_threshold"]).numpy()
    ref = detections([(m, 0, 0) for m in full], out["scores"][keep].numpy(), out["labels"][keep].numpy(), ok,
                     bundle.card.class_ids, p, offset=(100, 60))
    assert len(mine["scores"]) == len(ref["scores"]) >= 10
    assert np.array_equal(mine["boxes"], ref["boxes"]) and all(np.array_equal(a, b) for a, b in zip(mine["masks"], ref["masks"]))


def test_object_polygons_are_valid_where_pixels_touch_at_a_corner():
    """An object whose pixels touch only at a corner (and one with a hole touching its edge at a corner) is a valid
    (Multi)Polygon that covers exactly its pixels (8-connected rings touched themselves: invalid in GEOS and QGIS)."""
    import shapely
    from affine import Affine
    from rasterio.features import rasterize

    from geoseg.instances.tasks import _polygon

    m = np.zeros((9, 9), bool)
    m[:2, :2] = m[2:4, 2:4] = True  # two blocks meeting at a corner
    m[5:9, 4:9] = True
    m[6, 5] = False  # a hole ...
    m[7, 6] = False  # ... and another touching it at a corner
    t = Affine(0.5, 0, 600000.0, 0, -0.5, 4100000.0)
    poly = _polygon(m, Box(10, 19, 20, 29), t)
    assert shapely.is_valid(poly), shapely.is_valid_reason(poly)
    back = rasterize([poly], out_shape=m.shape, transform=t @ Affine.translation(20, 10), dtype="uint8").astype(bool)
    np.testing.assert_array_equal(back, m)


def test_object_scores_match_classes_by_name(objects_data, client, tmp_path):
    """evaluate-objects --label-field: the labels' classes meet the model's by name (the labels' values were
    renumbered 1..n and met the model's class ids by number: 'annex' was scored against the model's buildings)."""
    import geopandas as gpd

    from geoseg.pipeline import PredictOptions, predict

    out = tmp_path / "out"
    predict([objects_data["image"]], objects_data["model"], out, PredictOptions(chunk_size=256, vectors=False), client=client)
    gdf = gpd.read_file(objects_data["labels"])
    gdf["kind"] = ["annex" if i % 2 else "building" for i in range(len(gdf))]
    gdf.loc[3, "kind"] = None  # an object without a class: left out, with a warning, not a traceback
    gdf.to_file(tmp_path / "kinds.gpkg")
    run("evaluate-objects", out, "--labels", tmp_path / "kinds.gpkg", "--label-field", "kind", "--json", tmp_path / "s.json")
    classes = json.loads((tmp_path / "s.json").read_text())["classes"]
    assert set(classes) == {"annex", "building"}
    annex, building = classes["annex"], classes["building"]
    assert annex["true_objects"] == len(gdf) // 2 - 1 and annex["predicted_objects"] == 0 and annex["tp"] == 0  # row 3: none
    assert building["true_objects"] == (len(gdf) + 1) // 2 and building["tp"] >= 0.8 * building["true_objects"]
    # names meet ignoring case, as in geoseg evaluate ("Building" made two rows: its objects all missed, the model's all
    # false); a class name holding "NaN" is written as it is (the JSON's NaN scores were replaced as text)
    gdf["kind"] = ["Building" if i % 2 else "NaNshed" for i in range(len(gdf))]
    gdf.to_file(tmp_path / "caps.gpkg")
    run("evaluate-objects", out, "--labels", tmp_path / "caps.gpkg", "--label-field", "kind", "--json", tmp_path / "s.json", code=2)
    run("-q", "evaluate-objects", out, "--labels", tmp_path / "caps.gpkg", "--label-field", "kind", "--json", tmp_path / "s.json",
        "--overwrite")
    classes = json.loads((tmp_path / "s.json").read_text())["classes"]
    assert set(classes) == {"building", "NaNshed"}, classes
    assert classes["building"]["true_objects"] == len(gdf) // 2 and classes["building"]["tp"] >= 0.8 * (len(gdf) // 2)
    assert classes["NaNshed"]["precision"] is None  # no predicted object of it: no precision
    # an id raster: whole-number ids only (a cast made 1.0 and 1.5 one object), one class (--label-field refused), and
    # labels that hold no object where the prediction is (another CRS, a wrong extent) are an error, not a score of 0
    with rasterio.open(objects_data["image"]) as src:
        profile = {**src.profile, "count": 1, "dtype": "float32", "nodata": float("nan")}
    ids = objects_data["ids"].astype(np.float32)
    ids[ids == 2] = 1.5
    for name, values in (("frac.tif", ids), ("none.tif", np.zeros_like(ids))):
        with rasterio.open(tmp_path / name, "w", **profile) as dst:
            dst.write(values, 1)
    res = run("evaluate-objects", out, "--labels", tmp_path / "frac.tif", code=2)
    assert "whole numbers" in res.output and "1.5" in res.output
    res = run("evaluate-objects", out, "--labels", tmp_path / "none.tif", code=2)
    assert "no true object" in res.output and "CRS" in res.output
    ids[ids == 1.5] = 2
    with rasterio.open(tmp_path / "whole.tif", "w", **profile) as dst:
        dst.write(ids, 1)
    res = run("evaluate-objects", out, "--labels", tmp_path / "whole.tif", "--label-field", "kind", code=2)
    assert "--label-field is for polygon labels" in res.output
    (row,) = [line.split() for line in run("evaluate-objects", out, "--labels", tmp_path / "whole.tif").output.splitlines()
              if line.startswith("all")]
    assert int(row[1]) == len(np.unique(objects_data["ids"])) - 1 and int(row[3]) >= 0.8 * int(row[1])  # true objects, TP
    # a report path on the labels or in the prediction folder: refused (--overwrite replaced them)
    for target in (tmp_path / "whole.tif", out / "run.json"):
        res = run("evaluate-objects", out, "--labels", tmp_path / "whole.tif", "--json", target, "--overwrite", code=2)
        assert "would replace" in res.output


def test_instance_label_files_are_checked_before_training(objects_data, tmp_path, caplog):
    """Labels that cannot train or score say so in one line, before any training: objects only on nodata, a file
    that is neither raster nor vector, an id raster in another CRS; an id raster's nodata means no object and its ids
    may be large (hashed ids: renumbered, not tables sized by the largest)."""
    import geopandas as gpd
    import shapely

    from geoseg.instances.train import instance_targets
    from geoseg.io.sources import open_stack

    img, _, boxes = object_scene()
    img[:, :256] = 0  # the top half has no data
    t = from_origin(*ORIGIN, RES, RES)
    image = write_raster(tmp_path / "half.tif", img, crs="EPSG:32633", transform=t, nodata=0)
    top = [shapely.box(ORIGIN[0] + x0, ORIGIN[1] - y1, ORIGIN[0] + x1, ORIGIN[1] - y0) for y0, x0, y1, x1 in boxes if y1 < 250]
    gpd.GeoDataFrame(geometry=top, crs="EPSG:32633").to_file(tmp_path / "top.gpkg")
    res = run("train", image, "--task", "instance", "--labels", tmp_path / "top.gpkg", "--out", tmp_path / "m", "--epochs", 1,
              "--steps-per-epoch", 2, "--chip-size", 64, code=2)
    assert "where the image has data" in res.output and not (tmp_path / "m").exists()
    (tmp_path / "labels.csv").write_text("a,b\n1,2\n")
    res = run("train", objects_data["image"], "--task", "instance", "--labels", tmp_path / "labels.csv", "--out", tmp_path / "m2",
              code=2)
    assert "neither a raster GDAL can read nor a vector file" in res.output
    _, ids, _ = object_scene()
    other = write_raster(tmp_path / "ids_34.tif", ids, crs="EPSG:32634", transform=t)
    res = run("train", objects_data["image"], "--task", "instance", "--labels", other, "--out", tmp_path / "m3", code=2)
    assert "EPSG:32634" in res.output and "EPSG:32633" in res.output and "gdalwarp" in res.output
    big = np.where(ids > 0, ids.astype(np.int64) + 4_000_000_000, -1)
    labels = write_raster(tmp_path / "ids_big.tif", big, crs="EPSG:32633", transform=t, nodata=-1)
    stack = open_stack([objects_data["image"]])
    inst, lab, classes = instance_targets(str(labels), stack.grid, Box(0, SIZE, 0, SIZE))
    assert inst.max() == len(boxes) == len(lab) - 1 and (inst > 0).sum() == (ids > 0).sum()
    assert ((inst > 0) == (ids > 0)).all() and len(np.unique(inst[ids > 0])) == len(boxes)
    # a float id raster whose nodata is NaN
    nan_ids = write_raster(tmp_path / "ids_nan.tif", np.where(ids > 0, ids.astype(np.float32), np.nan), crs="EPSG:32633",
                           transform=t, nodata=float("nan"))
    inst, _, _ = instance_targets(str(nan_ids), stack.grid, Box(0, SIZE, 0, SIZE))
    assert ((inst > 0) == (ids > 0)).all() and inst.max() == len(boxes)
    # points are not objects to outline; objects under 6 px are refused when every one is, left out (said) when some are
    centres = [shapely.Point(ORIGIN[0] + (x0 + x1) / 2, ORIGIN[1] - (y0 + y1) / 2) for y0, x0, y1, x1 in boxes]
    gpd.GeoDataFrame(geometry=centres, crs="EPSG:32633").to_file(tmp_path / "points.gpkg")
    res = run("train", objects_data["image"], "--task", "instance", "--labels", tmp_path / "points.gpkg", "--out", tmp_path / "m4", code=2)
    assert "Point" in res.output and "polygon" in res.output and not (tmp_path / "m4").exists()
    tiny = [shapely.box(ORIGIN[0] + x0, ORIGIN[1] - y0 - 2, ORIGIN[0] + x0 + 2, ORIGIN[1] - y0) for y0, x0, _, _ in boxes]  # 2 x 2 px
    gpd.GeoDataFrame(geometry=tiny, crs="EPSG:32633").to_file(tmp_path / "tiny.gpkg")
    res = run("train", objects_data["image"], "--task", "instance", "--labels", tmp_path / "tiny.gpkg", "--out", tmp_path / "m5", code=2)
    assert "smaller than 6 pixels" in res.output and not (tmp_path / "m5").exists()
    below = [g for g, b in zip(tiny, boxes) if b[2] >= 250][:3]  # apart from the top objects
    gpd.GeoDataFrame(geometry=below + top, crs="EPSG:32633").to_file(tmp_path / "some_tiny.gpkg")
    run("train", objects_data["image"], "--task", "instance", "--labels", tmp_path / "some_tiny.gpkg", "--out", tmp_path / "m6",
        "--epochs", 1, "--steps-per-epoch", 1, "--chip-size", 64, "--batch-size", 1)
    assert f"3 of {3 + len(top)} objects are smaller than 6 pixels" in caplog.text
    # a clip or an overlay leaves geometry collections: their polygon parts are the objects
    mixed = [shapely.GeometryCollection([g, g.centroid]) for g in top[:4]]
    gpd.GeoDataFrame(geometry=mixed, crs="EPSG:32633").to_file(tmp_path / "mixed.gpkg")
    inst, _, _ = instance_targets(str(tmp_path / "mixed.gpkg"), stack.grid, Box(0, SIZE, 0, SIZE))
    assert inst.max() == 4 and all((inst == k + 1).sum() == shapely.area(top[k]) for k in range(4))
    # generated class ids step over the background's; options the instance task does not take are refused
    gpd.GeoDataFrame({"kind": ["a", "b", "c"]}, geometry=top[:3], crs="EPSG:32633").to_file(tmp_path / "named.gpkg")
    run("train", objects_data["image"], "--task", "instance", "--labels", tmp_path / "named.gpkg", "--label-field", "kind",
        "--background", 1, "--out", tmp_path / "m7", "--epochs", 1, "--steps-per-epoch", 1, "--chip-size", 64, "--batch-size", 1)
    card = json.loads((tmp_path / "m7" / "model.json").read_text())
    assert [(c["id"], c["name"]) for c in card["classes"]] == [(1, "background"), (2, "a"), (3, "b"), (4, "c")]
    res = run("train", objects_data["image"], "--task", "instance", "--labels", objects_data["labels"], "--out", tmp_path / "m8",
              "--mmu", 40, "--members", 3, "--resume", code=2)
    assert "--mmu, --members, --resume do not apply to --task instance" in res.output and not (tmp_path / "m8").exists()


def test_metres_on_a_grid_in_degrees_are_refused_as_such(objects_data, tmp_path):
    img, _, _ = object_scene()
    image = write_raster(tmp_path / "deg.tif", img[:, :128, :128], crs="EPSG:4326", transform=from_origin(15.0, 37.0, 1e-5, 1e-5))
    res = run("predict", image, "--model", objects_data["model"], "--out", tmp_path / "o", "--max-object-size", "30m", code=2)
    assert "metres need a grid in metres" in res.output and not (tmp_path / "o").exists()


def test_prompts_off_the_scene_are_left_out_with_a_warning(tmp_path, caplog):
    import logging

    import geopandas as gpd
    import shapely
    from odc.geo.geobox import GeoBox

    from geoseg.instances.sam import read_prompts

    grid = GeoBox((100, 100), from_origin(*ORIGIN, RES, RES), "EPSG:32633")
    pts = [shapely.Point(ORIGIN[0] + 10, ORIGIN[1] - 10), shapely.Point(ORIGIN[0] + 500, ORIGIN[1] - 10),
           shapely.Point(ORIGIN[0] + 50, ORIGIN[1] - 60)]
    gpd.GeoDataFrame(geometry=pts, crs="EPSG:32633").to_file(tmp_path / "p.gpkg")
    with caplog.at_level(logging.WARNING, logger="geoseg.instances.sam"):
        prompts = read_prompts(str(tmp_path / "p.gpkg"), grid)
    assert [p["number"] for p in prompts] == [0, 2] and [p["centre"] for p in prompts] == [(10, 10), (60, 50)]
    assert "1 of 3 prompts lie off the scene" in caplog.text and "rows 1" in caplog.text


def test_an_unreadable_prediction_folder_is_one_line(tmp_path):
    """An emptied prediction.zarr beside a run.json (or a run.json without its grid) was a zarr or KeyError traceback."""
    out = tmp_path / "out"
    (out / "prediction.zarr").mkdir(parents=True)
    (out / "run.json").write_text("{}")
    labels = tmp_path / "l.geojson"
    labels.write_text('{"type": "FeatureCollection", "features": []}')
    res = run("evaluate-objects", out, "--labels", labels, code=2)
    assert "is unreadable" in res.output and "Traceback" not in res.output


def test_instance_training_reads_the_objects_extent_not_the_scene(tmp_path):
    """Objects on a 512 px part of a 2048 px scene: the training area is their extent (polygons' bounds, or an id
    raster read window by window), so imagery far from them is never read (its tile is corrupt here) and random
    chips fall where someone labelled. An id raster 20 px off the image's grid is refused (a tolerance on the
    coordinates themselves, 1e-5 of a northing of 4.1e6 m, let 41 m through)."""
    import geopandas as gpd
    import shapely

    from geoseg.instances.train import objects_extent, training_box
    from geoseg.io.sources import open_stack

    img, ids, boxes = object_scene()
    y, x = 1024, 1280
    big = np.full((3, 2048, 2048), 300, np.uint16)
    big[:, y:y + SIZE, x:x + SIZE] = img
    big_ids = np.zeros((2048, 2048), np.uint32)
    big_ids[y:y + SIZE, x:x + SIZE] = ids
    t = from_origin(*ORIGIN, RES, RES)
    image = write_raster(tmp_path / "big.tif", big, crs="EPSG:32633", transform=t)
    id_raster = write_raster(tmp_path / "ids.tif", big_ids, crs="EPSG:32633", transform=t)
    polys = [shapely.box(ORIGIN[0] + x + x0, ORIGIN[1] - y - y1, ORIGIN[0] + x + x1, ORIGIN[1] - y - y0) for y0, x0, y1, x1 in boxes]
    gpd.GeoDataFrame(geometry=polys, crs="EPSG:32633").to_file(tmp_path / "objects.gpkg")
    ys, xs = np.nonzero(big_ids)
    tight = Box(int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1)
    grid, scene = open_stack([str(image)]).grid, Box(0, 2048, 0, 2048)
    assert objects_extent(str(id_raster), grid, scene) == tight
    assert objects_extent(str(tmp_path / "objects.gpkg"), grid, scene) == Box(tight.y0 - 1, tight.y1 + 1, tight.x0 - 1, tight.x1 + 1)
    assert objects_extent(str(id_raster), grid, Box(0, 1000, 0, 2048)) is None
    # a small extent grows to a chip, kept in the region
    assert training_box(Box(10, 20, 2040, 2046), scene, 64) == Box(0, 64, 1984, 2048)
    with rasterio.open(image) as ds:
        offset, size = (int(ds.get_tag_item(f"BLOCK_{k}_0_0", "TIFF", bidx=1)) for k in ("OFFSET", "SIZE"))
    with open(image, "r+b") as f:  # the far top-left tile of band 1: unreadable
        f.seek(offset)
        f.write(b"\0" * size)
    for labels, name in ((tmp_path / "objects.gpkg", "mv"), (id_raster, "mr")):
        run("train", image, "--task", "instance", "--labels", labels, "--out", tmp_path / name, "--epochs", 1,
            "--steps-per-epoch", 1, "--chip-size", 64, "--batch-size", 1)
        card = json.loads((tmp_path / name / "model.json").read_text())
        r = card["training"]["region"]
        assert tight.y0 - 1 <= r[0] <= tight.y0 and tight.y1 <= r[1] <= tight.y1 + 1, r
        assert tight.x0 - 1 <= r[2] <= tight.x0 and tight.x1 <= r[3] <= tight.x1 + 1, r
        assert card["training"]["objects"] == len(boxes)
    res = run("train", image, "--task", "instance", "--labels", id_raster, "--out", tmp_path / "m2", "--window", 0, 0, 1000, 1000,
              code=2)
    assert "no object falls inside the training area" in res.output and not (tmp_path / "m2").exists()
    # a region's objects, most far from the scene: only the scene's are read, the classes are the whole file's
    from geoseg.instances.train import instance_targets

    far = [shapely.box(ORIGIN[0] + k * 10, ORIGIN[1] - 90000 - 8, ORIGIN[0] + k * 10 + 8, ORIGIN[1] - 90000) for k in range(200)]
    gpd.GeoDataFrame({"kind": ["house"] * len(polys) + ["shed"] * len(far)}, geometry=polys + far,
                     crs="EPSG:32633").to_crs(4326).to_file(tmp_path / "region.gpkg")
    inst, lab, classes = instance_targets(str(tmp_path / "region.gpkg"), grid, tight, field="kind")
    assert [c.name for c in classes] == ["background", "house", "shed"] and len(lab) == len(polys) + 1
    assert inst.max() == len(polys)
    off = write_raster(tmp_path / "ids_off.tif", big_ids, crs="EPSG:32633", transform=from_origin(ORIGIN[0] + 20, ORIGIN[1], RES, RES))
    res = run("train", image, "--task", "instance", "--labels", off, "--out", tmp_path / "m3", code=2)
    assert "not on the image's grid" in res.output and not (tmp_path / "m3").exists()


def test_resume_of_an_object_model_s_job_says_it_recomputes(objects_data, tiny_sam, client, tmp_path):
    """An object model's run is made whole again (its objects are joined across the scene): --resume says it
    recomputes, where it said it made the missing outputs "from its chunks" and then ran every detection again."""
    import yaml

    from geoseg.jobs import execute, load_job, plan

    job = tmp_path / "job.yaml"
    settings = {"name": "objects", "scenes": [str(objects_data["image"])], "model": str(tiny_sam / "model"),
                "output": "out", "chunking": {"chunk_size": 256}, "outputs": {"cog": False, "vectors": False}}
    job.write_text(yaml.safe_dump(settings))
    done = execute(plan(load_job(job, env={}, config_files=[])), client=client)
    assert [s["status"] for s in done["scenes"]] == ["computed"]
    job.write_text(yaml.safe_dump({**settings, "outputs": {"cog": False, "vectors": True}}))
    res = run("run", job, "--resume", "--dry-run")
    assert "recomputing (--resume: an object model's run is not resumed)" in res.output
    assert "from its chunks" not in res.output


def test_a_panoptic_object_over_semantic_nodata_is_drawn_as_the_raster_shows_it(tmp_path):
    """An object across a chunk line over the semantic map's nodata: its polygon and pixel count are those of the
    raster (no object where the class map is nodata); the chunk that owns it counted the pixels beyond its core that
    its neighbour leaves empty (160 px for 80 in the raster)."""
    import shapely
    import zarr
    from affine import Affine

    from geoseg.instances import merge
    from geoseg.instances.net import detections
    from geoseg.instances.run import paint_plan
    from geoseg.instances.tasks import paint_chunk
    from geoseg.tiling import Box, TilingPlan

    h = w = 64
    plan = TilingPlan.make((h, w), stride=4, chunk_size=32, halo=16)
    dets = {}
    for ch in plan:  # one object, rows 10-20, cols 24-40: its box centre (col 32) in chunk (0, 1)
        win = ch.input
        b = Box(10, 20, 24, 40).intersect(win)
        d = detections([(np.ones(b.shape, bool), b.y0 - win.y0, b.x0 - win.x0)], np.array([0.9]), np.ones(1, int),
                       np.ones(win.shape, bool), (0, 1), {"min_object_px": 1}, (win.y0, win.x0))
        dets[(ch.iy, ch.ix)] = {**d, "window": win, "core": ch.core, "valid": np.ones(ch.core.shape, bool)}
    objects = merge.resolve(dets, [], (h, w))
    store = tmp_path / "store.zarr"
    g = zarr.open_group(store, mode="w")
    g.create_array("instance_id", shape=(h, w), chunks=(32, 32), dtype="uint32", fill_value=0)
    sem = np.full((h, w), 3, np.uint8)
    sem[:, :32] = 255  # the semantic model saw nothing on the west half
    g.create_array("class_id", shape=(h, w), chunks=(32, 32), dtype="uint8", fill_value=0)[:] = sem
    records = []
    for ch, region, owned, needed in paint_plan(plan, objects):
        records += paint_chunk(str(store), ch, region, needed, [o.id for o in owned], dets, Affine.identity(), None, False, {1: 7})
    raster = np.asarray(g["instance_id"][:]) == 1
    assert raster.sum() == 80 and [r["pixels"] for r in records] == [80]
    assert shapely.from_wkb(records[0]["wkb"]).area == 80
    assert (np.asarray(g["class_id"][:])[raster] == 7).all() and (np.asarray(g["class_id"][:, :32]) == 255).all()


def test_predict_options_an_object_model_has_no_use_for_are_refused(objects_data, tiny_sam, tmp_path):
    """--exact, --tile-size, --precision bf16 and --halo beside --max-object-size were accepted and dropped (run.json
    said fp32): refused before anything runs, naming them."""
    for extra, named in ((["--exact"], "--exact"), (["--tile-size", 128], "--tile-size"), (["--precision", "bf16"], "--precision bf16"),
                         (["--halo", 16, "--max-object-size", 40], "--halo with --max-object-size")):
        res = run("predict", objects_data["image"], "--model", tiny_sam / "model", "--out", tmp_path / "o", *extra, code=2)
        assert named in res.output and "do not apply to a sam model" in res.output, res.output
        assert not (tmp_path / "o").exists()


def test_sam_s_stretch_leaves_out_what_an_alpha_band_hides_on_scenes_of_any_size(tmp_path):
    """Above 1024 px a side the stretch is read decimated; it counted the pixels an alpha band hides (a black collar:
    [0, 200] at 1100 px against [150, 200] at 1000 px), which squashed the contrast SAM sees."""
    import types

    from rasterio.transform import from_origin

    from geoseg.instances.sam import scene_stretch
    from geoseg.io.sources import open_stack

    card = types.SimpleNamespace(band_roles=("red", "green", "blue"), n_bands=3)
    stretches = []
    for n in (1000, 1100):
        rgb = np.full((3, n, n), 150, np.uint8)
        rgb[:, :, : n // 2] = 0  # the collar, hidden by alpha
        rgb[:, n // 2:, n // 2:] = 200
        alpha = np.zeros((n, n), np.uint8)
        alpha[:, n // 2:] = 255
        path = tmp_path / f"rgba{n}.tif"
        with rasterio.open(path, "w", driver="GTiff", width=n, height=n, count=4, dtype="uint8", crs="EPSG:32633",
                           transform=from_origin(500000, 6000000, 1, 1), photometric="RGB", alpha="YES") as ds:
            ds.write(rgb, [1, 2, 3])
            ds.write(alpha, 4)
        stretches.append(scene_stretch(open_stack([str(path)]), card))
    assert stretches[0] == stretches[1] == [[150.0, 200.0]] * 3
