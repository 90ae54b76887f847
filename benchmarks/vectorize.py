"""geoseg's vectorize against a whole-raster polygonize and gdal_polygonize.py, measured side by side in one run.

    python benchmarks/vectorize.py [--sizes 16384,32768] [--workdir DIR] [--baseline-max 32768]
        [--predict-size 16384] [--chunk-size N] [--json PATH]

For each size N of --sizes, on an N x N class raster (labels.tif of `geoseg sample-data DIR --size N
--bands 1 --classes 6 --seed 0`: uint8, nodata 255, a tilted footprint with nodata corners and a hole),
prints, in this order:
  1. geoseg: `vectorize(labels.tif, [out.gpkg], client=client)` on an already started `connect()` cluster
     (default workers; a new cluster per size, warmed up by a 512 px raster, so each size's worker peak is
     its own): seconds; the client process's peak RSS during the call and its increase over the RSS before
     (sampled every 0.1 s by a thread; this process also holds the LocalCluster's scheduler); every
     worker's peak RSS since its start (VmHWM, so its start and the warm-up count; not ru_maxrss, which a
     spawned process inherits from its parent: see own_peak); polygons (vectorize's count and the file's);
  2. whole raster, in a plain subprocess with no cluster alive: rasterio reads the whole band,
     rasterio.features.shapes(a, mask=a != nodata, connectivity=4), a GeoDataFrame, a GeoPackage written
     by pyogrio: seconds (launch to exit, and the child's own read / polygonize / write split), the
     child's peak RSS (its VmHWM, printed by the child as JSON), polygons; skipped above --baseline-max;
  3. gdal_polygonize.py (where it is on PATH; run as an executable, it may belong to the system Python):
     `gdal_polygonize.py -q -f GPKG labels.tif out.gpkg landuse class_id` (4-connected, the band's nodata
     masked): seconds launch to exit, peak RSS (/usr/bin/time -v, else RUSAGE_CHILDREN, which an earlier
     or inherited peak can hide), polygons;
  4. whether the polygon counts agree, and the aims beside the figures: faster than GDAL; client peak
     < 0.5 GB at 32768^2; worker peak the same at every size (16384^2 and 32768^2).
Then, unless --predict-size 0: `geoseg.pipeline.predict` (COG and polygons included) of a 4-band scene of
that size with a random-weight U-Net (resnet18, depth 3; made by `geoseg model init` in a subprocess, so
this process never imports torch) on a started cluster, with this (client) process's RSS sampled every
0.1 s and split by stage (segment, cog, vectorize, item: boundaries taken from geoseg's own Stage timers
when they can be observed, else from the run record's timings anchored at the call's end, which is
approximate): each stage's peak and its increase over the RSS before the call, beside the record's
memory_client_bytes.
Finally a summary table; --json writes every figure. Scenes are cached in --workdir (default: a
temporary folder, removed at the end). Speeds are reported, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Self

from bench_common import init_model_cli, own_peak, worker_peaks  # this folder's: peak figures (VmHWM), a model made apart

MIB = 2**20
AIM_CLIENT_BYTES = 0.5e9  # "client peak < 0.5 GB at 32768^2"
AIM_CLIENT_SIZE = 32768
SAMPLE_S = 0.1
ENV = dict(os.environ)  # subprocesses get the environment from before any nanny touched os.environ


class RssSampler:
    """This process's RSS every ``interval`` s, with timestamps (time.perf_counter), while in the block."""

    def __init__(self, interval: float = SAMPLE_S) -> None:
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()

    def _rss(self) -> int:
        return self._proc.memory_info().rss

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append((time.perf_counter(), self._rss()))

    def __enter__(self) -> Self:
        import psutil

        self._proc = psutil.Process()
        self.before = self._rss()
        self.samples.append((time.perf_counter(), self.before))
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.perf_counter(), self._rss()))

    @property
    def peak(self) -> int:
        return max(r for _, r in self.samples)

    def peak_between(self, t0: float, t1: float) -> int | None:
        inside = [r for t, r in self.samples if t0 <= t <= t1]
        return max(inside) if inside else None


