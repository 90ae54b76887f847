"""SpaceNet Atlanta building polygons rasterized on the image grid: WORKDIR/labels.tif (background 0,
building 1, 255 where the image is nodata) and WORKDIR/classes.yaml.

    python benchmarks/spacenet_labels.py SPACENET_DIR WORKDIR      (used by spacenet_methods.sh, methods_splits.sh)
"""

import sys

import geopandas as gpd
import rasterio
from rasterio.features import rasterize

d, w = sys.argv[1:]
with rasterio.open(f"{d}/sample_geotiff.tif") as ds:
    profile = dict(ds.profile, count=1, dtype="uint8", nodata=255)
    shapes = gpd.read_file(f"{d}/geotiff_labels.geojson").to_crs(ds.crs).geometry
    mask = rasterize(((g, 1) for g in shapes), out_shape=ds.shape, transform=ds.transform, fill=0, dtype="uint8")
    mask[ds.read_masks(1) == 0] = 255
with rasterio.open(f"{w}/labels.tif", "w", **profile) as out:
    out.write(mask, 1)
with open(f"{w}/classes.yaml", "w") as fh:
    fh.write("- {id: 0, name: background, color: '#bababa'}\n- {id: 1, name: building, color: '#d7191c'}\n")
