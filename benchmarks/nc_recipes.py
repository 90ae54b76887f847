"""U-Net training recipes on the NC Landsat split (train: western 60%, score: eastern 40%), side by side.

    .venv/bin/python benchmarks/nc_recipes.py --workdir /tmp/nc-recipes [--only NAME ...]

Needs ../shared/data/grass-nc-landsat7. Each recipe trains with `geoseg.training.train` and is
scored with `geoseg.evaluation.evaluate` on the eastern part (every pixel with a label and a prediction).
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
    args = ap.parse_args()
    from geoseg.evaluation import EvaluateOptions, evaluate
    from geoseg.training.checkpoint import saved_states
    from geoseg.training.loop import TrainInputs, train

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    inputs = TrainInputs(images=tuple(BANDS), labels=str(DATA / "strata.tif"), classes_file=str(ROOT / "scripts" / "nc_classes.yaml"),
                         window=WEST)  # fmt: skip
    rows = {}
    for name, (config, update) in recipes().items():
        if args.only and name not in args.only:
            continue
        out = work / name
        t0 = time.perf_counter()
        if isinstance(config, str):  # the model of another recipe, run otherwise (test-time augmentation)
            import shutil

            from geoseg.model.card import ModelCard

            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(work / config, out)
            if update.get("method_params") == {}:
                (out / "pixel.lgb.txt").unlink(missing_ok=True)
            card = ModelCard.read(out / "model.json")
            (out / "model.json").write_text(ModelCard.model_validate({**card.model_dump(), **update}).to_json())
        elif not (out / "model.json").exists():
            resume = saved_states(work / f"{name}.training") != (None, [])  # an interrupted run continues
            train(inputs, out, config, device="cpu", overwrite=not resume, resume=resume, card_update=dict(update))
        t1 = time.perf_counter()
        ev = evaluate(BANDS, out, DATA / "strata.tif", EvaluateOptions(window=EAST))
        m = ev.metrics
        rows[name] = {"miou": round(m.miou, 4), "oa": round(m.overall_accuracy, 4), "pixels": int(m.pixels),
                      "iou": {n: round(float(v), 3) for n, v in zip(m.class_names, m.iou)}, "train_s": round(t1 - t0, 1)}  # fmt: skip
        print(f"{name:20s} mIoU {m.miou:.4f}  OA {m.overall_accuracy:.4f}  pixels {m.pixels}  "
              + " ".join(f"{n[:5]} {v:.2f}" for n, v in zip(m.class_names, m.iou)), flush=True)
        (work / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
