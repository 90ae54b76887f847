#!/bin/bash
# Packs what a bare GPU machine (Python 3.12 with torch, numpy, scipy, pandas, scikit-image...; no registry to
# install from) lacks to run geoseg, into .whl/ (keep it ignored: `echo /.whl/ >> .git/info/exclude`):
# the project's pinned wheels unpacked, shared libraries stripped of debug symbols, one tar.xz (~55 MB:
# rasterio 36 MB and pyogrio 33 MB as wheels would not fit beside each other in a 64 MiB transfer).
# Then, on that machine, from the repo root:  bash benchmarks/gpu_device.sh [gpu_check.py options]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-3.12}
dl=$(mktemp -d); site=$(mktemp -d)/devsite; mkdir -p "$site" .whl
plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
pkgs="rasterio pyproj shapely numcodecs zarr dask distributed rioxarray odc-geo segmentation_models_pytorch pydantic pydantic_core
annotated-types typing-inspection affine cligj click-plugins donfig google-crc32c locket partd tblib tornado zict rio-cogeo
morecantile geopandas pyogrio cachetools xarray pystac pystac-core"
pins=()
for p in $pkgs; do pins+=("$(grep -i "^${p//[-_]/[-_]}==" constraints.txt || echo "$p")"); done
pins+=($(grep -i "^pystac-ext-" constraints.txt))
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp $plat -d "$dl" "${pins[@]}"
for w in "$dl"/*.whl; do python3 -m zipfile -e "$w" "$site"; done
find "$site" -name "*.so*" -type f -exec strip --strip-debug {} + 2>/dev/null || true
tar cf - -C "$(dirname "$site")" devsite | xz -6 -T0 > .whl/devsite.tar.xz
rm -rf "$dl" "$(dirname "$site")"
ls -la .whl/devsite.tar.xz
