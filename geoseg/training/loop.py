"""`geoseg train`: inputs checked, data surveyed and split, the network trained, a model directory written.

Training runs in this process (CUDA with mixed precision when there is a GPU, else the CPU,
seeded and deterministic). After every epoch a checkpoint goes to ``<MODEL_DIR>.training/``:
weights and optimizer state as safetensors, everything else as JSON (no pickle), so an
interrupted run continues with ``resume=True`` from the last finished epoch and ends where an
uninterrupted run would. The model directory is written once, at the end, atomically.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from geoseg.errors import ConfigError, InputError
from geoseg.io import storage
from geoseg.io.sources import RasterStack, files_kept_open, open_stack
from geoseg.model.card import NODATA_CLASS, BandInfo, ClassInfo, ModelCard, Normalization
from geoseg.model.network import INPUT_SKIP, build_network, gives_input_skip, network_stride
from geoseg.model.store import make_card, save_model
from geoseg.runtime import pick_device
from geoseg.tiling import Box
from geoseg.training.chips import (
    CELL,
    DEFAULT_CACHE_BYTES,
    BlockSplit,
    labelled_extent,
    ChipReader,
    Survey,
    augment,
    chip_candidates,
    class_lut,
    region_box,
    split_blocks,
    survey,
    train_normalization,
)
from geoseg.training.checkpoint import (
    STATE_NAME,
    check_outputs,
    check_resumable,
    cpu_state,
    load_checkpoint,
    save_checkpoint,
    working_dir,
)
from geoseg.training.labels import LabelSource, default_classes, load_classes, open_labels
from geoseg.training.metrics import Metrics, confusion_indices

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """How to train: network, chips, optimisation, split. Everything here decides the result."""

    arch: str = "unet"
    encoder: str = "resnet18"
    encoder_depth: int = 4
    epochs: int = 30
    chip_size: int = 128
    batch_size: int = 8
    steps_per_epoch: int | None = None  # None: about two passes over the training blocks, 10-200 steps
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 8  # epochs without a better validation mIoU before stopping
    val_fraction: float = 0.2
    block_size: int | None = None  # None: twice the chip size
    min_labelled: float = 0.01  # share of a chip's pixels that must be labelled
    dice_weight: float = 1.0
    class_balance: bool = True  # cross-entropy weights ~ 1/sqrt(class frequency in the training blocks)
    band_dropout: float = 0.1  # chance a chip loses one band (set to its mean): models that classify with a band missing
    photometric: float = 0.0  # per-band gain and offset jitter of a chip (std, normalised units); NC: 0.1 cost 0.03 mIoU
    index_channels: bool = True  # indices the band roles allow (NDVI, NDWI...) as extra network inputs
    ensemble: bool = True  # fit a per-pixel LightGBM companion; keep the mix unless it clearly loses on validation
    val_max_pixels: int = 4_000_000  # validation blocks beyond this are sampled (seeded)
    seed: int = 0
    members: int = 3  # networks trained with seeds seed, seed+1, ...; the model is the mean of their logits
    tile_size: int = 1024  # the card's forward-pass tile for predict
    # a U-Net's last decoder block reads the input too (geoseg.model.network.add_input_skip); None: wherever the
    # arch is a U-Net whose encoder hands the input on
    input_skip: bool | None = None

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1,
            "chip_size": self.chip_size >= CELL,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0 and math.isfinite(self.lr),
            "weight_decay": self.weight_decay >= 0 and math.isfinite(self.weight_decay),
            "patience": self.patience >= 1,
            "val_fraction": 0 <= self.val_fraction < 1,
            "steps_per_epoch": self.steps_per_epoch is None or self.steps_per_epoch >= 1,
            "block_size": self.block_size is None or self.block_size >= CELL,
            "encoder_depth": 1 <= self.encoder_depth <= 5,
            "members": 1 <= self.members <= 16,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(f"invalid training option(s): {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}")
        if self.input_skip and self.arch.lower() != "unet":
            raise ConfigError(f"input_skip is for arch 'unet' (its decoder), not {self.arch!r}")

    def arch_params(self) -> dict[str, Any]:
        """The card's arch_params for this config (``input_skip`` resolved: ``resolved``)."""
        return {INPUT_SKIP: True} if self.input_skip else {}

    def resolved(self, net: Any = None) -> "TrainConfig":
        """This config with ``input_skip`` decided: a U-Net gets it where its encoder hands the input on (``net``:
        one already built for this config, else one is)."""
        if self.input_skip is not None:
            return self
        if net is None:
            net = build_network(self.arch, self.encoder, 1, 1, self.encoder_depth)
        return replace(self, input_skip=gives_input_skip(net))


