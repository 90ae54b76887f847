#!/usr/bin/env bash
# The methods side by side on the NC Landsat split: every method trained on the western 60% of the
# scene, all scored on the same pixels of the eastern 40% (pixels where every model gives a class).
#   bash benchmarks/nc_methods.sh [WORKDIR]      (needs ../shared/data/grass-nc-landsat7; ~15 min on 2 cores)
set -euo pipefail
W=${1:-/tmp/nc-methods}
BIN=${BIN:-.venv/bin}
export HF_HUB_OFFLINE=1
D=../shared/data/grass-nc-landsat7
B=("$D"/lsat7_2000_{10,20,30,40,50,70}.tif)
ROLES=blue,green,red,nir,swir1,swir2
COMMON=(--labels "$D/strata.tif" --classes scripts/nc_classes.yaml --window 0 0 293 443 --band-roles $ROLES --overwrite)
mkdir -p "$W"
train() { local name=$1; shift; [ -f "$W/$name/model.json" ] || "$BIN/geoseg" -q train "${B[@]}" "${COMMON[@]}" --out "$W/$name" "$@"; }
train threshold --method threshold --index mndwi
train kmeans --method kmeans
train pixel --method pixel
train unet-defaults
train unet-d4 --tta d4
"$BIN/geoseg" evaluate "${B[@]}" --labels "$D/strata.tif" --window 293 0 196 443 \
  --model "$W/threshold" --model "$W/kmeans" --model "$W/pixel" --model "$W/unet-defaults" --model "$W/unet-d4" \
  --json "$W/east.json" --csv "$W/east.csv" --overwrite
