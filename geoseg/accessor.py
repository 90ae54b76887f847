"""The ``.geoseg`` accessor on xarray objects: it only delegates to geoseg.api and geoseg.plot.

    scene.geoseg.predict(model)      # = geoseg.predict(scene, model)
    scene.geoseg.plot()              # true/false-colour composite
    ds.geoseg.plot()                 # class map in the model's colours, with a legend
    ds.geoseg.vectorize()            # = geoseg.vectorize(ds)
    ds.geoseg.to_cog("classes.tif")  # = geoseg.to_cog(ds, path)
"""

from __future__ import annotations

from typing import Any

import xarray as xr


@xr.register_dataarray_accessor("geoseg")
class SceneAccessor:
    def __init__(self, obj: xr.DataArray) -> None:
        self._obj = obj

    def predict(self, model: Any, **options: Any) -> xr.Dataset:
        from geoseg.api import predict

        return predict(self._obj, model, **options)

    def plot(self, **options: Any) -> Any:
        from geoseg.plot import plot_classes, plot_scene

        if "flag_values" in self._obj.attrs:
            return plot_classes(self._obj, **options)
        return plot_scene(self._obj, **options)

    def vectorize(self, **options: Any) -> Any:
        from geoseg.api import vectorize

        return vectorize(self._obj, **options)

    def to_cog(self, path: Any, **options: Any) -> Any:
        from geoseg.api import to_cog

        return to_cog(self._obj, path, **options)


@xr.register_dataset_accessor("geoseg")
class PredictionAccessor:
    def __init__(self, obj: xr.Dataset) -> None:
        self._obj = obj

    def predict(self, model: Any, **options: Any) -> xr.Dataset:
        """A Dataset of one variable per band (odc-stac's load) segmented, as geoseg.predict(ds, model)."""
        from geoseg.api import predict

        return predict(self._obj, model, **options)

    def plot(self, **options: Any) -> Any:
        from geoseg.plot import plot_classes

        return plot_classes(self._obj, **options)

    def vectorize(self, **options: Any) -> Any:
        from geoseg.api import vectorize

        return vectorize(self._obj, **options)

    def to_cog(self, path: Any, **options: Any) -> Any:
        from geoseg.api import to_cog

        return to_cog(self._obj, path, **options)

    def explore(self, **options: Any) -> Any:
        from geoseg.plot import explore

        return explore(self._obj, **options)
