"""geoseg: distributed batch segmentation of very large geospatial rasters.

The Python API (geoseg.api), imported on first use (it pulls in dask, xarray and torch):
``open_scene``, ``predict``, ``vectorize``, ``train``, ``evaluate``, ``cluster``, ``Model``,
``open_prediction``, ``to_cog``, ``physical``; ``import geoseg`` also registers the ``.geoseg`` xarray accessor
(when xarray is imported, before or after geoseg).
"""

import warnings

from geoseg.errors import GeosegError

# segmentation-models-pytorch's imports pull in tqdm.auto, which warns in a notebook without ipywidgets;
# geoseg draws its own progress bars (a widget only where ipywidgets is installed)
warnings.filterwarnings("ignore", message="IProgress not found")

__version__ = "0.1.0"
_API = ("Model", "classes_of", "cluster", "evaluate", "open_prediction", "open_scene", "physical", "plan_tiling",
        "predict", "sample_data", "segment", "to_cog", "train", "vectorize")
__all__ = ["GeosegError", "__version__", *_API]


# ``geoseg.cluster`` is the API's function, but also the name of a submodule: Python's import binds a submodule
# to its package's attribute when first imported, which would replace the function from then on (a second
# ``with geoseg.cluster():`` in a notebook failed). The submodule (light: no dask at import) is loaded here,
# once, and its binding dropped, so the name stays the API's.
import geoseg.cluster  # noqa: E402

del globals()["cluster"]


def __getattr__(name: str):
    if name in _API:
        from geoseg import api

        return getattr(api, name)
    if name in ("plot", "pipeline"):  # submodules, imported on first use
        import importlib

        return importlib.import_module(f"geoseg.{name}")
    raise AttributeError(name)


def __dir__():
    return sorted(__all__)


# The accessor is registered when xarray is imported, here if it already is, else right after it is: importing
# xarray takes 0.3-0.4 s, which the CLI would pay before it starts its workers' fork server and every worker
# again (their tasks never use xarray)
from geoseg._after_import import call_after_import as _call_after_import  # noqa: E402

_call_after_import("xarray", "geoseg.accessor")
