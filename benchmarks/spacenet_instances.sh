#!/usr/bin/env bash
# Objects on the shared SpaceNet chip (43 buildings, 0.5 m, Atlanta): a Mask R-CNN trained on the
# western half, scored on the eastern half (object precision / recall / F1 at IoU 0.5, PQ); then
# seconds per Mpx of instance inference against a semantic U-Net on the same 2700 x 2700 mosaic.
# Usage: bash benchmarks/spacenet_instances.sh [WORKDIR] [STEPS]
set -euo pipefail
W=${1:-/tmp/spacenet-instances}
STEPS=${2:-400}
D=$(cd "$(dirname "$0")/.." && pwd)/../shared/data/spacenet-solaris
PY=${PYTHON:-.venv/bin/python}
G=${GEOSEG:-.venv/bin/geoseg}
mkdir -p "$W"
IMG=$D/sample_geotiff.tif
LAB=$D/geotiff_labels.geojson
# west half: columns 0-449; east half: columns 450-899
$G -q train "$IMG" --task instance --labels "$LAB" --window 0 0 450 900 --out "$W/model" --overwrite \
   --epochs $((STEPS / 20)) --steps-per-epoch 20 --chip-size 256 --batch-size 4
$PY -c "import json; t=json.load(open('$W/model/model.json'))['training']; print('trained', t['steps'], 'steps in', t['seconds'], 's; objects', t['objects'], 'largest', t['largest_object_px'], 'px')"
$G -q predict "$IMG" --model "$W/model" --out "$W/pred" --overwrite --chunk-size 512
echo "== east half (never seen in training): objects at IoU 0.5"
$G evaluate-objects "$W/pred" --labels "$LAB" --window 450 0 450 900 --json "$W/east.json"
echo "== west half (training area, for reference)"
$G evaluate-objects "$W/pred" --labels "$LAB" --window 0 0 450 900

# speed: the same network family on a 2700 x 2700 mosaic (the chip 3 x 3), instance vs semantic
$PY - "$IMG" "$W/mosaic.tif" <<'PY'
import sys, numpy as np, rasterio
with rasterio.open(sys.argv[1]) as src:
    a, p = src.read(), src.profile
p.update(width=a.shape[2] * 3, height=a.shape[1] * 3, tiled=True, blockxsize=512, blockysize=512, compress="deflate")
with rasterio.open(sys.argv[2], "w", **p) as dst:
    dst.write(np.tile(a, (1, 3, 3)))
PY
$G -q model init "$W/unet" --bands 1 --classes 2 --overwrite >/dev/null
$G -q predict "$W/mosaic.tif" --model "$W/model" --out "$W/speed-instance" --overwrite --chunk-size 1024
$G -q predict "$W/mosaic.tif" --model "$W/unet" --out "$W/speed-semantic" --overwrite --chunk-size 1024 --no-vectors --no-cog
$PY - "$W" <<'PY'
import json, sys
w = sys.argv[1]
i = json.load(open(f"{w}/speed-instance/run.json")); s = json.load(open(f"{w}/speed-semantic/run.json"))
mpx = i["grid"]["shape"][0] * i["grid"]["shape"][1] / 1e6
ti, ts = i["timings"]["instances_s"], s["timings"]["segment_s"]
print(f"2700 x 2700 mosaic ({mpx:.2f} Mpx), chunk 1024, 2 workers: instance (Mask R-CNN-r18, halo {i['parameters']['halo']}) "
      f"{ti / mpx:.2f} s/Mpx ({i['objects']} objects); semantic U-Net-r18 (halo {s['parameters']['halo']}) {ts / mpx:.2f} s/Mpx; "
      f"ratio {ti / ts:.2f}")
PY
