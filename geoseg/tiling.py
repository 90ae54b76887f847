"""The tiling plan: chunks with a halo on the raster's grid, planned without computing anything.

Every output pixel is computed by a forward pass whose input reaches at least ``halo`` pixels
beyond it wherever the scene continues. At the scene's edges inputs are cut, never filled.
Chunk and tile origins, chunk and tile sizes and the halo are multiples of the network's stride,
so every forward pass starts on the stride lattice and a pass that reaches the scene's end is
padded to the same lattice point as one pass over the whole scene: tiled equals untiled.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Iterator, Sequence

if TYPE_CHECKING:
    from geoseg.model.card import ModelCard

from rasterio.windows import Window

log = logging.getLogger(__name__)


def round_up(value: int, multiple: int) -> int:
    return -(-int(value) // multiple) * multiple


@dataclass(frozen=True, order=True)
class Box:
    """Half-open pixel rectangle ``[y0, y1) x [x0, x1)`` on the scene grid."""

    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.y1 - self.y0, self.x1 - self.x0)

    @property
    def size(self) -> int:
        return (self.y1 - self.y0) * (self.x1 - self.x0)

    @property
    def window(self) -> Window:
        return Window(self.x0, self.y0, self.x1 - self.x0, self.y1 - self.y0)

    def grow(self, by: int, limit: tuple[int, int]) -> "Box":
        """This box grown by ``by`` on every side, cut (never filled) at the scene's limits."""
        return Box(max(0, self.y0 - by), min(limit[0], self.y1 + by), max(0, self.x0 - by), min(limit[1], self.x1 + by))

    def intersect(self, other: "Box") -> "Box | None":
        b = Box(max(self.y0, other.y0), min(self.y1, other.y1), max(self.x0, other.x0), min(self.x1, other.x1))
        return b if b.y0 < b.y1 and b.x0 < b.x1 else None

    def open_sides(self, shape: tuple[int, int]) -> tuple[bool, bool, bool, bool]:
        """Sides (top, bottom, left, right) where a scene of ``shape`` continues beyond this box."""
        return (self.y0 > 0, self.y1 < shape[0], self.x0 > 0, self.x1 < shape[1])

    def relative_to(self, outer: "Box") -> tuple[slice, slice]:
        """Slices selecting this box inside an array that covers ``outer``."""
        return slice(self.y0 - outer.y0, self.y1 - outer.y0), slice(self.x0 - outer.x0, self.x1 - outer.x0)


@dataclass(frozen=True)
class Tile:
    """One forward pass: ``core`` is what it outputs, ``input`` what it reads (core + halo, cut)."""

    core: Box
    input: Box


@dataclass(frozen=True)
class Chunk:
    """One unit of distributed work: ``core`` is written, ``input`` is read (core + halo, cut)."""

    iy: int
    ix: int
    core: Box
    input: Box


