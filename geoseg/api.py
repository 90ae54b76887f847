"""The Python/xarray face of geoseg: lazy segmentations as xarray Datasets.

    >>> import geoseg
    >>> ds = geoseg.segment(["scene.tif"], "model_dir")        # lazy: nothing computed yet
    >>> ds.class_id.sel(x=slice(..), y=slice(..)).compute()     # on the active dask client, if any

Only the chunks a selection touches are read and segmented.
"""

from __future__ import annotations

import os
from typing import Sequence

import xarray as xr

from geoseg.bands import match_bands
from geoseg.graph import build_segmentation
from geoseg.infer import InferenceSettings
from geoseg.io.sources import open_stack
from geoseg.io.zarr_store import georeference, open_prediction, pixel_centres
from geoseg.model.card import NODATA_CLASS
from geoseg.model.store import open_model
from geoseg.numerics import resolve_current
from geoseg.runtime import ModelRef
from geoseg.tiling import plan_for

plan_tiling = plan_for


def segment(
    images: Sequence[str | os.PathLike],
    model: str | os.PathLike,
    *,
    chunk_size: int | None = None,
    halo: int | None = None,
    exact: bool = False,
    tile_size: int | None = None,
    precision: str = "auto",
    batch_size: int = 2,
    device: str = "auto",
) -> xr.Dataset:
    """A lazy Dataset (``class_id`` uint8 with 255 = nodata, ``confidence``) on the input's grid."""
    stack = open_stack([str(p) for p in images])
    opened = open_model(model)
    card = opened.card
    stack = match_bands(stack, card, str(model))
    plan = plan_tiling(card, stack.shape, chunk_size=chunk_size, halo=halo, exact=exact, tile_size=tile_size)
    ref = ModelRef(opened.location, opened.digest, device)
    numerics = resolve_current(precision, device, exact)
    seg = build_segmentation(stack, plan, ref, InferenceSettings(numerics.precision, batch_size))
    y, x = pixel_centres(stack.grid)
    ds = xr.Dataset({"class_id": (("y", "x"), seg.class_id), "confidence": (("y", "x"), seg.confidence)},
                    coords={"y": y, "x": x})
    ds["class_id"].attrs.update(nodata=NODATA_CLASS, classes={c.id: c.name for c in card.classes})
    return georeference(ds, stack.grid)


__all__ = ["open_prediction", "plan_tiling", "segment"]
