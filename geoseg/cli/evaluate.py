"""`geoseg evaluate`: score a model against labels through the tiled predict graph."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from geoseg.cli import options as opt
from geoseg.cli.train import apply, geoseg_warnings, label_opts, region_opts


@click.command(short_help="Score a model against labelled imagery.")
@opt.images_arg
@opt.model_opt
@apply(label_opts)
@apply(region_opts)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, metavar="REPORT.json",
              help="Also write the report (per-class scores and confusion matrix) as JSON.")
@opt.chunk_opt
@opt.halo_opt
@opt.exact_opt
@click.option("--tile-size", type=int, default=None, metavar="PX", help="Side of one forward pass (default: the chunk).")
@opt.precision_opt
@click.option("--batch-size", type=int, default=2, show_default=True, help="Tiles per forward pass.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@opt.scheduler_opt
@opt.workers_opt
@opt.overwrite_opt
@click.pass_context
def evaluate(ctx, images, model_dir, labels, label_field, ignore, reproject_labels, bbox, window, json_path, chunk_size,
             halo, exact, tile_size, precision, batch_size, device, scheduler, n_workers, overwrite):
    """Segment IMAGE with --model through the same tiled graph as `geoseg predict` and compare
    the class map with --labels over the pixels where both are valid.

    Prints per-class IoU, precision, recall, F1 and pixel counts, mIoU, overall accuracy and the
    confusion matrix (rows: labels, columns: predictions); --json writes them too. Restrict to a
    region with --bbox or --window, e.g. an area held out from training.
    """
    from geoseg.errors import OutputExistsError
    from geoseg.evaluation import EvaluateOptions, plan_evaluation, run_evaluation

    options = EvaluateOptions(
        chunk_size=chunk_size, halo=halo, exact=exact, tile_size=tile_size, precision=precision or "auto",
        batch_size=batch_size, device=device, label_field=label_field, ignore=tuple(ignore),
        reproject_labels=reproject_labels, bbox=tuple(bbox) if bbox else None, window=tuple(window) if window else None,
    )  # fmt: skip
    if json_path and Path(json_path).exists() and not overwrite:
        raise OutputExistsError(f"{json_path}: already exists; choose another --json path or pass --overwrite")
    with geoseg_warnings():
        plan_evaluation(images, model_dir, labels, options, resolve=False)  # everything checked before a cluster starts
        from geoseg.cluster import connect

        with connect(scheduler, n_workers):
            # planned again on the cluster: the numerics are decided by the workers that run the model
            job = plan_evaluation(images, model_dir, labels, options)
            result = run_evaluation(job)
    report = result.to_dict()
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, path)
    if (ctx.obj or {}).get("verbosity", 0) >= 0:
        r = job.region
        click.echo(f"{model_dir} on rows {r.y0}-{r.y1}, cols {r.x0}-{r.x1} ({result.metrics.pixels} labelled valid pixels):")
        click.echo(result.metrics.table())
        if json_path:
            click.echo(f"report written to {json_path}")