@dataclass(frozen=True)
class TrainInputs:
    """What to train on: imagery, labels and how to read them."""

    images: tuple[str, ...]
    labels: str
    label_field: str | None = None
    label_layer: str | None = None  # vector labels: the layer of a file that holds several
    classes_file: str | None = None
    ignore: tuple[int, ...] = ()
    reproject_labels: bool = False
    background: int | None = None  # vector labels: class of valid pixels no feature covers
    bbox: tuple[float, float, float, float] | None = None  # region used, in the image CRS
    window: tuple[int, int, int, int] | None = None  # or col_off, row_off, width, height

    def __post_init__(self) -> None:
        object.__setattr__(self, "images", tuple(str(p) for p in self.images))
        object.__setattr__(self, "labels", str(self.labels))
        object.__setattr__(self, "ignore", tuple(int(v) for v in self.ignore))


@dataclass(frozen=True, eq=False)
class Prepared:
    """Everything checked and surveyed before training starts; nothing written yet."""

    stack: RasterStack
    labels: LabelSource
    classes: tuple[ClassInfo, ...]
    classes_from: str
    region: Box
    chip_size: int
    survey: Survey
    split: BlockSplit
    normalization: Normalization
    normalization_pixels: int
    candidates: np.ndarray  # (n, 2) training chip corners
    val_boxes: tuple[Box, ...]
    steps_per_epoch: int

    def reader(self, index_channels: tuple[str, ...] = (), roles: tuple[str | None, ...] = ()) -> ChipReader:
        return ChipReader(self.stack, self.labels, self.region, self.normalization, class_lut(self.classes), self.survey.cache,
                          tuple(index_channels), tuple(roles))


@dataclass(frozen=True, repr=False)
class TrainResult:
    card: ModelCard
    model_dir: Path
    history: tuple[dict[str, Any], ...]

    def _summary(self) -> tuple[str, list[str]]:
        c, t = self.card, self.card.training or {}
        lines = []
        if t.get("epochs_run") is not None:
            stopped = ", stopped early" if t.get("stopped_early") else ""
            lines.append(f"{t['epochs_run']} epochs{stopped}")
        miou = (t.get("metrics") or {}).get("miou")
        if miou is not None:
            lines.append(f"validation mIoU {miou:.3f}")
        ens = c.method_params.get("ensemble")
        if ens:
            lines.append(f"mixed with a {ens['method']} model (network weight {ens['weight']})")
        if self.history:
            lines.append(f"{len(self.history)} history rows: geoseg.plot.plot_history(result)")
        what = c.network if c.method == "smp" else f"{c.method} model"
        return f"geoseg TrainResult: {what} at {self.model_dir}", lines

    def __repr__(self) -> str:
        head, lines = self._summary()
        return "\n".join([head, *(f"  {line}" for line in lines)])

    def _repr_html_(self) -> str:
        from html import escape

        head, lines = self._summary()
        return f"<div><b>{escape(head)}</b><ul>" + "".join(f"<li>{escape(line)}</li>" for line in lines) + "</ul></div>"


def band_infos(stack: RasterStack) -> list[BandInfo]:
    """The card's bands: position, file name, description and resolution of every stacked band."""
    units = tuple(stack.grid.crs.units) if stack.grid.crs is not None else ()
    metric = bool(units) and all(u in ("metre", "meter", "m", "metres", "meters") for u in units)
    res = abs(float(stack.grid.affine.a)) if metric else None
    per_file: dict[str, int] = {}
    for b in stack.bands:
        per_file[b.path] = per_file.get(b.path, 0) + 1
    out = []
    for b in stack.bands:
        stem = Path(b.path).stem
        name = b.description or (stem if per_file[b.path] == 1 else f"{stem}_b{b.band}")
        out.append(BandInfo(name=name, description=b.description, file=Path(b.path).name, resolution_m=res,
                            scale=b.scale, offset=b.offset))
    return out


MIN_BLOCKS = 4  # blocks a region of one default block (two chips) is cut into by smaller chips


