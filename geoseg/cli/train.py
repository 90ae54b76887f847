"""`geoseg train`: train a model directory on labelled imagery."""

from __future__ import annotations

import contextlib
import math
import sys
import warnings

import click

from geoseg.cli import options as opt


def _threshold(ctx: click.Context, param: click.Parameter, value: str) -> str | float:
    """--threshold: otsu or a finite number, checked before any imagery is read."""
    if str(value).lower() == "otsu":
        return "otsu"
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise click.BadParameter(f"{value!r}: give otsu or a number (the index value pixels are split at)")
    return number


@contextlib.contextmanager
def geoseg_warnings():
    """Show geoseg's own warnings (labels accepted on an equivalent CRS, ...) as one plain line."""
    from geoseg.training.labels import LabelGridWarning

    with warnings.catch_warnings():
        original = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, LabelGridWarning):
                click.echo(f"geoseg: warning: {message}", err=True)
            else:
                original(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


region_opts = [
    click.option("--bbox", nargs=4, type=float, default=None, metavar="XMIN YMIN XMAX YMAX",
                 help="Use only this area (image CRS coordinates; snapped outward to whole pixels)."),
    click.option("--window", nargs=4, type=int, default=None, metavar="COL ROW WIDTH HEIGHT",
                 help="Use only this pixel window of the image."),
]  # fmt: skip

label_opts = [
    click.option("--labels", "labels", required=True, type=click.Path(dir_okay=False),
                 help="Class raster on the image grid, or polygons (GeoPackage, GeoJSON, Shapefile)."),
    click.option("--label-field", default=None, metavar="FIELD",
                 help="Vector labels: the field with class ids or class names (default: class_id, class, label, ... or the only field)."),
    click.option("--label-layer", default=None, metavar="LAYER",
                 help="Vector labels: the layer of a file that holds several (a GeoPackage)."),
    click.option("--ignore-index", "ignore", type=int, multiple=True, metavar="ID",
                 help="A label value left out of the loss and the metrics (repeatable). Nodata always is."),
    click.option("--background", type=click.IntRange(0, 254), default=None, metavar="ID",
                 help="Vector labels: the class of valid pixels no feature covers (e.g. 0 for building polygons); default: unlabelled."),
    click.option("--reproject-labels", is_flag=True,
                 help="Resample a label raster on another grid onto the image grid (nearest neighbour)."),
]  # fmt: skip


def apply(options):
    def deco(f):
        for o in reversed(options):
            f = o(f)
        return f

    return deco


@click.command(short_help="Train a model on labelled imagery.")
@opt.images_arg
@apply(label_opts)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Model directory to write.")
@click.option("--classes", "classes_file", type=click.Path(dir_okay=False), default=None,
              help="classes.yaml: a list of {id, name, color}; default: from the labels.")
@click.option("--task", type=click.Choice(["semantic", "instance"]), default="semantic", show_default=True,
              help="instance: a Mask R-CNN (torchvision, nothing downloaded) from one polygon per object (classes from "
                   "--label-field, else one) or an instance-id raster; steps = --epochs x --steps-per-epoch (default 20).")
@click.option("--method", type=click.Choice(["smp", "threshold", "kmeans", "pixel"]), default="smp", show_default=True,
              help="smp: an encoder-decoder network (--arch); threshold: a spectral index against a fixed or Otsu "
                   "threshold; kmeans: clusters of bands and indices mapped to classes by the labels; pixel: a LightGBM "
                   "classifier per pixel on bands, indices and local texture.")
@click.option("--band-roles", default=None, metavar="ROLES",
              help="Role of each band, in order, e.g. blue,green,red,nir,swir1,swir2 (- for none): indices are computed "
                   "by role. Default: read from band descriptions that name one.")
@click.option("--index", "index", default=None, metavar="NAME",
              help="threshold: ndvi, ndwi, mndwi, ndbi, nbr or expr:<arithmetic of roles> (default with --threshold otsu: the first of mndwi, ndwi, ndvi, ndbi the roles allow).")
@click.option("--threshold", "threshold", default="otsu", show_default=True, metavar="otsu|VALUE", callback=_threshold,
              help="threshold: a fixed value, or otsu: Otsu's threshold over each predicted scene, computed on the cluster.")
@click.option("--clusters", type=click.IntRange(2, 254), default=None, help="kmeans: number of clusters (default: twice the classes, at least 8).")
@click.option("--majority", type=click.IntRange(0, 16), default=0, show_default=True, metavar="R",
              help="Post-processing: majority filter over (2R+1)² pixels (0: off).")
@click.option("--mmu", "mmu", default=None, metavar="PX|CLASS=PX,...",
              help="Post-processing: minimum mapping unit in pixels; smaller regions take the class they share the longest "
                   "border with. One value, or per class id: 6=4,1=16.")
@click.option("--tta", type=click.Choice(["auto", "none", "d4"]), default="auto", show_default=True,
              help="smp: test-time augmentation at predict (d4: mean of the 8 flips/rotations, 8x the compute); auto: "
                   "d4 unless it lowers the validation mIoU (predict --tta none overrides it).")
@click.option("--ensemble/--no-ensemble", default=True, show_default=True,
              help="smp: also fit a per-pixel LightGBM companion and keep the mix (network weight 0.5 or 0.75, the better on the "
                   "validation blocks) unless it scores more than 0.01 mIoU below the network alone there.")
@click.option("--arch", default="unet", show_default=True, help="segmentation-models-pytorch architecture.")
@click.option("--encoder", default="resnet18", show_default=True, help="Encoder (randomly initialised, nothing downloaded).")
@click.option("--encoder-depth", type=click.IntRange(1, 5), default=4, show_default=True)
@click.option("--input-skip/--no-input-skip", "input_skip", default=None,
              help="U-Net: the last decoder block reads the input pixels too, not only stride-2 features "
                   "(default: on for --arch unet where the encoder hands the input on).")
@click.option("--epochs", type=click.IntRange(1), default=30, show_default=True)
@click.option("--chip-size", type=click.IntRange(8), default=None, metavar="PX",
              help="Side of the training chips (rounded to the network stride; default 128, 256 for --task instance).")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True)
