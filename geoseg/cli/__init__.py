"""The `geoseg` command line (click, in the manner of rasterio's `rio`)."""
