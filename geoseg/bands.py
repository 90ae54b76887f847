"""Match an input stack to the bands a model card expects."""

from __future__ import annotations

import math
from pathlib import Path

from geoseg.errors import InputError
from geoseg.io.sources import RasterStack
from geoseg.model.card import ModelCard


def match_bands(stack: RasterStack, card: ModelCard, model_dir: str = "the model") -> RasterStack:
    """The stack's bands chosen and ordered as the card lists them, or a clear error.

    Same count: taken in the order given, refused where band descriptions or file names show
    a different band or order. More bands than the card: chosen by description.
    """
    where = ", ".join(stack.paths)
    expected = [b.description or b.name for b in card.bands]
    descs = [b.description for b in stack.bands]
    if stack.count != card.n_bands:
        if all(descs) and all(e in descs for e in expected):
            chosen = stack.select([descs.index(e) for e in expected])
            check_scales(chosen, card, model_dir)
            return chosen
        raise InputError(
            f"{where}: {stack.count} band(s) given but {model_dir} expects {card.n_bands} "
            f"({', '.join(expected)}); give exactly those bands, in that order"
        )
    for i, (want, got) in enumerate(zip(card.bands, stack.bands)):
        if want.description and got.description and want.description != got.description:
            raise InputError(
                f"{got.path}: band {got.band} is {got.description!r} but {model_dir} expects "
                f"{want.description!r} at position {i + 1}; give the bands in the card's order ({', '.join(expected)})"
            )
    want_files = [b.file for b in card.bands]
    got_files = [Path(b.path).name for b in stack.bands]
    if all(want_files) and sorted(want_files) == sorted(got_files) and want_files != got_files:
        raise InputError(
            f"{where}: band files given in a different order than {model_dir} was trained on "
            f"({', '.join(want_files)}); give them in that order"
        )
    check_scales(stack, card, model_dir)
    return stack


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)


def check_scales(stack: RasterStack, card: ModelCard, model_dir: str = "the model") -> None:
    """Refuse bands stored with another GDAL scale or offset than those the model was trained on: read as stored,
    the same ground would reach the model in other units (a card that recorded none is not checked)."""
    check_band_scales([(f"{b.path}: band {b.band}", b.scale, b.offset) for b in stack.bands], card, model_dir,
                      "give the bands stored as the training imagery was (gdal_translate -unscale -ot Float32 writes "
                      "physical values), or train on imagery stored like this")


def check_band_scales(bands: list[tuple[str, float, float]], card: ModelCard, model_dir: str, remedy: str) -> None:
    """``bands``: each input band's (what to call it, scale, offset) in the card's order."""
    for i, (want, (where, scale, offset)) in enumerate(zip(card.bands, bands)):
        if want.scale is None or want.offset is None:
            continue
        if not (_same(want.scale, scale) and _same(want.offset, offset)):
            raise InputError(
                f"{where} holds values with scale {scale:g} and offset {offset:g}, but {model_dir} was trained on "
                f"band {i + 1} stored with scale {want.scale:g} and offset {want.offset:g}: the same ground would "
                f"reach the model in other units; {remedy}"
            )
