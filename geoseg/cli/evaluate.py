"""`geoseg evaluate`: score a model against labels through the tiled predict graph."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from geoseg.cli import options as opt
from geoseg.cli.train import apply, geoseg_warnings, label_opts, region_opts


def check_not_input(path: str, flag: str, inputs: list, folders: list) -> None:
    """``path`` (a report to write) is none of ``inputs`` and no file already in one of ``folders`` (a model
    directory, a prediction): --overwrite would replace it."""
    from geoseg.errors import ConfigError

    from geoseg.io import storage

    if storage.is_url(path):  # Path() made s3://b/k a local file s3:/b/k, said to be written to the bucket
        raise ConfigError(f"{path}: {flag} writes a local file; write it locally and upload it")
    p = Path(path).resolve()
    same = [i for i in inputs if "://" not in str(i) and Path(i).resolve() == p]
    inside = [f for f in folders if "://" not in str(f) and p.is_relative_to(Path(f).resolve()) and p.exists()]
    if same or inside:
        raise ConfigError(f"{path}: {flag} would replace {'an input' if same else 'a file of ' + str(inside[0])}; give another path")


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@click.command(short_help="Score a model (or several, side by side) against labelled imagery.")
@opt.images_arg
@click.option("--model", "model_dirs", required=True, multiple=True, type=click.Path(file_okay=False),
              help="Model directory (model.json + weights.safetensors); repeat to compare models side by side.")
@click.option("--name", "names", multiple=True, metavar="NAME",
              help="Row name of each --model in the table, in the same order (default: the directory names).")
@apply(label_opts)
@apply(region_opts)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, metavar="REPORT.json",
              help="Also write the report (per-class scores and confusion matrix) as JSON.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), default=None, metavar="TABLE.csv",
              help="Also write the table (a row per model: class IoUs, mIoU, OA, coverage) as CSV.")
@opt.chunk_opt
@opt.halo_opt
@opt.exact_opt
@click.option("--tile-size", type=click.IntRange(1), default=None, metavar="PX", help="Side of one forward pass (default: the chunk).")
@opt.precision_opt
@opt.tta_opt
@opt.postprocess_opts
@click.option("--batch-size", type=click.IntRange(1), default=2, show_default=True, help="Tiles per forward pass.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@opt.scheduler_opt
@opt.workers_opt
@opt.overwrite_opt
@click.pass_context
def evaluate(ctx, images, model_dirs, names, labels, label_field, label_layer, ignore, background, reproject_labels, bbox, window, json_path,
             csv_path, chunk_size, halo, exact, tile_size, precision, tta, majority, mmu, no_postprocess, batch_size, device,
             scheduler, n_workers, overwrite):
    """Segment IMAGE with --model through the same tiled graph as `geoseg predict` and compare
    the class map with --labels over the pixels where both are valid.

    Prints per-class IoU, precision, recall, F1 and pixel counts, mIoU, overall accuracy and the
    confusion matrix (rows: labels, columns: predictions); --json writes them too. Restrict to a
    region with --bbox or --window, e.g. an area held out from training.

    With --model given more than once, prints one table (a row per model: per-class IoU, mIoU,
    overall accuracy) computed on the same pixels for every model: those where the labels hold a
    class and every model predicts one. Coverage is the share of the labelled pixels a model
    predicts a class for. Classes are the union of the models' (by id); a class missing from a
    model's card scores IoU 0 for it where the labels hold it. --json and --csv write the table.
    """
    opt.check_cluster_options(scheduler, n_workers)
    if not scheduler:  # the workers' imports start now, while this process imports and plans (geoseg.forkserver)
        from geoseg import forkserver

        forkserver.start()
    from geoseg.errors import ConfigError, OutputExistsError
    from geoseg.evaluation import Comparison, EvaluateOptions, plan_comparison, plan_evaluation, run_comparison, run_evaluation

    options = EvaluateOptions(
        chunk_size=chunk_size, halo=halo, exact=exact, tile_size=tile_size, precision=precision or "auto",
        batch_size=batch_size, device=device, label_field=label_field, label_layer=label_layer, ignore=tuple(ignore),
        tta=None if tta == "card" else tta, postprocess=opt.postprocess_in_place(majority, mmu, no_postprocess),
        reproject_labels=reproject_labels, bbox=tuple(bbox) if bbox else None, window=tuple(window) if window else None,
        background=background,
    )  # fmt: skip
    if names and len(names) != len(model_dirs):
        raise ConfigError(f"{len(names)} --name for {len(model_dirs)} --model; give one name per model or none")
    from geoseg.io.storage import check_creatable

    for flag, p in (("--json", json_path), ("--csv", csv_path)):
        if p and Path(p).exists() and not overwrite:
            raise OutputExistsError(f"{p}: already exists; choose another {flag} path or pass --overwrite")
        if p:
            check_creatable(p, f"{flag} path")
    if json_path and csv_path and Path(json_path).resolve() == Path(csv_path).resolve():
        raise ConfigError(f"{json_path}: given as both --json and --csv; give two paths")
    for flag, p in (("--json", json_path), ("--csv", csv_path)):  # --overwrite deleted the labels it was pointed at
        if p:
            check_not_input(p, flag, [*images, labels], model_dirs)
    for p in (json_path, csv_path):  # --overwrite: a run that fails leaves no earlier report that looks like its own
        if p:
            Path(p).unlink(missing_ok=True)
    quiet = (ctx.obj or {}).get("verbosity", 0) < 0
    if len(model_dirs) > 1:
        with geoseg_warnings():
            plan_comparison(images, model_dirs, labels, options, names=names or None, resolve=False)  # checked first
            from geoseg.cluster import connect

            with connect(scheduler, n_workers, device=device):
                cjob = plan_comparison(images, model_dirs, labels, options, names=names or None)
                table = run_comparison(cjob)
        if json_path:
            _write_atomic(Path(json_path), json.dumps(table.to_dict(), indent=2) + "\n")
        if csv_path:
            table.to_csv(csv_path)
        if not quiet:
            r = cjob.region
            click.echo(f"{len(model_dirs)} models on rows {r.y0}-{r.y1}, cols {r.x0}-{r.x1}:")
            click.echo(table.table())
            for flag, p in (("report", json_path), ("table", csv_path)):
                if p:
                    click.echo(f"{flag} written to {p}")
        return
    (model_dir,) = model_dirs
    with geoseg_warnings():
        plan_evaluation(images, model_dir, labels, options, resolve=False)  # everything checked before a cluster starts
        from geoseg.cluster import connect

        with connect(scheduler, n_workers, device=device):
            # planned again on the cluster: the numerics are decided by the workers that run the model
            job = plan_evaluation(images, model_dir, labels, options)
            result = run_evaluation(job)
    report = result.to_dict()
    if json_path:
        _write_atomic(Path(json_path), json.dumps(report, indent=2) + "\n")
    if csv_path:
        Comparison.from_evaluation(result, names[0] if names else None).to_csv(csv_path)
    if not quiet:
        r = job.region
        cov = f", {100 * result.coverage:.1f}% of the labelled ones" if result.coverage is not None else ""
        click.echo(f"{model_dir} on rows {r.y0}-{r.y1}, cols {r.x0}-{r.x1} ({result.metrics.pixels} labelled pixels the model "
                   f"gives a class{cov}):")
        click.echo(result.metrics.table())
        if json_path:
            click.echo(f"report written to {json_path}")
        if csv_path:
            click.echo(f"table written to {csv_path}")
