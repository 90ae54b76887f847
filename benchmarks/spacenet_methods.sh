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
"$BIN/python" - "$D" "$W" <<'PY'
import sys, rasterio, geopandas as gpd
from rasterio.features import rasterize
d, w = sys.argv[1:]
with rasterio.open(f"{d}/sample_geotiff.tif") as ds:
    profile = dict(ds.profile, count=1, dtype="uint8", nodata=255)
    shapes = gpd.read_file(f"{d}/geotiff_labels.geojson").to_crs(ds.crs).geometry
    mask = rasterize(((g, 1) for g in shapes), out_shape=ds.shape, transform=ds.transform, fill=0, dtype="uint8")
    mask[ds.read_masks(1) == 0] = 255
with rasterio.open(f"{w}/labels.tif", "w", **profile) as out:
    out.write(mask, 1)
open(f"{w}/classes.yaml", "w").write("- {id: 0, name: background, color: '#bababa'}\n- {id: 1, name: building, color: '#d7191c'}\n")
PY
COMMON=(--labels "$W/labels.tif" --classes "$W/classes.yaml" --window 0 0 450 900 --overwrite)
train() { local name=$1; shift; [ -f "$W/$name/model.json" ] || "$BIN/geoseg" -q train "$D/sample_geotiff.tif" "${COMMON[@]}" --out "$W/$name" "$@"; }
train pixel --method pixel
train unet-defaults
"$BIN/geoseg" evaluate "$D/sample_geotiff.tif" --labels "$W/labels.tif" --window 450 0 450 900 \
  --model "$W/pixel" --model "$W/unet-defaults" --json "$W/east.json" --csv "$W/east.csv" --overwrite