def mib(b: float | None) -> str:
    return "-" if b is None else f"{b / MIB:.0f}"


def class_raster(work: Path, size: int) -> Path:
    """labels.tif of `geoseg sample-data DIR --size SIZE --bands 1 --classes 6 --seed 0`, cached."""
    from geoseg.sample import make_sample

    d = work / f"labels{size}-c6-seed0"
    if not (d / "labels.tif").exists():
        t = time.perf_counter()
        make_sample(d, size=size, bands=1, seed=0, n_classes=6)
        print(f"generated a {size}x{size} class raster in {time.perf_counter() - t:.1f} s", flush=True)
    return d / "labels.tif"


def features(path: Path, layer: str | None = None) -> int:
    import pyogrio

    return int(pyogrio.read_info(path, layer=layer)["features"])


def geoseg_run(client, labels: Path, out: Path, chunk_size: int | None) -> dict:
    from geoseg.vector.api import LAYER, vectorize

    out.unlink(missing_ok=True)
    before_workers, _ = worker_peaks(client)
    with RssSampler() as s:
        t = time.perf_counter()
        stats = vectorize(labels, [out], client=client, chunk_size=chunk_size)
        secs = time.perf_counter() - t
    workers, maxrss = worker_peaks(client)
    n_file = features(out, LAYER)
    r = {"seconds": secs, "client_peak_bytes": s.peak, "client_before_bytes": s.before,
         "client_increase_bytes": s.peak - s.before, "worker_peak_bytes": workers,
         "worker_peak_before_bytes": before_workers, "worker_ru_maxrss_bytes": maxrss, "polygons": stats["polygons"], "polygons_in_file": n_file,
         "chunks": stats["chunks"], "chunk_size": stats["chunk_size"], "inner": stats["inner"],
         "merged": stats["merged"], "border_labels": stats["border_labels"], "samples": len(s.samples)}
    print(f"  [1] geoseg vectorize: {secs:.2f} s ({stats['chunks']} chunks of {stats['chunk_size']}, {len(workers)} "
          f"workers); client peak {mib(s.peak)} MiB (+{mib(s.peak - s.before)} MiB over {mib(s.before)} MiB before; "
          f"scheduler in this process); worker peak {', '.join(mib(w) for w in workers)} MiB (before the "
          f"call {', '.join(mib(w) for w in before_workers)}{_maxrss_note(workers, maxrss)}); polygons {stats['polygons']} "
          f"({stats['inner']} inner + {stats['merged']} merged; {n_file} in the file)", flush=True)
    return r


def _maxrss_note(hwm: list[int], maxrss: list[int]) -> str:
    if max(maxrss) <= 1.05 * max(hwm):
        return ""
    return f"; ru_maxrss says {', '.join(mib(m) for m in maxrss)}: it includes the client's peak at the spawn"


def _baseline_child(src: str, out: str) -> None:
    """The whole-raster baseline, in its own process; prints its figures as one JSON line."""
    t0 = time.perf_counter()
    import geopandas as gpd
    import numpy as np
    import pyogrio
    import rasterio
    import rasterio.features
    import shapely.geometry

    t1 = time.perf_counter()
    with rasterio.open(src) as ds:
        a = ds.read(1)
        nodata, transform, crs = ds.nodata, ds.transform, ds.crs
    t2 = time.perf_counter()
    mask = None if nodata is None else a != nodata
    geoms, values = [], []
    for g, v in rasterio.features.shapes(a, mask=mask, connectivity=4, transform=transform):
        geoms.append(shapely.geometry.shape(g))
        values.append(v)
    del a, mask
    gdf = gpd.GeoDataFrame({"class_id": np.asarray(values, np.uint8)}, geometry=geoms, crs=crs)
    t3 = time.perf_counter()
    pyogrio.write_dataframe(gdf, out, layer="landuse", driver="GPKG")
    t4 = time.perf_counter()
    hwm, maxrss = own_peak()
    print(json.dumps({"import_s": t1 - t0, "read_s": t2 - t1, "polygonize_s": t3 - t2, "write_s": t4 - t3,
                      "peak_rss_bytes": hwm, "ru_maxrss_bytes": maxrss,
                      "polygons": len(gdf), "nodata": nodata}))


