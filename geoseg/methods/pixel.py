"""``pixel``: a LightGBM gradient-boosted-tree classifier per pixel on bands, indices and texture.

Fitted on the labelled pixels of the training blocks with early stopping on the validation
blocks (the networks' spatial split); saved as LightGBM's text model (no pickle). Missing bands
are NaN features: the trees send them down the branch learned for missing values, so a pixel
with one band missing is still classified (``missing_bands: fill`` in the card).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from geoseg.methods.features import feature_stack
from geoseg.model.card import PIXEL_WEIGHTS_NAME, ModelCard

PARAMS = {
    "objective": "multiclass",
    "learning_rate": 0.05,
    "num_leaves": 31,
    "min_data_in_leaf": 40,
    "feature_fraction": 0.8,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "lambda_l2": 1.0,
    "verbose": -1,
    "deterministic": True,
    "force_row_wise": True,
}
MAX_ROUNDS = 600
EARLY_STOP = 40
# a round "improves" the validation log loss only by more than this (nats per pixel): on a scene whose classes
# separate cleanly the loss creeps toward 0 by under 1e-6 a round, and trees fitted to that (600 rounds, not 210)
# made predict 3x slower for the same classes. The NC scene's fits stop where they did (42-54 rounds).
MIN_DELTA = 1e-5


def _threads() -> int:
    try:
        import torch

        return max(1, torch.get_num_threads())
    except ImportError:
        return 1


class PixelPredictor:
    def __init__(self, card: ModelCard, booster):
        self.card = card
        self.booster = booster
        self.features = tuple(card.method_params["features"])

    @classmethod
    def load(cls, model_dir: Path, card: ModelCard, device: Any = "cpu") -> "PixelPredictor":
        """On a GPU its features and trees run there (`forest.for_device`), as a network's companion does."""
        from geoseg.methods.forest import for_device
        from geoseg.model.store import lightgbm_booster

        return cls(card, for_device(lightgbm_booster(model_dir / PIXEL_WEIGHTS_NAME), device))

    def probabilities(self, data: np.ndarray, valid: np.ndarray, params: dict[str, Any]) -> np.ndarray:
        return predict_pixels(self.booster, self.card, self.features, data, valid)


def predict_pixels(booster, card: ModelCard, features: Sequence[str], data: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(classes, h, w) float32 probabilities of the ``valid`` pixels of ``data`` (float32, NaN = missing), 0 elsewhere.
    ``booster``: LightGBM's, or a `TorchForest` (a network's companion on a GPU), which gets its features there too."""
    from geoseg.methods.forest import TorchForest

    if isinstance(booster, TorchForest):
        return _predict_on_device(booster, card, features, data, valid)
    f = feature_stack(data, card.band_roles, features, card.normalization.std, card.index_band_units)
    out = np.zeros((card.n_classes, *valid.shape), np.float32)
    if valid.any():
        X = f[:, valid].T
        p = booster.predict(X, num_threads=_threads())
        out[:, valid] = np.asarray(p, np.float32).reshape(len(X), -1).T
    return out


def _predict_on_device(forest, card: ModelCard, features: Sequence[str], data: np.ndarray, valid: np.ndarray) -> np.ndarray:
    import torch

    from geoseg.methods import device_features

    out = np.zeros((card.n_classes, *valid.shape), np.float32)
    if valid.any():
        with torch.inference_mode(), torch.autocast(forest.device.type, enabled=False):
            x = torch.from_numpy(np.ascontiguousarray(data, np.float32)).to(forest.device)
            f = device_features.feature_stack(x, card.band_roles, features, card.normalization.std, card.index_band_units)
            X = f[:, torch.from_numpy(np.ascontiguousarray(valid)).to(forest.device)].T.contiguous()
            out[:, valid] = forest.probabilities(X).to(torch.float32).cpu().numpy().T
    return out


def class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-sample weights ~ 1/sqrt(class frequency), mean 1: rare classes count, without swamping."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, 1.0 / np.sqrt(np.maximum(counts, 1)), 0.0)
    sw = w[y]
    return sw / sw.mean()


def save(booster, path: Path) -> None:
    """LightGBM's text model, trees up to the best validation round."""
    booster.save_model(str(path), num_iteration=booster.best_iteration or None)


def fit(
    X: np.ndarray, y: np.ndarray, Xv: np.ndarray, yv: np.ndarray, n_classes: int, seed: int
) -> tuple[Any, dict[str, Any]]:
    """A booster fitted on (X, y), stopped early on (Xv, yv) when there is validation data."""
    import lightgbm as lgb

    params = dict(PARAMS, num_class=n_classes, seed=seed, num_threads=os.cpu_count() or 1)
    train = lgb.Dataset(X, y, weight=class_weights(y, n_classes), free_raw_data=True)
    kw: dict[str, Any] = {}
    if len(yv):
        valid = lgb.Dataset(Xv, yv, weight=class_weights(yv, n_classes), reference=train)
        kw = {"valid_sets": [valid], "callbacks": [lgb.early_stopping(EARLY_STOP, verbose=False, min_delta=MIN_DELTA)]}
    booster = lgb.train(params, train, num_boost_round=MAX_ROUNDS, **kw)
    rounds = booster.best_iteration or booster.current_iteration()
    return booster, {"rounds": int(rounds), "params": {k: v for k, v in params.items() if k != "num_threads"},
                     "early_stopping": {"patience": EARLY_STOP, "min_delta": MIN_DELTA} if len(yv) else None,
                     "lightgbm": lgb.__version__, "training_pixels": int(len(y)), "validation_pixels": int(len(yv))}  # fmt: skip
