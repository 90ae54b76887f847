"""Training checkpoints: where they live (``<MODEL_DIR>.training/``), how an epoch is saved crash-safe
(tensors as safetensors, the rest as JSON: no pickle) and restored, and whether a run may resume."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geoseg.errors import ConfigError, OutputExistsError

WORK_SUFFIX = ".training"
STATE_NAME = "state.json"
CHECKPOINT_FORMAT = "geoseg-train-checkpoint/1"


def working_dir(out_dir: str | os.PathLike) -> Path:
    """Where checkpoints of a training run into ``out_dir`` live: a sibling, ``<out_dir>.training``."""
    out = Path(os.path.abspath(out_dir))  # "." has no name of its own
    return out.with_name(out.name + WORK_SUFFIX)


def cpu_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in net.state_dict().items()}


def save_checkpoint(
    work: Path,
    epoch: int,
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    best: tuple[int, dict[str, torch.Tensor]] | None,
    state: dict[str, Any],
) -> Path:
    """Weights and optimizer tensors as safetensors, the rest as JSON; crash-safe.

    Tensor files are named by epoch and written first (the best weights only when they change);
    ``state.json`` then points at them and is replaced atomically, so a crash at any moment
    leaves one consistent checkpoint. Files it no longer points at are removed last.
    """
    from safetensors.torch import save_file

    tensors = {f"model/{k}": v for k, v in cpu_state(net).items()}
    osd = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in osd["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim/{pid}/{name}"] = v.detach().to("cpu", copy=True).contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd["param_groups"]]
    meta = {"format": CHECKPOINT_FORMAT, "epoch": str(epoch)}
    name = f"epoch-{epoch:04d}.safetensors"
    tmp = work / f".{name}.tmp"
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, work / name)
    best_name = None
    if best is not None:
        best_name = f"best-{best[0]:04d}.safetensors"
        if not (work / best_name).exists():
            tmp = work / f".{best_name}.tmp"
            save_file(best[1], str(tmp), metadata=dict(meta, epoch=str(best[0])))
            os.replace(tmp, work / best_name)
    doc = dict(state, format=CHECKPOINT_FORMAT, epoch=epoch, checkpoint=name, best_checkpoint=best_name,
               optimizer={"param_groups": groups, "scalars": scalars})  # fmt: skip
    tmp_state = work / f".{STATE_NAME}.tmp"
    tmp_state.write_text(json.dumps(doc, indent=1, default=_json_default) + "\n")
    os.replace(tmp_state, work / STATE_NAME)
    for old in [*work.glob("epoch-*.safetensors"), *work.glob("best-*.safetensors")]:
        if old.name not in (name, best_name):
            old.unlink(missing_ok=True)
    return work / name


def _json_default(v: Any) -> Any:
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def load_checkpoint(
    work: Path, net: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """Restore weights and optimizer from ``work``; returns the JSON state and the best weights (or None)."""
    from safetensors.torch import load_file

    state_path = work / STATE_NAME
    try:
        doc = json.loads(state_path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{work}: no checkpoint to resume ({STATE_NAME} missing); start without --resume") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{state_path}: checkpoint state is corrupt ({exc}); start again with --overwrite") from None
    if doc.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{state_path}: not a geoseg training checkpoint; start again with --overwrite")
    try:
        tensors = load_file(str(work / doc["checkpoint"]))
    except Exception as exc:
        raise ConfigError(f"{work / doc['checkpoint']}: checkpoint weights unreadable ({exc}); start again with --overwrite") from None
    net.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model/")}, strict=True)
    best = None
    if doc.get("best_checkpoint"):
        try:
            best = load_file(str(work / doc["best_checkpoint"]))
        except Exception as exc:
            raise ConfigError(
                f"{work / doc['best_checkpoint']}: best weights unreadable ({exc}); start again with --overwrite"
            ) from None
    ostate: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            _, pid, name = k.split("/", 2)
            ostate.setdefault(int(pid), {})[name] = v
    for pid, sc in doc["optimizer"]["scalars"].items():
        ostate.setdefault(int(pid), {}).update(sc)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in doc["optimizer"]["param_groups"]]
    optimizer.load_state_dict({"state": ostate, "param_groups": groups})
    return doc, best


def saved_states(work: str | os.PathLike) -> tuple[Path | None, list[Path]]:
    """The saved states of an interrupted run in ``work``: one network's (``work/state.json``, or None)
    and those of the networks of a several-network run (``work/member-K/state.json``)."""
    work = Path(work)
    top = work / STATE_NAME
    return (top if top.is_file() else None), sorted(work.glob(f"member-*/{STATE_NAME}"))


def check_resumable(work: Path, fingerprint: dict[str, Any], members: int) -> None:
    """Before anything trains: every saved state of the run in ``work`` was made with these inputs and
    options, in the layout of ``members`` networks (one: ``work/state.json``; several: ``work/member-K/``)."""
    top, parts = saved_states(work)
    layout_ok = (top is not None and not parts) if members == 1 else (bool(parts) and top is None)
    for path in [top, *parts] if top else parts:
        try:
            before = json.loads(path.read_text()).get("fingerprint")
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: checkpoint state is unreadable ({exc}); start again with --overwrite") from None
        for after_training in ("tile_size", "ensemble"):  # in fingerprints of runs begun before they could change
            (before or {}).get("config", {}).pop(after_training, None)
        if before != fingerprint:
            diff = differences(before or {}, fingerprint)
            # a fingerprint without it: a plain U-Net (--no-input-skip, or a run begun before the skip was the default)
            plain = "input_skip" not in (before or {}).get("config", {}) and fingerprint.get("config", {}).get("input_skip")
            raise ConfigError(
                f"{work}: the interrupted run used other inputs or options ({'; '.join(diff)}); resume with the same "
                "ones" + (" (it trained smp's plain U-Net: add --no-input-skip)" if plain else "")
                + ", or start again with --overwrite"
            )
    if not layout_ok:
        was = "one network" if top else f"{len(parts)} network(s) of several"
        raise ConfigError(f"{work}: the interrupted run trained {was}, this one asks for --members {members}; resume with "
                          "the same --members, or start again with --overwrite")


def check_outputs(out: Path, work: Path, resume: bool, overwrite: bool) -> None:
    interrupted = saved_states(work) != (None, [])
    # a run that was started could replace --out (it was empty, or --overwrite was given): its resumption may too, if
    # --out still holds what it held then (the fingerprint's "replaces", checked with the rest before anything trains)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite and not (resume and interrupted):
        raise OutputExistsError(f"{out}: already exists and is not empty; choose another --out or pass --overwrite")
    if resume:
        if not interrupted:
            raise ConfigError(f"{work}: no interrupted training run to resume there; start without --resume")
        for tmp in work.rglob(".*.tmp"):  # a write the interruption cut short
            tmp.unlink(missing_ok=True)
    elif work.exists() and not interrupted:
        # stopped before its first epoch finished, or while writing it (tensors without their state.json): nothing to resume
        shutil.rmtree(work)
    elif work.exists() and not overwrite:
        raise OutputExistsError(
            f"{work}: holds an interrupted training run for {out}; pass --resume to continue it or --overwrite to start again"
        )


def differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += differences(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} then, {vb!r} now")
    return out
