"""Pictures of scenes, class maps, polygons and metrics (matplotlib), and an interactive map (folium).

Large rasters are decimated to at most ``max_size`` pixels a side before anything is computed,
so a plot of a 100k x 100k scene reads only what it draws. A lazy prediction is not a raster on
disk: every chunk's model runs to draw it (a decimated pixel still needs its chunk), and again at
the next compute; ``ds = ds.persist()`` (or ``.compute()``) first draws and writes it from one run.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import xarray as xr

# band names that say which band is which colour (Landsat, Sentinel-2, common names)
_ROLES = {
    "red": ("red", "b4", "b04", "sr_b4", "lsat7_2000_30", "band_3"),
    "green": ("green", "b3", "b03", "sr_b3", "lsat7_2000_20", "band_2"),
    "blue": ("blue", "b2", "b02", "sr_b2", "lsat7_2000_10", "band_1"),
    "nir": ("nir", "nir08", "b8", "b08", "b5", "sr_b5", "lsat7_2000_40", "band_4"),
}


def _pyplot():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("module://matplotlib_inline.backend_inline", "agg") and not _in_notebook():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython

        return get_ipython() is not None and "IPKernelApp" in get_ipython().config
    except (ImportError, AttributeError):
        return False


def _step(da_: xr.DataArray, max_size: int) -> int:
    return max(1, int(np.ceil(max(da_.sizes["y"], da_.sizes["x"]) / max_size)))


def _decimate(da_: xr.DataArray, max_size: int) -> xr.DataArray:
    step = _step(da_, max_size)
    return da_.isel(y=slice(None, None, step), x=slice(None, None, step))


def _extent(da_: xr.DataArray, step: int = 1) -> list[float]:
    """Left, right, bottom, top of an image of ``da_`` (taken every ``step`` pixels of its source): each shown
    cell spans ``step`` source pixels from the source's own edge, not a cell centred on the pixel sampled."""
    x, y = da_["x"].values, da_["y"].values
    try:  # one row or column: the pixel size of the grid (rioxarray's transform), shown every ``step`` pixels
        res_x, res_y = da_.rio.resolution()
    except Exception:  # noqa: BLE001  (no grid at all: one unit per pixel)
        res_x, res_y = 1.0, -1.0
    dx = (x[1] - x[0]) if len(x) > 1 else float(res_x) * step
    dy = (y[1] - y[0]) if len(y) > 1 else float(res_y) * step
    left, top = x[0] - dx / step / 2, y[0] - dy / step / 2
    return [left, left + len(x) * dx, top + len(y) * dy, top]


def composite_bands(names: Sequence[str], false_colour: bool = False) -> list[int]:
    """Band positions of a true-colour (red, green, blue) or false-colour (nir, red, green) composite."""
    low = [str(n).lower() for n in names]

    def find(role: str) -> int | None:
        for alias in _ROLES[role]:
            for i, n in enumerate(low):
                if n == alias or n.endswith("_" + alias) or n.startswith(alias + "_"):
                    return i
        return None

    roles = ("nir", "red", "green") if false_colour else ("red", "green", "blue")
    found = [find(r) for r in roles]
    if all(f is not None for f in found):
        return found  # type: ignore[return-value]
    return list(range(min(3, len(names)))) if len(names) >= 3 else [0, 0, 0]


def stretch(rgb: np.ndarray, valid: np.ndarray, percentiles: tuple[float, float] = (2, 98)) -> np.ndarray:
    """Each band scaled so its low..high percentiles (of valid pixels) span 0..1."""
    out = np.zeros(rgb.shape, np.float32)
    for i in range(rgb.shape[0]):
        v = rgb[i][valid]
        if v.size:
            lo, hi = np.percentile(v, percentiles)
            out[i] = np.clip((rgb[i] - lo) / max(hi - lo, 1e-12), 0, 1)
    return out


