"""Pure inference kernels: arrays in, arrays out. No files, no cluster.

``segment_chunk`` runs the forward passes of one chunk (its tiles batched together) on an
array that covers the chunk's input window, and returns the class map and confidence of its core.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from geoseg.model.card import NODATA_CLASS, ModelCard
from geoseg.tiling import Box, Chunk, Tile, TilingPlan

PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class InferenceSettings:
    precision: str = "fp32"
    batch_size: int = 4
    device: str = "cpu"
    params: tuple[tuple[str, Any], ...] = ()  # what a method computed over the whole scene (Otsu's threshold)
    tta: str | None = None  # test-time augmentation of an smp model: None = the card's, "none" or "d4"
    # the post-processing each window runs in place of the card's (a PostProcess; geoseg predict: the majority
    # filter only, its sieve runs over the whole map after: geoseg.pipeline.sieve)
    postprocess: Any = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")


NORMALIZE_BYTES = 8 << 20  # a strip of normalised rows, computed in cache before its transposing copy


def _normalized(data: np.ndarray, valid: np.ndarray, card: ModelCard, band_valid: np.ndarray | None,
                out: np.ndarray | None = None) -> np.ndarray:
    """(bands + indices, h, w) float32 of ``normalize`` in band-first layout (into ``out`` if given)."""
    mean = np.asarray(card.normalization.mean, np.float32)[:, None, None]
    std = np.asarray(card.normalization.std, np.float32)[:, None, None]
    indices = getattr(card, "index_channels", ())
    nb = data.shape[0]
    x = np.empty((nb + len(indices), *data.shape[1:]), np.float32) if out is None else out
    bands = x[:nb]
    np.subtract(data, mean, out=bands, dtype=np.float32)
    np.divide(bands, std, out=bands)
    invalid = ~valid
    np.copyto(bands, np.float32(0), where=invalid)
    if band_valid is not None:
        np.copyto(bands, np.float32(0), where=~band_valid)
    if indices:
        from geoseg.methods.features import spectral_index

        raw = data.astype(np.float32)
        np.copyto(raw, np.float32(np.nan), where=invalid)
        if band_valid is not None:
            np.copyto(raw, np.float32(np.nan), where=~band_valid)
        extra = x[nb:]
        units = getattr(card, "index_band_units", None)
        for i, name in enumerate(indices):
            extra[i] = spectral_index(raw, card.band_roles, name, units)
        np.copyto(extra, np.float32(0), where=~np.isfinite(extra))
    return x


def _channels(data: np.ndarray, card: ModelCard) -> int:
    return data.shape[0] + len(getattr(card, "index_channels", ()))


def _normalized_into(out: np.ndarray, data: np.ndarray, valid: np.ndarray, card: ModelCard,
                     band_valid: np.ndarray | None) -> None:
    """``out`` (h, w, channels) = the normalised window, channels-last, made in strips of rows: each strip
    computed band-first in a small buffer (writing channels-last directly is 3x slower: strided writes),
    then copied across. Every value is computed per pixel, so strips give the same result, and no
    window-sized temporaries exist, which a fresh worker would first have to fault in."""
    h, w, c = out.shape
    rows = max(1, min(h, NORMALIZE_BYTES // (4 * c * w)))
    buf = np.empty((c, rows, w), np.float32)
    for y0 in range(0, h, rows):
        y1 = min(y0 + rows, h)
        x = _normalized(data[:, y0:y1], valid[y0:y1], card, None if band_valid is None else band_valid[:, y0:y1],
                        buf[:, : y1 - y0])
        out[y0:y1] = x.transpose(1, 2, 0)


def normalize(data: np.ndarray, valid: np.ndarray, card: ModelCard, band_valid: np.ndarray | None = None,
              channels_last: bool = False) -> np.ndarray:
    """``(x - mean) / std`` per band; invalid pixels (and missing values of a band) become 0 (the band mean).

    The card's index channels follow the bands (0 where an index has no finite value). Written
    with masked copies (no boolean gathers: this runs on every chunk's window).
    ``channels_last``: the (bands, h, w) result is a view of (h, w, bands) memory, the layout the
    network runs in, so the network makes no copy of its own while it holds its feature maps; made
    in strips (``_normalized_into``: a 4240 px window of 4 bands + 2 indices as one block took 3.7 s
    in a fresh worker, 0.6 s warm; see the #7 note)."""
    if not channels_last:
        return _normalized(data, valid, card, band_valid)
    out = np.empty((*data.shape[1:], _channels(data, card)), np.float32)
    _normalized_into(out, data, valid, card, band_valid)
    return out.transpose(2, 0, 1)


# dtypes torch converts to float32 on a device the way numpy does on the CPU
_DEVICE_DTYPES = frozenset(np.dtype(t) for t in ("uint8", "int8", "uint16", "int16", "int32", "float32", "float64"))


def _on_device(a: np.ndarray, device: str) -> torch.Tensor:
    import torch

    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


def normalizes_on_device(card: ModelCard, dtype: np.dtype) -> bool:
    """Whether ``normalized_on_device`` gives the CPU path's values for this card and dtype."""
    return not getattr(card, "index_channels", ()) and np.dtype(dtype) in _DEVICE_DTYPES


def normalized_on_device(data: np.ndarray, valid: np.ndarray, card: ModelCard, band_valid: np.ndarray | None,
                         device: str) -> torch.Tensor | None:
    """``_normalized`` computed on ``device`` from the raw bands: (bands, h, w) float32, the same values.

    On a GPU the raw bands travel to the device (half the bytes of float32 for uint16 data) and the
    arithmetic runs there, not in the worker's one CPU thread while the GPU waits (measured, H200, 4352 px
    windows: the GPU was busy 3% of the segment stage). None where only the CPU path can: index channels
    (``geoseg.methods.features``) or a dtype torch does not convert as numpy does."""
    import torch

    if not normalizes_on_device(card, data.dtype):
        return None
    mean = torch.tensor(card.normalization.mean, dtype=torch.float32, device=device)[:, None, None]
    std = torch.tensor(card.normalization.std, dtype=torch.float32, device=device)[:, None, None]
    x = (_on_device(data, device).to(torch.float32) - mean) / std  # as numpy: cast, subtract, divide in float32; never in
    # place: on the CPU device (and for float32 bands) the tensor is the caller's array
    keep = _on_device(valid, device)[None]
    if band_valid is not None:
        keep = keep & _on_device(band_valid, device)
    return torch.where(keep, x, torch.zeros((), dtype=torch.float32, device=device))


def _batch_tensor(x: np.ndarray, stride: int, device: str) -> torch.Tensor:
    """A batch ``(n, bands, h, w)`` as a channels-last tensor on ``device``, padded with zeros at the bottom and
    right up to ``stride``."""
    import torch

    h, w = x.shape[-2:]
    ph, pw = -h % stride, -w % stride
    if x.strides[1] != x.itemsize:  # not channels-last memory already (see normalize)
        x = np.ascontiguousarray(x)
    t = torch.from_numpy(x)
    if ph or pw:
        t = torch.nn.functional.pad(t, (0, pw, 0, ph))
    from geoseg.model.fuse import channels_last

    return channels_last(t.to(device))  # canonical strides: a numpy batch of one has a batch stride of 0


class InputWindow:
    """The normalised network input of one chunk's window (``normalize``), made when needed: whole,
    or, for a pass over the whole window, a strip of rows at a time (``rows``) as the first stage of a
    stage-wise pass reads it, so the window-sized input never exists. A fresh worker faults in every
    page it touches first (on the VMs measured, ~2 s per GB): a 4240 px window's 6 float channels
    are 0.43 GB."""

    def __init__(self, data: np.ndarray, valid: np.ndarray, card: ModelCard, band_valid: np.ndarray | None = None):
        self.data, self.valid, self.card, self.band_valid = data, valid, card, band_valid
        self._array: np.ndarray | None = None

    def array(self) -> np.ndarray:
        """The whole input (channels, h, w), in channels-last memory; made once."""
        if self._array is None:
            self._array = normalize(self.data, self.valid, self.card, self.band_valid, channels_last=True)
        return self._array

    def rows(self, stride: int, device: str) -> Any:
        """The whole window as one batch (1, channels, h, w), padded as ``_logits`` pads, for the network to read a
        strip of rows at a time (a ``geoseg.model.tiled.RowSource``; made whole only if a network asks)."""
        return _window_rows_class()(self, stride, device)


@functools.cache
def _window_rows_class() -> type:
    """The RowSource of an InputWindow, made once (torch is imported only where a network runs)."""
    from geoseg.model.tiled import RowSource

    class WindowRows(RowSource):
        """An InputWindow's rows as a RowSource. One class for every window, not one made per call: a
        class is a reference cycle, and one made in ``rows`` kept the window's arrays alive until Python's
        cyclic collector ran, often many windows later (measured, U-Net-resnet18 bf16, 4240 px windows
        one after another in one process: RSS grew from 3.1 to 6.0 GB over 30 windows; without the
        cycle it stays at 3.4 GB)."""

        def __init__(self, window: InputWindow, stride: int, device: str):
            h, w = window.valid.shape
            self.window, self.stride, self.device, self.size = window, stride, device, (h, w)
            self.channels = _channels(window.data, window.card)
            self.shape = (1, self.channels, h + (-h % stride), w + (-w % stride))
            # on a GPU the raw bands are normalised there where the card allows (else the CPU path, strip by strip)
            self.on_device = device != "cpu" and normalizes_on_device(window.card, window.data.dtype)

        def rows(self, y0: int, y1: int) -> torch.Tensor:
            import torch

            window, (h, w) = self.window, self.size
            if self.on_device:
                return self._device_rows(y0, y1)
            out = np.zeros((y1 - y0, self.shape[3], self.channels), np.float32)
            if min(y1, h) > y0:
                bv = None if window.band_valid is None else window.band_valid[:, y0:y1]
                _normalized_into(out[: min(y1, h) - y0, :w], window.data[:, y0:y1], window.valid[y0:y1], window.card, bv)
            from geoseg.model.fuse import channels_last

            # channels-last memory with canonical strides (torch takes a batch stride of the channels for NCHW)
            return channels_last(torch.from_numpy(out).permute(2, 0, 1)[None]).to(self.device)

        def whole(self) -> torch.Tensor:  # several networks, or one that runs as one pass: the array, made once
            if self.on_device:
                return self._device_rows(0, self.shape[2])
            return _batch_tensor(self.window.array()[None], self.stride, self.device)

        def _device_rows(self, y0: int, y1: int) -> torch.Tensor:
            """Rows ``y0:y1`` normalised on the device (``normalized_on_device``), padded with zeros."""
            import torch

            window, (h, w) = self.window, self.size
            part = None
            if min(y1, h) > y0:
                bv = None if window.band_valid is None else window.band_valid[:, y0:y1]
                part = normalized_on_device(window.data[:, y0:y1], window.valid[y0:y1], window.card, bv, self.device)
            out = torch.zeros((1, y1 - y0, self.shape[3], self.channels), dtype=torch.float32, device=self.device)
            out = out.permute(0, 3, 1, 2)  # channels-last memory, (1, channels, rows, width)
            if part is not None:
                out[0, :, : part.shape[1], :w] = part
            return out

    return WindowRows


def pixel_valid(card: ModelCard, valid: np.ndarray) -> np.ndarray:
    """Pixels to classify: ``valid`` as given (h, w), or from each band's mask (bands, h, w): every
    band present, or (``missing_bands: fill``) any band present."""
    if valid.ndim == 2:
        return valid
    return valid.any(axis=0) if card.missing_bands == "fill" else valid.all(axis=0)


def _autocast(settings: InferenceSettings):
    import torch

    if settings.precision == "bf16":
        return torch.autocast(device_type=torch.device(settings.device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _logits(net: torch.nn.Module, x: Any, stride: int, settings: InferenceSettings) -> torch.Tensor:
    """The network's logits ``(n, classes, h, w)`` for a batch ``(n, bands, h, w)`` (in the compute dtype).

    The batch is padded with zeros at the bottom and right up to the stride; callers place
    every batch on the stride lattice, so this is the same padding one pass over the whole
    scene gets. A large window of a U-Net runs stage by stage in strips (``geoseg.model.tiled``:
    the same logits, bounded memory).
    """
    import torch  # here, not at import: the client that plans a job never loads torch

    from geoseg.model.tiled import RowSource, tiled_forward

    if isinstance(x, RowSource):  # padded already, made a strip at a time (InputWindow.rows)
        t, (h, w) = x, x.size
    else:
        h, w = x.shape[-2:]
        t = _batch_tensor(x, stride, settings.device)

    with torch.inference_mode(), _autocast(settings):
        logits = tiled_forward(net, t)
    if tuple(logits.shape[-2:]) != tuple(t.shape[-2:]):
        from geoseg.errors import ModelError

        raise ModelError(f"the network's output is {tuple(logits.shape[-2:])} px for an input of {tuple(t.shape[-2:])}: "
                         "its head does not upsample to the input's size (an arch_params 'upsampling' for another "
                         "encoder depth?); train it again with the default arch_params")
    return logits[:, :, :h, :w]


def forward(net: torch.nn.Module, x: np.ndarray, stride: int, settings: InferenceSettings) -> np.ndarray:
    """Class probabilities ``(n, classes, h, w)`` for a batch ``(n, bands, h, w)`` (see ``_logits``)."""
    import torch

    probs = torch.softmax(_logits(net, x, stride, settings).float(), dim=1)
    return probs.cpu().numpy()


CLASS_ROWS = 64  # rows of logits turned into classes at a time: small enough to stay in cache


def forward_classes(net: torch.nn.Module, x: Any, stride: int, settings: InferenceSettings
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(class index, probability of that class) ``(n, h, w)`` each, as ``forward`` then argmax and max
    would give, without the probabilities of every class: the most likely class is the largest
    logit, and its probability is ``1 / sum(exp(logit - largest))``. Row strips keep it in cache."""
    import torch

    logits = _logits(net, x, stride, settings)
    n, c, h, w = logits.shape
    index = torch.empty((n, h, w), dtype=torch.uint8 if c <= 256 else torch.int64)
    prob = torch.empty((n, h, w), dtype=torch.float32)
    step = CLASS_ROWS if logits.device.type == "cpu" else h  # a device has the memory; one pass, one copy back
    with torch.inference_mode():
        for y0 in range(0, h, step):
            part = logits[:, :, y0:y0 + step].float()  # on the device; only the two results come back
            top, idx = part.max(dim=1)
            p = torch.exp(part - top[:, None]).sum(dim=1).reciprocal_()
            nan = torch.isnan(top)
            if nan.any():  # as the probabilities would say: no class is likelier than the first
                idx[nan] = 0
            index[:, y0:y0 + step] = idx.to(index.dtype).cpu()  # on a GPU: one byte a pixel crosses the bus, not eight
            prob[:, y0:y0 + step] = p.cpu()
    return index.numpy(), prob.numpy()


def forward_d4(net: torch.nn.Module, x: np.ndarray, stride: int, settings: InferenceSettings) -> np.ndarray:
    """Mean class probabilities over the 8 flips/rotations of the batch (test-time augmentation).

    The batch is padded to the stride at the bottom and right *before* it is turned, so every view
    sees the same padding in the same place: tiled inference with a halo stays equal to one pass.
    """
    n, b, h, w = x.shape
    ph, pw = -h % stride, -w % stride
    if ph or pw:
        x = np.pad(x, ((0, 0), (0, 0), (0, ph), (0, pw)))
    total = None
    for k in range(4):
        for flip in (False, True):
            t = np.rot90(x, k, axes=(2, 3))
            if flip:
                t = t[:, :, :, ::-1]
            p = forward(net, np.ascontiguousarray(t), stride, settings)
            if flip:
                p = p[:, :, :, ::-1]
            p = np.rot90(p, -k, axes=(2, 3))
            total = p.copy() if total is None else total + p
    return (total / 8.0)[:, :, :h, :w]


def _batches(tiles: Sequence[Tile], batch_size: int) -> list[list[Tile]]:
    by_shape: dict[tuple[int, int], list[Tile]] = {}
    for t in tiles:
        by_shape.setdefault(t.input.shape, []).append(t)
    return [group[i : i + batch_size] for group in by_shape.values() for i in range(0, len(group), batch_size)]


def segment_window(
    net: torch.nn.Module,
    card: ModelCard,
    x: np.ndarray | InputWindow,
    valid: np.ndarray,
    outer: Box,
    tiles: Sequence[Tile],
    core: Box,
    settings: InferenceSettings,
    mix: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Class ids (uint8, 255 = nodata) and confidence (float32, NaN = nodata) over ``core``.

    ``x`` is the normalised input covering ``outer`` (an array, or an InputWindow that makes it when
    needed); ``tiles`` cover ``core`` and read inside ``outer``.
    ``mix(probs, box)``: class probabilities of a tile's core combined with another model's (an ensemble).
    """
    lut = np.asarray(card.class_ids, np.uint8)
    class_id = np.full(core.shape, NODATA_CLASS, np.uint8)
    confidence = np.full(core.shape, np.nan, np.float32)
    d4 = (settings.tta or card.tta) == "d4"
    for batch in _batches(tiles, settings.batch_size):
        whole = len(batch) == 1 and batch[0].input == outer
        if whole and mix is None and not d4 and isinstance(x, InputWindow):
            # the default (tile = chunk): the input made a strip of rows at a time as the network reads it
            xb: Any = x.rows(card.stride, settings.device)
        elif whole:
            xb = _array(x)[None]  # the whole window is the one tile: no copy of it
        else:
            xa = _array(x)
            xb = np.stack([xa[(slice(None), *t.input.relative_to(outer))] for t in batch])
        if mix is None and not d4:  # the class and its probability straight from the logits
            index, prob = forward_classes(net, xb, card.stride, settings)
            for t, i, p in zip(batch, index, prob):
                sl = t.core.relative_to(t.input)
                class_id[t.core.relative_to(core)] = lut[i[sl]]
                confidence[t.core.relative_to(core)] = p[sl]
            continue
        probs = forward_d4(net, xb, card.stride, settings) if d4 else forward(net, xb, card.stride, settings)
        for t, p in zip(batch, probs):
            p = p[(slice(None), *t.core.relative_to(t.input))]
            if mix is not None:
                p = mix(p, t.core)
            class_id[t.core.relative_to(core)] = lut[p.argmax(axis=0)]
            confidence[t.core.relative_to(core)] = p.max(axis=0)
    v = valid[core.relative_to(outer)]
    class_id[~v] = NODATA_CLASS
    confidence[~v] = np.nan
    return class_id, confidence


def _array(x: np.ndarray | InputWindow) -> np.ndarray:
    return x.array() if isinstance(x, InputWindow) else x


def ensemble_mixer(companion: Any, card: ModelCard, data: np.ndarray, band_valid: np.ndarray | None, valid: np.ndarray,
                   outer: Box) -> Any:
    """``mix(probs, box)`` for an smp card with a per-pixel companion model: weight x network + (1 - weight) x trees.

    The companion's probabilities are computed once over the window ``outer`` (its texture needs
    a few pixels of context, inside the halo)."""
    ens = card.method_params.get("ensemble")
    if not ens or companion is None:
        return None
    from geoseg.methods.features import nan_bands
    from geoseg.methods.pixel import predict_pixels

    bv = band_valid if band_valid is not None else np.broadcast_to(valid, data.shape)
    other = predict_pixels(companion, card, ens["features"], nan_bands(data, bv), valid)
    w = float(ens["weight"])

    def mix(p: np.ndarray, box: Box) -> np.ndarray:
        return w * p + (1.0 - w) * other[(slice(None), *box.relative_to(outer))]

    return mix


def segment_chunk(
    net: Any,
    card: ModelCard,
    plan: TilingPlan,
    chunk: Chunk,
    data: np.ndarray,
    valid: np.ndarray,
    settings: InferenceSettings,
    companion: Any = None,
    align: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Segment one chunk; ``data``/``valid`` cover ``chunk.input``.

    ``align``: tiles read from the multiple of the stride at or before their input's start (``data`` must cover
    that): the network's stride grid then falls where one pass over the whole raster puts it.

    ``valid`` is the pixels' mask (h, w) or each band's (bands, h, w), so a model that classifies
    from the bands a pixel has (``missing_bands: fill``) can. ``net`` is the network of an ``smp``
    card or the predictor of another method. The post-processing of the card runs on the class
    map of the core grown by its ring (inside the halo) and the core is kept.
    """
    band_valid = valid if valid.ndim == 3 else None
    pix = pixel_valid(card, valid)
    if not pix[chunk.core.relative_to(chunk.input)].any():
        # Nothing to see: skip the model entirely.
        return (np.full(chunk.core.shape, NODATA_CLASS, np.uint8), np.full(chunk.core.shape, np.nan, np.float32))
    pp = card.postprocess if settings.postprocess is None else settings.postprocess
    box = chunk.core.grow(pp.ring, plan.shape).intersect(chunk.input) if pp.active else chunk.core
    assert box is not None
    if card.method == "smp":
        x = InputWindow(data, pix, card, band_valid)
        tiles = plan.tiles(chunk)
        if align:
            st = card.stride
            tiles = [Tile(t.core, Box(t.input.y0 - t.input.y0 % st, t.input.y1, t.input.x0 - t.input.x0 % st, t.input.x1))
                     for t in tiles]
        if pp.active:
            tiles = [Tile(t.core.grow(pp.ring, plan.shape).intersect(t.input) or t.core, t.input) for t in tiles]
        mix = ensemble_mixer(companion, card, data, band_valid, pix, chunk.input)
        class_id, confidence = segment_window(net, card, x, pix, chunk.input, tiles, box, settings, mix)
    else:
        class_id, confidence = classify_pixels(net, card, data, band_valid, pix, chunk.input, box, settings)
    if pp.active:
        from geoseg.methods.postprocess import apply

        class_id = apply(class_id, pp, box.open_sides(plan.shape))
        sl = chunk.core.relative_to(box)
        class_id, confidence = class_id[sl], confidence[sl]
    return class_id, confidence


def segment_chunk_north_up(net: Any, card: ModelCard, plan: TilingPlan, chunk: Chunk, data: np.ndarray, valid: np.ndarray,
                           settings: InferenceSettings, companion: Any = None,
                           flip: tuple[bool, bool] = (False, False)) -> tuple[np.ndarray, np.ndarray]:
    """``segment_chunk`` of a raster whose rows run south to north (``flip[0]``) or columns east to west (``flip[1]``):
    the model sees the window as it saw its training imagery, north-up and west to east (a mirror image is another
    image to a network), and the results go back onto the raster's own grid."""
    fy, fx = flip
    if not (fy or fx):
        return segment_chunk(net, card, plan, chunk, data, valid, settings, companion)
    h, w = plan.shape

    def mirror(b: Box) -> Box:
        return Box(h - b.y1 if fy else b.y0, h - b.y0 if fy else b.y1, w - b.x1 if fx else b.x0, w - b.x0 if fx else b.x1)

    sl = (slice(None, None, -1) if fy else slice(None), slice(None, None, -1) if fx else slice(None))
    # Mirrored windows start off the stride grid of a pass over the turned raster. Where that grid has its first
    # row (the turned raster's top) they start on it; elsewhere they are widened back to it with pixels of no
    # value, beyond the halo, so the network's stride grid and its padding at the far edges are one pass's.
    st = card.stride if card.method == "smp" else 1
    inp = mirror(chunk.input)
    ry, rx = inp.y0 % st, inp.x0 % st
    seen = Chunk(chunk.iy, chunk.ix, mirror(chunk.core), Box(inp.y0 - ry, inp.y1, inp.x0 - rx, inp.x1))

    def turned(a: np.ndarray) -> np.ndarray:
        return np.pad(a[(..., *sl)], ((0, 0),) * (a.ndim - 2) + ((ry, 0), (rx, 0)))

    class_id, confidence = segment_chunk(net, card, plan, seen, turned(data), turned(valid), settings, companion,
                                         align=st > 1)
    return np.ascontiguousarray(class_id[sl]), np.ascontiguousarray(confidence[sl])


def classify_pixels(predictor: Any, card: ModelCard, data: np.ndarray, band_valid: np.ndarray | None, valid: np.ndarray,
                    outer: Box, core: Box, settings: InferenceSettings) -> tuple[np.ndarray, np.ndarray]:
    """Class ids and confidence over ``core`` from a per-pixel method's probabilities on the window ``outer``."""
    from geoseg.methods.features import nan_bands

    bv = band_valid if band_valid is not None else np.broadcast_to(valid, data.shape)
    probs = predictor.probabilities(nan_bands(data, bv), valid, dict(settings.params))
    sl = core.relative_to(outer)
    p = probs[(slice(None), *sl)]
    lut = np.asarray(card.class_ids, np.uint8)
    class_id = lut[p.argmax(axis=0)]
    confidence = p.max(axis=0).astype(np.float32)
    v = valid[sl] & (p.sum(axis=0) > 0)  # a method gives no class where its inputs are missing
    class_id[~v] = NODATA_CLASS
    confidence[~v] = np.nan
    return class_id, confidence


def segment_array(
    net: Any, card: ModelCard, data: np.ndarray, valid: np.ndarray, settings: InferenceSettings, companion: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """One pass over a whole in-memory scene: the reference tiled inference must equal."""
    h, w = valid.shape[-2:]
    plan = TilingPlan.make((h, w), stride=card.stride, chunk_size=max(h, w), halo=0, tile_size=max(h, w))
    chunk = next(iter(plan))
    return segment_chunk(net, card, plan, chunk, data, valid, settings, companion)
