"""Pure inference kernels: arrays in, arrays out. No files, no cluster.

``segment_chunk`` runs the forward passes of one chunk (its tiles batched together) on an
array that covers the chunk's input window, and returns the class map and confidence of its core.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from geoseg.model.card import NODATA_CLASS, ModelCard
from geoseg.tiling import Box, Chunk, Tile, TilingPlan

PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class InferenceSettings:
    precision: str = "fp32"
    batch_size: int = 4
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")


def normalize(data: np.ndarray, valid: np.ndarray, card: ModelCard) -> np.ndarray:
    """``(x - mean) / std`` per band; invalid pixels become 0 (the band mean)."""
    mean = np.asarray(card.normalization.mean, np.float32)[:, None, None]
    std = np.asarray(card.normalization.std, np.float32)[:, None, None]
    x = (data.astype(np.float32, copy=False) - mean) / std
    x[:, ~valid] = 0.0
    return x


def _autocast(settings: InferenceSettings):
    if settings.precision == "bf16":
        return torch.autocast(device_type=torch.device(settings.device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def forward(net: torch.nn.Module, x: np.ndarray, stride: int, settings: InferenceSettings) -> np.ndarray:
    """Class probabilities ``(n, classes, h, w)`` for a batch ``(n, bands, h, w)``.

    The batch is padded with zeros at the bottom and right up to the stride; callers place
    every batch on the stride lattice, so this is the same padding one pass over the whole
    scene gets.
    """
    n, b, h, w = x.shape
    ph, pw = -h % stride, -w % stride
    t = torch.from_numpy(np.ascontiguousarray(x))
    if ph or pw:
        t = torch.nn.functional.pad(t, (0, pw, 0, ph))
    t = t.to(settings.device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), _autocast(settings):
        logits = net(t)
    probs = torch.softmax(logits.float(), dim=1)[:, :, :h, :w]
    return probs.cpu().numpy()


def _batches(tiles: Sequence[Tile], batch_size: int) -> list[list[Tile]]:
    by_shape: dict[tuple[int, int], list[Tile]] = {}
    for t in tiles:
        by_shape.setdefault(t.input.shape, []).append(t)
    return [group[i : i + batch_size] for group in by_shape.values() for i in range(0, len(group), batch_size)]


def segment_window(
    net: torch.nn.Module,
    card: ModelCard,
    x: np.ndarray,
    valid: np.ndarray,
    outer: Box,
    tiles: Sequence[Tile],
    core: Box,
    settings: InferenceSettings,
) -> tuple[np.ndarray, np.ndarray]:
    """Class ids (uint8, 255 = nodata) and confidence (float32, NaN = nodata) over ``core``.

    ``x`` is the normalised input covering ``outer``; ``tiles`` cover ``core`` and read inside ``outer``.
    """
    lut = np.asarray(card.class_ids, np.uint8)
    class_id = np.full(core.shape, NODATA_CLASS, np.uint8)
    confidence = np.full(core.shape, np.nan, np.float32)
    for batch in _batches(tiles, settings.batch_size):
        xb = np.stack([x[(slice(None), *t.input.relative_to(outer))] for t in batch])
        probs = forward(net, xb, card.stride, settings)
        for t, p in zip(batch, probs):
            p = p[(slice(None), *t.core.relative_to(t.input))]
            class_id[t.core.relative_to(core)] = lut[p.argmax(axis=0)]
            confidence[t.core.relative_to(core)] = p.max(axis=0)
    v = valid[core.relative_to(outer)]
    class_id[~v] = NODATA_CLASS
    confidence[~v] = np.nan
    return class_id, confidence


def segment_chunk(
    net: torch.nn.Module,
    card: ModelCard,
    plan: TilingPlan,
    chunk: Chunk,
    data: np.ndarray,
    valid: np.ndarray,
    settings: InferenceSettings,
) -> tuple[np.ndarray, np.ndarray]:
    """Segment one chunk; ``data``/``valid`` cover ``chunk.input``."""
    if not valid[chunk.core.relative_to(chunk.input)].any():
        # Nothing to see: skip the network entirely.
        return (np.full(chunk.core.shape, NODATA_CLASS, np.uint8), np.full(chunk.core.shape, np.nan, np.float32))
    x = normalize(data, valid, card)
    return segment_window(net, card, x, valid, chunk.input, plan.tiles(chunk), chunk.core, settings)


def segment_array(
    net: torch.nn.Module, card: ModelCard, data: np.ndarray, valid: np.ndarray, settings: InferenceSettings
) -> tuple[np.ndarray, np.ndarray]:
    """One forward pass over a whole in-memory scene: the reference tiled inference must equal."""
    h, w = valid.shape
    whole = Box(0, h, 0, w)
    x = normalize(data, valid, card)
    return segment_window(net, card, x, valid, whole, [Tile(whole, whole)], whole, settings)
