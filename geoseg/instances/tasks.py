"""What the workers run for objects: detect in a chunk's window, match two windows, paint a chunk
(pure kernels in ``net``, ``merge`` and ``sam``; reads and writes here at the edges)."""

from __future__ import annotations

from typing import Any

import numpy as np

from geoseg.errors import detached
from geoseg.infer import normalize, pixel_valid
from geoseg.instances import merge
from geoseg.instances.net import detect
from geoseg.io.sources import RasterStack, read_bands
from geoseg.model.card import NODATA_CLASS, ModelCard
from geoseg.runtime import ModelRef, get_model
from geoseg.tiling import Box, Chunk


def background_id(card: ModelCard) -> int:
    """The class of pixels no object covers: the card's first class (network label 0)."""
    return card.classes[0].id


@detached
def detect_chunk(ref: ModelRef, stack: RasterStack, chunk: Chunk, params: dict[str, Any],
                 prompts: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Detections in ``chunk``'s window (scene pixels), with the window, the core and the core's
    valid pixels. SAM: automatic masks, or one per prompt of ``prompts`` (its ``index``)."""
    bundle = get_model(ref)
    card = bundle.card
    data, valid = read_bands(stack, chunk.input.window)
    ok = pixel_valid(card, valid)
    offset = (chunk.input.y0, chunk.input.x0)
    if card.method == "sam":
        from geoseg.instances.sam import sam_detect

        dets = sam_detect(bundle.net, data, ok, card, params, offset, prompts)
    else:
        dets = detect(bundle.net, normalize(data, ok, card, valid), ok, card.class_ids, {**card.method_params, **params},
                      offset=offset, device=bundle.device)
    return {**dets, "window": chunk.input, "core": chunk.core, "valid": ok[chunk.core.relative_to(chunk.input)]}


def meta(dets: dict[str, Any]) -> dict[str, Any]:
    """What the client needs of a window's detections: everything but the masks."""
    return {k: dets[k] for k in ("boxes", "scores", "labels", "index", "window", "core")}


@detached
def match_windows(a: dict[str, Any], b: dict[str, Any], min_iou: float) -> list[tuple[int, int]]:
    return merge.match(a, a["window"], b, b["window"], min_iou)


def _polygon(mask: np.ndarray, box: Box, affine: Any) -> Any:
    import shapely
    from affine import Affine
    from rasterio.features import shapes

    t = affine @ Affine.translation(box.x0, box.y0)
    # 4-connected, as the class polygons: with 8, pixels touching at a corner made one ring that touches itself there,
    # which GEOS, OGR and QGIS call invalid; here they are parts of a MultiPolygon that meet at a point (valid)
    parts = [shapely.geometry.shape(g) for g, v in shapes(mask.astype(np.uint8), mask=mask, transform=t, connectivity=4) if v]
    return parts[0] if len(parts) == 1 else shapely.MultiPolygon(parts)


@detached
def paint_chunk(store: str, chunk: Chunk, region: Box, objects: list[merge.SceneObject], owned: list[int],
                dets: dict[tuple[int, int], dict[str, Any]], affine: Any, background: int | None,
                label_by_map: bool = False, class_map: dict[int, int] | None = None) -> list[dict[str, Any]]:
    """Paint ``objects`` over ``region`` (the chunk's core and its ``owned`` objects' boxes: ``run.paint_plan``)
    and write the core into the store; the polygons of the ``owned`` objects (the visible part: where
    objects overlap the higher score wins, as in the raster).

    ``background`` None (panoptic): the store's class map is a semantic model's; objects are laid
    over it (their pixels take their class) and none is drawn where it is nodata. ``label_by_map``
    (panoptic with SAM, whose masks have no class): the class map stays; each object takes the
    class most of its pixels have there. ``class_map``: the object classes' ids in the panoptic legend."""
    import shapely
    import zarr

    from geoseg.io import storage

    owned = set(owned)
    class_map = class_map or {}
    canvas = merge.paint(objects, dets, region)
    group = zarr.open_group(store, mode="r+", **storage.zarr_kwargs(store))
    around = None
    if background is None:
        # panoptic: no object where the semantic map is nodata, in the core or beyond it (an owned object's polygon
        # reaches into its neighbours' cores, which paint nothing there: it counted pixels the raster leaves empty)
        around = np.asarray(group["class_id"][region.y0:region.y1, region.x0:region.x1])
        canvas[around == NODATA_CLASS] = 0
    ids = canvas[chunk.core.relative_to(region)]
    valid = dets[(chunk.iy, chunk.ix)]["valid"]
    ids = np.where(valid, ids, 0).astype(np.uint32)
    lut = np.zeros(max([o.id for o in objects], default=0) + 1, np.uint8)
    for o in objects:
        lut[o.id] = class_map.get(o.class_id, o.class_id)
    sl = (slice(chunk.core.y0, chunk.core.y1), slice(chunk.core.x0, chunk.core.x1))
    if around is not None:
        classes = around[chunk.core.relative_to(region)].copy()  # nodata never changes: objects paint none there
        ids[classes == NODATA_CLASS] = 0
    else:
        classes = np.full(ids.shape, background, np.uint8)
        classes[~valid] = NODATA_CLASS
    canvas[chunk.core.relative_to(region)] = ids  # the polygons are what the raster shows
    if not label_by_map:
        classes = np.where(ids > 0, lut[ids], classes).astype(np.uint8)
        group["class_id"][sl] = classes
    group["instance_id"][sl] = ids
    semantic = None
    if label_by_map and owned:
        semantic = np.asarray(group["class_id"][region.y0:region.y1, region.x0:region.x1])
    out = []
    for o in objects:
        if o.id not in owned:
            continue
        box = o.extent
        mask = canvas[box.relative_to(region)] == o.id
        if not mask.any():
            continue
        cls = class_map.get(o.class_id, o.class_id)
        if semantic is not None:
            under = semantic[box.relative_to(region)][mask]
            under = under[under != NODATA_CLASS]
            cls = int(np.bincount(under).argmax()) if under.size else NODATA_CLASS
        out.append({"instance_id": o.id, "class_id": cls, "score": o.score, "pixels": int(mask.sum()),
                    "wkb": shapely.to_wkb(_polygon(mask, box, affine))})
    return out
