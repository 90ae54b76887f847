"""``geoseg train --task instance``: a Mask R-CNN from one polygon per object or an instance-id raster.

Chips are cut from the training area (four in five centred near an object, the rest anywhere),
turned by a random D4 element, and fed to torchvision's Mask R-CNN with AdamW and a cosine
schedule. The card records the largest object seen (``max_object_px``): the halo predict gives
its chunks, so an object is always seen whole by the window whose core holds its centre.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from geoseg.errors import InputError
from geoseg.instances.net import DEFAULTS, STRIDE, build_maskrcnn
from geoseg.io.sources import grid_of, open_stack, read_bands
from geoseg.model.card import DEFAULT_COLORS, NODATA_CLASS, ClassInfo, ModelCard, Normalization
from geoseg.tiling import Box, round_up

log = logging.getLogger(__name__)

MIN_OBJECT_PX = 6  # objects smaller than this are no training targets (a mask of a few pixels teaches nothing)


@dataclass(frozen=True)
class InstanceConfig:
    chip_size: int = 256
    batch_size: int = 4
    steps: int = 400
    lr: float = 1e-3
    weight_decay: float = 1e-4
    encoder: str = "resnet18"
    seed: int = 0
    max_object_px: int | None = None  # None: from the labels (largest object side, +25%)
    score_threshold: float = DEFAULTS["score_threshold"]
    device: str = "auto"  # auto: a CUDA GPU where there is one, else the CPU


def _objects_frame(labels: str, grid: Any, layer: str | None) -> tuple[Any, bool]:
    """The polygons of ``labels`` that can meet the image (``scene_bbox``: the others are not read), in the
    image's CRS, one per object (a clip's geometry collections: their polygon parts); and whether the file was
    read in part."""
    from geoseg.training.labels import _read_vector, scene_bbox

    bbox = scene_bbox(labels, layer, grid)
    gdf = _read_vector(labels, layer, bbox=bbox)
    if gdf.crs is None:
        raise InputError(f"{labels}: the polygons have no CRS; set one (ogr2ogr -a_srs) so they can be placed on the image")
    gdf = gdf[gdf.geometry.notna() & ~gdf.geometry.is_empty].to_crs(grid.crs.to_wkt())
    if (gdf.geom_type == "GeometryCollection").any():  # what a clip or an overlay leaves: its polygon parts
        import shapely

        def polygons(g: Any) -> Any:
            parts = [p for p in getattr(g, "geoms", [g]) if p.geom_type in ("Polygon", "MultiPolygon")]
            return shapely.union_all(parts) if parts else g

        gdf = gdf.assign(geometry=gdf.geometry.map(polygons))
    kinds = set(gdf.geom_type) - {"Polygon", "MultiPolygon"}
    if kinds:
        raise InputError(f"{labels}: instance labels are one polygon per object, and this file has {', '.join(sorted(kinds))} "
                         "geometries; outline the objects (points or lines can be buffered to polygons first)")
    return gdf, bbox is not None


def _open_ids(labels: str, grid: Any) -> Any:
    """An instance-id raster on the image's grid, opened (the caller closes it); a clear error for anything else."""
    import rasterio
    from odc.geo.geobox import GeoBox
    from rasterio.errors import RasterioIOError

    from geoseg.io.sources import grid_difference
    from geoseg.training.labels import _crs_name, crs_equivalent

    try:
        ds = rasterio.open(labels)
    except RasterioIOError as exc:
        raise InputError(
            f"{labels}: neither a raster GDAL can read nor a vector file ({str(exc).splitlines()[0]}); "
            "give an instance-id raster (GeoTIFF, 0 = no object) or polygons (GeoPackage, GeoJSON, Shapefile)"
        ) from None
    try:
        lcrs = grid_of(ds, labels).crs
        same_crs = lcrs == grid.crs or crs_equivalent(lcrs, grid.crs)
        # origins within a millionth of a pixel (a tolerance on the coordinates themselves passed tens of metres)
        if not same_crs or grid_difference(grid, GeoBox(ds.shape, ds.transform, grid.crs)) is not None:
            raise InputError(f"{labels}: instance raster is not on the image's grid (its CRS {_crs_name(lcrs)}, shape {ds.shape}, "
                             f"transform {tuple(ds.transform)[:6]}; the image's {_crs_name(grid.crs)}, {tuple(grid.shape)}, "
                             f"{tuple(grid.affine)[:6]}); warp it to the image first (gdalwarp -t_srs -tr -te)")
    except BaseException:
        ds.close()
        raise
    return ds


