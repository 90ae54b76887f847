"""Options shared by several geoseg subcommands."""

from __future__ import annotations

import contextlib

import click

images_arg = click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
model_opt = click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False),
                         help="Model directory (model.json + weights.safetensors).")
scheduler_opt = click.option("--scheduler", default=None, metavar="ADDRESS",
                             help="Address of a running dask scheduler (tcp:// or tls://). Default: an embedded local cluster.")
workers_opt = click.option("--workers", "n_workers", type=click.IntRange(1), default=None,
                           help="Worker processes of the embedded cluster (default: one per core).")
chunk_opt = click.option("--chunk-size", type=click.IntRange(1), default=None, metavar="PX",
                         help="Side of the chunks a worker segments and writes (default 2048; rounded up to the network stride).")
halo_opt = click.option("--halo", type=click.IntRange(0), default=None, metavar="PX",
                        help="Context read around every tile (default: the receptive field where that costs at most 15% more pixels); "
                             "the card's post-processing ring is added (in predict, the majority filter's radius only).")
exact_opt = click.option("--exact", is_flag=True,
                         help="Halo = the model's receptive field: the class map no longer depends on the chunking.")
precision_opt = click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default=None,
                             help="Numerics of the forward pass. auto (default): bf16 autocast where the device computes "
                                  "bf16 natively (GPUs, CPUs with AVX512-BF16/AMX), else fp32; fp32 with --exact.")
tta_opt = click.option("--tta", type=click.Choice(["card", "none", "d4"]), default="card", show_default=True,
                       help="Test-time augmentation of smp models: as the card says (chosen on validation by geoseg train), "
                            "none, or d4 (mean of the 8 flips/rotations: 8x the forward passes).")
overwrite_opt = click.option("--overwrite", is_flag=True, help="Replace a finished output.")


def refuse_unused(ctx: click.Context, used: frozenset[str], what: str) -> None:
    """Options given on the command line that ``what`` does not take: refused, not dropped."""
    from click.core import ParameterSource

    given = [p.opts[-1] if p.opts[-1].startswith("--") else p.opts[0] for p in ctx.command.params
             if p.name not in used and ctx.get_parameter_source(p.name) not in (ParameterSource.DEFAULT, None)]
    if given:
        one = len(given) == 1
        raise click.UsageError(f"{', '.join(given)} {'does' if one else 'do'} not apply to {what}; leave {'it' if one else 'them'} out")


def check_cluster_options(scheduler: str | None, n_workers: int | None) -> None:
    """--workers sizes the embedded cluster only: beside --scheduler it would be dropped."""
    if scheduler and n_workers:
        raise click.UsageError("--workers sizes the embedded local cluster; with --scheduler the cluster's own workers run: "
                               "leave --workers out (or --scheduler, for an embedded cluster)")


def check_overwrite_resume(overwrite: bool, resume: bool) -> None:
    if overwrite and resume:
        raise click.UsageError("--overwrite starts again from nothing and --resume continues what was done: give one of them")


def parse_mmu(text: str | None) -> dict:
    """``--mmu``: ``16`` -> min_pixels 16; ``6=4,1=16`` -> per class id (geoseg.model.card.parse_mmu)."""
    from geoseg.model.card import parse_mmu as parse

    try:
        return parse(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--mmu") from None


def postprocess_of(majority: int | None, mmu: str | None):
    """The PostProcess of ``--majority`` and ``--mmu``, None where neither is given (a usage error where out of range)."""
    from geoseg.model.card import postprocess_in_place

    parse_mmu(mmu)  # its own message, naming --mmu
    try:
        return postprocess_in_place(majority, mmu)
    except ValueError as exc:
        errors = getattr(exc, "errors", None)
        what = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors()) if errors else str(exc)
        raise click.BadParameter(what, param_hint="'--mmu' / '--majority'") from None


def postprocess_opts(f):
    """--majority, --mmu and --no-postprocess: post-processing in place of the card's (predict, evaluate)."""
    f = click.option("--no-postprocess", is_flag=True, help="Skip the card's majority filter and sieve.")(f)
    f = click.option("--mmu", "mmu", default=None, metavar="PX|CLASS=PX,...",
                     help="Post-processing in place of the card's: minimum mapping unit in pixels (4-connected), one or per "
                          "class id (6=4,1=16); predict sieves it over the whole map after the model.")(f)
    return click.option("--majority", type=click.IntRange(0, 16), default=None, metavar="R",
                        help="Post-processing in place of the card's: majority filter over (2R+1)² pixels (with --mmu: "
                             "an option not given is off).")(f)


def postprocess_in_place(majority: int | None, mmu: str | None, none: bool):
    """The PostProcess of those options, or None (the card's)."""
    if none and (majority is not None or mmu is not None):
        raise click.UsageError("--no-postprocess goes without --majority and --mmu")
    if none:
        from geoseg.model.card import PostProcess

        return PostProcess()
    return postprocess_of(majority, mmu)


@contextlib.contextmanager
def sigterm_as_ctrl_c():
    """A batch scheduler's SIGTERM (a job's time limit, a preempted node) raised as Ctrl-C's KeyboardInterrupt in
    the main thread, so a command stops as it does on Ctrl-C and says how to resume; the state yielded says
    whether it was one (``.terminated``: exit 143, SIGTERM's status, rather than 130)."""
    import signal
    import threading
    from types import SimpleNamespace

    state = SimpleNamespace(terminated=False)

    def handler(signum, frame):  # noqa: ANN001
        state.terminated = True
        raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGTERM, handler) if main else None
    try:
        yield state
    finally:
        if main and before is not None:
            signal.signal(signal.SIGTERM, before)