def plot_scene(scene: xr.DataArray, *, false_colour: bool = False, bands: Sequence[int] | None = None,
               percentiles: tuple[float, float] = (2, 98), max_size: int = 1024, ax: Any = None) -> Any:
    """The scene as a true- or false-colour composite with a percentile stretch; nodata transparent."""
    from geoseg.api import _as_scene, band_nodata

    plt = _pyplot()
    scene = _as_scene(scene)  # (band, y, x), north-up, each band's nodata, whatever the DataArray was
    pick = list(bands) if bands is not None else composite_bands([str(b) for b in scene["band"].values], false_colour)
    small = _decimate(scene.isel(band=pick), max_size)
    rgb = np.asarray(small.values, np.float64)
    valid = np.ones(rgb.shape[1:], bool)
    for i, nd in enumerate(np.asarray(band_nodata(scene), dtype=object)[pick]):
        if nd is not None:
            valid &= rgb[i] != nd
        valid &= np.isfinite(rgb[i])
    img = np.concatenate([stretch(rgb, valid, percentiles), valid[None].astype(np.float32)]).transpose(1, 2, 0)
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 7))
    ax.imshow(img, extent=_extent(small, _step(scene, max_size)), interpolation="nearest")
    names = [str(scene["band"].values[i]) for i in pick]
    ax.set_title(("false" if false_colour else "true") + f" colour: {', '.join(names)}")
    return ax


def _class_var(ds: xr.Dataset | xr.DataArray) -> xr.DataArray:
    return ds["class_id"] if isinstance(ds, xr.Dataset) else ds


