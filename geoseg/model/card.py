"""The model card: everything needed to run a network on a raster, stored as `model.json`.

Network output index ``i`` is class ``classes[i].id``; ids are 0-254 and 255 is nodata.
"""

from __future__ import annotations

import math

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from geoseg.errors import ModelError

SCHEMA_VERSION = 1
NODATA_CLASS = 255
CARD_NAME = "model.json"
WEIGHTS_NAME = "weights.safetensors"

# A palette that reads well in GIS viewers for the first classes of a generated model.
DEFAULT_COLORS = (
    "#d7191c", "#f2d680", "#a6d96a", "#1a9641", "#2b83ba", "#7b3294", "#e66101", "#bababa",
    "#ff00ff", "#00ffff", "#8c510a", "#01665e", "#c51b7d", "#4d9221", "#542788", "#b35806",
)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BandInfo(_Frozen):
    """One input band as the network expects it, in stacking order."""

    name: str
    description: str | None = None
    file: str | None = None
    resolution_m: float | None = None
    role: str | None = None  # blue, green, red, nir, swir1, swir2, thermal...: indices are computed by role
    # GDAL's scale and offset of the band the model was trained on (None: not recorded): the model reads bands
    # as stored, so a scene must store them the same way
    scale: float | None = None
    offset: float | None = None