@click.option("--steps-per-epoch", type=click.IntRange(1), default=None, help="Batches per epoch (default: ~2 passes over the training area, 10-200).")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Peak AdamW learning rate (warm-up, then cosine decay).")
@click.option("--weight-decay", type=float, default=1e-4, show_default=True)
@click.option("--patience", type=click.IntRange(1), default=8, show_default=True,
              help="Stop after this many epochs without a better validation mIoU.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.2, show_default=True,
              help="Share of the labelled spatial blocks held out for validation.")
@click.option("--block-size", type=click.IntRange(8), default=None, metavar="PX",
              help="Side of the spatial blocks of the train/validation split (default: twice the chip size; 64 for "
                   "--method threshold|kmeans|pixel).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--members", type=click.IntRange(1, 16), default=3, show_default=True,
              help="Networks trained with seeds SEED, SEED+1, ...; the model is the mean of their logits (steadier and "
                   "better than one network on small labelled areas; N times the training and the network's predict time).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto: CUDA (mixed precision) when a GPU is present, else the CPU.")
@click.option("--no-amp", is_flag=True, help="Train in fp32 on CUDA too.")
@click.option("--tile-size", type=click.IntRange(1), default=1024, show_default=True, help="Forward-pass tile recorded in the card for predict.")
@apply(region_opts)
@click.option("--resume", is_flag=True, help="Continue an interrupted run into the same --out from its last finished epoch.")
@opt.overwrite_opt
@click.pass_context
def train(ctx, images, labels, label_field, label_layer, ignore, background, reproject_labels, out_dir, classes_file, task, method, band_roles, index,
          threshold, clusters, majority, mmu, tta, ensemble, arch, encoder, encoder_depth, input_skip,
          epochs, chip_size, batch_size, steps_per_epoch, lr, weight_decay, patience, val_fraction, block_size, seed, members,
          device, no_amp, tile_size, bbox, window, resume, overwrite):
    """Train a network on IMAGE (one multi-band raster, or several single-band rasters on one
    grid, stacked in the order given) and --labels, and write the model directory --out
    (model.json + weights.safetensors), the format `geoseg predict` reads.

    \b
    Class ids keep the values the labels use (0-254). Chips are drawn from labelled pixels;
    training and validation come from separate spatial blocks. Normalisation statistics come
    from the training imagery and go into the card. After every epoch a checkpoint is saved
    next to --out (OUT.training/); --resume continues an interrupted run from it.
    """
    from geoseg.training.checkpoint import working_dir
    from geoseg.training.loop import TrainConfig, TrainInputs
    from geoseg.training.loop import train as run

    opt.check_overwrite_resume(overwrite, resume)
    from geoseg.model.store import check_model_out

    check_model_out(out_dir, [*images, labels, *([classes_file] if classes_file else [])])  # before any training
    if background is not None and background in ignore:
        raise click.UsageError(f"--background {background} labels the valid pixels no feature covers, and --ignore-index "
                               f"{background} leaves that class out: give one of them")
    verbosity = (ctx.obj or {}).get("verbosity", 0)
    if task == "instance":
        opt.refuse_unused(ctx, INSTANCE_OPTIONS, "--task instance (Mask R-CNN)")
        _train_instances(images, labels, out_dir, label_field, label_layer, background, encoder, epochs, chip_size, batch_size,
                         steps_per_epoch, lr, weight_decay, seed, bbox, window, overwrite, verbosity, device)
        return
    chip_size = chip_size or 128
    config = TrainConfig(
        arch=arch, encoder=encoder, encoder_depth=encoder_depth, epochs=epochs, chip_size=chip_size,
        batch_size=batch_size, steps_per_epoch=steps_per_epoch, lr=lr, weight_decay=weight_decay, patience=patience,
        val_fraction=val_fraction, block_size=block_size, seed=seed, members=members, tile_size=tile_size, ensemble=ensemble,
        input_skip=input_skip,
    )  # fmt: skip
    inputs = TrainInputs(
        images=tuple(images), labels=labels, label_field=label_field, label_layer=label_layer, classes_file=classes_file, ignore=tuple(ignore),
        reproject_labels=reproject_labels, bbox=tuple(bbox) if bbox else None, window=tuple(window) if window else None,
        background=background,
    )  # fmt: skip

    from geoseg.methods.fit import band_roles_for, train_method
    from geoseg.model.card import PostProcess

    if method == "smp":
        opt.refuse_unused(ctx, frozenset(p.name for p in ctx.command.params) - {"index", "threshold", "clusters"},
                       "--method smp (the networks)")
        if val_fraction == 0:
            # early stopping, the companion and the choice of test-time augmentation are made on the validation blocks
            opt.refuse_unused(ctx, frozenset(p.name for p in ctx.command.params) - {"patience"},
                           "--val-fraction 0 (no validation blocks: no early stopping)")
            if verbosity >= 0:
                click.echo("--val-fraction 0: no validation blocks, so every epoch runs, the last one is kept, and no LightGBM "
                           "companion or test-time augmentation is chosen", err=True)
    else:
        opt.refuse_unused(ctx, METHOD_OPTIONS | METHOD_ONLY[method], f"--method {method}")
    postprocess = opt.postprocess_of(majority, mmu) or PostProcess()
    if method != "smp":
        with geoseg_warnings():
            result = train_method(inputs, out_dir, method, config, band_roles=band_roles, index=index, threshold=threshold,
                                  clusters=clusters, postprocess=postprocess, overwrite=overwrite)  # fmt: skip
        _report(result, verbosity)
        return
    update: dict = {"postprocess": postprocess.model_dump(), "tta": tta}
    if band_roles:
        from geoseg.io.sources import open_stack

        update["band_roles"] = band_roles_for(open_stack(list(images)), band_roles)

    def progress(r):
        if verbosity < 0:
            return
        val = "" if r.get("val_miou") is None else f"  val loss {r['val_loss']:.4f}  val mIoU {r['val_miou']:.4f}"
        stop = "  (no better for --patience epochs: stopping)" if r["stopped"] else ""
        who = f"network {r['member'] + 1}/{r['members']}  " if r.get("members", 1) > 1 else ""
        click.echo(f"{who}epoch {r['epoch']:>3}/{r['epochs']}  loss {r['loss']:.4f}{val}  lr {r['lr']:.2e}  {r['seconds']:.1f} s{stop}")

    with opt.sigterm_as_ctrl_c() as stop:  # a scheduler's SIGTERM: said as Ctrl-C is, with how to resume
        try:
            with geoseg_warnings():
                result = run(inputs, out_dir, config, device=device, amp=not no_amp, resume=resume, overwrite=overwrite,
                             progress=progress, card_update=update)  # fmt: skip
        except KeyboardInterrupt:
            _interrupted(out_dir, overwrite, stop.terminated)
    _report(result, verbosity)


