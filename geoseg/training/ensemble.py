"""A per-pixel companion for a trained network: a LightGBM model fitted on the same split, mixed
with the network's probabilities at the weight that scores best on the validation blocks.

On small labelled areas a network trained from scratch and a tree model on bands, indices and
texture make different mistakes; their mean beats either. The weight is chosen on the spatially
separate validation blocks; where mixing does not help there, no companion is kept.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from geoseg.methods.features import default_features
from geoseg.methods.sampling import sample_blocks, window_features
from geoseg.training.chips import class_lut
from geoseg.training.labels import read_labels
from geoseg.training.metrics import Metrics, confusion_indices

WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)  # share of the network in the mix
MIN_GAIN = 0.005  # validation mIoU a mix must add over the network alone to be kept
COMPANION_NAME = "pixel.lgb.txt"
MAX_TRAIN_PIXELS = 2_000_000


def _network_probs(net: torch.nn.Module, x: np.ndarray, stride: int, device: str) -> np.ndarray:
    from geoseg.training.loop import _pad_to

    h, w = x.shape[1:]
    with torch.inference_mode():
        logits = net(_pad_to(torch.from_numpy(x)[None], stride).to(device)).float()[:, :, :h, :w]
    return torch.softmax(logits, 1)[0].cpu().numpy()


def fit_companion(prep: Any, net: torch.nn.Module, stride: int, device: str, roles: Sequence[str | None],
                  seed: int, reader: Any = None) -> tuple[Any, dict[str, Any]] | None:
    """The booster and the card's ``ensemble`` entry, or None where the mix does not help on validation."""
    from geoseg.methods import pixel

    if not prep.val_boxes:
        return None
    n = len(prep.classes)
    features = default_features(roles, prep.stack.count)
    lut = class_lut(prep.classes)
    scale = prep.normalization.std
    rng = np.random.default_rng([seed, 0xE75])

    def targets(box):
        return lut[read_labels(prep.labels, box)]

    X, y = sample_blocks(prep.stack, prep.split.boxes("train"), roles, features, scale, targets, MAX_TRAIN_PIXELS, rng)
    Xv, yv = sample_blocks(prep.stack, list(prep.val_boxes), roles, features, scale, targets, MAX_TRAIN_PIXELS // 4, rng)
    if not len(y):
        return None
    booster, record = pixel.fit(X, y, Xv, yv, n, seed)
    reader = reader or prep.reader()
    cms = {w: np.zeros((n, n), np.int64) for w in WEIGHTS}
    net.eval()
    for box in prep.val_boxes:
        x, target = reader.read(box)
        u = _network_probs(net, x, stride, device)
        f, valid = window_features(prep.stack, box, roles, features, scale)
        p = np.zeros_like(u)
        if valid.any():
            p[:, valid] = np.asarray(booster.predict(f[:, valid].T), np.float32).reshape(int(valid.sum()), -1).T
        for w in WEIGHTS:
            cms[w] += confusion_indices(target, (w * u + (1 - w) * p).argmax(0), n)
    ids, names = tuple(c.id for c in prep.classes), tuple(c.name for c in prep.classes)
    scores = {w: Metrics(ids, names, cms[w]).miou for w in WEIGHTS}
    best = max(WEIGHTS, key=lambda w: (round(scores[w], 6), w))  # ties: more network
    entry = {"method": "pixel", "file": COMPANION_NAME, "features": list(features), "weight": best,
             "validation_miou": {str(w): round(float(s), 6) for w, s in scores.items()},
             "fit": record}  # fmt: skip
    if best == 1.0 or scores[best] < scores[1.0] + MIN_GAIN:
        return None
    return booster, entry

