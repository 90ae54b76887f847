"""Objects of a scene on a cluster: the stages planned and run from the client.

Stages (futures on ``client``; model tasks carry the job's ``model_resources``):

1. ``detect_chunk`` per chunk (on the model's workers): read the chunk's haloed window, detect.
2. ``match`` per pair of chunks whose windows overlap: pairs of detections that are one object.
3. On the client: ``merge.resolve`` joins the matched detections into objects (ids, classes, scores):
   only boxes, scores and pairs come back, never masks.
4. ``paint_chunk`` per chunk: paints the objects over its core into the store (``instance_id``
   uint32, 0 = none; ``class_id`` of the object, the background class elsewhere, 255 nodata) and
   returns the polygons of the objects whose box centre lies in its core (each object once, whole).

Then ``geoseg.instances.outputs`` writes ``instances.tif`` and ``classes.tif`` (COGs), ``objects.gpkg`` and, last,
run.json (the commit protocol of ``geoseg.pipeline.commit``).
"""

from __future__ import annotations

import uuid
from typing import Any

from geoseg.instances import merge
from geoseg.instances.net import DEFAULTS
from geoseg.instances.tasks import background_id, detect_chunk, match_windows, meta, paint_chunk
from geoseg.tiling import Box, Chunk, TilingPlan


def prompted_objects(meta: dict[tuple[int, int], dict[str, Any]], shape: tuple[int, int]) -> list[merge.SceneObject]:
    """One object per prompt that gave a mask, from the chunk that segmented it; id = prompt row + 1."""
    found = []
    for key, m in sorted(meta.items()):
        for i, number in enumerate(m["index"]):
            box = tuple(int(v) for v in m["boxes"][i])
            found.append(merge.SceneObject(int(number) + 1, int(m["labels"][i]), float(m["scores"][i]), box, ((key, i),),
                                           not bool(merge.cut(m["boxes"][i], m["window"], shape)[0])))
    return sorted(found, key=lambda o: o.id)