def _interrupted(out_dir, overwrite: bool, terminated: bool) -> None:  # noqa: ANN001
    """What a stopped training saved and how to go on; exit 130 (Ctrl-C) or 143 (SIGTERM)."""
    from geoseg.training.checkpoint import saved_states, working_dir

    work = working_dir(out_dir)
    if saved_states(work) == (None, []):
        click.echo("geoseg: interrupted before the first epoch finished; nothing was saved: run the same command "
                   "to start again", err=True)
    else:
        click.echo(f"geoseg: interrupted; the last finished epoch is saved in {work}: "
                   f"run the same command with --resume{' in place of --overwrite' if overwrite else ''} to continue",
                   err=True)  # fmt: skip
    sys.exit(143 if terminated else 130)


# what --task instance takes; every other option is refused, not ignored
INSTANCE_OPTIONS = frozenset({"images", "labels", "label_field", "label_layer", "background", "out_dir", "task", "encoder", "epochs",
                              "chip_size", "batch_size", "steps_per_epoch", "lr", "weight_decay", "seed", "bbox", "window",
                              "overwrite", "device"})


# what --method threshold|kmeans|pixel take (labels, split, post-processing); the networks' options are refused
METHOD_OPTIONS = frozenset({"images", "labels", "label_field", "label_layer", "ignore", "background", "reproject_labels", "out_dir",
                            "classes_file", "task", "method", "band_roles", "majority", "mmu", "seed", "block_size",
                            "val_fraction", "bbox", "window", "overwrite"})
