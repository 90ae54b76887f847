"""How many regions stay below the minimum mapping unit after geoseg's sieve, beside GDAL's sieve filter.

geoseg sieves in one pass on the map as given (so chunks equal the whole map): a small region takes the class
of its neighbours at or above the limit it shares the longest border with, and keeps its class where every
neighbour is small. GDAL's sieve (rasterio.features.sieve) merges small regions into their largest neighbour
until nothing changes. Maps: 30 px blocks of 5 classes with a share of pixels given a random class (speckle),
as a per-pixel classifier leaves them. Run: ``.venv/bin/python benchmarks/sieve_speckle.py``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from rasterio.features import sieve as gdal_sieve

from geoseg.vector.regions import label_regions
from geoseg.vector.sieve import sieve


def below(a: np.ndarray, limit: int) -> tuple[int, int]:
    """(regions, regions under ``limit`` px) of a class map, 4-connected."""
    labels, _ = label_regions(a, None, 4)
    sizes = np.bincount(labels.ravel())[1:]
    return len(sizes), int((sizes < limit).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=300)
    ap.add_argument("--seed", type=int, default=6)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    cells = -(-args.size // 30)
    base = np.kron(rng.integers(0, 5, size=(cells, cells)), np.ones((30, 30), int))[:args.size, :args.size].astype(np.uint8)
    print(f"{args.size}² map, 5 classes in 30 px blocks; regions (and those under the limit) after the sieve")
    print(f"{'speckle':>7} {'limit':>5} | {'geoseg':>15} {'s':>6} | {'GDAL sieve':>15} {'s':>6}")
    for noise in (0.05, 0.2, 0.4):
        a = base.copy()
        m = rng.random(a.shape) < noise
        a[m] = rng.integers(0, 5, m.sum())
        for limit in (5, 20):
            t = time.perf_counter()
            ours = sieve(a, 255, limit)
            t_ours = time.perf_counter() - t
            t = time.perf_counter()
            theirs = gdal_sieve(a, limit, connectivity=4)
            t_gdal = time.perf_counter() - t
            (n, k), (gn, gk) = below(ours, limit), below(theirs, limit)
            print(f"{noise:7.2f} {limit:5d} | {n:6d} ({k:5d} <) {t_ours:6.2f} | {gn:6d} ({gk:5d} <) {t_gdal:6.2f}")


if __name__ == "__main__":
    main()
