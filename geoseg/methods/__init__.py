"""The field's segmentation methods behind one interface.

``smp`` (segmentation-models-pytorch encoder-decoders) is the default and runs through
``geoseg.infer``; the others are fitted here and predict per pixel from features
(``geoseg.methods.features``):

- ``threshold``: a spectral index above a fixed or Otsu threshold (Otsu over the whole scene, on the cluster)
- ``kmeans``: clusters of bands and indices (dask-ml k-means on a sample), optionally mapped to classes
- ``pixel``: a LightGBM gradient-boosted-tree classifier on bands, indices and local texture

Each predictor returns class probabilities ``(classes, h, w)`` over a window, so every method goes
through the same tiling, stitching, post-processing, COG, polygons and evaluation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from geoseg.model.card import ModelCard


class Predictor(Protocol):
    def probabilities(self, data: np.ndarray, valid: np.ndarray, params: dict[str, Any]) -> np.ndarray:
        """``data`` float32 (bands, h, w), NaN where a band is missing; ``valid`` (h, w): pixels to classify."""


def load_predictor(model_dir: Path, card: ModelCard, device: Any = "cpu") -> Predictor:
    """The predictor of a method's model directory, for the device its worker runs models on."""
    if card.method == "threshold":
        from geoseg.methods.threshold import ThresholdPredictor

        return ThresholdPredictor(card)
    if card.method == "kmeans":
        from geoseg.methods.kmeans import KMeansPredictor

        return KMeansPredictor.load(Path(model_dir), card)
    if card.method == "pixel":
        from geoseg.methods.pixel import PixelPredictor

        return PixelPredictor.load(Path(model_dir), card, device)
    raise ValueError(f"no predictor for method {card.method!r}")


def scene_params(card: ModelCard) -> tuple[str, ...]:
    """Parameters a method computes over the whole scene before it predicts (Otsu's threshold)."""
    if card.method == "threshold" and card.method_params.get("threshold") == "otsu":
        return ("threshold",)
    return ()


def current_client():
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def scene_settings(card: ModelCard, stack, plan, settings, client=None, array=None, nodata=None):
    """``settings`` with what the method computes over the whole scene first (Otsu's threshold: on
    ``client``, the current distributed client, or dask's threaded scheduler); unchanged for methods
    that need nothing. ``array``/``nodata``: a dask array scene instead of ``stack``."""
    from dataclasses import replace

    if not scene_params(card):
        return settings
    from geoseg.methods.threshold import otsu_of_array, otsu_on_cluster

    client = client if client is not None else current_client()
    if array is not None:
        t = otsu_of_array(card, array, nodata, client)
    else:
        t = otsu_on_cluster(card, stack, plan, client)
    return replace(settings, params=(("threshold", t),))
