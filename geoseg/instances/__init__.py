"""Objects, not only classes: instance segmentation at scene scale.

- ``net``: torchvision's Mask R-CNN for any number of bands, built without downloading anything
  (``weights=None``), and the pure kernel that turns one window into detections.
- ``merge``: pure kernels that join the detections of overlapping chunk windows into objects
  (matched by mask overlap on the area the windows share, so an object is never counted twice and
  one cut by a window edge is joined) and paint them into a chunk.
- ``tasks``: what workers run (detect in a window, match two windows, paint a chunk and draw its polygons).
- ``run``: the stages planned and run from the client (detect per chunk, match neighbours, resolve,
  paint); ``outputs``: the store, COGs, objects.gpkg and run.json (committed last).
- ``sam``: Segment Anything with a checkpoint the user provides.
- ``train``: ``geoseg train --task instance`` from one polygon per object or an instance-id raster.
- ``metrics``: object precision / recall / F1 at IoU 0.5 and panoptic quality.
"""