def baseline_run(labels: Path, out: Path) -> dict:
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--baseline-child", str(labels), str(out)]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, check=False)
    secs = time.perf_counter() - t
    if p.returncode != 0:
        print(f"  [2] whole raster: FAILED (exit {p.returncode}) after {secs:.1f} s: {p.stderr.strip()[-500:]}", flush=True)
        return {"failed": p.returncode, "seconds": secs, "stderr": p.stderr[-2000:]}
    child = json.loads(p.stdout.strip().splitlines()[-1])
    r = {"seconds": secs, "peak_bytes": child["peak_rss_bytes"], "polygons": child["polygons"],
         "polygons_in_file": features(out, "landuse"), "child": child}
    print(f"  [2] whole raster (rasterio shapes + GeoDataFrame + pyogrio): {secs:.2f} s launch to exit (imports "
          f"{child['import_s']:.1f}, read {child['read_s']:.1f}, polygonize {child['polygonize_s']:.1f}, write "
          f"{child['write_s']:.1f}); process peak {mib(child['peak_rss_bytes'])} MiB; polygons {child['polygons']} "
          f"(nodata {child['nodata']})", flush=True)
    return r


def _gdal_version() -> str | None:
    exe = shutil.which("gdalinfo")
    if not exe:
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run([exe, "--version"], capture_output=True, text=True, env=ENV, timeout=30,
                              check=False).stdout.strip()
    return None


def gdal_run(labels: Path, out: Path) -> dict | None:
    exe = shutil.which("gdal_polygonize.py", path=ENV.get("PATH"))
    if not exe:
        print("  [3] gdal_polygonize.py: not on PATH, skipped", flush=True)
        return None
    out.unlink(missing_ok=True)
    cmd = [exe, "-q", "-f", "GPKG", str(labels), str(out), "landuse", "class_id"]
    timev = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None
    tfile = out.with_suffix(".time.txt")
    if timev:
        cmd = [timev, "-v", "-o", str(tfile)] + cmd
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, check=False)
    secs = time.perf_counter() - t
    if p.returncode != 0:
        print(f"  [3] gdal_polygonize.py: FAILED (exit {p.returncode}) after {secs:.1f} s: {p.stderr.strip()[-500:]}",
              flush=True)
        return {"failed": p.returncode, "seconds": secs, "stderr": p.stderr[-2000:]}
    peak, how = None, None
    if timev and tfile.exists():
        m = re.search(r"Maximum resident set size \(kbytes\):\s*(\d+)", tfile.read_text())
        if m:
            peak, how = int(m.group(1)) * 1024, "/usr/bin/time -v"
    if peak is None:
        after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        # the largest child waited for so far: the command's own only if it beat every earlier child
        peak, how = (after, "RUSAGE_CHILDREN") if after > before else (None, "RUSAGE_CHILDREN: no larger than earlier children")
    n = features(out, "landuse")
    print(f"  [3] gdal_polygonize.py: {secs:.2f} s launch to exit; process peak {mib(peak)} MiB ({how}); "
          f"polygons {n}", flush=True)
    return {"seconds": secs, "peak_bytes": peak, "peak_from": how, "polygons": n, "exe": exe}


