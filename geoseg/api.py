"""The Python/xarray face of geoseg: lazy segmentations as xarray Datasets.

    >>> import geoseg
    >>> ds = geoseg.segment(["scene.tif"], "model_dir")        # lazy: nothing computed yet
    >>> ds.class_id.sel(x=slice(..), y=slice(..)).compute()     # on the active dask client, if any

Only the chunks a selection touches are read and segmented.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import xarray as xr

from geoseg.bands import match_bands
from geoseg.errors import ConfigError
from geoseg.graph import build_segmentation
from geoseg.infer import InferenceSettings
from geoseg.io.sources import open_stack
from geoseg.io.zarr_store import georeference, open_prediction, pixel_centres
from geoseg.model.card import NODATA_CLASS, ModelCard
from geoseg.model.store import check_model_dir, model_digest
from geoseg.runtime import ModelRef
from geoseg.tiling import TilingPlan

DEFAULT_CHUNK = 1024


def plan_tiling(
    card: ModelCard,
    shape: tuple[int, int],
    *,
    chunk_size: int | None = None,
    halo: int | None = None,
    exact: bool = False,
    tile_size: int | None = None,
) -> TilingPlan:
    """The tiling a model gets on a scene: the card's defaults, ``exact`` = halo of the receptive field."""
    if exact and halo is not None and halo < card.exact_halo:
        raise ConfigError(f"--exact needs a halo of at least {card.exact_halo} px (the receptive field); drop --halo or raise it")
    if halo is not None and halo < 0:
        raise ConfigError(f"--halo must be >= 0, got {halo}")
    chosen = halo if halo is not None else (card.exact_halo if exact else card.default_halo)
    return TilingPlan.make(shape, stride=card.stride, chunk_size=chunk_size or DEFAULT_CHUNK, halo=chosen,
                           tile_size=tile_size or card.tile_size)


def segment(
    images: Sequence[str | os.PathLike],
    model: str | os.PathLike,
    *,
    chunk_size: int | None = None,
    halo: int | None = None,
    exact: bool = False,
    tile_size: int | None = None,
    precision: str = "fp32",
    batch_size: int = 2,
    device: str = "auto",
) -> xr.Dataset:
    """A lazy Dataset (``class_id`` uint8 with 255 = nodata, ``confidence``) on the input's grid."""
    stack = open_stack([str(p) for p in images])
    card = check_model_dir(model)
    stack = match_bands(stack, card, str(model))
    plan = plan_tiling(card, stack.shape, chunk_size=chunk_size, halo=halo, exact=exact, tile_size=tile_size)
    ref = ModelRef(str(Path(model).resolve()), model_digest(Path(model)), device)
    seg = build_segmentation(stack, plan, ref, InferenceSettings(precision, batch_size))
    y, x = pixel_centres(stack.grid)
    ds = xr.Dataset({"class_id": (("y", "x"), seg.class_id), "confidence": (("y", "x"), seg.confidence)},
                    coords={"y": y, "x": x})
    ds["class_id"].attrs.update(nodata=NODATA_CLASS, classes={c.id: c.name for c in card.classes})
    return georeference(ds, stack.grid)


__all__ = ["open_prediction", "plan_tiling", "segment"]
