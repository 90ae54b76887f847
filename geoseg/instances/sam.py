"""Segment Anything (the ``segment-anything`` package) with a checkpoint the user provides.

``geoseg model init OUT --method sam --checkpoint sam_vit_b_01ec64.pth`` reads the checkpoint with
``torch.load(weights_only=True)`` (tensors only: no code runs), checks it fits the architecture,
and writes it as safetensors beside a card that records the checkpoint's sha256. Nothing is
downloaded. Without ``--checkpoint`` the weights are random (seeded): for plumbing checks only.

Per chunk, SAM sees the window as 8-bit RGB: the red, green and blue bands by role (else the first
three; one band is repeated), each stretched between its 2nd and 98th percentiles over the whole
scene (computed once on the client from a decimated read), so every chunk gets the same stretch.
Automatic masks come from SAM's grid of point prompts; prompted masks from points or boxes in map
coordinates, each prompt segmented by the chunk whose core holds it.
"""

from __future__ import annotations

import warnings
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from geoseg.errors import InputError, ModelError

# embed dim, depth, heads, global attention blocks, image size, prompt dim, window, decoder mlp, decoder heads
SAM_TYPES: dict[str, tuple] = {
    "vit_b": (768, 12, 12, (2, 5, 8, 11), 1024, 256, 14, 2048, 8),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23), 1024, 256, 14, 2048, 8),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31), 1024, 256, 14, 2048, 8),
    "tiny": (32, 2, 2, (1,), 256, 32, 4, 64, 2),  # random weights only: tests and plumbing checks
}
SAM_DEFAULTS: dict[str, Any] = {
    "points_per_side": 32,
    "score_threshold": 0.88,  # SAM's predicted IoU (pred_iou_thresh)
    "stability_threshold": 0.95,
    "nms_iou": 0.7,
    "min_object_px": 16,
    "max_object_px": 128,
}


def build_sam(model_type: str) -> torch.nn.Module:
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    if model_type not in SAM_TYPES:
        raise ModelError(f"SAM model type must be one of {', '.join(SAM_TYPES)}, not {model_type!r}")
    embed, depth, heads, glob, size, prompt, window, mlp, dheads = SAM_TYPES[model_type]
    grid = size // 16
    sam = Sam(
        image_encoder=ImageEncoderViT(depth=depth, embed_dim=embed, img_size=size, mlp_ratio=4,
                                      norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=heads, patch_size=16,
                                      qkv_bias=True, use_rel_pos=True, global_attn_indexes=glob, window_size=window,
                                      out_chans=prompt),
        prompt_encoder=PromptEncoder(embed_dim=prompt, image_embedding_size=(grid, grid), input_image_size=(size, size),
                                     mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=prompt, mlp_dim=mlp,
                                                                                        num_heads=dheads),
                                 transformer_dim=prompt, iou_head_depth=3, iou_head_hidden_dim=prompt),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
    )  # fmt: skip
    return sam.eval()


def read_checkpoint(path: str | Path, model_type: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, loaded without running any code (weights_only), checked against the architecture."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: SAM checkpoint not found; give the .pth file you downloaded (geoseg never downloads one)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle with code in it, truncated file...
            raise ModelError(f"{path}: not a plain tensor checkpoint ({str(exc).splitlines()[0][:160]}); "
                             "use the official SAM checkpoint or a safetensors file") from None
    state = state.get("model", state) if isinstance(state, dict) else state
    net = build_sam(model_type)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{path}: does not fit SAM {model_type} ({str(exc).splitlines()[0][:200]}); "
                         "check --sam-type (vit_b, vit_l or vit_h)") from None
    return {k: v.contiguous() for k, v in net.state_dict().items()}


