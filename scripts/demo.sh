#!/usr/bin/env bash
# The demo: a synthetic scene segmented on an embedded local Dask cluster.
set -euo pipefail
DEMO=${1:-demo}
BIN=${BIN:-.venv/bin}
export HF_HUB_OFFLINE=1
mkdir -p "$DEMO"
"$BIN/geoseg" sample-data "$DEMO/data" --size 2048 --bands 4 --classes 5 --seed 0
[ -f "$DEMO/model/model.json" ] || "$BIN/geoseg" model init "$DEMO/model" --bands 4 --classes-file "$DEMO/data/classes.yaml" --encoder resnet18 --seed 0
"$BIN/geoseg" predict "$DEMO/data/image.tif" --model "$DEMO/model" --out "$DEMO/out" --overwrite
cat <<MSG

Done. Outputs in $DEMO/out:
  classes.tif      open in QGIS/ArcGIS (colour table and class names embedded)
  landuse.gpkg     land-use polygons, one per 4-connected region
  prediction.zarr  python -c "import xarray as xr; print(xr.open_zarr('$DEMO/out/prediction.zarr', decode_coords='all'))"
  run.json         what ran, timings, Mpx/s
MSG
