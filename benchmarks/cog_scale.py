"""geoseg's COG made on the cluster against GDAL's COG driver in one process, side by side in one run.

    python benchmarks/cog_scale.py [--sizes 8192,16384,32768] [--workdir DIR] [--baseline-max 32768] [--json PATH]

For each size N of --sizes, on an N x N class map (vectorize.py's: labels.tif of `geoseg sample-data DIR --size N
--bands 1 --classes 6 --seed 0`, copied into a Zarr store of 4096 px chunks, as a prediction store holds it), prints:
  1. geoseg: `write_cog_cluster(client, store["class_id"], out)` on an already started `connect()` cluster
     (default workers, warmed up by a 1024 px map): seconds, Mpx/s, tiles and tasks' blocks, this (client)
     process's RSS during the call (sampled every 0.1 s as vectorize.py does; it also holds the scheduler):
     its peak and increase over the RSS before, and every worker's peak RSS (VmHWM);
  2. GDAL's COG driver (`geoseg.io.cog.write_cog`: the store read window by window into a tiled GeoTIFF,
     then `COMPRESS=DEFLATE, OVERVIEW_RESAMPLING=MODE, NUM_THREADS=ALL_CPUS`) in a plain subprocess with no
     cluster alive: seconds launch to exit, the child's imports (zarr, odc.geo, rasterio, geoseg.io.cog)
     and its write timed after them (the ratio to geoseg's uses the write: geoseg's workers have
     imported already), its peak RSS (VmHWM); skipped above --baseline-max;
  3. agreement of the two files, read back with rasterio: full resolution equal or not, and for every
     overview the share of equal pixels (both take the most frequent class of each 2x2 block; GDAL may
     break ties and treat nodata differently).
Then a summary table; --json writes every figure. Class maps and stores are cached in --workdir (default:
a temporary folder, removed at the end). Speeds are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import worker_peaks  # this folder's: workers' peak figures (VmHWM)
from vectorize import RssSampler, class_raster  # the same class maps, the client's RSS sampled as vectorize.py does

GDAL_CHILD = r"""
import json, sys, time
t = time.perf_counter()
import zarr
from odc.geo.geobox import GeoBox
from rasterio.transform import Affine
from geoseg.io.cog import write_cog
from geoseg.model.card import ClassInfo
t_write = time.perf_counter()
meta = json.loads(sys.argv[3])
grid = GeoBox(tuple(meta["shape"]), Affine(*meta["affine"]), meta["crs"])
classes = [ClassInfo(**c) for c in meta["classes"]]
write_cog(zarr.open_array(sys.argv[1], mode="r"), sys.argv[2], grid=grid, classes=classes)
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
end = time.perf_counter()
print(json.dumps({"import_s": t_write - t, "write_s": end - t_write, "seconds": end - t, "peak_rss": hwm}))
"""


def class_store(work: Path, size: int) -> tuple[Path, dict]:
    """vectorize.py's class map (labels.tif of `geoseg sample-data`) as a Zarr array of 4096 px chunks, and its
    grid and classes (cached)."""
    import numpy as np
    import rasterio
    import zarr

    from geoseg.sample import sample_classes

    tif = class_raster(work, size)
    store = tif.parent / "class_id.zarr"
    with rasterio.open(tif) as src:
        meta = {"shape": [src.height, src.width], "affine": list(src.transform)[:6], "crs": src.crs.to_wkt(),
                "classes": [c.model_dump() for c in sample_classes(6)]}
        if not (store / "zarr.json").exists():
            z = zarr.open_array(str(store), mode="w", shape=(src.height, src.width), chunks=(4096, 4096), dtype="uint8",
                                fill_value=255)
            for y0 in range(0, src.height, 4096):
                for x0 in range(0, src.width, 4096):
                    w = ((y0, min(y0 + 4096, src.height)), (x0, min(x0 + 4096, src.width)))
                    z[w[0][0]:w[0][1], w[1][0]:w[1][1]] = src.read(1, window=w).astype(np.uint8)
    return store, meta


def geoseg_cog(client, store: Path, meta: dict, out: Path) -> dict:
    import zarr
    from odc.geo.geobox import GeoBox
    from rasterio.transform import Affine

    from geoseg.io.cog_cluster import write_cog_cluster
    from geoseg.model.card import ClassInfo

    grid = GeoBox(tuple(meta["shape"]), Affine(*meta["affine"]), meta["crs"])
    classes = [ClassInfo(**c) for c in meta["classes"]]
    with RssSampler() as s:
        t = time.perf_counter()
        info = write_cog_cluster(client, zarr.open_array(str(store), mode="r"), out, grid=grid, classes=classes)
        seconds = time.perf_counter() - t
    return {"seconds": seconds, "tiles": info["tiles"], "blocks": info.get("blocks"), "bytes": info["bytes"],
            "client_before": s.before, "client_peak": s.peak, "client_peak_growth": s.peak - s.before,
            "worker_peak_rss": worker_peaks(client)[0]}


def gdal_cog(store: Path, meta: dict, out: Path) -> dict:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", GDAL_CHILD, str(store), str(out), json.dumps(meta)],
                       capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    child = json.loads(r.stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "seconds": child["write_s"], "import_s": child["import_s"], "child_s": child["seconds"],
            "peak_rss": child["peak_rss"]}


def agreement(a: Path, b: Path) -> dict:
    import numpy as np
    import rasterio

    out: dict = {}
    with rasterio.open(a) as da, rasterio.open(b) as db:
        out["full_equal"] = bool((da.read(1) == db.read(1)).all())
        out["overviews"] = da.overviews(1)
        out["gdal_overviews"] = db.overviews(1)
    shares = []
    for i in range(min(len(out["overviews"]), len(out["gdal_overviews"]))):
        with rasterio.open(a, OVERVIEW_LEVEL=i) as oa, rasterio.open(b, OVERVIEW_LEVEL=i) as ob:
            x, y = oa.read(1), ob.read(1)
            shares.append(float(np.mean(x == y)) if x.shape == y.shape else None)
    out["overview_equal_share"] = shares
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="8192,16384,32768")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--baseline-max", type=int, default=32768, help="skip GDAL's COG driver above this size")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="geoseg-cog-"))
    work.mkdir(parents=True, exist_ok=True)
    from geoseg.cluster import connect

    figures: dict = {}
    try:
        stores = {n: class_store(work, n) for n in sizes + [1024]}
        for n in sizes:
            store, meta = stores[n]
            fig: dict = {}
            with connect() as client:
                geoseg_cog(client, *stores[1024], work / "warm.tif")  # imports and a first graph on every worker
                fig["geoseg"] = g = geoseg_cog(client, store, meta, work / f"geoseg{n}.tif")
            mpx = n * n / 1e6
            print(f"[{n}] geoseg on the cluster: {g['seconds']:.1f} s = {mpx / g['seconds']:.0f} Mpx/s, {g['tiles']} tiles "
                  f"in {g['blocks']} block tasks, client RSS peak {g['client_peak'] / 2**20:.0f} MB "
                  f"(+{g['client_peak_growth'] / 2**20:.0f} MB over {g['client_before'] / 2**20:.0f} MB before; sampled "
                  "every 0.1 s), workers' peak (VmHWM) "
                  + ", ".join(f"{v / 2**20:.0f} MB" for v in g["worker_peak_rss"]), flush=True)
            if n <= args.baseline_max:
                fig["gdal"] = b = gdal_cog(store, meta, work / f"gdal{n}.tif")
                print(f"[{n}] GDAL's COG driver, one process: {b['wall_s']:.1f} s launch to exit (imports {b['import_s']:.1f} s, "
                      f"then the write {b['seconds']:.1f} s) = {mpx / b['seconds']:.0f} Mpx/s written, peak (VmHWM) "
                      f"{b['peak_rss'] / 2**20:.0f} MB; geoseg / GDAL {g['seconds'] / b['seconds']:.2f}x its write time "
                      "(both warm: geoseg's workers have imported already)", flush=True)
                fig["agreement"] = a = agreement(work / f"geoseg{n}.tif", work / f"gdal{n}.tif")
                print(f"[{n}] full resolution equal: {a['full_equal']}; overviews {a['overviews']} (GDAL {a['gdal_overviews']}), "
                      "equal pixels " + ", ".join("-" if s is None else f"{100 * s:.2f}%" for s in a["overview_equal_share"]),
                      flush=True)
            figures[str(n)] = fig
        print("\nsize    geoseg s   GDAL write s   GDAL imports s   ratio (write)   geoseg client peak +MB   full equal")
        for n in sizes:
            f = figures[str(n)]
            g, b = f["geoseg"], f.get("gdal")
            print(f"{n:<7} {g['seconds']:8.1f} {b['seconds'] if b else float('nan'):14.1f} "
                  f"{b['import_s'] if b else float('nan'):16.1f} "
                  f"{g['seconds'] / b['seconds'] if b else float('nan'):15.2f} {g['client_peak_growth'] / 2**20:24.0f}   "
                  f"{f.get('agreement', {}).get('full_equal', '-')}")
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