def one_size(args, work: Path, size: int, warm: Path) -> dict:
    from geoseg.cluster import connect
    from geoseg.vector.api import vectorize

    labels = class_raster(work, size)
    d = labels.parent
    print(f"\n== {size} x {size} ({labels}) ==", flush=True)
    fig: dict = {"size": size}
    t = time.perf_counter()
    with connect() as client:
        start = time.perf_counter() - t
        t = time.perf_counter()
        # 4 chunks of 256 px: every worker imports and runs everything once
        vectorize(warm, [d / "warmup.gpkg"], client=client, chunk_size=256)
        print(f"  cluster started in {start:.1f} s, warmed up in {time.perf_counter() - t:.1f} s", flush=True)
        fig["cluster_start_s"] = start
        fig["geoseg"] = geoseg_run(client, labels, d / "geoseg.gpkg", args.chunk_size)
    # no cluster of ours alive from here: the cores are the subprocesses'
    if size <= args.baseline_max:
        fig["whole"] = baseline_run(labels, d / "whole.gpkg")
    else:
        print(f"  [2] whole raster: skipped ({size} > --baseline-max {args.baseline_max})", flush=True)
    g = gdal_run(labels, d / "gdal.gpkg")
    if g is not None:
        fig["gdal"] = g
    counts = {"geoseg": fig["geoseg"]["polygons"], "geoseg file": fig["geoseg"]["polygons_in_file"]}
    for k in ("whole", "gdal"):
        if k in fig and "polygons" in fig[k]:
            counts["whole raster" if k == "whole" else "gdal_polygonize"] = fig[k]["polygons"]
    fig["counts_equal"] = len(set(counts.values())) == 1
    print(f"  [4] polygon counts {'EQUAL' if fig['counts_equal'] else 'DIFFER'}: "
          + ", ".join(f"{k} {v}" for k, v in counts.items()), flush=True)
    gs = fig["geoseg"]
    if "gdal" in fig and "polygons" in fig["gdal"]:
        ratio = fig["gdal"]["seconds"] / gs["seconds"]
        fig["speedup_vs_gdal"] = ratio
        print(f"      aim faster than GDAL: geoseg {gs['seconds']:.2f} s vs gdal_polygonize {fig['gdal']['seconds']:.2f} s "
              f"= {ratio:.2f}x ({'met' if ratio > 1 else 'NOT met'})", flush=True)
    ok = gs["client_peak_bytes"] < AIM_CLIENT_BYTES
    print(f"      aim client peak < 0.5 GB at {AIM_CLIENT_SIZE}^2: {gs['client_peak_bytes'] / 1e9:.3f} GB here "
          f"(+{gs['client_increase_bytes'] / 1e9:.3f} GB during the call)"
          + (f" ({'met' if ok else 'NOT met'})" if size == AIM_CLIENT_SIZE else f" (the aim is for {AIM_CLIENT_SIZE}^2)"),
          flush=True)
    return fig


@contextlib.contextmanager
def stage_clock():
    """Enter/exit times of geoseg's Stage timers in geoseg.pipeline.commit while in the block (observed only:
    a subclass that notes the clock; nothing of geoseg changes). Empty if commit no longer uses Stage."""
    from geoseg.pipeline import commit

    seen: list[tuple[str, float, float]] = []
    orig = getattr(commit, "Stage", None)
    if orig is None:
        yield seen
        return

    class Clocked(orig):
        def __enter__(self):
            self._bench_t0 = time.perf_counter()
            return super().__enter__()

        def __exit__(self, *exc):
            r = super().__exit__(*exc)
            seen.append((self.name, self._bench_t0, time.perf_counter()))
            return r

    commit.Stage = Clocked
    try:
        yield seen
    finally:
        commit.Stage = orig