def _blocks(region: Box, block: int) -> int:
    return math.ceil(region.shape[0] / block) * math.ceil(region.shape[1] / block)


def _round_to(value: int, multiple: int) -> int:
    return max(multiple, (int(value) // multiple) * multiple)


def _resolve_classes(inputs: TrainInputs, labels: LabelSource, id_counts: np.ndarray) -> tuple[tuple[ClassInfo, ...], str]:
    present = [int(i) for i in np.nonzero(id_counts[:NODATA_CLASS])[0]]
    if inputs.classes_file:
        classes = load_classes(inputs.classes_file)
        known = {c.id for c in classes}
        unknown = [i for i in present if i not in known]
        if unknown:
            raise InputError(
                f"{inputs.labels}: labels hold class id(s) {unknown} that {inputs.classes_file} does not list; "
                "add them there or pass --ignore-index to leave them out"
            )
        return classes, Path(inputs.classes_file).name
    if labels.classes is not None:
        return labels.classes, f"{Path(inputs.labels).name} field {getattr(labels, 'field', '')!r}"
    return default_classes(present), "label values"


def prepare(inputs: TrainInputs, config: TrainConfig, stride: int, cache_bytes: int = DEFAULT_CACHE_BYTES) -> Prepared:
    """Open and check inputs, survey imagery and labels, split, compute normalisation. Writes nothing."""
    stack = open_stack(inputs.images)
    pre_classes = load_classes(inputs.classes_file) if inputs.classes_file else None
    image_name = stack.paths[0] if len(stack.paths) == 1 else f"the image ({stack.paths[0]}, ...)"
    labels = open_labels(
        inputs.labels,
        stack.grid,
        field=inputs.label_field,
        layer=inputs.label_layer,
        classes=pre_classes,
        classes_from=str(inputs.classes_file),
        ignore=inputs.ignore,
        reproject=inputs.reproject_labels,
        background=inputs.background,
        image=image_name,
    )
    h, w = stack.shape
    asked = region_box(stack.grid, inputs.bbox, inputs.window) or Box(0, h, 0, w)
    # the labels' extent, as if the scene had been cut to it: time and memory follow the labelled area, not the
    # scene, and a labelled patch smaller than a chip gets the small-region chips below, as a small scene does
    extent = labelled_extent(labels, asked)
    region = asked if extent is None else extent
    unit = math.lcm(stride, CELL)
    chip = min(_round_to(config.chip_size, unit), _round_to(min(region.shape), unit))
    if chip > min(region.shape):
        raise InputError(f"the training region ({region.shape[0]} x {region.shape[1]} px) is smaller than one chip of {unit} px")
    if config.block_size is None and config.val_fraction > 0 and _blocks(region, 2 * chip) < 2:
        # a region of one block, which no split can cut: chips small enough that blocks of two chips cut it in four
        # (regions of two blocks or more keep their chips, as they always did)
        while chip > unit and _blocks(region, 2 * chip) < MIN_BLOCKS:
            chip = _round_to(chip // 2, unit)
        if chip < config.chip_size:
            log.info("the training region (%d x %d px) is small: chips of %d px (asked %d), blocks of %d px",
                     *region.shape, chip, config.chip_size, 2 * chip)
    block = _round_to(config.block_size or 2 * chip, CELL)
    if block < chip:
        raise ConfigError(f"--block-size {block} is smaller than the chip size {chip}; blocks must hold whole chips: give a smaller --chip-size too")
    sv = survey(stack, labels, region, block, cache_bytes)
    counts = sv.id_counts
    if extent is not None and sv.valid_pixels.sum() == 0:
        from geoseg.training.chips import empty_bands

        empty = empty_bands(stack, region)  # the files to name: those of the bands with no value there
        if empty:
            files = sorted({stack.bands[i].path for i in empty})
            raise InputError(f"{', '.join(files)}: no valid pixel in the training region (band(s) "
                             f"{', '.join(str(i + 1) for i in empty)} of the stack are nodata there); check the nodata value "
                             "(gdalinfo) and the region (--window, --bbox)")
        raise InputError(f"{', '.join(stack.paths)}: no pixel of the training region has a value in every band (each band "
                         "is nodata where another has one); check the nodata values (gdalinfo) and the region (--window, --bbox)")
    if counts.sum() == 0:
        raise InputError(
            f"{inputs.labels}: no labelled pixel on valid imagery in the training region; the labels are all "
            "nodata or ignored, or they do not cover the image"
        )
    classes, classes_from = _resolve_classes(inputs, labels, counts)
    split = split_blocks(sv, config.val_fraction, config.seed)
    norm, norm_px = train_normalization(sv, split)
    cands = chip_candidates(sv, split, chip, config.min_labelled)
    if len(cands) == 0:
        raise InputError(
            f"{inputs.labels}: no {chip} px training chip lies inside training blocks with labels; "
            "use a smaller --chip-size, a larger --block-size or denser labels"
        )
    val_boxes = split.boxes("val")
    if sum(b.size for b in val_boxes) > config.val_max_pixels:
        rng = np.random.default_rng([config.seed, 0xDA7A])
        keep = max(1, config.val_max_pixels // (block * block))
        pick = sorted(rng.choice(len(val_boxes), keep, replace=False))
        val_boxes = [val_boxes[i] for i in pick]
    steps = config.steps_per_epoch or int(
        np.clip(math.ceil(2 * int(split.train.sum()) * block * block / (chip * chip) / config.batch_size), 10, 200)
    )
    return Prepared(stack, labels, classes, classes_from, region, chip, sv, split, norm, norm_px, cands, tuple(val_boxes), steps)


# -- optimisation ----------------------------------------------------------------------------


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 1% of ``base``: a pure function of the step (resumable)."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


@dataclass(frozen=True)
class _Numerics:
    device: str
    amp_dtype: torch.dtype | None  # autocast dtype on CUDA, None for fp32

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16-mixed", torch.float16: "fp16-mixed"}[self.amp_dtype]

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)


def _numerics(device: str, amp: bool) -> _Numerics:
    device = pick_device(device)
    if device.startswith("cuda") and amp:
        return _Numerics(device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return _Numerics(device, None)


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.default_rng([seed, epoch, 0x70C4]).integers(2**62))


def _batch(reader: ChipReader, corners: np.ndarray, chip: int, rng: np.random.Generator,
           config: TrainConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    xs, ts = [], []
    for y, x in corners:
        xi, ti = reader.read(Box(int(y), int(y) + chip, int(x), int(x) + chip))
        xi, ti = augment(xi, ti, rng)
        if config is not None:
            xi = photometric(xi, rng, config.photometric, config.band_dropout, reader.stack.count, reader.band_roles,
                             reader.index_channels)
        xs.append(xi)
        ts.append(ti)
    return np.stack(xs), np.stack(ts)


def photometric(x: np.ndarray, rng: np.random.Generator, jitter: float, band_dropout: float,
                n_bands: int | None = None, roles: Sequence[str | None] = (), indices: Sequence[str] = ()) -> np.ndarray:
    """Per-band gain ``1 + N(0, jitter)`` and offset ``N(0, jitter)`` (normalised units), and with chance
    ``band_dropout`` one band set to 0 (its mean: how predict fills a missing band). Invalid pixels stay 0."""
    if jitter <= 0 and band_dropout <= 0:
        return x
    b = x.shape[0]
    blank = ~np.any(x != 0, axis=0)
    if jitter > 0:
        gain = 1.0 + jitter * rng.standard_normal(b).astype(np.float32)
        offset = jitter * rng.standard_normal(b).astype(np.float32)
        x = x * gain[:, None, None] + offset[:, None, None]
    nb = n_bands or b
    if band_dropout > 0 and nb > 1 and rng.random() < band_dropout:
        # a band goes missing as at predict: the band at its mean (0) and every index that reads it at 0
        from geoseg.methods.features import INDICES

        x = x.copy()
        k = int(rng.integers(nb))
        x[k] = 0.0
        role = roles[k] if k < len(roles) else None
        for i, name in enumerate(indices):
            if role is not None and role in INDICES.get(name, ()):
                x[nb + i] = 0.0
    x[:, blank] = 0.0
    return np.ascontiguousarray(x, dtype=np.float32)


def class_weights(counts: np.ndarray) -> np.ndarray:
    """Cross-entropy weights per class index ~ 1/sqrt(frequency), mean 1 over the classes present, at most 10."""
    c = counts.astype(np.float64)
    w = np.where(c > 0, 1.0 / np.sqrt(np.maximum(c, 1)), 0.0)
    present = c > 0
    if present.any():
        w = w / w[present].mean()
    return np.clip(w, 0.0, 10.0)


def _pad_to(t: torch.Tensor, stride: int) -> torch.Tensor:
    h, w = t.shape[-2:]
    ph, pw = -h % stride, -w % stride
    return torch.nn.functional.pad(t, (0, pw, 0, ph)) if ph or pw else t


def validate(
    net: torch.nn.Module, reader: ChipReader, boxes: Sequence[Box], n_classes: int, stride: int, num: _Numerics
) -> tuple[np.ndarray, float]:
    """Confusion (target index x predicted index) and mean cross-entropy over the validation blocks.

    Each block is one forward pass on its own pixels (padded like predict pads at the scene's end).
    """
    cm = np.zeros((n_classes, n_classes), np.int64)
    loss_sum, loss_n = 0.0, 0
    net.eval()
    with torch.inference_mode():
        for box in boxes:
            x, target = reader.read(box)
            t = _pad_to(torch.from_numpy(x)[None], stride).to(num.device)
            with num.autocast():
                logits = net(t)
            logits = logits.float()[:, :, : box.shape[0], : box.shape[1]]
            tt = torch.from_numpy(target.astype(np.int64))[None].to(num.device)
            labelled = int((tt != NODATA_CLASS).sum())
            if labelled:
                loss_sum += float(torch.nn.functional.cross_entropy(logits, tt, ignore_index=NODATA_CLASS, reduction="sum"))
                loss_n += labelled
            pred = logits.argmax(dim=1)[0].cpu().numpy()
            cm += confusion_indices(target, pred, n_classes)
    return cm, (loss_sum / loss_n if loss_n else math.nan)


# -- checkpoints -----------------------------------------------------------------------------


def _fingerprint(inputs: TrainInputs, config: TrainConfig) -> dict[str, Any]:
    d = asdict(inputs)
    d["images"] = [os.path.abspath(p) for p in inputs.images]
    d["labels"] = os.path.abspath(inputs.labels)
    d["classes_file"] = os.path.abspath(inputs.classes_file) if inputs.classes_file else None
    # the files as they are (size, modification time): a label file edited at the same path must not resume
    files = [*inputs.images, inputs.labels, *([inputs.classes_file] if inputs.classes_file else [])]
    d["files"] = {name: list(ident) for p in files for name, ident in _file_identities(p)}
    c = asdict(config)
    if c["members"] == 1:
        del c["members"]  # runs of one network resume as they did before members existed
    if not c["input_skip"]:
        del c["input_skip"]  # nor do runs of a plain U-Net (--no-input-skip) before the input skip existed
    for after_training in ("tile_size", "ensemble"):  # what is chosen once the networks are trained: may change on resume
        c.pop(after_training, None)
    return json.loads(json.dumps({"inputs": d, "config": c}))


SIDECARS = (".dbf", ".shx", ".prj", ".cpg")  # a Shapefile's attributes (its classes) live in the .dbf


def _file_identities(path: str) -> list[tuple[str, tuple[int, ...]]]:
    """(path, (size, mtime)) of ``path``, its Shapefile sidecars and the files of a directory (a FileGDB); an
    object-store URL has none here (its path is all that is known)."""
    p = Path(path)
    if "://" in str(path) or not p.exists():
        return []
    found = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    if p.suffix.lower() == ".shp":
        found += [q for q in (p.with_suffix(x) for x in SIDECARS) if q.is_file()]
    return [(i[0], tuple(i[1:])) for i in map(storage.identity, found)]  # [path, size, mtime]


@dataclass(frozen=True, eq=False)
class _MemberFit:
    """Trains member ``k`` of a run (seed ``config.seed + k``) with checkpoints in its own directory.

    One member is the whole run (its checkpoints in the working directory itself, as before
    members existed); with several, each has ``member-K/``. On ``resume`` a finished member's last
    checkpoint leaves no epoch to run: its kept weights come back without training."""

    config: TrainConfig
    prep: Prepared
    reader: ChipReader
    num: _Numerics
    n_inputs: int
    stride: int
    fingerprint: dict[str, Any]
    weight: torch.Tensor | None
    progress: Callable[[dict[str, Any]], None] | None

    def __call__(self, k: int, work: Path, resume: bool) -> tuple[torch.nn.Module, dict[str, Any]]:
        config, prep, num = self.config, self.prep, self.num
        seed = config.seed + k
        n_classes = len(prep.classes)
        torch.manual_seed(seed)
        net = build_network(config.arch, config.encoder, self.n_inputs, n_classes, config.encoder_depth,
                            config.arch_params()).to(num.device)
        optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        scaler = torch.amp.GradScaler("cuda") if num.amp_dtype == torch.float16 else None
        best_state: dict[str, torch.Tensor] | None = None  # weights of the epoch with the best validation mIoU
        state: dict[str, Any] = {"fingerprint": self.fingerprint, "step": 0, "history": [], "best": None, "bad_epochs": 0,
                                 "stopped": False, "seconds": 0.0}  # fmt: skip
        start_epoch = 1
        if resume and (work / STATE_NAME).is_file():  # its fingerprint was checked before any member trained
            doc, best_state = load_checkpoint(work, net, optimizer)
            state = {key: doc[key] for key in state}
            start_epoch = int(doc["epoch"]) + 1
            if scaler is not None and doc.get("scaler"):
                scaler.load_state_dict(doc["scaler"])
            log.info("resuming %s after epoch %d", work, doc["epoch"])
        work.mkdir(parents=True, exist_ok=True)
        best_state = self._epochs(k, seed, work, net, optimizer, scaler, state, best_state, start_epoch)
        if best_state is not None:
            net.load_state_dict(best_state)
        return net, state

    def _epochs(self, k: int, seed: int, work: Path, net: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: Any,
                state: dict[str, Any], best_state: dict[str, torch.Tensor] | None, start_epoch: int
                ) -> dict[str, torch.Tensor] | None:
        config, prep, num, reader, stride = self.config, self.prep, self.num, self.reader, self.stride
        n_classes = len(prep.classes)
        ce = torch.nn.CrossEntropyLoss(weight=self.weight, ignore_index=NODATA_CLASS)
        from segmentation_models_pytorch.losses import DiceLoss

        dice = DiceLoss("multiclass", from_logits=True, ignore_index=NODATA_CLASS)
        steps = prep.steps_per_epoch
        total = config.epochs * steps
        warmup = min(steps, max(1, total // 10))
        chip = prep.chip_size
        for epoch in range(start_epoch, config.epochs + 1):
            if state["stopped"]:
                break
            t0 = time.perf_counter()
            torch.manual_seed(_epoch_seed(seed, epoch))
            rng = np.random.default_rng([seed, epoch])
            net.train()
            losses = []
            for _ in range(steps):
                lr = lr_at(state["step"], total, config.lr, warmup)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                corners = prep.candidates[rng.integers(len(prep.candidates), size=config.batch_size)]
                xb, tb = _batch(reader, corners, chip, rng, config)
                x = torch.from_numpy(xb).to(num.device)
                t = torch.from_numpy(tb.astype(np.int64)).to(num.device)
                optimizer.zero_grad(set_to_none=True)
                with num.autocast():
                    logits = net(x)
                logits = logits.float()
                loss = ce(logits, t) + config.dice_weight * dice(logits, t)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                losses.append(float(loss.detach()))
                state["step"] += 1
            record: dict[str, Any] = {"epoch": epoch, "loss": round(float(np.mean(losses)), 6), "lr": lr}
            if prep.val_boxes:
                cm, val_loss = validate(net, reader, prep.val_boxes, n_classes, stride, num)
                m = Metrics(tuple(c.id for c in prep.classes), tuple(c.name for c in prep.classes), cm)
                miou = m.miou
                record.update(val_loss=round(val_loss, 6), val_miou=round(miou, 6) if math.isfinite(miou) else None,
                              val_accuracy=round(m.overall_accuracy, 6))  # fmt: skip
                best_miou = state["best"]["miou"] if state["best"] else -math.inf
                if math.isfinite(miou) and miou > best_miou + 1e-9:
                    state["best"] = {"epoch": epoch, "miou": miou, "metrics": m.to_dict()}
                    best_state = cpu_state(net)
                    state["bad_epochs"] = 0
                else:
                    state["bad_epochs"] += 1
                state["stopped"] = state["bad_epochs"] >= config.patience
            record["seconds"] = round(time.perf_counter() - t0, 3)
            state["seconds"] += record["seconds"]
            state["history"].append(record)
            extra = {"scaler": scaler.state_dict()} if scaler is not None else {}
            best = (state["best"]["epoch"], best_state) if state["best"] and best_state is not None else None
            save_checkpoint(work, epoch, net, optimizer, best, {**state, **extra})
            log.debug(
                "epoch %d/%d loss %.4f val mIoU %s (%.1f s)", epoch, config.epochs, record["loss"],
                "-" if record.get("val_miou") is None else f"{record['val_miou']:.4f}", record["seconds"],
            )  # fmt: skip
            if self.progress is not None:
                self.progress(dict(record, epochs=config.epochs, stopped=state["stopped"], member=k, members=config.members))
        return best_state


# -- the loop --------------------------------------------------------------------------------


@files_kept_open()
def train(
    inputs: TrainInputs,
    out_dir: str | os.PathLike,
    config: TrainConfig = TrainConfig(),
    *,
    device: str = "auto",
    amp: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    card_update: dict[str, Any] | None = None,
) -> TrainResult:
    """Train a network on ``inputs`` and write the model directory ``out_dir`` (model.json + weights).

    ``progress`` is called with each epoch's record after its checkpoint is saved (an exception
    it raises interrupts the run; ``resume=True`` continues it). Bad inputs fail before anything
    is written.
    """
    out = Path(os.path.abspath(out_dir))
    work = working_dir(out)
    check_outputs(out, work, resume, overwrite)
    num = _numerics(device, amp)
    torch.manual_seed(config.seed)
    net = build_network(config.arch, config.encoder, 1, 1, config.encoder_depth)  # the stride, and whether the input skip fits
    config = config.resolved(net)
    stride = network_stride(net, config.encoder_depth)
    prep = prepare(inputs, config, stride, cache_bytes)
    if (card_update or {}).get("postprocess"):  # before any epoch: an mmu for a class the labels lack does nothing
        from geoseg.model.card import PostProcess, check_mmu_classes

        check_mmu_classes(PostProcess(**card_update["postprocess"]), [c.id for c in prep.classes])

    from geoseg.methods.features import available_indices, band_units, guess_roles

    roles = tuple((card_update or {}).get("band_roles") or guess_roles([b.description for b in prep.stack.bands]))
    indices = available_indices(roles) if config.index_channels else ()
    n_inputs = prep.stack.count + len(indices)
    fingerprint = dict(_fingerprint(inputs, config), band_roles=list(roles), index_channels=list(indices),
                       classes=[[c.id, c.name] for c in prep.classes],
                       # what the survey made of them (a run begun when the region was the whole scene does not resume)
                       region=[prep.region.y0, prep.region.y1, prep.region.x0, prep.region.x1],
                       normalization=[list(prep.normalization.mean), list(prep.normalization.std)],
                       # what --out held when the run began: its resumption replaces that, and nothing put there since
                       replaces={os.path.relpath(n, out): list(ident) for n, ident in _file_identities(str(out))})
    if indices and band_units(prep.stack.bands) is not None:
        # on scaled bands: a run begun when index channels were computed on stored values does not resume on physical ones
        fingerprint["index_units"] = "physical"
    if resume:
        check_resumable(work, fingerprint, config.members)
    elif work.exists():
        shutil.rmtree(work)  # --overwrite: a stale run must not be mixed with this one
    work.mkdir(parents=True, exist_ok=True)

    reader = prep.reader(indices, roles)
    weight = None
    if config.class_balance:
        counts = prep.survey.class_counts[prep.split.train].sum(axis=0)[[c.id for c in prep.classes]]
        weight = torch.tensor(class_weights(counts), dtype=torch.float32, device=num.device)
    fit = _MemberFit(config, prep, reader, num, n_inputs, stride, fingerprint, weight, progress)
    fitted = [fit(k, work if config.members == 1 else work / f"member-{k}", resume) for k in range(config.members)]
    if len(fitted) == 1:
        net, state = fitted[0]
    else:
        from geoseg.model.members import MemberMean

        net = MemberMean(n for n, _ in fitted)
        state = _merged_state([s for _, s in fitted], net, prep, reader, stride, num)
    net = net.eval().cpu().float()
    card = make_card(
        net,
        arch=config.arch,
        encoder=config.encoder,
        encoder_depth=config.encoder_depth,
        arch_params=config.arch_params(),
        bands=band_infos(prep.stack),
        classes=list(prep.classes),
        normalization=prep.normalization,
        tile_size=config.tile_size,
        provenance={"source": "geoseg train", "seed": config.seed},
        training=_training_record(inputs, config, prep, state, num),
        index_channels=indices,
    )
    # band roles, post-processing, test-time augmentation: how predict runs it, not how it trained;
    # a network trained with band dropout classifies pixels that miss a band (the band at its mean)
    update: dict[str, Any] = {"missing_bands": "fill" if config.band_dropout > 0 else "nodata", **(card_update or {})}
    update.pop("band_roles", None)
    update["bands"] = [dict(b.model_dump(), role=r) for b, r in zip(card.bands, roles)]
    extra: dict[str, Callable[[Path], None]] = {}
    tta = update.pop("tta", "auto")
    if config.ensemble or tta == "auto":
        from geoseg.training.ensemble import choose_inference

        t_choice = time.perf_counter()
        choice = choose_inference(prep, net, stride, roles, config.seed, reader, config.ensemble, tta)
        tta = choice["tta"]
        if choice["entry"] is not None:
            entry, booster = choice["entry"], choice["booster"]
            update["method_params"] = {**card.method_params, "ensemble": entry, "files": [entry["file"]]}
            extra[entry["file"]] = lambda path, b=booster: b.save_model(str(path), num_iteration=b.best_iteration or None)
        update["training"] = dict(card.training or {}, inference_choice_seconds=round(time.perf_counter() - t_choice, 3),
                                  inference_choice=choice["scores"],
                                  ensemble=choice["entry"] or choice["why"])  # fmt: skip
    update["tta"] = "none" if tta == "auto" else tta
    card = ModelCard.model_validate({**card.model_dump(), **update})
    save_model(net, card, out, overwrite=True, extra=extra)  # emptiness was checked up front
    shutil.rmtree(work, ignore_errors=True)
    return TrainResult(card, out, tuple(state["history"]))


def _merged_state(states: Sequence[dict[str, Any]], mean: torch.nn.Module, prep: Prepared, reader: ChipReader, stride: int,
                  num: _Numerics) -> dict[str, Any]:
    """The training state of a several-network run: every member's epochs (``member`` K), their total
    time, and the validation scores of ``mean``, the members' mean (what the model computes)."""
    best = None
    if prep.val_boxes:
        cm, _ = validate(mean, reader, prep.val_boxes, len(prep.classes), stride, num)
        m = Metrics(tuple(c.id for c in prep.classes), tuple(c.name for c in prep.classes), cm)
        best = {"epoch": None, "miou": m.miou, "metrics": m.to_dict()}
    members = [{"member": k, "epochs_run": len(s["history"]), "best_epoch": s["best"]["epoch"] if s["best"] else None,
                "val_miou": round(s["best"]["miou"], 6) if s["best"] else None, "stopped": bool(s["stopped"]),
                "seconds": round(s["seconds"], 3)} for k, s in enumerate(states)]  # fmt: skip
    return {"history": [dict(r, member=k) for k, s in enumerate(states) for r in s["history"]], "best": best,
            "stopped": any(s["stopped"] for s in states), "seconds": sum(s["seconds"] for s in states), "members": members}


def _training_record(inputs: TrainInputs, config: TrainConfig, prep: Prepared, state: dict[str, Any], num: _Numerics) -> dict[str, Any]:
    best = state["best"]
    history = state["history"]
    return {
        "images": [Path(p).name for p in inputs.images],
        "labels": prep.labels.describe(),
        "classes_from": prep.classes_from,
        "ignore_index": list(inputs.ignore),
        "region": [prep.region.y0, prep.region.y1, prep.region.x0, prep.region.x1],
        "config": dict(asdict(config), chip_size=prep.chip_size, steps_per_epoch=prep.steps_per_epoch),
        "split": prep.split.describe(prep.survey, [c.id for c in prep.classes]),
        "validation_blocks_used": len(prep.val_boxes),
        "normalization_pixels": prep.normalization_pixels,
        "training_chip_positions": int(len(prep.candidates)),
        "device": num.device,
        "precision": num.name,
        "epochs_run": len(history),
        "best_epoch": best["epoch"] if best else (history[-1]["epoch"] if history else None),
        "stopped_early": bool(state["stopped"]) and len(history) < config.epochs * config.members,
        **({"members": state["members"]} if "members" in state else {}),
        "seconds": round(state["seconds"], 3),
        "history": history,
        "metrics": best["metrics"] if best else None,  # validation scores of the kept epoch (of the members' mean)
    }