class ClassInfo(_Frozen):
    id: int = Field(ge=0, le=254)
    name: str
    color: str = "#808080"

    @field_validator("color")
    @classmethod
    def _hex(cls, v: str) -> str:
        if not re.fullmatch(r"#[0-9a-fA-F]{6}", v):
            raise ValueError(f"colour {v!r} is not of the form #rrggbb")
        return v.lower()

    @property
    def rgb(self) -> tuple[int, int, int]:
        return tuple(int(self.color[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


class Normalization(_Frozen):
    """Per-band affine normalisation applied before the network: ``(x - mean) / std``."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @model_validator(mode="after")
    def _same_length(self) -> "Normalization":
        if len(self.mean) != len(self.std):
            raise ValueError("normalization mean and std must have one value per band")
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)):
            raise ValueError("normalization mean and std must be finite numbers (a NaN would label every pixel alike)")
        if any(s <= 0 for s in self.std):
            raise ValueError("normalization std values must be > 0")
        return self


METHODS = ("smp", "threshold", "kmeans", "pixel", "instance", "sam")
PIXEL_WEIGHTS_NAME = "model.lgb.txt"  # LightGBM's own text format: no pickle


MAX_MMU = 10_000_000  # px: geoseg predict sieves any mmu across chunks (geoseg.pipeline.sieve)
WINDOW_MMU = 2048  # px: the most a window grown by the mmu sieves (the Python API, geoseg evaluate): rings of 4095 px


class PostProcess(_Frozen):
    """Clean-up of the class map, chunk by chunk with a halo, so tiles stay seamless.

    First a majority (mode) filter over a (2r+1)² window, then a sieve: a 4- (or 8-) connected region
    of fewer pixels than its class's minimum mapping unit takes the class it shares the longest
    border with.
    """

    majority_radius: int = Field(default=0, ge=0, le=16)
    min_pixels: int = Field(default=0, ge=0, le=MAX_MMU)
    class_min_pixels: dict[int, int] = Field(default_factory=dict)
    connectivity: Literal[4, 8] = 4

    @field_validator("class_min_pixels")
    @classmethod
    def _per_class(cls, v: dict[int, int]) -> dict[int, int]:
        bad = {c: n for c, n in v.items() if not (0 <= c <= 254 and 0 <= n <= MAX_MMU)}
        if bad:
            raise ValueError(f"minimum mapping units need class ids 0-254 and 0-{MAX_MMU} pixels, got {bad}")
        return v

    @property
    def sieve_pixels(self) -> int:
        return max([self.min_pixels, *self.class_min_pixels.values()])

    @property
    def sieve_ring(self) -> int:
        """Pixels of class map a sieve in a window needs around its core to equal the whole map's: 2 L - 1
        (geoseg.vector.sieve.window_ring)."""
        from geoseg.vector.sieve import window_ring

        return window_ring(self.sieve_pixels)

    @property
    def ring(self) -> int:
        """Pixels of class map needed around a core for its post-processing to equal the whole map's."""
        return self.majority_radius + self.sieve_ring

    @property
    def active(self) -> bool:
        return self.ring > 0

    @classmethod
    def of(cls, value: "PostProcess | dict[str, Any]", what: str = "postprocess") -> "PostProcess":
        """A PostProcess from itself or a dict of its fields (the Python API's), a ConfigError saying what is wrong."""
        if isinstance(value, PostProcess):
            return value
        from geoseg.errors import ConfigError

        try:
            return cls(**value)
        except (ValidationError, TypeError) as exc:
            why = "; ".join(e["msg"] for e in exc.errors()) if isinstance(exc, ValidationError) else str(exc)
            raise ConfigError(f"{what}={value!r}: {why}") from None

    def without_sieve(self) -> "PostProcess":
        """The majority filter alone: what a window runs where the sieve runs later over the whole map."""
        return PostProcess(majority_radius=self.majority_radius, connectivity=self.connectivity)


def check_mmu_classes(pp: PostProcess, class_ids: Any, what: str = "--mmu") -> None:
    """Refuse a minimum mapping unit for a class id that is not among ``class_ids`` (it would do nothing)."""
    from geoseg.errors import ConfigError

    ids = sorted(int(c) for c in class_ids)
    unknown = sorted(set(pp.class_min_pixels) - set(ids))
    if unknown:
        raise ConfigError(f"{what} names class id(s) {unknown}, which the model does not have (its classes: "
                          f"{', '.join(map(str, ids))})")


def postprocess_in_place(majority: int | None, mmu: str | int | None) -> PostProcess | None:
    """``--majority`` / ``--mmu`` (or a job's ``inference``) in place of the card's post-processing: None where neither
    is given (the card's); an option not given is off. A ValueError says what is wrong."""
    if majority is None and mmu is None:
        return None
    return PostProcess(majority_radius=majority or 0, **parse_mmu(mmu))


def parse_mmu(text: str | int | None) -> dict:
    """``16`` -> min_pixels 16; ``6=4,1=16`` -> per class id (a ValueError saying what to give otherwise)."""
    if text is None or text == "":
        return {}
    text = str(text)
    try:
        if "=" not in text:
            return {"min_pixels": int(text.removesuffix("px"))}
        pairs = [(int(c), int(v.removesuffix("px"))) for c, v in (p.split("=") for p in text.split(","))]
    except ValueError:
        raise ValueError(f"{text!r}: give pixels (16) or class=pixels pairs (6=4,1=16)") from None
    ids = [c for c, _ in pairs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{text!r}: class id(s) {sorted({c for c in ids if ids.count(c) > 1})} given more than once")
    return {"class_min_pixels": dict(pairs)}


class ModelCard(_Frozen):
    schema_version: Literal[1] = SCHEMA_VERSION
    arch: str = "unet"
    encoder: str = "resnet18"
    encoder_depth: int = Field(default=5, ge=1, le=5)
    members: int = Field(default=1, ge=1, le=16,
                         description="networks of this architecture (weights members.K.*) whose mean logits are the output")
    arch_params: dict[str, Any] = Field(default_factory=dict)
    bands: tuple[BandInfo, ...]
    normalization: Normalization
    classes: tuple[ClassInfo, ...]
    stride: int = Field(ge=1, description="input size must be a multiple of this (encoder output stride)")
    tile_size: int = Field(default=1024, ge=32)
    receptive_field: int = Field(ge=0, description="radius in pixels of the measured impulse response")
    global_reach: bool = Field(default=False, description="every output depends on every input (global pooling, "
                               "squeeze-excitation, group norm): no halo is exact; receptive_field is the reach measured")
    default_halo: int = Field(ge=0)
    provenance: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] | None = None
    method: Literal["smp", "threshold", "kmeans", "pixel", "instance", "sam"] = "smp"
    method_params: dict[str, Any] = Field(default_factory=dict)
    missing_bands: Literal["nodata", "fill"] = Field(
        default="nodata", description="nodata: a pixel with any band missing is nodata; fill: it is classified from the bands it has")
    postprocess: PostProcess = Field(default_factory=PostProcess)
    index_channels: tuple[str, ...] = Field(
        default=(), description="smp: spectral indices (by band role) appended to the normalised bands as network inputs")
    tta: Literal["none", "d4"] = Field(default="none", description="test-time augmentation of smp models: d4 = mean of the 8 flips/rotations")
    index_units: Literal["stored", "physical"] = Field(
        default="stored", description="what spectral indices are computed on: physical values (each band's value x "
        "scale + offset; models trained since 2026-12-04) or values as stored (cards written before)")

    @model_validator(mode="after")
    def _consistent(self) -> "ModelCard":
        if len(self.normalization.mean) != len(self.bands):
            raise ValueError(
                f"normalization has {len(self.normalization.mean)} values but the card lists "
                f"{len(self.bands)} bands"
            )
        names = [*self.method_params.get("files", ()), *([self.method_params["ensemble"].get("file")] if self.method_params.get("ensemble") else [])]
        for n in names:  # file names beside the card only: a fetched card never writes or reads elsewhere
            if not isinstance(n, str) or not n or n in (".", "..") or "/" in n or "\\" in n or n == CARD_NAME:
                raise ValueError(f"model file {n!r} must be a plain file name in the model directory")
        ens = self.method_params.get("ensemble")
        if ens and ens.get("file") not in self.method_params.get("files", ()):
            raise ValueError("the ensemble's file must be listed in method_params.files")
        ids = [c.id for c in self.classes]
        if len(set(ids)) != len(ids):
            raise ValueError(f"class ids must be unique, got {ids}")
        if len(ids) < 1:
            raise ValueError("a model needs at least one class")
        return self

    @model_validator(mode="before")
    @classmethod
    def _known_mmu_classes(cls, data: Any) -> Any:
        """A minimum mapping unit for a class the model lacks did nothing (cards of geoseg before 2026-12-04 may
        hold one): dropped, with a warning. Where a card is made, ``check_mmu_classes`` refuses it first."""
        if not isinstance(data, dict) or not isinstance(data.get("postprocess"), dict):
            return data
        per_class = data["postprocess"].get("class_min_pixels") or {}
        ids = {c.get("id") if isinstance(c, dict) else getattr(c, "id", None) for c in data.get("classes") or ()}
        unknown = sorted(int(k) for k in per_class if int(k) not in ids)
        if unknown:
            import warnings

            warnings.warn(f"the card's minimum mapping units for class id(s) {unknown} are dropped: the model has no "
                          "such class (they never had an effect)", stacklevel=2)
            kept = {k: v for k, v in per_class.items() if int(k) in ids}
            data = {**data, "postprocess": {**data["postprocess"], "class_min_pixels": kept}}
        return data

    @property
    def n_bands(self) -> int:
        return len(self.bands)

    @property
    def finds_objects(self) -> bool:
        """An instance or SAM model: its objects are joined across the scene, and scored as objects."""
        return self.method in ("instance", "sam")

    @property
    def index_band_units(self) -> tuple[tuple[float, float], ...] | None:
        """Each band's (scale, offset) the indices take it to its physical value by (None: as stored)."""
        from geoseg.methods.features import band_units

        return band_units(self.bands) if self.index_units == "physical" else None

    @property
    def n_inputs(self) -> int:
        """Channels the network takes: the bands, then the index channels."""
        return len(self.bands) + len(self.index_channels)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def network(self) -> str:
        """``unet/resnet18 depth 4``, with `` + input skip`` and `` x 3 networks`` where they apply."""
        skip = " + input skip" if self.arch_params.get("input_skip") else ""
        nets = f" x {self.members} networks" if self.members > 1 else ""
        return f"{self.arch}/{self.encoder} depth {self.encoder_depth}{skip}{nets}"

    @property
    def class_ids(self) -> tuple[int, ...]:
        return tuple(c.id for c in self.classes)

    def with_postprocess(self, pp: "PostProcess | dict[str, Any]", what: str = "--mmu") -> "ModelCard":
        """This card with ``pp`` in place of its post-processing (a dict: the Python API's), its mmu classes checked."""
        pp = PostProcess.of(pp)
        check_mmu_classes(pp, self.class_ids, what)
        return self.model_copy(update={"postprocess": pp})

    @property
    def reach(self) -> str:
        """The receptive field in words: ``142 px``, or that it is global."""
        return "global (every output depends on every input pixel)" if self.global_reach else f"{self.receptive_field} px"

    @property
    def exact_halo(self) -> int:
        """The smallest stride-aligned halo that covers the receptive field and the post-processing.

        Strictly more than their sum: the receptive field is measured from a pixel on the stride lattice, and
        the pixel just outside a lattice-aligned window (one row before a lattice line) reaches one pixel further.
        """
        return -(-(self.receptive_field + self.postprocess.ring + 1) // self.stride) * self.stride

    @property
    def band_roles(self) -> tuple[str | None, ...]:
        return tuple(b.role for b in self.bands)

    @property
    def weights_name(self) -> str | None:
        """The file beside the card that holds the fitted parameters (None: the card says it all)."""
        return {"smp": WEIGHTS_NAME, "kmeans": WEIGHTS_NAME, "pixel": PIXEL_WEIGHTS_NAME, "threshold": None,
                "instance": WEIGHTS_NAME, "sam": WEIGHTS_NAME}[self.method]

    @property
    def files(self) -> tuple[str, ...]:
        extra = tuple(self.method_params.get("files", ()))
        return (CARD_NAME,) + ((self.weights_name,) if self.weights_name else ()) + extra

    def to_json(self) -> str:
        data = self.model_dump(mode="json")
        if not data["global_reach"]:
            del data["global_reach"]  # written only where true: geoseg before 2026-12-04 still reads the card
        return json.dumps(data, indent=2, sort_keys=False) + "\n"

    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def identity(self) -> dict[str, Any]:
        """What a run's records (run.json, the STAC item) say about the model they ran: one place for all."""
        return {"card_sha256": self.digest(), "method": self.method, "arch": self.arch, "encoder": self.encoder,
                "encoder_depth": self.encoder_depth, "arch_params": dict(self.arch_params),
                "receptive_field": self.receptive_field}

    @classmethod
    def read(cls, path: Path) -> "ModelCard":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ModelError(
                f"{path}: model card not found; a model directory holds {CARD_NAME} and "
                f"{WEIGHTS_NAME} (make one with 'geoseg model init' or 'geoseg train')"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelError(f"{path}: cannot be read as a model card ({type(exc).__name__}: {exc}); re-export the model") from None
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "card"
            newer = ""
            if first["loc"][:1] == ("schema_version",) or first["type"] == "extra_forbidden":
                newer = " (a card written by a newer geoseg? upgrade geoseg to read it)"
            raise ModelError(f"{path}: invalid model card at {where}: {first['msg']}{newer}") from None
