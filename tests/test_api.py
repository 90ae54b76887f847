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
