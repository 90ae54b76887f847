#!/usr/bin/env bash
# The defaults against the per-pixel model on every split of the shared data, both ways: NC Landsat
# west->east, east->west, north->south, south->north; SpaceNet Atlanta west->east, east->west.
# On each split `geoseg train` with its defaults and `--method pixel` train on one part, and
# `geoseg evaluate --model A --model B` scores both on the same pixels of the other part.
#   bash benchmarks/methods_splits.sh [WORKDIR]     (needs ../shared/data; ~45 min on 2 cores; models are reused)
set -euo pipefail
W=${1:-/tmp/methods-splits}
BIN=${BIN:-.venv/bin}
export HF_HUB_OFFLINE=1
NC=../shared/data/grass-nc-landsat7
SN=../shared/data/spacenet-solaris
mkdir -p "$W"

# SpaceNet building polygons rasterized on the image grid (background 0, building 1)
mkdir -p "$W/spacenet-labels"
[ -f "$W/spacenet-labels/labels.tif" ] || "$BIN/python" benchmarks/spacenet_labels.py "$SN" "$W/spacenet-labels"

split() {  # split NAME TRAIN_WINDOW EVAL_WINDOW, on IMAGES with LABELS and training options OPTS
  local tw=$2 ew=$3 d="$W/$1" m
  mkdir -p "$d"
  for m in pixel defaults; do
    local extra=(); [ "$m" = pixel ] && extra=(--method pixel)
    # shellcheck disable=SC2086
    [ -f "$d/$m/model.json" ] || "$BIN/geoseg" -q train "${IMAGES[@]}" --labels "$LABELS" "${OPTS[@]}" --window $tw \
      --overwrite --out "$d/$m" "${extra[@]}"
  done
  # shellcheck disable=SC2086
  "$BIN/geoseg" evaluate "${IMAGES[@]}" --labels "$LABELS" --window $ew --model "$d/pixel" --model "$d/defaults" \
    --json "$d/scores.json" --overwrite >"$d/scores.txt" 2>&1
}

IMAGES=("$NC"/lsat7_2000_{10,20,30,40,50,70}.tif) LABELS=$NC/strata.tif
OPTS=(--classes scripts/nc_classes.yaml --band-roles blue,green,red,nir,swir1,swir2)
split nc-west-east   "0 0 293 443"   "293 0 196 443"
split nc-east-west   "293 0 196 443" "0 0 293 443"
split nc-north-south "0 0 489 266"   "0 266 489 177"
split nc-south-north "0 266 489 177" "0 0 489 266"
IMAGES=("$SN/sample_geotiff.tif") LABELS=$W/spacenet-labels/labels.tif
OPTS=(--classes "$W/spacenet-labels/classes.yaml")
split sn-west-east   "0 0 450 900"   "450 0 450 900"
split sn-east-west   "450 0 450 900" "0 0 450 900"

"$BIN/python" - "$W" <<'PY'
import json, sys
from pathlib import Path
w = Path(sys.argv[1])
print(f"{'split':16} {'pixel mIoU':>10} {'defaults mIoU':>13} {'difference':>10}")
for d in sorted(p for p in w.iterdir() if (p / "scores.json").exists()):
    doc = json.loads((d / "scores.json").read_text())
    miou = {m["name"]: m["miou"] for m in doc["models"]}
    print(f"{d.name:16} {miou['pixel']:10.3f} {miou['defaults']:13.3f} {miou['defaults'] - miou['pixel']:+10.3f}")
PY