def predict_stages(args, work: Path) -> dict:
    from geoseg.cluster import connect
    from geoseg.pipeline import PredictOptions, predict
    from geoseg.sample import make_sample

    size = args.predict_size
    d = work / f"scene{size}-b4-seed0"
    if not (d / "image.tif").exists():
        t = time.perf_counter()
        make_sample(d, size=size, bands=4, seed=0)
        print(f"generated a {size}x{size}x4 scene in {time.perf_counter() - t:.1f} s", flush=True)
    # made by `geoseg model init` in a subprocess: init_model here would import torch into this (client) process
    # and raise the RSS every stage is measured against
    model = init_model_cli(work / "model-random-r18-d3", encoder_depth=3)
    print(f"\n== geoseg predict, {size} x {size} x 4, random U-Net resnet18 depth 3 ==", flush=True)
    with connect() as client:
        with stage_clock() as seen, RssSampler() as s:
            t0 = time.perf_counter()
            rec = predict([d / "image.tif"], model, work / f"predict{size}", PredictOptions(overwrite=True), client=client)
            t1 = time.perf_counter()
        workers, _ = worker_peaks(client)
    timings = rec["timings"]
    order = [k for k in ("segment_s", "cog_s", "vectorize_s", "item_s") if k in timings]
    if [n for n, _, _ in seen] == [k[:-2] for k in order]:
        bounds = {n + "_s": (a, b) for n, a, b in seen}
        how = "geoseg's Stage enter/exit times"
    else:  # the record's timings laid back to back, ending at the call's end (what follows item is small)
        bounds, end = {}, t1
        for k in reversed(order):
            bounds[k] = (end - timings[k], end)
            end -= timings[k]
        how = "run record timings, end-anchored (approximate)"
    first = min(a for a, _ in bounds.values())
    stages = {"before segment": {"seconds": first - t0, "client_peak_bytes": s.peak_between(t0, first)}}
    for k in order:
        a, b = bounds[k]
        stages[k[:-2]] = {"seconds": timings[k], "client_peak_bytes": s.peak_between(a, b)}
    mem = rec.get("memory_client_bytes", {})
    print(f"  whole call {t1 - t0:.1f} s; client RSS {mib(s.before)} MiB before (torch {'imported' if 'torch' in sys.modules else 'not imported'} here), peak "
          f"{mib(s.peak)} MiB; polygons {rec.get('polygons')}; worker peak (VmHWM) {', '.join(mib(w) for w in workers)} MiB",
          flush=True)
    print(f"  client peak per stage ({how}; samples every {SAMPLE_S} s), and its increase over the RSS before the call:",
          flush=True)
    for name, v in stages.items():
        recd = mem.get(f"{name}_peak_rss")
        pk = v["client_peak_bytes"]
        v["client_increase_bytes"] = None if pk is None else pk - s.before
        print(f"    {name:15} {v['seconds']:8.2f} s  peak {mib(pk):>6} MiB"
              + ("" if pk is None else f" (+{mib(pk - s.before)})")
              + (f"  (run record: {mib(recd)} MiB)" if recd is not None else ""), flush=True)
    print(f"  run record memory_client_bytes: {json.dumps(mem)}", flush=True)
    return {"size": size, "seconds": t1 - t0, "stage_bounds": how, "stages": stages, "timings": timings,
            "memory_client_bytes": mem, "client_before_bytes": s.before, "client_peak_bytes": s.peak,
            "worker_peak_bytes": workers, "polygons": rec.get("polygons"), "chunks": rec.get("chunks"),
            "parameters": rec.get("parameters")}


