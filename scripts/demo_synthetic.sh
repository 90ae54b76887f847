#!/usr/bin/env bash
# A synthetic scene of any size segmented by a seeded random-weight model: the pipeline without training.
set -euo pipefail
DEMO=${1:-demo-synthetic}
SIZE=${SIZE:-2048}
BIN=${BIN:-.venv/bin}
export HF_HUB_OFFLINE=1
mkdir -p "$DEMO"
"$BIN/geoseg" sample-data "$DEMO/data" --size "$SIZE" --bands 4 --classes 5 --seed 0 --overwrite  # unchanged if the same
[ -f "$DEMO/model/model.json" ] || "$BIN/geoseg" model init "$DEMO/model" --bands 4 --classes-file "$DEMO/data/classes.yaml" --seed 0
"$BIN/geoseg" predict "$DEMO/data/image.tif" --model "$DEMO/model" --out "$DEMO/out" --overwrite
echo "outputs in $DEMO/out (classes.tif, landuse.gpkg, prediction.zarr, run.json)"
