"""`geoseg model`: make and inspect model directories."""

from __future__ import annotations

import click


@click.group(short_help="Make and inspect model directories.")
def model() -> None:
    """Model directories: model.json (the card) + weights.safetensors."""


@model.command("init")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--arch", default="unet", show_default=True, help="segmentation-models-pytorch architecture.")
@click.option("--encoder", default="resnet18", show_default=True, help="Encoder name (no pretrained weights are downloaded).")
@click.option("--encoder-depth", type=click.IntRange(3, 5), default=5, show_default=True)
@click.option("--bands", "n_bands", type=int, required=True, help="Input bands.")
@click.option("--classes", "n_classes", type=int, default=None, help="Number of classes (ids 0..N-1).")
@click.option("--classes-file", type=click.Path(dir_okay=False, exists=True), default=None, help="classes.yaml with id, name, color.")
@click.option("--tile-size", type=int, default=1024, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True)
def init(out_dir, arch, encoder, encoder_depth, n_bands, n_classes, classes_file, tile_size, seed, overwrite):
    """Make a model with seeded random weights in OUT_DIR, so the pipeline runs before training.

    The receptive field is measured from the network's impulse response and stored in the card.
    """
    from geoseg.errors import ConfigError
    from geoseg.model.store import init_model

    classes = None
    if classes_file:
        from geoseg.io.classes import load_classes

        classes = list(load_classes(classes_file))
    elif not n_classes:
        raise ConfigError("give --classes N or --classes-file classes.yaml")
    card = init_model(out_dir, arch=arch, encoder=encoder, n_bands=n_bands, n_classes=n_classes or len(classes),
                      classes=classes, seed=seed, encoder_depth=encoder_depth, tile_size=tile_size, overwrite=overwrite)
    click.echo(f"model written to {out_dir}: {arch}/{encoder} depth {encoder_depth}, {card.n_bands} bands, "
               f"{card.n_classes} classes, receptive field {card.receptive_field} px (exact halo {card.exact_halo})")


@model.command("show")
@click.argument("model_dir", type=click.Path(file_okay=False))
def show(model_dir):
    """Print a model card."""
    from geoseg.model.store import check_model_dir

    click.echo(check_model_dir(model_dir).to_json())
