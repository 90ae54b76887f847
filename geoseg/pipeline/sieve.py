"""The card's sieve (``--mmu``) over a whole prediction, joined across chunks after the segment stage.

Sieved inside each chunk's window, a minimum mapping unit of N pixels needs 2 N - 1 pixels of class map
around the core (geoseg.vector.sieve), and the model computes them: 4x the forward passes for 1000 px on 2048
px chunks with the N a window needed before small neighbours stopped voting, more now.
Here the model's halo is its receptive field only (and the majority filter's radius, run in the
window), the segment stage writes the raw class map into ``class_id_raw``, and this stage sieves
it as ``geoseg.vector.sieve`` does for vectorize, in two passes of chunk tasks:

1. each chunk reads its core and a one-pixel ring and reports its border regions (sizes, classes,
   edges); the client joins them, decides the small joined regions' classes and saves the
   decisions in the store (``.geoseg/sieve.npz``);
2. each chunk reads its raw core, sieves it (inner regions itself, border regions as decided) and
   writes ``class_id``, then its marker (``.geoseg/sieved/IY_IX``).

The raw map is never written over, so a pass cut short is taken up again (``--resume``): the saved
decisions, and the chunks without a marker. Once every chunk is sieved the raw array is removed.
The result equals the card's sieve of the whole class map.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from geoseg.errors import detached
from geoseg.io import storage
from geoseg.model.card import NODATA_CLASS, PostProcess
from geoseg.tiling import Box, TilingPlan

RAW_ARRAY = "class_id_raw"
DECISIONS = ".geoseg/sieve.npz"
SIEVED = ".geoseg/sieved"


def sieve_joined(pp: PostProcess) -> bool:
    """Whether a prediction sieves in this stage (any sieve does; the majority filter stays in the window)."""
    return pp.sieve_pixels > 1


def _read(store: str, array: str, box: Box) -> np.ndarray:
    import zarr

    group = zarr.open_group(store, mode="r", **storage.zarr_kwargs(store))
    return np.asarray(group[array][box.y0:box.y1, box.x0:box.x1])


@detached
def border_task(store: str, plan: TilingPlan, iy: int, ix: int, pp: PostProcess) -> dict[str, Any]:
    """Pass 1 of a chunk: its ``border_facts`` (read with a one-pixel ring of its neighbours, for the edges)."""
    from geoseg.vector.sieve import border_facts, class_limits, core_regions

    core = plan.chunk(iy, ix).core
    window = core.grow(1, plan.shape)
    regions = core_regions(_read(store, RAW_ARRAY, window), core, window, NODATA_CLASS, pp.connectivity)
    return border_facts(regions, core.open_sides(plan.shape), class_limits(pp.min_pixels, pp.class_min_pixels))


@detached
def sieve_task(store: str, plan: TilingPlan, iy: int, ix: int, pp: PostProcess, decided: tuple[np.ndarray, ...],
               key: str) -> int:
    """Pass 2 of a chunk: its raw core sieved into ``class_id``, then its marker; returns the pixels changed."""
    import zarr

    from geoseg.vector.sieve import class_limits, core_regions, sieve_core

    core = plan.chunk(iy, ix).core
    raw = _read(store, RAW_ARRAY, core)
    regions = core_regions(raw, core, core, NODATA_CLASS, pp.connectivity)
    out = sieve_core(regions, core.open_sides(plan.shape), class_limits(pp.min_pixels, pp.class_min_pixels), raw, decided)
    group = zarr.open_group(store, mode="r+", **storage.zarr_kwargs(store))
    group["class_id"][core.y0:core.y1, core.x0:core.x1] = out
    storage.write_atomic(storage.join(store, SIEVED, f"{iy}_{ix}"), key.encode())
    return int(np.count_nonzero(out != raw))


Decided = tuple[np.ndarray, np.ndarray, np.ndarray]  # border labels that change, their new classes, border labels small joined


def _save(store: str, decided: dict[tuple[int, int], Decided], key: str) -> None:
    keys = sorted(decided)
    counts = [len(decided[k][0]) for k in keys]
    small_counts = [len(decided[k][2]) for k in keys]
    buf = io.BytesIO()
    np.savez(buf, key=np.array(key), chunks=np.array(keys, np.int64).reshape(-1, 2), counts=np.array(counts, np.int64),
             labels=np.concatenate([decided[k][0] for k in keys] or [np.zeros(0)]).astype(np.int64),
             classes=np.concatenate([decided[k][1] for k in keys] or [np.zeros(0)]).astype(np.int64),
             small_counts=np.array(small_counts, np.int64),
             small=np.concatenate([decided[k][2] for k in keys] or [np.zeros(0)]).astype(np.int64))
    storage.write_atomic(storage.join(store, DECISIONS), buf.getvalue())


def _load(store: str, key: str) -> dict[tuple[int, int], Decided] | None:
    """The decisions saved for ``key``, or None (none saved, for another job, or by a geoseg whose sieve let small
    neighbours vote alike: decided again)."""
    try:
        f = np.load(io.BytesIO(storage.read_bytes(storage.join(store, DECISIONS))), allow_pickle=False)
    except (FileNotFoundError, OSError, ValueError):
        return None
    if str(f["key"]) != key or "small" not in f.files:
        return None
    ends = np.cumsum(f["counts"])
    starts = ends - f["counts"]
    small_ends = np.cumsum(f["small_counts"])
    small_starts = small_ends - f["small_counts"]
    return {(int(iy), int(ix)): (f["labels"][a:b], f["classes"][a:b], f["small"][c:d])
            for (iy, ix), a, b, c, d in zip(f["chunks"], starts, ends, small_starts, small_ends)}


def _sieved(store: str, key: str) -> set[tuple[int, int]]:
    from geoseg.io.zarr_store import done_chunks

    return done_chunks(store, key, SIEVED)


def forget(store: str) -> None:
    """Drop saved decisions and markers: the raw map changed (chunks segmented again)."""
    storage.remove(storage.join(store, DECISIONS))
    storage.remove(storage.join(store, SIEVED), recursive=True)


def decide_store(client: Any, store: str, plan: TilingPlan, pp: PostProcess, key: str, priority: int = 0
                 ) -> dict[tuple[int, int], Decided]:
    """Pass 1 over a store whose raw class map is complete (or the decisions it saved for ``key``): each chunk's
    border labels that change class, and to which."""
    from geoseg.vector.regions import join_borders
    from geoseg.vector.sieve import class_limits, joined_decisions

    decided = _load(store, key)
    if decided is not None:
        return decided
    forget(store)
    if not storage.is_url(store):
        Path(store, SIEVED).mkdir(parents=True, exist_ok=True)
    found = {(ch.iy, ch.ix): client.submit(border_task, store, plan, ch.iy, ch.ix, pp, pure=False, priority=priority)
             for ch in plan}
    facts = dict(zip(found, client.gather(list(found.values()))))
    del found
    ny, nx = plan.grid_shape
    join = join_borders((ny, nx), {k: f["edges"] for k, f in facts.items()},
                        {k: f["classes"] for k, f in facts.items()}, pp.connectivity)
    decisions = joined_decisions(join, {iy * nx + ix: f for (iy, ix), f in facts.items()},
                                 class_limits(pp.min_pixels, pp.class_min_pixels), nx)
    del facts
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
    decided = {(ch.iy, ch.ix): decisions.get(ch.iy * nx + ch.ix, empty) for ch in plan}
    _save(store, decided, key)
    return decided


def sieve_store(client: Any, store: str, plan: TilingPlan, pp: PostProcess, key: str, priority: int = 0) -> dict[str, Any]:
    """Both passes over a store whose raw class map is complete, the chunks sieved already (their marker holds
    ``key``) kept; the raw map removed at the end. Returns what it did (for run.json)."""
    decided = decide_store(client, store, plan, pp, key, priority)
    done = _sieved(store, key)
    todo = [ch for ch in plan if (ch.iy, ch.ix) not in done]
    futures = [client.submit(sieve_task, store, plan, ch.iy, ch.ix, pp, decided[(ch.iy, ch.ix)], key, pure=False,
                             priority=priority) for ch in todo]
    changed = sum(client.gather(futures))
    storage.remove(storage.join(store, RAW_ARRAY), recursive=True)
    return {"sieve": "joined across chunks", "chunks_sieved": len(todo), "chunks_reused": len(done),
            "pixels_changed": None if done else int(changed)}
