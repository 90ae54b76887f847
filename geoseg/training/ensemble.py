"""A per-pixel companion for a trained network: a LightGBM model fitted on the same split, mixed
with the network's probabilities at the weight that scores best on the validation blocks.

On small labelled areas a network trained from scratch and a tree model on bands, indices and
texture make different mistakes; their mean beats either. The companion is kept with the network in
the majority (weight 0.5 or 0.75, chosen on the spatially separate validation blocks) unless the mix
lowers validation mIoU clearly: on small areas those blocks are few (one 256 px block on the NC
splits), and a gain threshold there dropped mixes that scored better on the held-out part.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from geoseg.methods.features import default_features
from geoseg.methods.sampling import window_features
from geoseg.training.metrics import Metrics, confusion_indices

WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)  # share of the network in the mix: each scored on validation (recorded)
KEPT_WEIGHTS = (0.5, 0.75)  # those a companion is kept at
MAX_LOSS = 0.01  # validation mIoU a mix may lose to the network alone and still be kept
MIN_GAIN_TTA = 0.0  # test-time augmentation (8x the forward passes) is kept unless it lowers validation mIoU
COMPANION_NAME = "pixel.lgb.txt"


def kept_weight(validation_miou: dict[float, float]) -> float:
    """The network's weight in the mix a companion is kept at, from validation mIoU by weight (1.0: the
    network alone): the best of ``KEPT_WEIGHTS`` (ties: more network), or 1.0 (no companion) where
    that mix scores more than ``MAX_LOSS`` below the network alone or no mix was scored."""
    if not all(w in validation_miou for w in KEPT_WEIGHTS):
        return 1.0
    w = max(KEPT_WEIGHTS, key=lambda v: (round(validation_miou[v], 6), v))
    return w if validation_miou[w] >= validation_miou[1.0] - MAX_LOSS else 1.0


def choose_inference(prep: Any, net: torch.nn.Module, stride: int, roles: Sequence[str | None], seed: int,
                     reader: Any = None, ensemble: bool = True, tta: str = "auto") -> dict[str, Any]:
    """How the trained network runs at predict, chosen on the validation blocks.

    ``tta``: ``auto`` keeps the 8 flips/rotations (8x the compute) only where they raise validation
    mIoU by ``MIN_GAIN_TTA``; ``ensemble``: fit the LightGBM companion and keep the mix at the best
    of ``KEPT_WEIGHTS`` unless it scores more than ``MAX_LOSS`` below the network alone. Returns
    ``tta``, ``booster`` (or None), the card's ``ensemble`` entry (or None), ``why`` none is kept
    and the validation scores of every choice.
    """
    from geoseg.infer import InferenceSettings, forward, forward_d4

    options = ("none", "d4") if tta == "auto" else (tta,)
    not_asked = None if ensemble else "not asked for (--no-ensemble)"
    if not prep.val_boxes:
        return {"tta": "none" if tta == "auto" else tta, "booster": None, "entry": None, "scores": {},
                "why": not_asked or "not kept: no validation blocks to choose on"}
    n = len(prep.classes)
    features = default_features(roles, prep.stack.count)
    scale = prep.normalization.std
    booster, record = None, {}
    if ensemble:
        from geoseg.methods.fit import fit_pixel_on_split

        fitted = fit_pixel_on_split(prep, roles, features, seed)
        if fitted is not None:
            booster, record = fitted
    weights = WEIGHTS if booster is not None else (1.0,)
    reader = reader or prep.reader()
    cms = {(t, w): np.zeros((n, n), np.int64) for t in options for w in weights}
    net.eval()
    settings = InferenceSettings()
    for box in prep.val_boxes:
        x, target = reader.read(box)
        p = None
        if booster is not None:
            f, valid = window_features(prep.stack, box, roles, features, scale)
            p = np.zeros((n, *box.shape), np.float32)
            if valid.any():
                p[:, valid] = np.asarray(booster.predict(f[:, valid].T), np.float32).reshape(int(valid.sum()), -1).T
        for t in options:
            u = (forward_d4 if t == "d4" else forward)(net, x[None], stride, settings)[0]
            for w in weights:
                mixed = u if p is None else w * u + (1 - w) * p
                cms[(t, w)] += confusion_indices(target, mixed.argmax(0), n)
    ids, names = tuple(c.id for c in prep.classes), tuple(c.name for c in prep.classes)
    scores = {k: Metrics(ids, names, cm).miou for k, cm in cms.items()}

    def best_weight(t: str) -> float:
        return kept_weight({w: scores[(t, w)] for w in weights})

    chosen = options[0]
    if len(options) > 1 and scores[("d4", best_weight("d4"))] >= scores[("none", best_weight("none"))] + MIN_GAIN_TTA:
        chosen = "d4"
    w = best_weight(chosen)
    entry = None
    if w < 1.0:
        entry = {"method": "pixel", "file": COMPANION_NAME, "features": list(features), "weight": w,
                 "validation_miou": {str(v): round(float(scores[(chosen, v)]), 6) for v in weights}, "fit": record}  # fmt: skip
    why = None if entry else not_asked or (
        "not kept: no companion could be fitted on the training blocks" if booster is None else
        f"not kept: the mix scored more than {MAX_LOSS} below the network alone on validation")
    return {"tta": chosen, "booster": booster if entry else None, "entry": entry, "why": why,
            "scores": {f"tta={t} network_weight={v}": round(float(sc), 6) for (t, v), sc in scores.items()}}
