"""Mask R-CNN (torchvision) for n-band rasters, and detection of one window.

Nothing is downloaded: the backbone is a torchvision ResNet built with ``weights=None`` whose
first convolution takes the card's bands; the FPN and heads are narrower than torchvision's
defaults (64 channels), which trains and runs several times faster on CPUs. Images are never
resized (the transform only pads to the stride), so a pixel of a window is a pixel of the map.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

ENCODERS = ("resnet18", "resnet34", "resnet50")
STRIDE = 32

# What a card's method_params may set, with the defaults a new model gets.
DEFAULTS: dict[str, Any] = {
    "fpn_channels": 64,
    "score_threshold": 0.5,  # detections below are dropped
    "nms_iou": 0.5,  # non-maximum suppression of boxes within a window (per class)
    "mask_threshold": 0.5,  # mask probability that counts as inside
    "match_iou": 0.5,  # detections of two windows are one object above this IoU on their shared area
    "max_detections": 2000,  # per window
    "max_object_px": 64,  # objects are expected no larger than this: the halo of the chunks
    "min_object_px": 4,  # masks of fewer pixels are dropped (training sets it to a quarter of its smallest object)
    "mask_overlap": 0.5,  # a mask more than this share covered by higher-scoring masks is a duplicate: dropped
}


class _NoResize(GeneralizedRCNNTransform):
    """torchvision's transform without the resize: windows keep their pixels (padding to the stride only)."""

    def resize(self, image, target=None):  # type: ignore[override]
        return image, target


def build_maskrcnn(encoder: str, n_inputs: int, n_classes: int, params: dict[str, Any] | None = None) -> torch.nn.Module:
    """Mask R-CNN with a ``encoder`` FPN backbone; ``n_classes`` counts the background (label 0)."""
    import torchvision
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    p = {**DEFAULTS, **(params or {})}
    if encoder not in ENCODERS:
        raise ValueError(f"instance encoder must be one of {', '.join(ENCODERS)}, not {encoder!r}")
    body = getattr(torchvision.models, encoder)(weights=None)
    body.conv1 = torch.nn.Conv2d(n_inputs, 64, kernel_size=7, stride=2, padding=3, bias=False)
    widths = [64, 128, 256, 512] if encoder != "resnet50" else [256, 512, 1024, 2048]
    fpn = int(p["fpn_channels"])
    backbone = BackboneWithFPN(body, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}, widths, fpn)
    n_det = int(p["max_detections"])
    net = MaskRCNN(
        backbone, num_classes=None, min_size=256, max_size=256, image_mean=[0.0] * n_inputs, image_std=[1.0] * n_inputs,
        box_head=TwoMLPHead(fpn * 7 * 7, 256), box_predictor=FastRCNNPredictor(256, n_classes),
        mask_head=MaskRCNNHeads(fpn, (fpn,) * 4, 1), mask_predictor=MaskRCNNPredictor(fpn, fpn, n_classes),
        rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=500,
        rpn_pre_nms_top_n_test=max(1000, 2 * n_det), rpn_post_nms_top_n_test=max(1000, n_det),
        rpn_batch_size_per_image=128, box_batch_size_per_image=128,
        box_score_thresh=float(p["score_threshold"]), box_nms_thresh=float(p["nms_iou"]), box_detections_per_img=n_det,
    )  # fmt: skip
    net.transform = _NoResize(256, 256, [0.0] * n_inputs, [1.0] * n_inputs, size_divisible=STRIDE)
    return net


def empty_detections() -> dict[str, Any]:
    return {"boxes": np.zeros((0, 4), np.int64), "masks": [], "scores": np.zeros(0, np.float32),
            "labels": np.zeros(0, np.uint8), "index": np.zeros(0, np.int64)}


