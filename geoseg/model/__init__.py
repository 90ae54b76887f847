"""Model cards, model directories and the networks they describe.

``geoseg.model.card`` is light (pydantic only); ``store``/``network`` import torch on use.
"""

from geoseg.model.card import BandInfo, ClassInfo, ModelCard, Normalization

__all__ = ["BandInfo", "ClassInfo", "ModelCard", "Normalization", "init_model", "load_model", "open_model", "save_model"]


def __getattr__(name: str):
    if name in ("init_model", "load_model", "open_model", "OpenedModel", "save_model", "ModelBundle"):
        from geoseg.model import store

        return getattr(store, name)
    raise AttributeError(name)
