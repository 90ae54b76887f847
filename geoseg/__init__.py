"""geoseg: distributed batch segmentation of very large geospatial rasters."""

from geoseg.errors import GeosegError

__version__ = "0.1.0"
__all__ = ["GeosegError", "__version__"]