@torch.no_grad()
def detect(net: torch.nn.Module, x: np.ndarray, valid: np.ndarray, class_ids: tuple[int, ...], params: dict[str, Any],
           offset: tuple[int, int] = (0, 0), device: str = "cpu") -> dict[str, Any]:
    """Objects in one window: ``x`` normalised float32 (bands, h, w) with 0 where a band is missing,
    ``valid`` (h, w). Masks smaller than ``min_object_px`` or mostly covered by a higher-scoring mask
    (``mask_overlap``) are dropped. Returns boxes ``(y0, x0, y1, x1)`` of each mask in scene pixels
    (``offset`` is the window's corner), masks cropped to their box, scores and class ids
    (``class_ids[label]``).

    The network runs stage by stage so each 28 x 28 mask is pasted into its own box only (the
    pixels torchvision's ``paste_masks_in_image`` gives it, without a window-sized array per object).
    """
    from torchvision.models.detection.roi_heads import expand_boxes, expand_masks

    p = {**DEFAULTS, **params}
    # the job's settings, not the ones the network was built with (the same for every task of a job)
    net.roi_heads.score_thresh = float(p["score_threshold"])
    net.roi_heads.nms_thresh = float(p["nms_iou"])
    h, w = valid.shape
    images, _ = net.transform([torch.from_numpy(np.ascontiguousarray(x)).to(device)])
    features = net.backbone(images.tensors)
    proposals, _ = net.rpn(images, features)
    out = net.roi_heads(features, proposals, images.image_sizes)[0][0]  # boxes in window pixels (never resized)
    keep = out["scores"] >= float(p["score_threshold"])
    scores, labels = out["scores"][keep].float().cpu().numpy(), out["labels"][keep].cpu().numpy()
    pieces = []
    if len(scores):
        masks, scale = expand_masks(out["masks"][keep], padding=1)
        for m, b in zip(masks, expand_boxes(out["boxes"][keep], scale).to(dtype=torch.int64).tolist()):
            bw, bh = max(b[2] - b[0] + 1, 1), max(b[3] - b[1] + 1, 1)
            r = torch.nn.functional.interpolate(m[0].expand((1, 1, -1, -1)), size=(bh, bw), mode="bilinear", align_corners=False)[0][0]
            x0, x1, y0, y1 = max(b[0], 0), min(b[2] + 1, w), max(b[1], 0), min(b[3] + 1, h)
            crop = r[y0 - b[1]:max(y1, y0) - b[1], x0 - b[0]:max(x1, x0) - b[0]] >= float(p["mask_threshold"])
            pieces.append((crop.cpu().numpy(), y0, x0))
    return detections(pieces, scores, labels, valid, class_ids, p, offset)


def detections(pieces: list[tuple[np.ndarray, int, int]], scores: np.ndarray, labels: np.ndarray, valid: np.ndarray,
               class_ids: tuple[int, ...], params: dict[str, Any], offset: tuple[int, int] = (0, 0)) -> dict[str, Any]:
    """Masks of one window (``pieces``: a bool array and its corner ``(y, x)`` in the window) as
    detections: cropped to their boxes in scene pixels; specks (``min_object_px``) and duplicates
    (``mask_overlap``) dropped in descending score order. ``index``: the position in ``pieces`` each
    kept detection comes from (a prompt's number)."""
    p = {**DEFAULTS, **params}
    dets = empty_detections()
    boxes, crops, sc, lab, idx = [], [], [], [], []
    taken = np.zeros(valid.shape, bool)  # pixels of the masks kept so far
    for k in np.argsort(-np.asarray(scores, np.float64), kind="stable"):
        piece, py, px = pieces[k]
        sl = (slice(py, py + piece.shape[0]), slice(px, px + piece.shape[1]))
        m = piece & valid[sl]
        area = int(m.sum())
        if area < max(1, int(p["min_object_px"])) or labels[k] <= 0 or (m & taken[sl]).sum() > float(p["mask_overlap"]) * area:
            continue
        taken[sl] |= m
        rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        boxes.append((py + y0 + offset[0], px + x0 + offset[1], py + y1 + offset[0], px + x1 + offset[1]))
        crops.append(np.ascontiguousarray(m[y0:y1, x0:x1]))
        sc.append(float(scores[k]))
        lab.append(class_ids[int(labels[k])])
        idx.append(int(k))
    if boxes:
        dets.update(boxes=np.asarray(boxes, np.int64), masks=crops, scores=np.asarray(sc, np.float32),
                    labels=np.asarray(lab, np.uint8), index=np.asarray(idx, np.int64))
    return dets
