"""`geoseg predict`: segment a scene into Zarr, COG and land-use polygons."""

from __future__ import annotations

import sys

import click

from geoseg.cli import options as opt


@click.command(short_help="Segment a scene of any size.")
@opt.images_arg
@opt.model_opt
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory.")
@opt.chunk_opt
@opt.halo_opt
@opt.exact_opt
@click.option("--tile-size", type=click.IntRange(1), default=None, metavar="PX", help="Side of one forward pass (default: the chunk; smaller bounds the memory of a pass, each tile gets its own halo).")
@opt.precision_opt
@opt.tta_opt
@opt.postprocess_opts
@click.option("--batch-size", type=click.IntRange(1), default=2, show_default=True, help="Tiles per forward pass (tiles of one chunk only).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@opt.scheduler_opt
@opt.workers_opt
@opt.overwrite_opt
@click.option("--resume", is_flag=True, help="Reuse the chunks an interrupted run of the same job finished.")
@click.option("--no-cog", is_flag=True, help="Skip classes.tif.")
@click.option("--no-vectors", is_flag=True, help="Skip landuse.gpkg.")
@click.option("--prompts", default=None, type=click.Path(dir_okay=False, exists=True), metavar="FILE",
              help="SAM models: points or polygons (their boxes) in any CRS, one object each (ids = row + 1); "
                   "without it SAM segments everything (automatic masks).")
@click.option("--instance-model", default=None, metavar="DIR",
              help="Panoptic: an instance model run in the same job; its objects are laid over --model's class map "
                   "(prediction.zarr gains instance_id; instances.tif and objects.gpkg are written too).")
@click.option("--max-object-size", default=None, metavar="SIZE",
              help="Instance models: the largest object expected, in pixels (64, 64px) or metres (30m); the chunks' halo "
                   "(default: as the card says, from the training labels).")
@click.option("--score-threshold", type=click.FloatRange(0, 1), default=None, help="Instance models: drop detections scoring below.")
@click.option("--nms-iou", type=click.FloatRange(0, 1), default=None, help="Instance models: box IoU above which non-maximum suppression keeps one.")
@click.pass_context
def predict(ctx, images, model_dir, out_dir, chunk_size, halo, exact, tile_size, precision, tta, majority, mmu, no_postprocess,
            batch_size, device,
            scheduler, n_workers, overwrite, resume, no_cog, no_vectors, prompts, instance_model, max_object_size, score_threshold,
            nms_iou):
    """Segment IMAGE (one multi-band raster, or several single-band rasters on one grid,
    stacked in the order given) with the model in --model, and write to --out:

    \b
      prediction.zarr  class_id (uint8, 255 = nodata) and confidence, georeferenced
      classes.tif      Cloud-Optimized GeoTIFF with colour table and class names
      landuse.gpkg     one polygon per 4-connected region of one class
      run.json         what was run, timings and throughput

    With an instance model (geoseg train --task instance): prediction.zarr holds instance_id (uint32,
    0 = no object) and class_id; instances.tif and classes.tif; objects.gpkg one polygon per object
    (instance_id, class_id, class_name, score, area_m2); objects cut by chunk lines are joined.

    Inputs, model and output directory are checked before any cluster starts.
    """
    opt.check_cluster_options(scheduler, n_workers)
    opt.check_overwrite_resume(overwrite, resume)
    if not scheduler:  # the workers' imports start now, while this process imports and plans (geoseg.forkserver)
        from geoseg import forkserver

        forkserver.start()
    from geoseg.pipeline import DEFAULT_PRECISION, PredictOptions
    from geoseg.pipeline import predict as run

    postprocess = opt.postprocess_in_place(majority, mmu, no_postprocess)
    options = PredictOptions(
        postprocess=postprocess, chunk_size=chunk_size, halo=halo, exact=exact, tile_size=tile_size, precision=precision or DEFAULT_PRECISION,
        batch_size=batch_size, device=device, overwrite=overwrite, resume=resume, cog=not no_cog, vectors=not no_vectors,
        tta=None if tta == "card" else tta, max_object_size=max_object_size, score_threshold=score_threshold, nms_iou=nms_iou,
        instance_model=instance_model, prompts=prompts,
    )
    verbosity = ctx.obj["verbosity"]
    record = run(images, model_dir, out_dir, options, scheduler=scheduler, n_workers=n_workers,
                 progress=verbosity >= 0 and sys.stderr.isatty())
    if verbosity >= 0 and record.get("task") == "instance":
        p = record["parameters"]
        click.echo(f"found {record['objects']} objects in {p['shape'][0]} x {p['shape'][1]} px in "
                   f"{record['timings']['instances_s']:.1f} s (halo {p['halo']} px); outputs in {out_dir}: "
                   + ", ".join(record["outputs"]) + ", run.json")
    elif verbosity >= 0:
        p = record["parameters"]
        # a speed only where every chunk was segmented by this run (reused chunks cost nothing: no honest figure)
        speed = f"{record['throughput_mpx_s']:.2f} Mpx/s; " if record["throughput_mpx_s"] else ""
        click.echo(
            f"segmented {p['shape'][0]} x {p['shape'][1]} px in {record['timings']['segment_s']:.1f} s "
            f"({speed}chunks {record['chunks']['computed']} computed, {record['chunks']['reused']} reused; halo {p['halo']} px)"
        )
        click.echo(f"outputs in {out_dir}: " + ", ".join(record["outputs"]) + ", run.json")
