"""`geoseg vectorize`: polygons of a class map, chunk-parallel on a Dask cluster, exact across chunk borders."""

from __future__ import annotations

import click

from geoseg.cli.options import check_cluster_options, scheduler_opt, workers_opt


@click.command(short_help="Polygons of a class map (chunk-parallel, exact).")
@click.argument("source", type=click.Path())
@click.option("--out", "outputs", multiple=True, required=True, type=click.Path(dir_okay=False),
              help="Output file: .gpkg (GeoPackage), .parquet (GeoParquet 1.1) or .fgb (FlatGeobuf). Repeat for several.")
@click.option("--chunk-size", type=click.IntRange(min=1), default=None, metavar="PX",
              help="Side of the chunks polygonized in parallel (default: the source's chunks, or 2048). "
                   "The polygons do not depend on it.")
@click.option("--connectivity", type=click.Choice(["4", "8"]), default="4", show_default=True,
              help="Pixels of one region touch along edges (4, GDAL's default) or edges and corners (8).")
@click.option("--classes", "keep", default=None, metavar="ID,ID,...", help="Keep only these class ids.")
@click.option("--min-area", default=None, metavar="AREA",
              help="Sieve first: regions smaller than AREA (25px, 500m2, 0.5ha; a bare number is pixels) take the "
                   "class of the neighbouring regions at or above AREA they share the longest border with (one "
                   "pass; a region whose neighbours are all smaller keeps its class). The result does not depend "
                   "on the chunking (a halo of 2 x AREA - 1 pixels, joined across chunks once that passes 256 px).")
@click.option("--simplify", default=None, metavar="TOL",
              help="Simplify borders by TOL (1.5px, or CRS units) with GEOS's coverage simplification: shared "
                   "borders stay shared (no gaps, no overlaps). Runs over the whole layer in this process.")
@scheduler_opt
@workers_opt
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
@click.pass_context
def vectorize(ctx, source, outputs, chunk_size, connectivity, keep, min_area, simplify, scheduler, n_workers, overwrite):
    """Polygonize SOURCE (a prediction.zarr or a single-band class raster such as classes.tif).

    One polygon per connected region of one class, the same as GDAL's polygonize of the whole
    raster for any chunk size; nodata is never vectorized. Fields: class_id, class_name,
    area_m2 and perimeter_m (on the ellipsoid, in every CRS), pixels, mean_confidence (from a
    prediction store). GeoPackages carry a QGIS style; other formats get a .qml beside them.
    """
    from pathlib import Path

    from geoseg.cluster import connect
    from geoseg.errors import ConfigError, OutputExistsError
    from geoseg.io.storage import check_creatable
    from geoseg.vector.run import open_class_raster
    from geoseg.vector.writers import check_vector_path
    from geoseg.vector.api import vectorize as run

    for out in outputs:
        check_vector_path(out)
        if Path(out).exists() and not overwrite:
            raise OutputExistsError(f"{out}: already exists; choose another path or pass --overwrite")
        check_creatable(out, "--out path")
    try:
        ids = None if keep is None else [int(v) for v in keep.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--classes must be class ids separated by commas, not {keep!r}") from None
    check_cluster_options(scheduler, n_workers)
    src = open_class_raster(source)  # checked before any cluster starts
    from geoseg.vector.api import min_area_limit

    min_area_limit(min_area, src)  # as is --min-area
    with connect(scheduler, n_workers, gpus=()) as client:  # no model tasks: no GPU workers
        result = run(src, list(outputs), client=client, chunk_size=chunk_size, connectivity=int(connectivity), keep_classes=ids,
                     min_area=min_area, simplify=simplify)
    for w in result["outputs"] if (ctx.obj or {}).get("verbosity", 0) >= 0 else ():
        click.echo(f"{w['path']}: {w['polygons']} polygons ({w['format']})")