METHOD_ONLY = {"threshold": frozenset({"index", "threshold"}), "kmeans": frozenset({"clusters"}), "pixel": frozenset()}


def _train_instances(images, labels, out_dir, label_field, label_layer, background, encoder, epochs, chip_size, batch_size,
                     steps_per_epoch, lr, weight_decay, seed, bbox, window, overwrite, verbosity, device) -> None:
    from geoseg.instances.train import InstanceConfig, train_instances
    from geoseg.io.sources import open_stack
    from geoseg.training.chips import region_box

    stack = open_stack(list(images))
    region = region_box(stack.grid, bbox, window)
    config = InstanceConfig(chip_size=chip_size or 256, batch_size=min(batch_size, 4), steps=epochs * (steps_per_epoch or 20), lr=lr,
                            weight_decay=weight_decay, encoder=encoder, seed=seed, device=device)

    def progress(r):
        if verbosity >= 0:
            click.echo(f"step {r['step']:>5}/{r['steps']}  loss {r['loss']:.4f}  {r['seconds']:.1f} s")

    card = train_instances(list(images), labels, out_dir, config, region=region, field=label_field, layer=label_layer,
                           background=0 if background is None else background, overwrite=overwrite, progress=progress)
    if verbosity >= 0:
        click.echo(f"model written to {out_dir}: Mask R-CNN-{card.encoder}, {card.n_bands} bands, classes "
                   + ", ".join(c.name for c in card.classes[1:]) + f"; largest object {card.training['largest_object_px']} px "
                   f"-> halo {card.default_halo} px")


def _report(result, verbosity: int) -> None:
    if verbosity >= 0:
        from geoseg.training.metrics import Metrics

        tr = result.card.training or {}
        # the card's majority filter and sieve run at predict time (geoseg evaluate scores them)
        raw = ", before the card's post-processing" if result.card.postprocess.active else ""
        if result.card.method != "smp":
            if tr.get("metrics"):
                click.echo(f"\nvalidation ({_held_out(tr)}{raw}):")
                click.echo(Metrics.from_dict(tr["metrics"]).table(confusion=False))
            mp = result.card.method_params
            if result.card.method == "threshold":
                names = {c.id: c.name for c in result.card.classes}
                t = mp["threshold"] if mp["threshold"] == "otsu" else f"{mp['threshold']:g}"
                trained = (tr.get("fit") or {}).get("training_otsu")
                t += f" (on the training blocks: {trained:.4g}; each scene gets its own)" if trained is not None else ""
                click.echo(f"index {mp['index']}, threshold {t}: above {names[mp['above']]}, below {names[mp['below']]}")
            click.echo(f"model written to {result.model_dir}: method {result.card.method}, {result.card.n_bands} bands, "
                       f"{result.card.n_classes} classes, in {tr.get('seconds', 0):.0f} s")
            return
        if tr.get("metrics"):
            kept = f"mean of {len(tr['members'])} networks" if tr.get("members") else f"epoch {tr['best_epoch']}"
            click.echo(f"\nvalidation ({kept}, {_held_out(tr)}{raw}):")
            click.echo(Metrics.from_dict(tr["metrics"]).table(confusion=False))
        ens = result.card.method_params.get("ensemble")
        if ens:
            v = ens["validation_miou"]
            click.echo(f"ensemble: network x {ens['weight']} + LightGBM per pixel x {1 - ens['weight']} "
                       f"(validation mIoU {v[str(ens['weight'])]:.3f}, network alone {v['1.0']:.3f}, trees alone {v['0.0']:.3f})")
        elif isinstance(tr.get("ensemble"), str):
            click.echo(f"ensemble: {tr['ensemble']}")
        click.echo(
            f"model written to {result.model_dir}: {result.card.network}, "
            f"{result.card.n_bands} bands, {result.card.n_classes} classes, {tr.get('epochs_run')} epochs in "
            f"{tr.get('seconds', 0):.0f} s on {tr.get('device')}"
        )


def _held_out(training: dict) -> str:
    """The validation blocks scored: a sample of them where they hold more than val_max_pixels."""
    held = training["split"]["val"]["blocks"]
    used = training.get("validation_blocks_used", held)
    return f"{held} held-out blocks" if used == held else f"{used} of {held} held-out blocks, a seeded sample"
