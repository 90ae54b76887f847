"""The class map as a Cloud-Optimized GeoTIFF built on the cluster: workers make the tiles, the client lays them out.

Workers compute the overview levels (MODE of 2x2 blocks, nodata ignored: averaging would
invent classes) and DEFLATE-compress every 512 px tile of every level, one task per 4096 px block
for four levels at once, then in rounds over the mosaic of the last level made (a task per tile, as
this module first did, spent its time scheduling: an 8192 px map took 3.5 s, in blocks 1.3 s, on two
workers). The client first learns only the tiles' sizes, writes the TIFF header (IFDs before data,
as GDAL's COG driver lays them out, with its "ghost" structural metadata), then appends the tiles
in COG order (smallest overview first, full resolution last, rows in order), fetching a few rows
at a time.

GeoTIFF keys, GDAL metadata (class names and colours), nodata and the colour table are the
bytes GDAL itself writes for this grid: taken from a tiny GeoTIFF GDAL makes in memory.
odc-geo's ``save_cog_with_dask`` does the same job but pads the raster to a multiple of its
overview factor (the grid would change), so geoseg lays the file out itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
import struct
import uuid
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
from odc.geo.geobox import GeoBox

from geoseg.model.card import NODATA_CLASS, ClassInfo

TILE = 512
BLOCK = 8 * TILE  # one task makes a 4096 px block's tiles at four levels
_GHOST = ("LAYOUT=IFDS_BEFORE_DATA\nBLOCK_ORDER=ROW_MAJOR\nBLOCK_LEADER=SIZE_AS_UINT4\n"
          "BLOCK_TRAILER=LAST_4_BYTES_REPEATED\nKNOWN_INCOMPATIBLE_EDITION=NO\n ")
# tags copied from GDAL's own GeoTIFF: ColorMap, GeoTIFF keys and transform, GDAL metadata and nodata
_COPIED = (320, 33550, 33922, 34264, 34735, 34736, 34737, 42112, 42113)
_TYPES = {1: ("B", 1), 2: ("s", 1), 3: ("H", 2), 4: ("I", 4), 12: ("d", 8), 16: ("Q", 8)}


def mode2(x: np.ndarray) -> np.ndarray:
    """One overview step: the most frequent valid value of each 2x2 block (ties: the first in
    row order), nodata where the block has none. ``x`` has even sides.

    The four pixels a, b, c, d of each block are compared pairwise once (six comparisons): a
    pixel's count is itself (if valid) plus the valid pixels equal to it. All in uint8, the block
    grid at a time (10x faster than counting each pixel's matches among all four in int64)."""
    a, b, c, d = (np.ascontiguousarray(x[i::2, j::2]) for i in (0, 1) for j in (0, 1))
    va, vb, vc, vd = (v != NODATA_CLASS for v in (a, b, c, d))
    ab, ac, ad = (a == b) & va, (a == c) & va, (a == d) & va
    bc, bd, cd = (b == c) & vb, (b == d) & vb, (c == d) & vc
    u8 = np.uint8
    counts = (va.view(u8) + ab.view(u8) + ac.view(u8) + ad.view(u8), vb.view(u8) + ab.view(u8) + bc.view(u8) + bd.view(u8),
              vc.view(u8) + ac.view(u8) + bc.view(u8) + cd.view(u8), vd.view(u8) + ad.view(u8) + bd.view(u8) + cd.view(u8))
    out, best = a, counts[0]  # a block with no valid pixel keeps a, which is nodata
    for v, n in zip((b, c, d), counts[1:]):
        more = n > best  # strictly: a tie keeps the earlier pixel
        out, best = np.where(more, v, out), np.where(more, n, best)
    return out


def level_shapes(shape: tuple[int, int]) -> list[tuple[int, int]]:
    """Full resolution and its overviews' shapes (each padded to even sides, then halved) until a level fits in one tile."""
    out = [(int(shape[0]), int(shape[1]))]
    while max(out[-1]) > TILE:
        h, w = out[-1]
        out.append(((h + 1) // 2, (w + 1) // 2))
    return out


def _even(a: np.ndarray) -> np.ndarray:
    h, w = a.shape
    return np.pad(a, ((0, h % 2), (0, w % 2)), constant_values=NODATA_CLASS) if h % 2 or w % 2 else a


def block_pyramid(block: np.ndarray, n: int, downsample: bool) -> tuple[list[list[bytes]], np.ndarray]:
    """The compressed tiles (row-major) of ``n`` successive levels of one block, and the last of those levels.

    ``downsample``: ``block`` is the level before the first one (the first is its MODE overview).
    A block's sides are a multiple of a tile at every level it makes, except at the raster's right
    and bottom edges, where padding to even sides is the whole raster's own: the tiles equal those
    of the levels computed over the whole raster.
    """
    a = block
    tiles = []
    for i in range(n):
        if downsample or i:
            a = mode2(_even(a))
        tiles.append([compress_tile(a[y:y + TILE, x:x + TILE]) for y in range(0, a.shape[0], TILE)
                      for x in range(0, a.shape[1], TILE)])
    return tiles, a


@dataclass(eq=False)
class Round:
    """One task per block over one level's mosaic, making the tiles of levels ``first .. first + n - 1``."""

    blocks: np.ndarray  # (block rows, block columns): futures of each block's tiles
    first: int
    n: int
    side: int  # a block's side at level ``first``
    sizes: np.ndarray | None = None  # per block, each level's tile sizes (once computed)

    def level_side(self, level: int) -> int:
        return self.side >> (level - self.first)


def block_pyramid_read(array: Any, y0: int, y1: int, x0: int, x1: int, n: int) -> tuple[list[list[bytes]], np.ndarray]:
    """A first round's block, read from a zarr array by the task itself."""
    return block_pyramid(np.asarray(array[y0:y1, x0:x1]), n, False)


def block_pyramid_mosaic(lasts: list[list[np.ndarray]], n: int) -> tuple[list[list[bytes]], np.ndarray]:
    """A later round's block: the last levels of the previous round's blocks it covers, side by side."""
    return block_pyramid(np.block(lasts), n, True)


def block_pyramid_tiles(result: tuple[list[list[bytes]], np.ndarray]) -> list[list[bytes]]:
    return result[0]


def block_pyramid_last(result: tuple[list[list[bytes]], np.ndarray]) -> np.ndarray:
    return result[1]


def pyramid_futures(client: Any, full: Any, n_levels: int, block: int, priority: float = 0) -> list[Round]:
    """The rounds of block tasks that make every level's tiles, submitted to ``client`` (the futures of their last
    levels are let go once the next round's tasks hold them).

    One task per ``block`` px block makes its tiles at several levels (``block`` = TILE x 2^k: k + 1 levels from
    full resolution, then k per round on the mosaic of the previous round's last level), so there are a few tasks
    per block instead of several per tile, and memory stays one block per task. ``full``: a zarr array, which the
    first round's tasks read themselves (plain tasks: no worker imports dask.array, and with it xarray and pandas,
    0.55 s of one core), or a dask array, computed block by block. Only a block's last level (1/64 of it) moves to
    the next round's task; its tiles stay where they were made until the client fetches them."""
    k = (block // TILE).bit_length() - 1
    if k < 1 or block != TILE << k:
        raise ValueError(f"block must be {TILE} px times a power of two, at least 2; got {block}")
    h, w = full.shape
    rows, cols = range(0, h, block), range(0, w, block)
    n = min(k + 1, n_levels)
    if hasattr(full, "to_delayed"):  # a dask array: its own graph gives the blocks
        import dask

        parts = full.rechunk(block).to_delayed(optimize_graph=False).ravel()
        pairs = client.compute([dask.delayed(block_pyramid, pure=True)(p, n, False) for p in parts], priority=priority)
    else:
        pairs = [client.submit(block_pyramid_read, full, y, min(y + block, h), x, min(x + block, w), n, pure=False,
                               priority=priority) for y in rows for x in cols]
    shape = (len(rows), len(cols))
    rounds: list[Round] = []
    level, steps = 0, n - 1  # each step pads to even sides and halves
    while True:
        tiles = client.map(block_pyramid_tiles, pairs, pure=False, priority=priority)
        rounds.append(Round(_grid(tiles, shape), level, n, block >> (level > 0)))
        level += n
        lasts = None if level >= n_levels else _grid(client.map(block_pyramid_last, pairs, pure=False, priority=priority),
                                                      shape)
        for fu in pairs:  # the tiles and the last level have futures of their own: a block's pair goes with them
            fu.release()
        if lasts is None:
            return rounds
        per = 1 << steps  # previous blocks a block of this round covers each way: their last levels are block >> steps
        n = min(k, n_levels - level)
        shape = (-(-shape[0] // per), -(-shape[1] // per))
        pairs = [client.submit(block_pyramid_mosaic, lasts[y * per:(y + 1) * per, x * per:(x + 1) * per].tolist(), n,
                               pure=False, priority=priority) for y in range(shape[0]) for x in range(shape[1])]
        for fu in lasts.ravel():  # held by the tasks just submitted, until they ran
            fu.release()
        steps = n


def _file_order(per_block: np.ndarray, i: int, widths: list[int]) -> list[Any]:
    """Level ``i``'s items of every block (``per_block[by, bx][i]``, each block's row-major, ``widths[bx]`` a row) in
    the file's order: rows of tiles across the blocks."""
    out: list[Any] = []
    for by in range(per_block.shape[0]):
        lists = [per_block[by, bx][i] for bx in range(per_block.shape[1])]
        for r in range(len(lists[0]) // widths[0]):
            for items, n in zip(lists, widths):
                out.extend(items[r * n:(r + 1) * n])
    return out


def _widths(side: int, width: int, columns: int) -> list[int]:
    """Tiles a row in each block column of a level ``width`` px wide, blocks ``side`` px wide at that level."""
    return [-(-min(side, width - bx * side) // TILE) for bx in range(columns)]


def _grid(items: list[Any], shape: tuple[int, ...]) -> np.ndarray:
    out = np.empty(len(items), object)
    for i, v in enumerate(items):  # one by one: numpy would unpack lists
        out[i] = v
    return out.reshape(shape)


def _tile_sizes(result: list[list[bytes]]) -> list[list[int]]:
    return [[len(t) for t in lvl] for lvl in result]


def _tile_rows(result: list[list[bytes]], level: int, r0: int, r1: int, n: int) -> list[list[bytes]]:
    """Rows ``r0:r1`` of a block's tiles at its ``level`` (``n`` tiles a row)."""
    tiles = result[level]
    return [tiles[r * n:(r + 1) * n] for r in range(r0, r1)]


def _batches_of_rows(sizes: list[int], ntx: int, nb: int, budget: int) -> Iterator[tuple[int, int]]:
    """(first, end) tile rows of a level fetched together: within one row of blocks (``nb`` tile rows), and no
    more compressed bytes than ``budget`` unless one row alone has more."""
    n_rows = len(sizes) // ntx
    ty = 0
    while ty < n_rows:
        end, total = ty, 0
        limit = min(n_rows, (ty // nb + 1) * nb)
        while end < limit:
            row = sum(sizes[end * ntx:(end + 1) * ntx])
            if end > ty and total + row > budget:
                break
            total += row
            end += 1
        yield ty, end
        ty = end


def compress_tile(block: np.ndarray) -> bytes:
    """A full 512 x 512 tile (edge tiles padded with nodata), DEFLATE as TIFF compression 8."""
    tile = np.full((TILE, TILE), NODATA_CLASS, np.uint8)
    tile[: block.shape[0], : block.shape[1]] = block
    return zlib.compress(tile.tobytes(), 6)


def gdal_tags(grid: GeoBox, classes: Iterable[ClassInfo], tags: Mapping[str, Any] | None) -> dict[int, tuple[int, Any]]:
    """{tag: (TIFF type, values)} of the tags GDAL writes for this grid, class metadata and colour table."""
    import tifffile
    from rasterio.io import MemoryFile

    from geoseg.io.cog import _rio_crs, class_tags, colormap

    classes = tuple(classes)
    dataset_tags, band_tags = class_tags(classes)
    dataset_tags |= {str(k): str(v) for k, v in (tags or {}).items()}
    with MemoryFile() as mem:
        with mem.open(driver="GTiff", height=16, width=16, count=1, dtype="uint8", nodata=NODATA_CLASS,
                      crs=_rio_crs(grid), transform=grid.affine) as dst:
            dst.write_colormap(1, colormap(classes))
            dst.set_band_description(1, "class_id")
            dst.update_tags(**dataset_tags)
            dst.update_tags(1, **band_tags)
            dst.write(np.zeros((1, 16, 16), np.uint8))
        data = mem.read()
    import io

    out: dict[int, tuple[int, Any]] = {}
    with tifffile.TiffFile(io.BytesIO(data)) as tf:
        for tag in tf.pages[0].tags:
            if tag.code in _COPIED:
                value = tag.value
                if tag.dtype == 2:
                    value = (value if isinstance(value, str) else value.decode()).encode("utf-8") + b"\0"
                elif tag.code == 320:
                    value = np.asarray(value, np.uint16).ravel()
                out[tag.code] = (int(tag.dtype), value)
    return out


class _Ifd:
    """One IFD's tags, laid out classic (4-byte offsets) or BigTIFF (8-byte)."""

    def __init__(self, big: bool) -> None:
        self.big = big
        self.tags: dict[int, tuple[int, Any]] = {}

    def add(self, code: int, typ: int, values: Any) -> None:
        self.tags[code] = (typ, values)

    @staticmethod
    def _raw(typ: int, values: Any) -> tuple[bytes, int]:
        if typ == 2:
            raw = bytes(values)
            return raw, len(raw)
        fmt, _ = _TYPES[typ]
        vals = np.atleast_1d(np.asarray(values)).ravel().tolist()
        return struct.pack("<" + fmt * len(vals), *vals), len(vals)

    def size(self) -> int:
        """Bytes of the IFD and its out-of-line values."""
        entry, head, inline = (20, 8 + 8, 8) if self.big else (12, 2 + 4, 4)
        extra = 0
        for typ, values in self.tags.values():
            raw, _ = self._raw(typ, values)
            if len(raw) > inline:
                extra += len(raw) + (len(raw) % 2)
        return head + entry * len(self.tags) + extra

    def pack(self, at: int, next_ifd: int) -> bytes:
        entry, inline = (20, 8) if self.big else (12, 4)
        n = len(self.tags)
        head = struct.pack("<Q", n) if self.big else struct.pack("<H", n)
        tail_at = at + len(head) + entry * n + (8 if self.big else 4)
        entries, blobs = b"", b""
        for code in sorted(self.tags):
            typ, values = self.tags[code]
            raw, count = self._raw(typ, values)
            if len(raw) <= inline:
                field = raw.ljust(inline, b"\0")
            else:
                off = tail_at + len(blobs)
                field = struct.pack("<Q", off) if self.big else struct.pack("<I", off)
                blobs += raw + (b"\0" if len(raw) % 2 else b"")
            entries += struct.pack("<HHQ", code, typ, count) if self.big else struct.pack("<HHI", code, typ, count)
            entries += field
        nxt = struct.pack("<Q", next_ifd) if self.big else struct.pack("<I", next_ifd)
        return head + entries + nxt + blobs


def start_cog_cluster(client: Any, class_id: Any, *, block: int = BLOCK, priority: float = 0) -> list[Round]:
    """The block tasks of ``class_id``'s COG, submitted now (every round at once), for ``write_cog_cluster(...,
    rounds=)`` to lay the file out from later. Given a priority below other work's, the workers make the tiles
    when that work leaves them idle (``geoseg predict``: while the client joins and writes the polygons)."""
    return pyramid_futures(client, class_id, len(level_shapes(class_id.shape)), block, priority)


def release(rounds: list[Round]) -> None:
    """Let the block tasks of ``rounds`` go (their tiles leave the workers), written or not."""
    for fu in (fu for r in rounds for fu in r.blocks.ravel()):
        fu.release()


def write_cog_cluster(
    client: Any,
    class_id: Any,
    out_path: str | os.PathLike,
    *,
    grid: GeoBox,
    classes: Iterable[ClassInfo],
    tags: Mapping[str, Any] | None = None,
    block: int = BLOCK,
    batch_bytes: int = 64 << 20,
    bigtiff: bool | None = None,
    priority: float = 0,
    rounds: list[Round] | None = None,
) -> dict[str, Any]:
    """Write ``class_id`` (a zarr array or dask array, uint8, ``grid.shape``) as a COG built on ``client``'s workers.

    The file appears at ``out_path`` complete or not at all. Returns the levels and tile counts.
    The client fetches tiles a few rows at a time, at most ``batch_bytes`` of them compressed (or one row).
    ``rounds``: the block tasks ``start_cog_cluster`` submitted for ``class_id`` and ``block`` (let go here, written
    or not).
    """
    out = Path(out_path)
    if tuple(class_id.shape) != tuple(grid.shape) or class_id.dtype != np.uint8:
        from geoseg.errors import InputError

        release(rounds or [])
        raise InputError(f"{out_path}: the class map of shape {tuple(class_id.shape)} ({class_id.dtype}) does not fit the "
                         f"grid {tuple(grid.shape)} (uint8)")
    shapes = level_shapes(class_id.shape)
    # every block task of every round submitted at once; the results stay on the workers until written
    if rounds is None:
        rounds = pyramid_futures(client, class_id, len(shapes), block, priority)
    round_of = [r for r in rounds for _ in range(r.n)]  # each level's round
    try:  # the tiles stay on the workers until written, and go whatever happens
        for r in rounds:
            r.sizes = _grid(client.gather(client.map(_tile_sizes, list(r.blocks.ravel()), pure=False, priority=priority)),
                            r.blocks.shape)
        widths = [_widths(r.level_side(i), w, r.blocks.shape[1]) for i, (r, (_, w)) in enumerate(zip(round_of, shapes))]
        sizes = [_file_order(r.sizes, i - r.first, widths[i]) for i, r in enumerate(round_of)]
        total = sum(sum(s) for s in sizes)
        # classic TIFF: tile bytes, 8 bytes of leader and trailer and 8 of offset and count per tile, IFDs and tags
        n_tiles = sum(len(s) for s in sizes)
        big = total + 16 * n_tiles + 2**20 > 2**32 - 1 if bigtiff is None else bigtiff
        copied = gdal_tags(grid, classes, tags)
        ifds = []
        for i, (h, w) in enumerate(shapes):
            ifd = _Ifd(big)
            ifd.add(254, 4, 1 if i else 0)  # NewSubfileType: reduced-resolution image for overviews
            ifd.add(256, 4, w)
            ifd.add(257, 4, h)
            ifd.add(258, 3, 8)
            ifd.add(259, 3, 8)  # DEFLATE
            ifd.add(262, 3, 3)  # palette
            ifd.add(277, 3, 1)
            ifd.add(284, 3, 1)
            ifd.add(322, 3, TILE)
            ifd.add(323, 3, TILE)
            n = len(sizes[i])
            ifd.add(324, 16 if big else 4, np.zeros(n, np.uint64))
            ifd.add(325, 16 if big else 4, np.asarray(sizes[i], np.uint64))
            ifd.add(339, 3, 1)
            ifd.add(320, 3, copied[320][1])
            if i == 0:
                for code, (typ, value) in copied.items():
                    if code != 320:
                        ifd.add(code, typ, value)
            elif 42113 in copied:
                ifd.add(42113, *copied[42113])
            ifds.append(ifd)
        header_len = 16 if big else 8
        ghost = f"GDAL_STRUCTURAL_METADATA_SIZE={len(_GHOST):06d} bytes\n{_GHOST}".encode()
        first_ifd = header_len + len(ghost)
        first_ifd += first_ifd % 2
        ifd_at, at = [], first_ifd
        for ifd in ifds:
            ifd_at.append(at)
            at += ifd.size()
            at += at % 2
        data_at = at
        # tile offsets: smallest overview first, full resolution last; each tile has GDAL's leader
        # (its size, 4 bytes) and trailer (its last 4 bytes again), which readers use to fetch it in one go
        cursor = data_at
        for i in reversed(range(len(ifds))):
            offs = np.zeros(len(sizes[i]), np.uint64)
            for k, s in enumerate(sizes[i]):
                offs[k] = cursor + 4
                cursor += 4 + s + 4
            ifds[i].add(324, 16 if big else 4, offs)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(b"II+\0" + struct.pack("<HHQ", 8, 0, first_ifd) if big else b"II*\0" + struct.pack("<I", first_ifd))
                f.write(ghost)
                f.write(b"\0" * (first_ifd - f.tell()))
                for k, ifd in enumerate(ifds):
                    nxt = ifd_at[k + 1] if k + 1 < len(ifds) else 0
                    f.write(ifd.pack(ifd_at[k], nxt))
                    f.write(b"\0" * ((ifd_at[k + 1] if k + 1 < len(ifds) else data_at) - f.tell()))
                for i in reversed(range(len(ifds))):
                    r = round_of[i]
                    nb = r.level_side(i) // TILE  # tile rows in a row of blocks
                    for ty0, ty1 in _batches_of_rows(sizes[i], -(-shapes[i][1] // TILE), nb, batch_bytes):
                        by, r0 = divmod(ty0, nb)
                        parts = client.gather([client.submit(_tile_rows, fu, i - r.first, r0, r0 + ty1 - ty0, n, pure=False,
                                                             priority=priority) for fu, n in zip(r.blocks[by], widths[i])])
                        for k in range(ty1 - ty0):  # rows of tiles across the blocks
                            for blob in (b for part in parts for b in part[k]):
                                f.write(struct.pack("<I", len(blob)) + blob + blob[-4:])
                        del parts
                    if i == r.first:  # every level of this round written: its tiles can go
                        release([r])
                assert f.tell() == cursor, (f.tell(), cursor)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    finally:
        release(rounds)
    return {"levels": [list(s) for s in shapes], "tiles": n_tiles, "blocks": sum(r.blocks.size for r in rounds),
            "bytes": cursor, "bigtiff": big}
