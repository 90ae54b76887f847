"""``kmeans``: unsupervised clusters of bands and indices (dask-ml's k-means on a sample of the scene),
applied per chunk; clusters are mapped to classes by the labels they overlap most, when given.

Centres, feature scaling and the cluster -> class table go to ``weights.safetensors``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from geoseg.methods.features import feature_stack
from geoseg.model.card import WEIGHTS_NAME, ModelCard


class KMeansPredictor:
    def __init__(self, card: ModelCard, centers: np.ndarray, mean: np.ndarray, std: np.ndarray, cluster_class: np.ndarray):
        self.card, self.centers, self.mean, self.std, self.cluster_class = card, centers, mean, std, cluster_class
        self.features = tuple(card.method_params["features"]) if card is not None else ()

    @classmethod
    def load(cls, model_dir: Path, card: ModelCard) -> "KMeansPredictor":
        from safetensors.numpy import load_file

        t = load_file(str(model_dir / WEIGHTS_NAME))
        return cls(card, t["centers"], t["feature_mean"], t["feature_std"], t["cluster_class"].astype(np.int64))

    def standardize(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Standardized features, 0 where missing, and where they are present."""
        Z = ((X - self.mean) / self.std).astype(np.float32)
        present = np.isfinite(Z)
        Z[~present] = 0.0
        return Z, present

    def clusters(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest centre of each row of ``X`` (raw features) and the squared distances to every centre.

        A row with features missing (a band with no value, and the indices and texture made from it) is
        measured on the features it has, the distance scaled up to all of them: placing a missing feature
        at the sample mean instead pulled such pixels to the centres nearest the mean (measured: a band
        missing over a stripe, accuracy there 0.96 -> 0.63, water never found)."""
        Z, present = self.standardize(X)
        c2 = self.centers * self.centers
        if present.all():
            d2 = (Z * Z).sum(1)[:, None] - 2 * Z @ self.centers.T + c2.sum(1)[None]
        else:
            p = present.astype(np.float32)
            d2 = (Z * Z).sum(1)[:, None] - 2 * Z @ self.centers.T + p @ c2.T
            n = p.sum(1, keepdims=True)
            d2 *= Z.shape[1] / np.maximum(n, 1)
        return d2.argmin(1), np.maximum(d2, 0)

    def probabilities(self, data: np.ndarray, valid: np.ndarray, params: dict[str, Any]) -> np.ndarray:
        f = feature_stack(data, self.card.band_roles, self.features, self.card.normalization.std, self.card.index_band_units)
        out = np.zeros((self.card.n_classes, *valid.shape), np.float32)
        if valid.any():
            _, d2 = self.clusters(f[:, valid].T)
            # soft assignment: softmax of -d²/2 over the clusters, summed per class
            a = -(d2 - d2.min(1, keepdims=True)) / 2.0
            w = np.exp(a)
            w /= w.sum(1, keepdims=True)
            per_class = np.zeros((len(w), self.card.n_classes), np.float32)
            np.add.at(per_class.T, self.cluster_class, w.T)
            out[:, valid] = per_class.T
        return out


def fit(X: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """k-means (dask-ml, k-means|| initialisation) on the standardized sample ``X`` (n, F)."""
    import dask.array as da
    import dask_ml
    from dask_ml.cluster import KMeans

    mean = np.nanmean(X, axis=0).astype(np.float32)
    std = np.nanstd(X, axis=0).astype(np.float32)
    std[~(std > 0)] = 1.0
    mean[~np.isfinite(mean)] = 0.0
    Z = (X - mean) / std
    Z[~np.isfinite(Z)] = 0.0
    chunk = max(10_000, len(Z) // 8)
    km = KMeans(n_clusters=k, random_state=seed, init="k-means||", max_iter=300, tol=1e-4)
    km.fit(da.from_array(Z.astype(np.float64), chunks=(chunk, Z.shape[1])))
    centers = np.asarray(km.cluster_centers_, np.float32)
    return centers, mean, std, {"k": k, "iterations": int(getattr(km, "n_iter_", 0) or 0), "inertia": float(km.inertia_),
                                "dask_ml": dask_ml.__version__, "sample_pixels": int(len(X))}  # fmt: skip


def map_clusters(clusters: np.ndarray, y: np.ndarray, k: int, n_classes: int) -> np.ndarray:
    """Each cluster's most frequent class among labelled pixels (the most frequent class overall where it has none)."""
    votes = np.zeros((k, n_classes), np.int64)
    np.add.at(votes, (clusters, y), 1)
    overall = int(np.bincount(y, minlength=n_classes).argmax()) if len(y) else 0
    return np.where(votes.sum(1) > 0, votes.argmax(1), overall).astype(np.int64)
