"""U-Net training recipes on the NC Landsat splits, side by side, over seeds.

    .venv/bin/python benchmarks/nc_recipes.py --workdir /tmp/nc-recipes [--only NAME ...] [--splits we ew ns sn] [--seeds 0 1 2]

Needs ../shared/data/grass-nc-landsat7. Each recipe trains with `geoseg.training.train` on one part of the
scene and is scored with `geoseg.evaluation.evaluate` on the other (every pixel with a label and a
prediction). Splits: ``we`` train on the western 60%, score the eastern 40% (the default); ``ew`` the
other way; ``ns`` / ``sn`` north 266 rows / south. With several seeds it prints each recipe's mean and
spread per split: one split and one seed cannot tell a gain of 0.01-0.03 mIoU from the seed's own noise.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "grass-nc-landsat7"
BANDS = [str(DATA / f"lsat7_2000_{b}.tif") for b in (10, 20, 30, 40, 50, 70)]
ROLES = "blue,green,red,nir,swir1,swir2"
WEST, EAST = (0, 0, 293, 443), (293, 0, 196, 443)
NORTH, SOUTH = (0, 0, 489, 266), (0, 266, 489, 177)
SPLITS = {"we": (WEST, EAST), "ew": (EAST, WEST), "ns": (NORTH, SOUTH), "sn": (SOUTH, NORTH)}


def recipes():
    from geoseg.training.loop import TrainConfig

    base = TrainConfig()
    old = replace(base, class_balance=False, band_dropout=0.0, photometric=0.0, ensemble=False, members=1, input_skip=False)
    return {
        "previous-defaults": (old, {}),
        "defaults": (base, {}),
        "defaults-no-input-skip": (replace(base, input_skip=False), {}),  # smp's own U-Net (the defaults before 2026-12-06)
        "defaults-network-only": ("defaults", {"method_params": {}}),
        "defaults+d4": ("defaults", {"tta": "d4"}),
        "small-area": (replace(base, encoder_depth=3, chip_size=64, block_size=64, lr=3e-3, epochs=40, patience=10), {}),
        "small-area-network-only": ("small-area", {"method_params": {}}),
        "small-area+d4": ("small-area", {"tta": "d4"}),
        "roles": (base, {"band_roles": ROLES.split(",")}),
        "roles-network-only": ("roles", {"method_params": {}}),
        "roles+d4": ("roles", {"tta": "d4"}),
        "roles-no-dice": (replace(base, dice_weight=0.0), {"band_roles": ROLES.split(",")}),
        "roles-wd1e-2": (replace(base, weight_decay=1e-2), {"band_roles": ROLES.split(",")}),
        "no-balance": (replace(base, class_balance=False), {}),
        "photometric-0.1": (replace(base, photometric=0.1), {}),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/nc-recipes")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--splits", nargs="*", default=["we"], choices=sorted(SPLITS))
    ap.add_argument("--seeds", nargs="*", type=int, default=[0])
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = json.loads((work / "results.json").read_text()) if (work / "results.json").exists() else {}
    for split in args.splits:
        for seed in args.seeds:
            for name, (config, update) in recipes().items():
                if args.only and name not in args.only:
                    continue
                key = run_key(name, split, seed)
                rows[key] = {"recipe": name, "split": split, "seed": seed, **run_one(work, key, split, seed, config, update)}
                (work / "results.json").write_text(json.dumps(rows, indent=1))
    summarize(rows, args)


def run_key(name: str, split: str, seed: int) -> str:
    """A run's folder and results key: the recipe's name alone for west->east seed 0 (the earlier single-run names)."""
    return name if (split, seed) == ("we", 0) else f"{name}@{split}-s{seed}"


def run_one(work: Path, key: str, split: str, seed: int, config, update: dict) -> dict:
    from geoseg.evaluation import EvaluateOptions, evaluate
    from geoseg.training.checkpoint import saved_states
    from geoseg.training.loop import TrainInputs, train

    train_window, score_window = SPLITS[split]
    inputs = TrainInputs(images=tuple(BANDS), labels=str(DATA / "strata.tif"), classes_file=str(ROOT / "scripts" / "nc_classes.yaml"),
                         window=train_window)  # fmt: skip
    out = work / key
    t0 = time.perf_counter()
    if isinstance(config, str):  # the model of another recipe, run otherwise (test-time augmentation)
        import shutil

        from geoseg.model.card import ModelCard

        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(work / run_key(config, split, seed), out)
        if update.get("method_params") == {}:
            (out / "pixel.lgb.txt").unlink(missing_ok=True)
        card = ModelCard.read(out / "model.json")
        (out / "model.json").write_text(ModelCard.model_validate({**card.model_dump(), **update}).to_json())
    elif not (out / "model.json").exists():
        resume = saved_states(work / f"{key}.training") != (None, [])  # an interrupted run continues
        train(inputs, out, replace(config, seed=seed), device="cpu", overwrite=not resume, resume=resume, card_update=dict(update))
    t1 = time.perf_counter()
    m = evaluate(BANDS, out, DATA / "strata.tif", EvaluateOptions(window=score_window)).metrics
    print(f"{key:28s} mIoU {m.miou:.4f}  OA {m.overall_accuracy:.4f}  pixels {m.pixels}  "
          + " ".join(f"{n[:5]} {v:.2f}" for n, v in zip(m.class_names, m.iou)), flush=True)
    return {"miou": round(m.miou, 4), "oa": round(m.overall_accuracy, 4), "pixels": int(m.pixels),
            "iou": {n: round(float(v), 3) for n, v in zip(m.class_names, m.iou)}, "train_s": round(t1 - t0, 1)}  # fmt: skip


def summarize(rows: dict, args) -> None:
    """Per recipe and split: the mean mIoU over the seeds run, their spread (max - min) and the seeds' values."""
    import statistics

    names = [n for n in recipes() if not args.only or n in args.only]
    print(f"\n{'recipe':24s} " + " ".join(f"{s:>22s}" for s in args.splits) + f" {'mean of splits':>15s}")
    for name in names:
        cells, means = [], []
        for split in args.splits:
            vals = [r["miou"] for r in rows.values() if r.get("recipe") == name and r.get("split") == split
                    and r.get("seed") in args.seeds]  # fmt: skip
            if not vals:
                cells.append(f"{'-':>22s}")
                continue
            mean = statistics.fmean(vals)
            means.append(mean)
            cells.append(f"{mean:.3f} ±{(max(vals) - min(vals)) / 2:.3f} (n={len(vals)})".rjust(22))
        print(f"{name:24s} " + " ".join(cells) + (f" {statistics.fmean(means):15.3f}" if len(means) == len(args.splits) else ""))


if __name__ == "__main__":
    main()