def init_sam_model(out_dir: str | Path, *, model_type: str = "vit_b", checkpoint: str | Path | None = None, n_bands: int = 3,
                   seed: int = 0, params: dict[str, Any] | None = None, overwrite: bool = False):
    """A model directory for SAM: the checkpoint as safetensors and a card recording its sha256."""
    from safetensors.torch import save_file

    from geoseg.instances.net import DEFAULTS
    from geoseg.model.card import BandInfo, ClassInfo, ModelCard, Normalization
    from geoseg.model.store import check_new_model_dir, file_sha256, write_model_dir

    check_new_model_dir(out_dir, overwrite)  # before a checkpoint is read and converted
    if checkpoint is not None:
        state, digest, source = read_checkpoint(checkpoint, model_type), file_sha256(Path(checkpoint)), Path(checkpoint).name
    else:
        torch.manual_seed(seed)
        state, digest, source = {k: v.contiguous() for k, v in build_sam(model_type).state_dict().items()}, None, None
    p = {**DEFAULTS, **SAM_DEFAULTS, **(params or {}), "model_type": model_type, "checkpoint": source, "checkpoint_sha256": digest}
    halo = -(-int(p["max_object_px"]) // 16) * 16
    card = ModelCard(arch="sam", encoder=model_type, method="sam", method_params=p,
                     bands=tuple(BandInfo(name=f"band_{i + 1}") for i in range(n_bands)),
                     normalization=Normalization(mean=(0.0,) * n_bands, std=(1.0,) * n_bands),
                     classes=(ClassInfo(id=0, name="background", color="#bababa"), ClassInfo(id=1, name="object", color="#d7191c")),
                     stride=16, tile_size=SAM_TYPES[model_type][4], receptive_field=halo, default_halo=halo,
                     provenance={"source": "geoseg model init --method sam", "weights": "checkpoint" if source else "random",
                                 "seed": None if source else seed})

    def weights(path: Path) -> None:
        save_file(state, str(path), metadata={"format": "pt", "checkpoint_sha256": digest or ""})

    write_model_dir(out_dir, card, {"weights.safetensors": weights}, overwrite)
    return card


def rgb_positions(card: Any) -> list[int]:
    roles = list(card.band_roles)
    if all(r in roles for r in ("red", "green", "blue")):
        return [roles.index("red"), roles.index("green"), roles.index("blue")]
    n = card.n_bands
    return [0, 1, 2] if n >= 3 else [0, min(1, n - 1), 0]


def scene_stretch(stack: Any, card: Any, max_side: int = 1024) -> list[list[float]]:
    """Each RGB band's 2nd and 98th percentile over the scene (a decimated read of the valid pixels)."""
    from geoseg.io.sources import read_bands
    from rasterio.windows import Window

    h, w = stack.shape
    step = max(1, -(-max(h, w) // max_side))
    out = []
    for pos in rgb_positions(card):
        band = stack.select([pos])
        data, valid = read_bands(band, Window(0, 0, w, h)) if step == 1 else _decimated(band, h, w, step)
        v = data[0][valid[0]]
        lo, hi = (np.percentile(v, [2, 98]) if v.size else (0.0, 1.0))
        out.append([float(lo), float(hi if hi > lo else lo + 1)])
    return out


def _decimated(band: Any, h: int, w: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    import rasterio

    from geoseg.io import storage

    b = band.bands[0]
    with storage.gdal_env(b.path), rasterio.open(b.path) as ds:
        shape = (max(1, h // step), max(1, w // step))
        data = ds.read(b.band, out_shape=shape).astype(np.float32)
        valid = np.isfinite(data) & ((data != b.nodata) if b.nodata is not None else True)
        if b.mask is not None:  # what GDAL's mask or an alpha band hides, as the whole-scene read (read_bands) leaves out
            kind, band = b.mask
            hidden = ds.read_masks(band, out_shape=shape) if kind == "gdal" else ds.read(band, out_shape=shape)
            valid = valid & (hidden > 0)
    return data[None], np.broadcast_to(valid, data.shape)[None]


def to_rgb(data: np.ndarray, valid: np.ndarray, card: Any, stretch: Sequence[Sequence[float]]) -> np.ndarray:
    """(h, w, 3) uint8 from the bands SAM sees, with the scene's stretch; invalid pixels black."""
    out = np.zeros((*data.shape[1:], 3), np.uint8)
    for c, (pos, (lo, hi)) in enumerate(zip(rgb_positions(card), stretch)):
        out[..., c] = np.clip((data[pos] - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8)
    out[~valid] = 0
    return out


@torch.no_grad()
def sam_detect(sam: torch.nn.Module, data: np.ndarray, valid: np.ndarray, card: Any, params: dict[str, Any],
               offset: tuple[int, int], prompts: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """SAM's masks in one window as detections: automatic (``prompts`` None) or one per prompt
    (``index`` = the prompt's number; prompts in scene pixels)."""
    from segment_anything import SamAutomaticMaskGenerator, SamPredictor

    from geoseg.instances.net import detections, empty_detections

    p = {**SAM_DEFAULTS, **card.method_params, **params}
    rgb = to_rgb(data, valid, card, p["stretch"])
    if prompts is None:
        gen = SamAutomaticMaskGenerator(sam, points_per_side=int(p["points_per_side"]), pred_iou_thresh=float(p["score_threshold"]),
                                        stability_score_thresh=float(p["stability_threshold"]), box_nms_thresh=float(p["nms_iou"]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            anns = gen.generate(rgb)
        if not anns:
            return empty_detections()
        masks = np.stack([a["segmentation"] for a in anns])
        scores = np.array([a["predicted_iou"] for a in anns], np.float32)
        numbers = np.arange(len(anns))
    else:
        if not prompts:
            return empty_detections()
        pred = SamPredictor(sam)
        pred.set_image(rgb)
        masks, scores, numbers = [], [], []
        for pr in prompts:
            c = np.asarray(pr["coords"], np.float64) - np.array([offset[1], offset[0]] * (len(pr["coords"]) // 2))
            if pr["kind"] == "point":
                m, s, _ = pred.predict(point_coords=c[None, :2], point_labels=np.array([1]), multimask_output=False)
            else:
                m, s, _ = pred.predict(box=c[:4], multimask_output=False)
            masks.append(m[0])
            scores.append(float(s[0]))
            numbers.append(int(pr["number"]))
        masks, scores, numbers = np.stack(masks), np.asarray(scores, np.float32), np.asarray(numbers)
    # prompted masks: each prompt is its own object (never suppressed as another's duplicate)
    q = {**p, "mask_overlap": 1.0} if prompts is not None else p
    dets = detections([(m, 0, 0) for m in masks], scores, np.ones(len(scores), np.int64), valid, card.class_ids, q, offset)
    dets["index"] = numbers[dets["index"]] if len(dets["index"]) else dets["index"]
    return dets


def read_prompts(path: str, grid: Any) -> list[dict[str, Any]]:
    """Points (``point``) and polygons (their bounds: ``box``) of a vector file, reprojected onto the
    scene, in scene pixel coordinates (x, y); each with its row number."""
    from geoseg.training.labels import _read_vector

    gdf = _read_vector(path, None, "keep the prompts in a file of their own (ogr2ogr -f GPKG prompts.gpkg FILE LAYER)")
    if gdf.crs is None:
        raise InputError(f"{path}: the prompts have no CRS; set one (ogr2ogr -a_srs) so they can be placed on the scene")
    gdf = gdf.to_crs(grid.crs.to_wkt())
    inv = ~grid.affine
    h, w = grid.shape
    out = []
    for n, g in enumerate(gdf.geometry):
        if g is None or g.is_empty:
            continue
        if g.geom_type == "Point":
            x, y = inv @ (g.x, g.y)
            coords, kind = [x, y], "point"
        else:
            x0, y0, x1, y1 = g.bounds
            (ax, ay), (bx, by) = inv @ (x0, y0), inv @ (x1, y1)
            coords, kind = [min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)], "box"
        cx, cy = (coords[0] + coords[-2]) / 2, (coords[1] + coords[-1]) / 2
        if 0 <= cx < w and 0 <= cy < h:
            out.append({"number": n, "kind": kind, "coords": coords, "centre": (int(cy), int(cx))})
    if not out:
        raise InputError(f"{path}: none of its {len(gdf)} prompts lies on the scene; check the file and its CRS")
    on = {o["number"] for o in out}
    off = [n for n, g in enumerate(gdf.geometry) if g is not None and not g.is_empty and n not in on]
    if off:
        import logging

        logging.getLogger(__name__).warning("%s: %d of %d prompts lie off the scene and are left out (rows %s)", path, len(off),
                                            len(gdf), ", ".join(map(str, off[:10])) + (", ..." if len(off) > 10 else ""))
    return out
