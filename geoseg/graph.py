"""Build the dask graph of a segmentation: read -> infer -> (write). Building never computes.

Reading, inference and writing are separate layers so a cluster can place them apart (CPU
workers for I/O, GPU workers for the model: the infer layer carries the resource annotation,
and ``submit`` hands the scheduler the layered graph so that annotation reaches it).
Each read task reads its chunk's whole input window (core + halo) in the file's own dtype, so an
infer task depends on exactly one read: what travels to the model's worker is the chunk's input
and its halo, nothing more.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

from geoseg.errors import detached
from geoseg.infer import InferenceSettings, segment_chunk, segment_chunk_north_up
from geoseg.io.sources import RasterStack, read_bands
from geoseg.runtime import ModelRef, get_model
from geoseg.tiling import Box, Chunk, TilingPlan

if TYPE_CHECKING:  # dask.array is the client's (0.6 s to import): the workers' tasks here never need it
    import dask.array as da


@detached
def read_block(stack: RasterStack, box: Box) -> tuple[np.ndarray, np.ndarray]:
    """The bands of ``box`` in the rasters' common dtype (no float copy on the wire) and each band's
    valid mask packed to bits (an eighth of a byte per band and pixel on the wire)."""
    data, valid = read_bands(stack, box.window, dtype=stack.dtype)
    return data, np.packbits(valid, axis=None)


def unpack_valid(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return np.unpackbits(packed, count=int(np.prod(shape))).reshape(shape).view(bool)  # 0/1 bytes: no copy


def on_device(settings: InferenceSettings, device: str) -> InferenceSettings:
    from dataclasses import replace

    return replace(settings, device=device)


@detached
def infer_chunk(
    ref: ModelRef,
    plan: TilingPlan,
    chunk: Chunk,
    settings: InferenceSettings,
    block: tuple[np.ndarray, np.ndarray],
    flip: tuple[bool, bool] = (False, False),
) -> tuple[np.ndarray, np.ndarray]:
    bundle = get_model(ref)
    _single_stream()  # geoseg evaluate or predict without a client: dask's threads
    data, packed = block
    valid = unpack_valid(packed, (data.shape[0], *chunk.input.shape))
    return segment_chunk_north_up(bundle.net, bundle.card, plan, chunk, data, valid, on_device(settings, bundle.device),
                                  bundle.companion, flip)


def grid_flip(stack: RasterStack) -> tuple[bool, bool]:
    """(rows run south to north, columns east to west) of a raster's grid: the model sees it turned."""
    a = stack.grid.affine
    return (a.e > 0, a.a < 0)


@dataclass(frozen=True)
class Segmentation:
    """The lazy result of a segmentation: dask arrays on the scene grid plus the graph's names."""

    plan: TilingPlan
    class_id: da.Array
    confidence: da.Array
    graph: HighLevelGraph
    read_name: str
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
    reads = {(read_name, ch.iy, ch.ix): (read_block, stack, ch.input) for ch in plan}
    flip = grid_flip(stack)
    infers = {(infer_name, ch.iy, ch.ix): (infer_chunk, ref, plan, ch, settings, (read_name, ch.iy, ch.ix), flip) for ch in plan}
    annotations = {"resources": dict(model_resources)} if model_resources else None
    layers: dict[str, Any] = {
        read_name: MaterializedLayer(reads),
        infer_name: MaterializedLayer(infers, annotations=annotations),
    }
    deps: dict[str, set[str]] = {read_name: set(), infer_name: {read_name}}
    return _segmentation(plan, layers, deps, token, read_name, infer_name)


def _segmentation(plan: TilingPlan, layers: dict[str, Any], deps: dict[str, set[str]], token: str, read_name: str,
                  infer_name: str) -> Segmentation:
    """The class_id and confidence arrays over an infer layer's (class map, confidence) results."""
    arrays = {}
    for i, name in enumerate(("class_id", "confidence")):
        out = f"geoseg-{name}-{token}"
        layers[out] = MaterializedLayer({(out, ch.iy, ch.ix): (operator.getitem, (infer_name, ch.iy, ch.ix), i) for ch in plan})
        deps[out] = {infer_name}
        arrays[name] = out
    import dask.array as da

    graph = HighLevelGraph(layers, deps)
    class_id = da.Array(graph, arrays["class_id"], plan.chunks, dtype=np.uint8)
    confidence = da.Array(graph, arrays["confidence"], plan.chunks, dtype=np.float32)
    return Segmentation(plan, class_id, confidence, graph, read_name, infer_name)


