#!/usr/bin/env bash
# A second real split for the methods: SpaceNet Atlanta buildings (0.5 m panchromatic, 900 x 900).
# Labels rasterized on the image grid (background 0, building 1) into WORKDIR; methods trained on the
# western half, scored on the eastern half on the same pixels.
#   bash benchmarks/spacenet_methods.sh [WORKDIR]    (needs ../shared/data/spacenet-solaris)
set -euo pipefail
W=${1:-/tmp/spacenet-methods}
BIN=${BIN:-.venv/bin}
export HF_HUB_OFFLINE=1
D=../shared/data/spacenet-solaris
mkdir -p "$W"
"$BIN/python" benchmarks/spacenet_labels.py "$D" "$W"
COMMON=(--labels "$W/labels.tif" --classes "$W/classes.yaml" --window 0 0 450 900 --overwrite)
train() { local name=$1; shift; [ -f "$W/$name/model.json" ] || "$BIN/geoseg" -q train "$D/sample_geotiff.tif" "${COMMON[@]}" --out "$W/$name" "$@"; }
train pixel --method pixel
train unet-defaults
"$BIN/geoseg" evaluate "$D/sample_geotiff.tif" --labels "$W/labels.tif" --window 450 0 450 900 \
  --model "$W/pixel" --model "$W/unet-defaults" --json "$W/east.json" --csv "$W/east.csv" --overwrite