def summary(fig: dict) -> None:
    rows = [("size", "method", "seconds", "client/proc MiB", "worker MiB", "polygons")]
    for f in fig["sizes"]:
        g = f["geoseg"]
        rows.append((f["size"], "geoseg vectorize", f"{g['seconds']:.2f}", mib(g["client_peak_bytes"]),
                     mib(max(g["worker_peak_bytes"])), g["polygons"]))
        for k, name in (("whole", "whole raster"), ("gdal", "gdal_polygonize")):
            if k in f:
                r = f[k]
                rows.append((f["size"], name, f"{r['seconds']:.2f}", "failed" if "failed" in r else mib(r["peak_bytes"]),
                             "-", r.get("polygons", "-")))
    p = fig.get("predict")
    if p:
        for name, v in p["stages"].items():
            rows.append((p["size"], f"predict: {name}", f"{v['seconds']:.2f}", mib(v["client_peak_bytes"]), "-",
                         p["polygons"] if name == "vectorize" else ""))
        rows.append((p["size"], "predict: whole call", f"{p['seconds']:.2f}", mib(p["client_peak_bytes"]),
                     mib(max(p["worker_peak_bytes"])), p["polygons"]))
    print("\n" + "\n".join(f"{a!s:>7}  {b:22} {c:>9} {d:>16} {e:>11} {f!s:>10}" for a, b, c, d, e, f in rows))
    print("aims:")
    for f in fig["sizes"]:
        if "speedup_vs_gdal" in f:
            print(f"  {f['size']}: faster than GDAL: {f['speedup_vs_gdal']:.2f}x "
                  f"({'met' if f['speedup_vs_gdal'] > 1 else 'NOT met'})")
        if f["size"] == AIM_CLIENT_SIZE:
            b = f["geoseg"]["client_peak_bytes"]
            print(f"  {f['size']}: client peak < 0.5 GB: {b / 1e9:.3f} GB ({'met' if b < AIM_CLIENT_BYTES else 'NOT met'})")
        print(f"  {f['size']}: polygon counts {'equal' if f['counts_equal'] else 'DIFFER'}")
    peaks = {f["size"]: max(f["geoseg"]["worker_peak_bytes"]) for f in fig["sizes"]}
    if len(peaks) > 1:
        lo = min(peaks.values())
        print("  worker peak the same at every size: " + ", ".join(f"{s}: {mib(v)} MiB ({v / lo:.2f}x)" for s, v in peaks.items()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="16384,32768", help="sides of the class rasters, comma-separated")
    ap.add_argument("--workdir", default=None, help="keep rasters and outputs here (default: a temp dir, removed)")
    ap.add_argument("--baseline-max", type=int, default=32768, help="largest side the whole-raster baseline runs on")
    ap.add_argument("--predict-size", type=int, default=16384, help="side of the predict scene (0: skip)")
    ap.add_argument("--chunk-size", type=int, default=None, help="vectorize's chunk size (default: geoseg's choice)")
    ap.add_argument("--json", default=None, help="also write every figure here")
    ap.add_argument("--baseline-child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline_child:
        _baseline_child(*args.baseline_child)
        return 0
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]

    work = Path(args.workdir or tempfile.mkdtemp(prefix="geoseg-vbench-"))
    work.mkdir(parents=True, exist_ok=True)
    from geoseg.cluster import default_workers
    from geoseg.sample import make_sample

    gdal = shutil.which("gdal_polygonize.py", path=ENV.get("PATH"))
    print(f"{len(os.sched_getaffinity(0))} cores, {default_workers()} workers; gdal_polygonize.py: "
          f"{gdal or 'not on PATH'}" + (f" ({_gdal_version()})" if gdal else "") + f"; work in {work}", flush=True)
    fig: dict = {"cores": len(os.sched_getaffinity(0)), "workers": default_workers(), "gdal_polygonize": gdal,
                 "gdal_version": _gdal_version() if gdal else None, "chunk_size": args.chunk_size, "sizes": []}
    try:
        warm = work / "warmup-c6" / "labels.tif"
        if not warm.exists():
            make_sample(warm.parent, size=512, bands=1, seed=1, n_classes=6)
        for size in sizes:
            fig["sizes"].append(one_size(args, work, size, warm))
        if args.predict_size:
            fig["predict"] = predict_stages(args, work)
        summary(fig)
        if args.json:
            Path(args.json).write_text(json.dumps(fig, indent=2, default=str))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
