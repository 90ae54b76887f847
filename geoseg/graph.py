"""Build the dask graph of a segmentation: read -> infer -> (write). Building never computes.

Reading, inference and writing are separate layers so a cluster can place them apart (CPU
workers for I/O, GPU workers for the model: the infer layer carries the resource annotation).
Read blocks are the chunk cores, so reads are aligned to the chunk grid and each pixel is read
once; an infer task gathers the blocks its chunk's input window (core + halo) touches.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Sequence

import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

from geoseg.errors import detached
from geoseg.infer import InferenceSettings, segment_chunk
from geoseg.io.sources import RasterStack, read_window
from geoseg.runtime import ModelRef, get_model
from geoseg.tiling import Box, Chunk, TilingPlan


@detached
def read_block(stack: RasterStack, box: Box) -> tuple[np.ndarray, np.ndarray]:
    return read_window(stack, box.window)


def assemble(boxes: Sequence[Box], blocks: Sequence[tuple[np.ndarray, np.ndarray]], outer: Box) -> tuple[np.ndarray, np.ndarray]:
    """Cut the window ``outer`` out of the read blocks that cover it."""
    bands = blocks[0][0].shape[0]
    data = np.empty((bands, *outer.shape), np.float32)
    valid = np.empty(outer.shape, bool)
    for box, (d, v) in zip(boxes, blocks):
        part = box.intersect(outer)
        assert part is not None
        dst, src = part.relative_to(outer), part.relative_to(box)
        data[(slice(None), *dst)] = d[(slice(None), *src)]
        valid[dst] = v[src]
    return data, valid


@detached
def infer_chunk(
    ref: ModelRef,
    plan: TilingPlan,
    chunk: Chunk,
    settings: InferenceSettings,
    boxes: Sequence[Box],
    blocks: Sequence[tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    bundle = get_model(ref)
    data, valid = assemble(boxes, blocks, chunk.input)
    device_settings = InferenceSettings(settings.precision, settings.batch_size, str(next(bundle.net.parameters()).device))
    return segment_chunk(bundle.net, bundle.card, plan, chunk, data, valid, device_settings)


@dataclass(frozen=True)
class Segmentation:
    """The lazy result of a segmentation: dask arrays on the scene grid plus the graph's names."""

    plan: TilingPlan
    class_id: da.Array
    confidence: da.Array
    graph: HighLevelGraph
    infer_name: str

    def infer_key(self, chunk: Chunk) -> tuple[str, int, int]:
        return (self.infer_name, chunk.iy, chunk.ix)


def build_segmentation(
    stack: RasterStack,
    plan: TilingPlan,
    ref: ModelRef,
    settings: InferenceSettings,
    model_resources: dict[str, float] | None = None,
) -> Segmentation:
    """The read and infer layers of a segmentation and its output arrays (nothing is computed)."""
    token = tokenize(stack, plan, ref, settings)
    read_name, infer_name = f"geoseg-read-{token}", f"geoseg-infer-{token}"
    reads: dict[Any, Any] = {}
    for ch in plan:
        reads[(read_name, ch.iy, ch.ix)] = (read_block, stack, ch.core)
    infers: dict[Any, Any] = {}
    cs = plan.chunk_size
    for ch in plan:
        keys, boxes = [], []
        for iy in range(ch.input.y0 // cs, (ch.input.y1 - 1) // cs + 1):
            for ix in range(ch.input.x0 // cs, (ch.input.x1 - 1) // cs + 1):
                keys.append((read_name, iy, ix))
                boxes.append(plan.chunk(iy, ix).core)
        infers[(infer_name, ch.iy, ch.ix)] = (infer_chunk, ref, plan, ch, settings, boxes, keys)
    annotations = {"resources": model_resources} if model_resources else None
    layers: dict[str, Any] = {
        read_name: MaterializedLayer(reads),
        infer_name: MaterializedLayer(infers, annotations=annotations),
    }
    deps: dict[str, set[str]] = {read_name: set(), infer_name: {read_name}}
    arrays = {}
    for i, (name, dtype) in enumerate((("class_id", np.uint8), ("confidence", np.float32))):
        out = f"geoseg-{name}-{token}"
        layers[out] = MaterializedLayer({(out, ch.iy, ch.ix): (operator.getitem, (infer_name, ch.iy, ch.ix), i) for ch in plan})
        deps[out] = {infer_name}
        arrays[name] = (out, dtype)
    graph = HighLevelGraph(layers, deps)
    class_id = da.Array(graph, arrays["class_id"][0], plan.chunks, dtype=np.uint8)
    confidence = da.Array(graph, arrays["confidence"][0], plan.chunks, dtype=np.float32)
    return Segmentation(plan, class_id, confidence, graph, infer_name)
