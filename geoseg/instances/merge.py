"""Joining the detections of overlapping chunk windows into objects, and painting them (pure kernels).

Every chunk detects objects in its window (core + a halo at least as large as the objects), so an
object near a chunk line is seen by two to four windows. Detections of two windows are the same
object when their masks, restricted to the area both windows see, overlap with IoU >= ``match_iou``
(one to one, best overlaps first); a group never holds two detections of one window. Of one group
the object is the whole view (not cut by a window edge) of the window whose core holds the group's
centre (that of its best-scoring whole view): that window saw it with context on every side, as
one pass would. A group whose every member is cut by a window edge (an object larger than the halo)
becomes the union of its members, if one of their boxes reaches into its own window's core (the
client has the boxes; masks stay on the workers). A group seen only in halos, never by the window
whose core holds its centre, is dropped: that window had the better view and found nothing (or
found the object whole, and a cut piece matched it too poorly).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from geoseg.tiling import Box

Key = tuple[int, int]  # a chunk (iy, ix)


def paste(mask: np.ndarray, box: Sequence[int], region: Box) -> np.ndarray:
    """``mask`` (covering ``box`` = y0, x0, y1, x1) placed in a False array covering ``region``."""
    out = np.zeros(region.shape, bool)
    y0, x0, y1, x1 = (int(v) for v in box)
    inter = Box(y0, y1, x0, x1).intersect(region)
    if inter is not None:
        out[inter.relative_to(region)] = mask[inter.relative_to(Box(y0, y1, x0, x1))]
    return out


def cut(boxes: np.ndarray, window: Box, shape: tuple[int, int]) -> np.ndarray:
    """Whether each box touches a side of its window that lies inside the scene (the object may go on)."""
    top, bottom, left, right = window.open_sides(shape)
    b = np.asarray(boxes).reshape(-1, 4)
    return ((b[:, 0] <= window.y0) & top) | ((b[:, 1] <= window.x0) & left) | ((b[:, 2] >= window.y1) & bottom) | \
        ((b[:, 3] >= window.x1) & right)


def centres_in(boxes: np.ndarray, core: Box) -> np.ndarray:
    b = np.asarray(boxes).reshape(-1, 4)
    cy, cx = (b[:, 0] + b[:, 2]) // 2, (b[:, 1] + b[:, 3]) // 2
    return (cy >= core.y0) & (cy < core.y1) & (cx >= core.x0) & (cx < core.x1)


def _box_meets(box: Sequence[int], core: Box) -> bool:
    y0, x0, y1, x1 = (int(v) for v in box)
    return Box(y0, y1, x0, x1).intersect(core) is not None


def match(a: Mapping[str, Any], wa: Box, b: Mapping[str, Any], wb: Box, min_iou: float) -> list[tuple[int, int]]:
    """Pairs (i, j) of detections of windows ``wa`` and ``wb`` that are one object: mask IoU on the shared area."""
    shared = wa.intersect(wb)
    ba, bb = np.asarray(a["boxes"]).reshape(-1, 4), np.asarray(b["boxes"]).reshape(-1, 4)
    if shared is None or not len(ba) or not len(bb):
        return []
    y0 = np.maximum(ba[:, None, 0], bb[None, :, 0])
    x0 = np.maximum(ba[:, None, 1], bb[None, :, 1])
    y1 = np.minimum(ba[:, None, 2], bb[None, :, 2])
    x1 = np.minimum(ba[:, None, 3], bb[None, :, 3])
    near = (np.minimum(y1, shared.y1) > np.maximum(y0, shared.y0)) & (np.minimum(x1, shared.x1) > np.maximum(x0, shared.x0))
    scored = []
    for i, j in zip(*np.nonzero(near)):
        box = Box(int(min(ba[i, 0], bb[j, 0])), int(max(ba[i, 2], bb[j, 2])), int(min(ba[i, 1], bb[j, 1])), int(max(ba[i, 3], bb[j, 3])))
        region = box.intersect(shared)
        if region is None:
            continue
        ma, mb = paste(a["masks"][i], ba[i], region), paste(b["masks"][j], bb[j], region)
        union = np.count_nonzero(ma | mb)
        if union and np.count_nonzero(ma & mb) / union >= min_iou:
            scored.append((np.count_nonzero(ma & mb) / union, int(i), int(j)))
    # one to one, best overlaps first: a blob one window sees as one never swallows two of the other's
    pairs, used_a, used_b = [], set(), set()
    for _, i, j in sorted(scored, key=lambda t: (-t[0], t[1], t[2])):
        if i not in used_a and j not in used_b:
            pairs.append((i, j))
            used_a.add(i)
            used_b.add(j)
    return sorted(pairs)


@dataclass(frozen=True)
class SceneObject:
    """One object of the scene: its id, class and score, and the detections its mask comes from."""

    id: int
    class_id: int
    score: float
    box: tuple[int, int, int, int]  # y0, x0, y1, x1 in scene pixels
    members: tuple[tuple[Key, int], ...]  # (chunk, detection) whose masks make it (one, or several unioned)
    whole: bool = True  # False: larger than the halo, the union of cut pieces

    @property
    def extent(self) -> Box:
        return Box(self.box[0], self.box[2], self.box[1], self.box[3])


def cover(region: Box, objects: Iterable[SceneObject]) -> Box:
    """The smallest box holding ``region`` and every object's box."""
    for o in objects:
        region = Box(min(region.y0, o.box[0]), max(region.y1, o.box[2]), min(region.x0, o.box[1]), max(region.x1, o.box[3]))
    return region


