"""Polygons of class maps at any scale: exact chunk-parallel polygonize, true areas, styled files.

``regions``: pure kernels (labels, chunk borders, joins); ``measure``: ellipsoidal areas and
perimeters; ``polygons``: per-chunk polygons and their merge across chunk borders; ``run``:
the two-phase dask computation; ``writers`` and ``style``: GeoPackage / GeoParquet /
FlatGeobuf outputs with a QGIS style.
"""