def plot_classes(ds: xr.Dataset | xr.DataArray, *, polygons: Any = None, max_size: int = 1024, legend: bool = True,
                 ax: Any = None, alpha: float = 1.0) -> Any:
    """The class map in the model's colours with a legend of class names; ``polygons`` drawn over it."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from geoseg.api import _north_up, classes_of

    plt = _pyplot()
    var = _north_up(_class_var(ds))  # drawn north-up, as plot_scene draws (a map without coordinates: as it is)
    classes = classes_of(var)
    small = _decimate(var, max_size)
    ids = np.asarray(small.values)
    nodata = var.rio.nodata
    if nodata is not None and np.isfinite(nodata) and float(nodata) != 255:  # a class map with a nodata of its own
        ids = np.where(ids == nodata, 255, ids)
        classes = [c for c in classes if c.id != int(nodata)] if classes else classes
    if not classes:
        classes = [__import__("geoseg.model.card", fromlist=["ClassInfo"]).ClassInfo(id=int(i), name=f"class_{int(i)}")
                   for i in np.unique(ids) if i != 255]
    index = np.full(256, -1, np.int64)
    for k, c in enumerate(classes):
        index[c.id] = k
    shown = np.ma.masked_less(index[ids], 0)
    cmap = ListedColormap([c.color for c in classes])
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 7))
    ax.imshow(shown, cmap=cmap, vmin=-0.5, vmax=len(classes) - 0.5, extent=_extent(small, _step(var, max_size)),
              interpolation="nearest",
              alpha=alpha)
    if polygons is not None and len(polygons):
        polygons.boundary.plot(ax=ax, color="black", linewidth=0.4)
    if legend:
        present = set(np.unique(ids).tolist())
        handles = [Patch(facecolor=c.color, edgecolor="black", label=c.name) for c in classes if c.id in present]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="classes",
                  ncol=max(1, -(-len(handles) // 25)))  # columns of at most 25 names: many classes stay in the figure
    ax.set_title("classes")
    return ax


def plot_confusion(metrics: Any, *, normalize: bool = True, ax: Any = None) -> Any:
    """The confusion matrix as a heat map (rows: labels, columns: predictions), row-normalised by default."""
    plt = _pyplot()
    cm = np.asarray(metrics.confusion, np.float64)
    shown = cm / np.maximum(cm.sum(1, keepdims=True), 1) if normalize else cm
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(shown, cmap="viridis")
    names = list(metrics.class_names)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("label")
    for (i, j), v in np.ndenumerate(shown):
        ax.text(j, i, f"{v:.2f}" if normalize else f"{int(v)}", ha="center", va="center", fontsize=7,
                color="white" if v < shown.max() / 2 else "black")
    ax.figure.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title("confusion" + (" (share of each label)" if normalize else ""))
    return ax


def plot_iou(metrics: Any, *, ax: Any = None, others: dict[str, Any] | None = None) -> Any:
    """Per-class IoU bars (several models side by side with ``others``: name -> Metrics)."""
    plt = _pyplot()
    runs = {"model": metrics, **(others or {})}
    names = list(metrics.class_names)
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(runs)
    for k, (label, m) in enumerate(runs.items()):
        iou = np.nan_to_num(np.asarray(m.iou, np.float64))
        ax.bar(np.arange(len(names)) + k * width, iou, width, label=f"{label} (mIoU {m.miou:.3f})")
    ax.set_xticks(np.arange(len(names)) + width * (len(runs) - 1) / 2, names, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("IoU")
    ax.legend()
    ax.set_title("IoU per class")
    return ax


def plot_history(history: Sequence[dict[str, Any]] | Any, *, ax: Any = None) -> Any:
    """Training curves: losses and validation mIoU by epoch (a card's ``training['history']`` or a TrainResult);
    a model of several networks gets one curve per network in each colour."""
    plt = _pyplot()
    if hasattr(history, "history"):
        history = history.history
    elif hasattr(history, "training"):
        history = (history.training or {}).get("history", [])
    history = list(history)
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    runs: dict[int, list[dict[str, Any]]] = {}
    for h in history:
        runs.setdefault(int(h.get("member", 0)), []).append(h)

    def curves(axis: Any, key: str, **style: Any) -> None:
        for k, run in runs.items():
            epochs = [h.get("epoch", i + 1) for i, h in enumerate(run)]
            axis.plot(epochs, [h[key] for h in run], **(style if k == min(runs) else dict(style, label=None)))

    for key, color in (("loss", "tab:blue"), ("val_loss", "tab:orange")):
        if history and key in history[0]:
            curves(ax, key, color=color, label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    key = next((k for k in ("val_miou", "miou") if history and k in history[0]), None)
    if key:
        ax2 = ax.twinx()
        curves(ax2, key, color="tab:green", label="validation mIoU")
        ax2.set_ylabel("validation mIoU")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="lower right")
    ax.legend(loc="upper right")
    ax.set_title("training")
    return ax


def explore(ds: xr.Dataset | xr.DataArray, *, polygons: Any = None, max_size: int = 1024, opacity: float = 0.7) -> Any:
    """An interactive folium map of the class map (and polygons), from local data only: no basemap
    tiles are fetched, the class map is embedded as an image in Web Mercator, as Leaflet draws it. The page
    loads Leaflet itself from its CDN, as folium's maps do: offline it stays blank."""
    import base64
    import io

    import folium
    from matplotlib.colors import to_rgba

    from geoseg.api import classes_of

    var = _class_var(ds)
    classes = classes_of(var)
    small = _decimate(var, max_size)
    # Leaflet stretches an image overlay linearly in Web Mercator between its corners: warped to EPSG:3857 it
    # lies where the polygons are (warped to lon/lat, a scene 1 degree tall was ~180 m off in its middle)
    merc = small.rio.reproject("EPSG:3857", nodata=255, resampling=0)
    ids = np.asarray(merc.values)
    rgba = np.zeros((*ids.shape, 4), np.uint8)
    for c in classes:
        rgba[ids == c.id] = (np.array(to_rgba(c.color)) * 255).astype(np.uint8)
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, format="PNG")
    from pyproj import Transformer

    x0, y0, x1, y1 = merc.rio.bounds()
    (west, east), (south, north) = Transformer.from_crs("EPSG:3857", "EPSG:4326", always_xy=True).transform([x0, x1], [y0, y1])
    m = folium.Map(location=[(south + north) / 2, (west + east) / 2], tiles=None, control_scale=True)
    folium.raster_layers.ImageOverlay(
        image="data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(),
        bounds=[[south, west], [north, east]], opacity=opacity, name="classes").add_to(m)
    if polygons is not None and len(polygons):
        colors = {c.id: c.color for c in classes}
        folium.GeoJson(polygons.to_crs("EPSG:4326")[["class_id", "class_name", "area_m2", "geometry"]],
                       name="polygons",
                       style_function=lambda f: {"color": "black", "weight": 0.5,
                                                 "fillColor": colors.get(f["properties"]["class_id"], "#888888"),
                                                 "fillOpacity": 0.0},
                       tooltip=folium.GeoJsonTooltip(["class_name", "area_m2"])).add_to(m)
    folium.LayerControl().add_to(m)
    m.fit_bounds([[south, west], [north, east]])
    return m
