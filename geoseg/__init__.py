"""geoseg: distributed batch segmentation of very large geospatial rasters."""

from geoseg.errors import GeosegError

__version__ = "0.1.0"
__all__ = ["GeosegError", "__version__", "open_prediction", "segment"]


def __getattr__(name: str):
    # The xarray API pulls in torch and dask: import it only when asked for.
    if name in ("segment", "open_prediction", "plan_tiling"):
        from geoseg import api

        return getattr(api, name)
    raise AttributeError(name)
