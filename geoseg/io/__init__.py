"""Reading and writing rasters, stores and vectors: all file I/O lives in this package."""