def _id_nodata(ds: Any, raw: np.ndarray) -> np.ndarray:
    if ds.nodata is None:
        return np.zeros(raw.shape, bool)
    return np.isnan(raw) if np.isnan(ds.nodata) else raw == ds.nodata


def objects_extent(labels: str, grid: Any, region: Box, layer: str | None = None, frame: tuple[Any, bool] | None = None
                   ) -> Box | None:
    """The smallest box of ``region`` that holds every object of ``labels`` (None: none there): the polygons'
    bounds (``frame``: them as ``_objects_frame`` read them), or an instance-id raster read window by window
    (never the whole scene at once)."""
    from geoseg.training.chips import bounds_box, scan_extent
    from geoseg.training.labels import is_vector

    if is_vector(labels):
        gdf, _ = frame or _objects_frame(labels, grid, layer)
        return bounds_box(grid, gdf.total_bounds, region) if len(gdf) else None
    with _open_ids(labels, grid) as ds:

        def objects(win: Box) -> np.ndarray:
            raw = ds.read(1, window=win.window)
            return (raw != 0) & ~_id_nodata(ds, raw)

        return scan_extent(objects, region)[0]


def training_box(extent: Box, region: Box, side: int) -> Box:
    """``extent`` grown about its centre to at least ``side`` px a side where ``region`` has room, kept in ``region``."""

    def grow(a0: int, a1: int, r0: int, r1: int) -> tuple[int, int]:
        n = min(max(a1 - a0, side), r1 - r0)
        lo = min(max(r0, (a0 + a1 - n) // 2), r1 - n)
        return lo, lo + n

    (y0, y1), (x0, x1) = grow(extent.y0, extent.y1, region.y0, region.y1), grow(extent.x0, extent.x1, region.x0, region.x1)
    return Box(y0, y1, x0, x1)


def instance_targets(labels: str, grid: Any, box: Box, field: str | None = None, background: int = 0, layer: str | None = None,
                     frame: tuple[Any, bool] | None = None) -> tuple[np.ndarray, np.ndarray, tuple[ClassInfo, ...]]:
    """Object ids (uint32, 0 = none) over ``box``, the network label of each id, and the classes
    (background first). ``labels``: polygons (one per object; classes from ``field``, else one
    class; ``frame``: them as ``_objects_frame`` read them) or an instance-id raster on the image's grid (one class)."""
    from affine import Affine

    from geoseg.training.labels import file_values, is_vector

    if is_vector(labels):
        from rasterio.features import rasterize

        gdf, part = frame or _objects_frame(labels, grid, layer)
        if field is not None and field not in gdf.columns:
            raise InputError(f"{labels}: no field {field!r}; fields are {', '.join(c for c in gdf.columns if c != 'geometry')}")
        if field is not None and gdf[field].isna().any():
            missing = int(gdf[field].isna().sum())
            if missing == len(gdf):
                raise InputError(f"{labels}: no polygon has a value in the field {field!r}; give the field that holds the classes")
            log.warning("%s: %d of %d polygons have no value in %r: left out (neither objects nor background)",
                        labels, missing, len(gdf), field)
            gdf = gdf[gdf[field].notna()]
        # classes over the whole file, as if it had been read whole: one file gives every scene the same ids
        every = (file_values(labels, layer, field) if part else gdf[field]) if field else None
        values = sorted(set(every.tolist()) | set(gdf[field].tolist())) if field else ["object"]
        numeric = field is not None and all(isinstance(v, (int, np.integer)) and 0 <= v <= 254 and v != background for v in values)
        free = [v for v in range(1, NODATA_CLASS) if v != background]  # 255 is the class map's nodata
        if len(values) > len(free):
            raise InputError(f"{labels}: {len(values)} classes in {field!r}; at most {len(free)} fit beside the background "
                             f"(class ids 0-{NODATA_CLASS - 1}, {NODATA_CLASS} is nodata)")
        ids = [int(v) for v in values] if numeric else free[:len(values)]
        names = [f"class_{v}" for v in values] if numeric else [str(v) for v in values]
        label_of = {v: k + 1 for k, v in enumerate(values)}
        t = grid.affine @ Affine.translation(box.x0, box.y0)
        shapes = [(g, n + 1) for n, g in enumerate(gdf.geometry)]
        inst = rasterize(shapes, out_shape=box.shape, transform=t, fill=0, dtype="uint32") if shapes else np.zeros(box.shape, np.uint32)
        lab = np.zeros(len(gdf) + 1, np.int64)
        lab[1:] = [label_of[v] for v in (gdf[field] if field else ["object"] * len(gdf))]
    else:
        with _open_ids(labels, grid) as ds:
            raw = ds.read(1, window=box.window)
            nodata = _id_nodata(ds, raw)
        if np.issubdtype(raw.dtype, np.floating) and not np.isfinite(raw[~nodata]).all():
            raise InputError(f"{labels}: the instance raster holds NaN or infinite values that are not its nodata; "
                             "set its nodata (gdal_edit -a_nodata nan) or give whole-number ids")
        some = (raw != 0) & ~nodata  # nodata: no object
        ids_ = raw[some]
        if np.issubdtype(raw.dtype, np.floating):
            frac = ids_[ids_ != np.floor(ids_)]
            if frac.size:  # a cast would make ids 1.0 and 1.5 one object
                raise InputError(f"{labels}: instance ids must be whole numbers (it holds {float(frac[0])!r}); "
                                 "give one integer id per object (e.g. gdal_calc.py --calc 'round(A)' --type UInt32)")
        if ids_.size and ids_.min() < 0:
            raise InputError(f"{labels}: instance ids must be >= 0 (0 = no object; or set the raster's nodata)")
        # ids renumbered 1..n in order (hashed or OSM ids run to 2**32: tables sized by the largest id would not fit);
        # only the objects' pixels are sorted, not the whole box
        _, inv = np.unique(ids_, return_inverse=True)
        inst = np.zeros(raw.shape, np.uint32)
        inst[some] = inv.ravel() + 1
        lab = np.zeros(int(inst.max()) + 1, np.int64)
        lab[1:] = 1
        ids, names = [1 if background != 1 else 2], ["object"]
    classes = (ClassInfo(id=background, name="background", color="#bababa"),) + tuple(
        ClassInfo(id=i, name=n, color=DEFAULT_COLORS[k % len(DEFAULT_COLORS)]) for k, (i, n) in enumerate(zip(ids, names)))
    return inst, lab, classes


def _object_boxes(inst: np.ndarray) -> dict[int, tuple[int, int, int, int]]:
    from scipy import ndimage

    out = {}
    for i, sl in enumerate(ndimage.find_objects(inst.astype(np.int64)), start=1):
        if sl is not None:
            out[i] = (sl[0].start, sl[1].start, sl[0].stop, sl[1].stop)
    return out


def _target(ids: np.ndarray, lab: np.ndarray, min_px: int = MIN_OBJECT_PX) -> dict[str, torch.Tensor]:
    boxes, masks, labels = [], [], []
    for i in np.unique(ids[ids > 0]):
        m = ids == i
        if m.sum() < min_px:
            continue
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        boxes.append([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])
        masks.append(m)
        labels.append(int(lab[i]))
    h, w = ids.shape
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.from_numpy(np.stack(masks).astype(np.uint8)) if masks else torch.zeros((0, h, w), dtype=torch.uint8)}


def train_instances(images: Sequence[str], labels: str, out_dir: str | Path, config: InstanceConfig = InstanceConfig(), *,
                    region: Box | None = None, field: str | None = None, background: int = 0, layer: str | None = None,
                    overwrite: bool = False,
                    progress: Callable[[dict[str, Any]], None] | None = None) -> ModelCard:
    """Train a Mask R-CNN on ``region`` of ``images`` (the whole scene by default) and write its model directory."""
    from geoseg import __version__
    from geoseg.errors import OutputExistsError
    from geoseg.infer import normalize
    from geoseg.model.store import save_model
    from geoseg.training.chips import augment
    from geoseg.training.loop import band_infos

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:  # said now, not after training
        raise OutputExistsError(f"{out}: already exists and is not empty; choose another directory or pass --overwrite")
    stack = open_stack(images)
    h, w = stack.shape
    region = region or Box(0, h, 0, w)
    if min(region.shape) < STRIDE:
        raise InputError(f"the training area {region.shape} is smaller than one {STRIDE} px chip; give a larger area")
    # The training area is the objects' extent (grown to a chip), not the scene: memory and reads follow the
    # labels, and chips drawn "anywhere" fall where someone labelled, not where unlabelled objects would teach
    # the network to miss them.
    from geoseg.training.labels import is_vector

    frame = _objects_frame(labels, stack.grid, layer) if is_vector(labels) else None  # read once, for both below
    extent = objects_extent(labels, stack.grid, region, layer, frame)
    if extent is None:
        raise InputError(f"{labels}: no object falls inside the training area of {images[0]} (rows {region.y0}-{region.y1}, "
                         f"cols {region.x0}-{region.x1}); check the labels' CRS and extent, and the region")
    box = training_box(extent, region, config.chip_size)
    cs = min(config.chip_size, box.shape[0], box.shape[1]) // STRIDE * STRIDE
    inst, lab, classes = instance_targets(labels, stack.grid, box, field, background, layer, frame)
    data, valid = read_bands(stack, box.window)
    ok = valid.all(axis=0)
    inst = np.where(ok, inst, 0)  # objects on nodata are none: checked now, not after training
    objects = _object_boxes(inst)
    if not objects:
        raise InputError(f"{labels}: no object falls inside the training area of {images[0]} where the image has data; "
                         "check the region, the CRS and the image's nodata")
    sizes = np.bincount(inst.ravel(), minlength=max(objects) + 1)
    small = [i for i in objects if sizes[i] < MIN_OBJECT_PX]
    if len(small) == len(objects):
        raise InputError(f"{labels}: every object is smaller than {MIN_OBJECT_PX} pixels of {images[0]} (largest "
                         f"{int(sizes[1:].max())} px), too small to learn masks from; outline the objects as polygons at "
                         "this resolution, or train on finer imagery")
    if small:
        log.warning("%s: %d of %d objects are smaller than %d pixels: left out as training targets",
                    labels, len(small), len(objects), MIN_OBJECT_PX)
        objects = {i: b for i, b in objects.items() if sizes[i] >= MIN_OBJECT_PX}
    stats = [(float(v.mean()), max(float(v.std()), 1e-6)) for v in (data[b][ok] for b in range(stack.count))]  # a band at a time
    norm = Normalization(mean=tuple(m for m, _ in stats), std=tuple(s for _, s in stats))
    card_probe = ModelCard(bands=tuple(band_infos(stack)), normalization=norm, classes=classes, stride=STRIDE, receptive_field=0,
                           default_halo=0)
    x = normalize(data, ok, card_probe, valid)
    del data, valid
    largest = max(max(b[2] - b[0], b[3] - b[1]) for b in objects.values())
    max_px = config.max_object_px or max(STRIDE, round_up(math.ceil(largest * 1.25), STRIDE))

    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    from geoseg.runtime import pick_device

    device = pick_device(config.device)
    net = build_maskrcnn(config.encoder, stack.count, len(classes), {"score_threshold": config.score_threshold}).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warm = max(1, config.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, config.steps) / config.steps)))
    centres = np.array([((b[0] + b[2]) // 2, (b[1] + b[3]) // 2) for b in objects.values()])
    H, W = box.shape
    net.train()
    t0, losses = time.perf_counter(), []
    for step in range(config.steps):
        xs, ts = [], []
        for _ in range(config.batch_size):
            if rng.random() < 0.8:
                cy, cx = centres[rng.integers(len(centres))] + rng.integers(-cs // 3, cs // 3 + 1, 2)
                y0, x0 = int(np.clip(cy - cs // 2, 0, H - cs)), int(np.clip(cx - cs // 2, 0, W - cs))
            else:
                y0, x0 = int(rng.integers(0, H - cs + 1)), int(rng.integers(0, W - cs + 1))
            cx_, ci = augment(x[:, y0:y0 + cs, x0:x0 + cs], inst[y0:y0 + cs, x0:x0 + cs], rng)
            xs.append(torch.from_numpy(cx_).to(device))
            ts.append({k: v.to(device) for k, v in _target(ci, lab).items()})
        loss_parts = net(xs, ts)
        loss = sum(loss_parts.values())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 10.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if progress is not None and ((step + 1) % 25 == 0 or step + 1 == config.steps):
            progress({"step": step + 1, "steps": config.steps, "loss": float(np.mean(losses[-25:])),
                      "seconds": round(time.perf_counter() - t0, 1)})
    net.eval()
    counts = np.bincount(inst.ravel().astype(np.int64))[1:]
    smallest = int(counts[counts > 0].min())
    params = {**DEFAULTS, "max_object_px": max_px, "score_threshold": config.score_threshold,
              "min_object_px": max(DEFAULTS["min_object_px"], smallest // 4)}
    card = card_probe.model_copy(update=dict(
        arch="maskrcnn", encoder=config.encoder, method="instance", method_params=params, tile_size=round_up(cs, STRIDE),
        receptive_field=max_px, default_halo=max_px,
        provenance={"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "geoseg": __version__, "source": "geoseg train --task instance"},
        training={"task": "instance", "images": [str(i) for i in images], "labels": str(labels),
                  "region": [box.y0, box.y1, box.x0, box.x1], "objects": len(objects), "largest_object_px": int(largest),
                  "steps": config.steps, "batch_size": config.batch_size, "chip_size": cs, "lr": config.lr, "seed": config.seed,
                  "final_loss": float(np.mean(losses[-25:])), "seconds": round(time.perf_counter() - t0, 1), "device": device}))
    card = ModelCard.model_validate(card.model_dump())
    save_model(net, card, out_dir, overwrite)
    return card