def neighbour_pairs(plan: TilingPlan) -> list[tuple[Chunk, Chunk]]:
    """Pairs of chunks whose windows overlap (each pair once)."""
    reach = -(-2 * plan.halo // plan.chunk_size) if plan.halo else 0
    ny, nx = plan.grid_shape
    pairs = []
    for a in plan:
        for dy in range(0, reach + 1):
            for dx in range(-reach, reach + 1):
                if (dy, dx) <= (0, 0) or not (0 <= a.iy + dy < ny and 0 <= a.ix + dx < nx):
                    continue
                b = plan.chunk(a.iy + dy, a.ix + dx)
                if a.input.intersect(b.input) is not None:
                    pairs.append((a, b))
    return pairs


def panoptic_class_map(semantic: Any, instance: Any) -> dict[int, int]:
    """Where each object class of ``instance`` goes in the legend of ``semantic``'s map: the semantic
    class of the same name, else its own id if free, else the lowest free id (both models number
    classes from 1 when trained from names, so "building" 1 must not become "agriculture" 1)."""
    taken = {c.id: c.name for c in semantic.classes}
    out: dict[int, int] = {}
    for c in instance.classes[1:]:
        same = [i for i, n in taken.items() if n == c.name]
        if same:
            out[c.id] = same[0]
            continue
        new = c.id if c.id not in taken else min(set(range(255)) - set(taken))
        taken[new] = c.name
        out[c.id] = new
    return out


def paint_plan(plan: TilingPlan, objects: list[merge.SceneObject]):
    """For every chunk: the region it paints (its core and the boxes of the objects it owns), the
    objects it draws polygons of (box centre in its core) and every object meeting that region. Objects are bucketed by the
    chunks their boxes touch, so the work grows with the objects, not chunks x objects."""
    cs = plan.chunk_size
    ny, nx = plan.grid_shape

    def span(b: Box) -> tuple[range, range]:
        return range(max(0, b.y0 // cs), min(ny, (b.y1 - 1) // cs + 1)), range(max(0, b.x0 // cs), min(nx, (b.x1 - 1) // cs + 1))

    buckets: dict[tuple[int, int], list[merge.SceneObject]] = {}
    owners: dict[tuple[int, int], list[merge.SceneObject]] = {}
    for o in objects:
        ys, xs = span(o.extent)
        for iy in ys:
            for ix in xs:
                buckets.setdefault((iy, ix), []).append(o)
        owners.setdefault((min(ny - 1, (o.box[0] + o.box[2]) // 2 // cs), min(nx - 1, (o.box[1] + o.box[3]) // 2 // cs)), []).append(o)
    for ch in plan:
        owned = owners.get((ch.iy, ch.ix), [])
        region = merge.cover(ch.core, owned)
        ys, xs = span(region)
        seen: dict[int, merge.SceneObject] = {}
        for iy in ys:
            for ix in xs:
                for o in buckets.get((iy, ix), ()):
                    if o.extent.intersect(region) is not None:
                        seen[o.id] = o
        yield ch, region, owned, sorted(seen.values(), key=lambda o: o.id)


def find_objects(job: Any, client: Any, store: str, params: dict[str, Any] | None = None, panoptic: bool = False,
                 class_map: dict[int, int] | None = None) -> dict[str, Any]:
    """Stages 1-4 on ``client``; returns the objects' records (polygons as WKB) and counts.
    ``panoptic``: objects are laid over the semantic class map the store already holds, their
    classes renumbered by ``class_map`` (``panoptic_class_map``)."""
    card, plan, stack = job.card, job.plan, job.stack
    params = dict(params or {})
    p = {**DEFAULTS, **card.method_params, **params}
    ref = job.ref
    res = dict(job.options.model_resources or {}) or None
    token = uuid.uuid4().hex[:10]
    by_chunk: dict[tuple[int, int], list] | None = None
    if card.method == "sam":
        from geoseg.instances.sam import read_prompts, scene_stretch

        params["stretch"] = scene_stretch(stack, card)  # one stretch for every chunk
        if job.options.prompts:
            by_chunk = {}
            cs = plan.chunk_size
            for pr in read_prompts(job.options.prompts, stack.grid):
                by_chunk.setdefault((pr["centre"][0] // cs, pr["centre"][1] // cs), []).append(pr)
    dets = {(ch.iy, ch.ix): client.submit(detect_chunk, ref, stack, ch, params,
                                          None if by_chunk is None else by_chunk.get((ch.iy, ch.ix), []),
                                          resources=res, pure=False, key=f"geoseg-detect-{token}-{ch.iy}-{ch.ix}") for ch in plan}
    from geoseg.pipeline.execute import WorkerWatch

    # the detections wait for a worker that can run the model: a clear error once none has been there for the timeout
    with WorkerWatch(client, list(dets.values()), res, job.options.worker_timeout, pause_timeout=job.options.pause_timeout):
        return _finish(job, client, store, dets, token, p, params, by_chunk, panoptic, class_map)


def _finish(job: Any, client: Any, store: str, dets: dict, token: str, p: dict[str, Any], params: dict[str, Any],
            by_chunk: dict | None, panoptic: bool, class_map: dict[int, int] | None) -> dict[str, Any]:
    """Stages 2-4 over the detections ``dets`` (futures)."""
    card, plan, stack = job.card, job.plan, job.stack
    metas = {k: client.submit(meta, f, key=f"geoseg-meta-{token}-{k[0]}-{k[1]}") for k, f in dets.items()}
    pairs = [] if by_chunk is not None else [
        (a, b, client.submit(match_windows, dets[(a.iy, a.ix)], dets[(b.iy, b.ix)], float(p["match_iou"]),
                             key=f"geoseg-match-{token}-{a.iy}-{a.ix}-{b.iy}-{b.ix}")) for a, b in neighbour_pairs(plan)]
    got = client.gather(metas)
    matched = client.gather([f for _, _, f in pairs])
    edges = [(((a.iy, a.ix), i), ((b.iy, b.ix), j)) for (a, b, _), found in zip(pairs, matched) for i, j in found]
    objects = prompted_objects(got, plan.shape) if by_chunk is not None else merge.resolve(got, edges, plan.shape)
    detections = sum(len(m["scores"]) for m in got.values())
    tasks = []
    for ch, region, owned, needed in paint_plan(plan, objects):
        keys = {(ch.iy, ch.ix)} | {k for o in needed for k, _ in o.members}
        tasks.append(client.submit(paint_chunk, store, ch, region, needed, [o.id for o in owned], {k: dets[k] for k in keys},
                                   stack.grid.affine, None if panoptic else background_id(card), panoptic and card.method == "sam",
                                   class_map, key=f"geoseg-paint-{token}-{ch.iy}-{ch.ix}"))
    records = [r for part in client.gather(tasks) for r in part]
    for f in [*dets.values(), *metas.values(), *(f for _, _, f in pairs), *tasks]:
        f.release()
    records.sort(key=lambda r: r["instance_id"])
    return {"records": records, "detections": detections, "objects": len(records), "pairs": len(edges),
            "scene_parameters": {"stretch": params["stretch"]} if "stretch" in params else {}}
