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
@click.option("--input-skip", "input_skip", is_flag=True,
              help="U-Net: the last decoder block reads the input pixels too, as geoseg train's do by default.")
@click.option("--bands", "n_bands", type=click.IntRange(1), default=None, help="Input bands (required, except for SAM: 3).")
@click.option("--method", type=click.Choice(["smp", "sam"]), default="smp", show_default=True,
              help="sam: Segment Anything with --checkpoint (segment-anything package; nothing is downloaded).")
@click.option("--checkpoint", type=click.Path(dir_okay=False, exists=True), default=None,
              help="SAM: the checkpoint you downloaded (.pth read with weights_only, or .safetensors); its sha256 goes into the card. "
                   "Without it SAM's weights are random (plumbing checks only).")
@click.option("--sam-type", type=click.Choice(["vit_b", "vit_l", "vit_h", "tiny"]), default="vit_b", show_default=True,
              help="SAM: the checkpoint's architecture (tiny: a small random SAM for tests).")
@click.option("--max-object-size", "max_object_px", type=click.IntRange(1), default=128, show_default=True, metavar="PX",
              help="SAM: the largest object expected, in pixels (the chunks' halo).")
@click.option("--classes", "n_classes", type=click.IntRange(1, 255), default=None, help="Number of classes (ids 0..N-1).")
@click.option("--classes-file", type=click.Path(dir_okay=False, exists=True), default=None, help="classes.yaml with id, name, color.")
@click.option("--tile-size", type=click.IntRange(1), default=1024, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True)
@click.pass_context
def init(ctx, out_dir, arch, encoder, encoder_depth, input_skip, n_bands, method, checkpoint, sam_type, max_object_px, n_classes, classes_file,
         tile_size, seed, overwrite):
    """Make a model with seeded random weights in OUT_DIR, so the pipeline runs before training.

    The receptive field is measured from the network's impulse response and stored in the card.
    With --method sam: Segment Anything from your --checkpoint, converted to safetensors.
    """
    from geoseg.cli.options import refuse_unused
    from geoseg.errors import ConfigError
    from geoseg.model.store import init_model

    other = (("arch", "encoder", "encoder_depth", "input_skip", "n_classes", "classes_file", "tile_size") if method == "sam"
             else ("checkpoint", "sam_type", "max_object_px"))
    refuse_unused(ctx, frozenset(p.name for p in ctx.command.params) - set(other), f"--method {method}")
    if n_classes and classes_file:
        raise click.UsageError("give --classes N or --classes-file, not both (the file's classes decide the number)")
    if method == "sam":
        from geoseg.instances.sam import init_sam_model

        card = init_sam_model(out_dir, model_type=sam_type, checkpoint=checkpoint, n_bands=n_bands or 3, seed=seed,
                              params={"max_object_px": max_object_px}, overwrite=overwrite)
        if (ctx.obj or {}).get("verbosity", 0) < 0:
            return
        click.echo(f"model written to {out_dir}: SAM {sam_type}, {card.n_bands} bands, "
                   + (f"checkpoint sha256 {card.method_params['checkpoint_sha256'][:16]}..." if checkpoint else "random weights")
                   + f", halo {card.default_halo} px")
        return
    if not n_bands:
        raise ConfigError("give --bands N (the model's input bands)")

    classes = None
    if classes_file:
        from geoseg.io.classes import load_classes

        classes = list(load_classes(classes_file))
    elif not n_classes:
        raise ConfigError("give --classes N or --classes-file classes.yaml")
    card = init_model(out_dir, arch=arch, encoder=encoder, n_bands=n_bands, n_classes=n_classes or len(classes),
                      classes=classes, seed=seed, encoder_depth=encoder_depth, tile_size=tile_size, overwrite=overwrite,
                      input_skip=input_skip)
    if (ctx.obj or {}).get("verbosity", 0) < 0:
        return
    click.echo(f"model written to {out_dir}: {card.network}, {card.n_bands} bands, "
               f"{card.n_classes} classes, receptive field {card.reach}"
               + ("" if card.global_reach else f" (exact halo {card.exact_halo})"))


@model.command("show")
@click.argument("model_dir", type=click.Path(file_okay=False))
def show(model_dir):
    """Print a model card."""
    from geoseg.model.store import check_model_dir

    click.echo(check_model_dir(model_dir).to_json())
