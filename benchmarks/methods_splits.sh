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
NC_BANDS=("$NC"/lsat7_2000_{10,20,30,40,50,70}.tif)
mkdir -p "$W"

# SpaceNet building polygons rasterized on the image grid (background 0, building 1), as in spacenet_methods.sh
mkdir -p "$W/spacenet-labels"
[ -f "$W/spacenet-labels/labels.tif" ] || "$BIN/python" - "$SN" "$W/spacenet-labels" <<'PY'
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

split() {  # split NAME TRAIN_WINDOW EVAL_WINDOW images... -- train options...
  local name=$1 tw=$2 ew=$3; shift 3
  local images=() opts=()
  while [ "$1" != "--" ]; do images+=("$1"); shift; done; shift; opts=("$@")
  local d="$W/$name"; mkdir -p "$d"
  for m in pixel defaults; do
    local extra=(); [ "$m" = pixel ] && extra=(--method pixel)
    # shellcheck disable=SC2086
    [ -f "$d/$m/model.json" ] || "$BIN/geoseg" -q train "${images[@]}" "${opts[@]}" --window $tw --overwrite --out "$d/$m" "${extra[@]}"
  done
  local labels; labels=$(printf '%s\n' "${opts[@]}" | sed -n '/--labels/{n;p}')
  # shellcheck disable=SC2086
  "$BIN/geoseg" evaluate "${images[@]}" --labels "$labels" --window $ew --model "$d/pixel" --model "$d/defaults" \
    --json "$d/scores.json" --overwrite >"$d/scores.txt" 2>&1
}

NC_OPTS=(--labels "$NC/strata.tif" --classes scripts/nc_classes.yaml --band-roles blue,green,red,nir,swir1,swir2)
SN_OPTS=(--labels "$W/spacenet-labels/labels.tif" --classes "$W/spacenet-labels/classes.yaml")
split nc-west-east   "0 0 293 443"   "293 0 196 443" "${NC_BANDS[@]}" -- "${NC_OPTS[@]}"
split nc-east-west   "293 0 196 443" "0 0 293 443"   "${NC_BANDS[@]}" -- "${NC_OPTS[@]}"
split nc-north-south "0 0 489 266"   "0 266 489 177" "${NC_BANDS[@]}" -- "${NC_OPTS[@]}"
split nc-south-north "0 266 489 177" "0 0 489 266"   "${NC_BANDS[@]}" -- "${NC_OPTS[@]}"
split sn-west-east   "0 0 450 900"   "450 0 450 900" "$SN/sample_geotiff.tif" -- "${SN_OPTS[@]}"
split sn-east-west   "450 0 450 900" "0 0 450 900"   "$SN/sample_geotiff.tif" -- "${SN_OPTS[@]}"

"$BIN/python" - "$W" <<'PY'
import json, sys
from pathlib import Path
w = Path(sys.argv[1])
print(f"{'split':16} {'pixel mIoU':>10} {'defaults mIoU':>13} {'difference':>10}")
for d in sorted(p for p in w.iterdir() if (p / "scores.json").exists()):
    doc = json.loads((d / "scores.json").read_text())
    miou = {Path(m["model"]).name if "model" in m else m["name"]: m["miou"] for m in doc["models"]}
    print(f"{d.name:16} {miou['pixel']:10.3f} {miou['defaults']:13.3f} {miou['defaults'] - miou['pixel']:+10.3f}")
PY
