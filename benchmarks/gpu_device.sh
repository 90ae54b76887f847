#!/bin/bash
# On a bare GPU machine, from the repo root, with .whl/ from benchmarks/gpu_bundle.sh beside it: unpack the
# packages, say what runs, then benchmarks/gpu_check.py on a 16384^2 scene (its options pass through).
# Its log and the dask log go to $OUT when set.
t0=$(date +%s)
OUT=${OUT:-/tmp/gpu-check-out}; mkdir -p "$OUT"
python3 -c "import tarfile; tarfile.open('.whl/devsite.tar.xz').extractall('/tmp/dev', filter='tar')" || exit 3
export PYTHONPATH=/tmp/dev/devsite:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
echo "unpacked in $(( $(date +%s) - t0 )) s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "
import pystac, rio_cogeo, geoseg.pipeline, rasterio, pyogrio, zarr, distributed, xarray, torch, numpy, segmentation_models_pytorch as smp
print({m.__name__: m.__version__ for m in (rasterio, pyogrio, zarr, distributed, xarray, torch, numpy, smp)})" || exit 4
timeout "${GPU_CHECK_TIMEOUT:-540}" python3 benchmarks/gpu_check.py --size 16384 --workdir /tmp/gc "$@" 2>&1 | tee "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
cp /tmp/gc/dask.log "$OUT/" 2>/dev/null
echo "gpu_check exit $rc after $(( $(date +%s) - t0 )) s"
exit "$rc"