@dataclass(frozen=True)
class TilingPlan:
    """How a scene of ``shape`` is cut into chunks and forward-pass tiles.

    ``chunk_size`` is the side of the written chunks (the Zarr chunks), ``tile_size`` the side
    of one forward pass's output; tiles of one chunk are batched together and never with
    another chunk's, so results do not depend on scheduling.
    """

    shape: tuple[int, int]
    chunk_size: int
    halo: int
    stride: int
    tile_size: int

    def __post_init__(self) -> None:
        for name in ("chunk_size", "tile_size", "halo"):
            v = getattr(self, name)
            if v < 0 or v % self.stride:
                raise ValueError(f"{name}={v} must be a non-negative multiple of the network stride {self.stride}")
        if self.chunk_size <= 0 or self.tile_size <= 0:
            raise ValueError("chunk_size and tile_size must be > 0")

    @classmethod
    def make(
        cls, shape: tuple[int, int], *, stride: int, chunk_size: int, halo: int, tile_size: int | None = None
    ) -> "TilingPlan":
        """A plan with sizes rounded up to the stride and tiles no larger than chunks."""
        chunk = round_up(chunk_size, stride)
        tile = min(round_up(tile_size or chunk, stride), chunk)
        return cls((int(shape[0]), int(shape[1])), chunk, round_up(halo, stride), stride, tile)

    @property
    def grid_shape(self) -> tuple[int, int]:
        return (-(-self.shape[0] // self.chunk_size), -(-self.shape[1] // self.chunk_size))

    @property
    def chunks(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Dask-style chunk sizes along y and x."""
        return tuple(  # type: ignore[return-value]
            tuple(min(self.chunk_size, n - o) for o in range(0, n, self.chunk_size)) for n in self.shape
        )

    def chunk(self, iy: int, ix: int) -> Chunk:
        cs = self.chunk_size
        core = Box(iy * cs, min(self.shape[0], (iy + 1) * cs), ix * cs, min(self.shape[1], (ix + 1) * cs))
        return Chunk(iy, ix, core, core.grow(self.halo, self.shape))

    def __iter__(self) -> Iterator[Chunk]:
        ny, nx = self.grid_shape
        for iy in range(ny):
            for ix in range(nx):
                yield self.chunk(iy, ix)

    def __len__(self) -> int:
        ny, nx = self.grid_shape
        return ny * nx

    def tiles(self, chunk: Chunk) -> list[Tile]:
        c, ts = chunk.core, self.tile_size
        return [
            Tile(core, core.grow(self.halo, self.shape))
            for y in range(c.y0, c.y1, ts)
            for x in range(c.x0, c.x1, ts)
            for core in [Box(y, min(c.y1, y + ts), x, min(c.x1, x + ts))]
        ]

    @cached_property
    def forward_pixels(self) -> int:
        """Pixels the network processes over the whole scene (before padding to the stride)."""
        return sum(t.input.size for ch in self for t in self.tiles(ch))

    @property
    def overhead(self) -> float:
        """Forward-pass pixels per scene pixel: the price of the halo."""
        return self.forward_pixels / (self.shape[0] * self.shape[1])

    def __str__(self) -> str:
        d = self.describe()
        return (f"TilingPlan: {d['shape'][0]} x {d['shape'][1]} px in {d['chunks']} chunks of {d['chunk_size']} px "
                f"({self.grid_shape[0]} x {self.grid_shape[1]}), halo {d['halo']} px, tiles {d['tile_size']} px, "
                f"stride {d['stride']}, pixel overhead {d['overhead']:.3f}")

    def _repr_html_(self) -> str:
        d = self.describe()
        rows = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in d.items())
        return f"<div><b>geoseg TilingPlan</b><table>{rows}</table></div>"

    def describe(self) -> dict:
        return {
            "shape": list(self.shape),
            "chunk_size": self.chunk_size,
            "tile_size": self.tile_size,
            "halo": self.halo,
            "stride": self.stride,
            "chunks": len(self),
            "overhead": round(self.overhead, 4),
        }


DEFAULT_CHUNK = 2048
STAGEWISE_CHUNK = 4096  # chunks of a network run stage by stage in strips (geoseg.model.tiled)
COSTLY_OVERHEAD = 2.0  # a chunk size given whose exact halo reads more than this many times the pixels: said
HALO_PER_CHUNK = 32  # default halo where the receptive field is too costly: chunk / 32 (64 px at 2048), overhead about 1.13
SEAM_FREE_OVERHEAD = 1.15  # the default halo is the whole receptive field while the plan's overhead stays within this

_STAGEWISE_ENCODER = re.compile(r"^(resnet(18|34|50|101|152)|resnext\d+_\d+x\d+d)$")


def runs_stagewise(card: "ModelCard") -> bool:
    """Whether workers run this model's network stage by stage in strips (``geoseg.model.tiled``),
    so a 4096 px chunk costs about twice the memory of a 2048 px pass, not four times: an smp U-Net
    on an undilated ResNet encoder with nearest upsampling, no attention and no classification head.
    Decided from the card alone (the client that plans never imports torch); ``tests/test_tiled.py``
    checks it agrees with ``TiledUnet.plan`` on the network."""
    p = card.arch_params
    return (card.method == "smp" and card.arch.lower() == "unet" and bool(_STAGEWISE_ENCODER.match(card.encoder))
            and card.encoder_depth >= 2 and p.get("decoder_attention_type") is None
            and p.get("decoder_interpolation", "nearest") == "nearest" and p.get("activation") is None
            and p.get("aux_params") is None and p.get("decoder_use_norm", "batchnorm") in (True, False, "batchnorm", "identity")
            and p.get("decoder_use_batchnorm", True) in (True, False)
            and p.get("output_stride", 32) >= 2 ** card.encoder_depth)  # a dilated encoder does not halve every stage


def plan_for(
    card: "ModelCard",
    shape: tuple[int, int],
    *,
    chunk_size: int | None = None,
    halo: int | None = None,
    exact: bool = False,
    tile_size: int | None = None,
    own_chunks: Sequence[int] | None = None,
) -> TilingPlan:
    """The tiling a model gets on a scene; ``exact``: halo = receptive field.

    ``own_chunks``: the chunk sizes geoseg may choose from where the user gave none (default: 2048, and 4096
    for a network run stage by stage); they are planned as the defaults are, not as a user's chunk size.

    Default halo: the whole receptive field (and post-processing ring), so tiled output equals one
    pass, wherever that costs a pixel overhead of at most 1.15 on this scene. Default chunks: 2048
    px, or 4096 px where 2048 px chunks cannot be exact within that overhead and the network runs
    stage by stage in strips (``runs_stagewise``). A U-Net-resnet18 of depth 4 (receptive field
    142 px): about 2053² to 3978² scenes are one 4096 px chunk (2048 px chunks would cost more than
    1.15; one busy worker), a 4096² scene four 2048 px chunks (1.146), larger scenes 4096 px
    chunks (1.07-1.15). Where no candidate is exact within the overhead: the largest candidate and
    a halo of the larger of the card's default_halo and chunk / 32. A ``chunk_size`` given keeps
    the exact halo whatever it costs (more tasks at the price of halo pixels, never seams); a
    ``halo`` given keeps ``chunk_size`` or 2048. Chunks are segmented in one forward pass each
    (tile = chunk); ``tile_size`` smaller than the chunk bounds the memory of one pass (each tile
    gets its own exact halo; the chunk is chosen as without it). The card's ``tile_size`` is not a default: it records what the model was trained and
    checked with.
    """
    from geoseg.errors import ConfigError

    if halo is not None and halo < 0:
        raise ConfigError(f"--halo must be >= 0, got {halo}")
    if exact and card.global_reach:
        raise ConfigError(f"--exact: every output of this {card.network} depends on every input pixel (global pooling, "
                          "squeeze-excitation or group norm in its layers), so no halo makes tiles equal one pass; drop --exact")
    if exact and halo is not None and halo < card.exact_halo:
        ring = card.postprocess.ring
        parts = f"the receptive field {card.receptive_field} px + post-processing {ring} px" if ring else "the receptive field"
        raise ConfigError(f"--exact needs a halo of at least {card.exact_halo} px ({parts}); drop --halo or raise it")
    from geoseg.model.card import WINDOW_MMU

    if card.postprocess.sieve_pixels > WINDOW_MMU:
        raise ConfigError(f"an mmu of {card.postprocess.sieve_pixels} px is sieved here in windows grown by twice it, "
                          f"which take an mmu of at most {WINDOW_MMU} px: geoseg predict sieves any mmu across chunks (or give "
                          "postprocess= / --mmu a smaller one here)")
    ring = card.postprocess.ring  # class map needed around a core by the post-processing
    if halo is not None:  # the user's halo: their chunk, else the default one
        chunk = chunk_size or DEFAULT_CHUNK
        return TilingPlan.make(shape, stride=card.stride, chunk_size=chunk, halo=halo + (0 if exact else ring),
                               tile_size=tile_size or chunk)
    own = list(own_chunks) if own_chunks else [DEFAULT_CHUNK] + ([STAGEWISE_CHUNK] if runs_stagewise(card) else [])
    candidates = [chunk_size] if chunk_size else own
    # the chunk is chosen on its own overhead: tiles only bound a pass's memory, and each keeps the exact halo
    plans = [TilingPlan.make(shape, stride=card.stride, chunk_size=c, halo=card.exact_halo) for c in candidates]
    chosen = next((p for p in plans if p.overhead <= SEAM_FREE_OVERHEAD), None)
    if chosen is None and (exact or chunk_size):
        # a chunk size given keeps the exact halo: more tasks at the price of halo pixels, never seams
        chosen = plans[-1]
        if chunk_size and not exact and chosen.overhead > COSTLY_OVERHEAD:
            log.warning("--chunk-size %d with the halo that keeps it seam-free (%d px) reads %.1f times the scene's "
                        "pixels; a larger chunk size costs less", chunk_size, card.exact_halo, chosen.overhead)
    if chosen is not None:
        return TilingPlan.make(shape, stride=card.stride, chunk_size=chosen.chunk_size, halo=card.exact_halo,
                               tile_size=tile_size or chosen.chunk_size)
    chunk = candidates[-1]
    model_exact = card.exact_halo - ring if ring else card.exact_halo
    chosen = max(card.default_halo, min(chunk // HALO_PER_CHUNK, max(model_exact, 0))) + ring
    return TilingPlan.make(shape, stride=card.stride, chunk_size=chunk, halo=chosen, tile_size=tile_size or chunk)