def with_layer(graph: HighLevelGraph, name: str, tasks: Mapping[Any, Any], depends_on: set[str],
               annotations: dict[str, Any] | None = None) -> HighLevelGraph:
    """``graph`` with one more layer (its annotations kept: never flatten a graph to a dict)."""
    layers = dict(graph.layers)
    deps = {k: set(v) for k, v in graph.dependencies.items()}
    layers[name] = MaterializedLayer(dict(tasks), annotations=annotations)
    deps[name] = set(depends_on)
    return HighLevelGraph(layers, deps)


def submit(client: Any, graph: HighLevelGraph, keys: list[Any], priority: int = 0) -> list[Any]:
    """Futures for ``keys`` of a layered graph; layer annotations (resources) reach the scheduler.

    ``Client.get`` on a HighLevelGraph sends each layer's annotations with its tasks; a plain
    dict made from the graph would drop them and let model tasks run on any worker.
    """
    if not keys:
        return []
    return client.get(graph, keys, sync=False, priority=priority)


def assemble(boxes: Sequence[Box], blocks: Sequence[np.ndarray], outer: Box) -> np.ndarray:
    """Cut the window ``outer`` (bands, h, w) out of the blocks (bands, ...) that cover it."""
    data = np.empty((blocks[0].shape[0], *outer.shape), blocks[0].dtype)
    for box, b in zip(boxes, blocks):
        part = box.intersect(outer)
        assert part is not None
        data[(slice(None), *part.relative_to(outer))] = b[(slice(None), *part.relative_to(box))]
    return data


def band_masks(data: np.ndarray, nodata: Sequence[float | None]) -> np.ndarray:
    """Where each band holds a value (bands, h, w): not its nodata, finite."""
    valid = np.ones(data.shape, bool)
    for v, band, nd in zip(valid, data, nodata):
        if nd is not None:
            v &= ~np.isnan(band) if isinstance(nd, float) and np.isnan(nd) else band != nd
        if band.dtype.kind == "f":
            v &= np.isfinite(band)
    return valid


def valid_mask(data: np.ndarray, nodata: Sequence[float | None]) -> np.ndarray:
    """Pixels where every band holds a value: not its nodata, finite."""
    return band_masks(data, nodata).all(axis=0)


@detached
def infer_window(ref: ModelRef, plan: TilingPlan, chunk: Chunk, settings: InferenceSettings,
                 nodata: tuple[float | None, ...], boxes: Sequence[Box], blocks: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Segment one chunk whose input window is assembled from the blocks of an array (any dask collection)."""
    bundle = get_model(ref)
    _single_stream()
    data = assemble(boxes, blocks, chunk.input)
    return segment_chunk(bundle.net, bundle.card, plan, chunk, data, band_masks(data, nodata), on_device(settings, bundle.device),
                         bundle.companion)


def _single_stream() -> None:
    """Outside a distributed worker (dask's threaded scheduler), each dask thread runs one torch thread (where torch
    is loaded: methods without a network never import it)."""
    import sys

    if "torch" not in sys.modules:
        return
    import torch

    from geoseg.runtime import _worker_threads

    if _worker_threads() is None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def segmentation_from_array(
    data: da.Array,
    nodata: Sequence[float | None],
    plan: TilingPlan,
    ref: ModelRef,
    settings: InferenceSettings,
    model_resources: dict[str, float] | None = None,
) -> Segmentation:
    """The infer layer over an array ``(bands, y, x)`` from anywhere (rioxarray, odc-stac, stackstac...).

    The array is rechunked onto the plan's chunks (whole bands); each infer task takes the blocks
    its haloed window touches (a chunk and parts of its neighbours) and cuts the window out.
    """
    data = data.rechunk(((data.shape[0],),) + plan.chunks)
    token = tokenize(data.name, plan, ref, settings, tuple(nodata))
    infer_name = f"geoseg-infer-{token}"
    cs = plan.chunk_size
    infers: dict[Any, Any] = {}
    for ch in plan:
        keys, boxes = [], []
        for iy in range(ch.input.y0 // cs, (ch.input.y1 - 1) // cs + 1):
            for ix in range(ch.input.x0 // cs, (ch.input.x1 - 1) // cs + 1):
                keys.append((data.name, 0, iy, ix))
                boxes.append(plan.chunk(iy, ix).core)
        infers[(infer_name, ch.iy, ch.ix)] = (infer_window, ref, plan, ch, settings, tuple(nodata), boxes, keys)
    annotations = {"resources": dict(model_resources)} if model_resources else None
    source = data.__dask_graph__()
    source = source if isinstance(source, HighLevelGraph) else HighLevelGraph.from_collections(data.name, source)
    layers: dict[str, Any] = dict(source.layers)
    deps = {k: set(v) for k, v in source.dependencies.items()}
    layers[infer_name] = MaterializedLayer(infers, annotations=annotations)
    deps[infer_name] = set(data.__dask_layers__())
    return _segmentation(plan, layers, deps, token, "", infer_name)
