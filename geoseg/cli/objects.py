"""`geoseg evaluate-objects`: object precision / recall / F1 at IoU 0.5 and panoptic quality of an instance prediction."""

from __future__ import annotations

import json
import math

import click

from geoseg.cli import options as opt


@click.command("evaluate-objects", short_help="Score the objects of an instance prediction.")
@click.argument("out_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--labels", required=True, type=click.Path(dir_okay=False, exists=True),
              help="One polygon per true object (any CRS), or an instance-id raster on the prediction's grid (0 = none).")
@click.option("--label-field", default=None, metavar="FIELD", help="Polygons: the field holding each object's class.")
@click.option("--bbox", nargs=4, type=float, default=None, metavar="XMIN YMIN XMAX YMAX", help="Score only this area (the grid's CRS).")
@click.option("--window", nargs=4, type=int, default=None, metavar="COL ROW WIDTH HEIGHT", help="Score only this pixel window.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, metavar="REPORT.json", help="Write the scores as JSON.")
@opt.overwrite_opt
@click.pass_context
def evaluate_objects(ctx, out_dir, labels, label_field, bbox, window, json_path, overwrite):
    """Match the objects of OUT_DIR (geoseg predict with an instance model) with the true objects:
    a pair matches at mask IoU > 0.5; prints precision, recall, F1, segmentation quality (mean IoU
    of matches) and panoptic quality (PQ = SQ x F1), overall and per class."""
    from pathlib import Path

    from geoseg.errors import OutputExistsError
    from geoseg.instances.metrics import score_prediction
    from geoseg.io.storage import check_creatable

    if json_path:
        from geoseg.cli.evaluate import check_not_input

        check_not_input(json_path, "--json", [labels], [out_dir])
        if Path(json_path).exists() and not overwrite:
            raise OutputExistsError(f"{json_path}: already exists; choose another --json path or pass --overwrite")
        check_creatable(json_path, "--json path")
    report = score_prediction(out_dir, labels, bbox=bbox, window=window, field=label_field)
    rows = {"all": report["all"], **report.get("classes", {})}
    if (ctx.obj or {}).get("verbosity", 0) >= 0:
        click.echo(f"{'':<14}{'true':>6}{'pred':>6}{'TP':>6}{'FP':>6}{'FN':>6}{'P':>8}{'R':>8}{'F1':>8}{'SQ':>8}{'PQ':>8}")
        for name, r in rows.items():
            f = [("-" if math.isnan(r[k]) else f"{r[k]:.3f}") for k in ("precision", "recall", "f1", "sq", "pq")]
            click.echo(f"{name[:13]:<14}{r['true_objects']:>6}{r['predicted_objects']:>6}{r['tp']:>6}{r['fp']:>6}{r['fn']:>6}"
                       + "".join(f"{v:>8}" for v in f))
    if json_path:
        from geoseg.cli.evaluate import _write_atomic

        from geoseg.cli.info import _json_safe

        _write_atomic(Path(json_path), json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n")