@dataclass
class _Find:
    parent: list[int] = field(default_factory=list)

    def add(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)


def resolve(meta: Mapping[Key, Mapping[str, Any]], pairs: Iterable[tuple[tuple[Key, int], tuple[Key, int]]],
            shape: tuple[int, int]) -> list[SceneObject]:
    """The scene's objects from every window's detections (``meta``: chunk -> boxes, scores, labels,
    window, core) and the matched pairs. Ids 1..N follow the objects' boxes (row-major), so they do
    not depend on the chunking."""
    uf, index = _Find(), {}
    windows: dict[int, set[Key]] = {}  # root -> the windows its detections come from
    for key in sorted(meta):
        for i in range(len(meta[key]["scores"])):
            index[(key, i)] = uf.add()
            windows[index[(key, i)]] = {key}
    for p, q in sorted(pairs, key=lambda pq: -max(float(meta[pq[0][0]]["scores"][pq[0][1]]), float(meta[pq[1][0]]["scores"][pq[1][1]]))):
        rp, rq = uf.find(index[p]), uf.find(index[q])
        if rp == rq or windows[rp] & windows[rq]:
            continue  # two detections of one window are two objects (each window's duplicates are already gone)
        uf.union(rp, rq)
        windows[uf.find(rp)] = windows[rp] | windows[rq]
    groups: dict[int, list[tuple[Key, int]]] = {}
    for member, n in index.items():
        groups.setdefault(uf.find(n), []).append(member)
    found = []
    for members in groups.values():
        whole = [(key, i) for key, i in members if not cut(meta[key]["boxes"][i], meta[key]["window"], shape)[0]]
        if whole:
            # One centre for the group (its best whole view's), so windows whose masks differ by a
            # pixel at a chunk line never both decline it; the object is the view of the window
            # whose core holds that centre. None of them: the window that holds it missed it.
            best = max(whole, key=lambda ki: (float(meta[ki[0]]["scores"][ki[1]]), tuple(-v for v in ki[0])))
            centre = np.asarray(meta[best[0]]["boxes"][best[1]])
            owners = [(key, i) for key, i in whole if centres_in(centre, meta[key]["core"])[0]]
            if owners:
                key, i = owners[0]
                m = meta[key]
                found.append((tuple(int(v) for v in m["boxes"][i]), int(m["labels"][i]), float(m["scores"][i]), ((key, i),), True))
            continue
        # every view is cut by a window edge: an object larger than the halo, the union of its pieces
        boxes = np.asarray([meta[k]["boxes"][i] for k, i in members])
        best = max(members, key=lambda ki: float(meta[ki[0]]["scores"][ki[1]]))
        box = (int(boxes[:, 0].min()), int(boxes[:, 1].min()), int(boxes[:, 2].max()), int(boxes[:, 3].max()))
        if not any(_box_meets(meta[k]["boxes"][i], meta[k]["core"]) for k, i in members):
            # pieces only in halos (a poorly matching piece of an object another window saw whole, or
            # something the window whose core holds it did not find): that window had the better view
            continue
        found.append((box, int(meta[best[0]]["labels"][best[1]]), float(meta[best[0]]["scores"][best[1]]),
                      tuple(sorted(members)), False))
    found.sort(key=lambda f: (f[0], -f[2]))
    return [SceneObject(n + 1, lab, sc, box, mem, whole) for n, (box, lab, sc, mem, whole) in enumerate(found)]


def object_mask(obj: SceneObject, dets: Mapping[Key, Mapping[str, Any]], region: Box | None = None) -> np.ndarray:
    """The object's mask over ``region`` (default: its box), from the detections it is made of."""
    region = region or obj.extent
    out = np.zeros(region.shape, bool)
    for key, i in obj.members:
        out |= paste(dets[key]["masks"][i], dets[key]["boxes"][i], region)
    return out


def paint(objects: Sequence[SceneObject], dets: Mapping[Key, Mapping[str, Any]], region: Box) -> np.ndarray:
    """uint32 instance ids over ``region``; where objects overlap the higher score wins (ties: lower id)."""
    out = np.zeros(region.shape, np.uint32)
    for obj in sorted(objects, key=lambda o: (o.score, -o.id)):
        box = obj.extent.intersect(region)
        if box is None:
            continue
        m = object_mask(obj, dets, box)
        out[box.relative_to(region)][m] = obj.id
    return out
