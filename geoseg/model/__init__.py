"""Model cards, model directories and the networks they describe."""

from geoseg.model.card import ClassInfo, ModelCard, BandInfo, Normalization
from geoseg.model.store import init_model, load_model, save_model, ModelBundle

__all__ = [
    "BandInfo",
    "ClassInfo",
    "ModelBundle",
    "ModelCard",
    "Normalization",
    "init_model",
    "load_model",
    "save_model",
]
