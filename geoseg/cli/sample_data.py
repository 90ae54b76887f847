"""`geoseg sample-data`: a deterministic synthetic scene to try the pipeline on."""

from __future__ import annotations

import click


@click.command("sample-data", short_help="Write a synthetic scene and its labels.")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--size", type=int, default=1024, show_default=True, help="Scene height and width in pixels.")
@click.option("--bands", type=int, default=4, show_default=True)
@click.option("--classes", "n_classes", type=int, default=5, show_default=True)
@click.option("--crs", default="EPSG:32617", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace files of another scene in OUT_DIR.")
@click.pass_context
def sample_data(ctx, out_dir, size, bands, n_classes, crs, seed, overwrite):
    """Write image.tif (land-cover-like regions, nodata border), labels.tif and classes.yaml to OUT_DIR.

    The same options give the same files: a folder that holds them already is left as it is."""
    from geoseg.sample import make_sample

    scene = make_sample(out_dir, size=size, bands=bands, seed=seed, n_classes=n_classes, crs=crs, overwrite=overwrite)
    if (ctx.obj or {}).get("verbosity", 0) >= 0:
        click.echo(f"{'unchanged (the same scene)' if scene.unchanged else 'wrote'} {scene.image_path}, {scene.labels_path}, "
                   f"{scene.classes_path}")
