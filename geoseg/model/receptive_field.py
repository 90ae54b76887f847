"""Measure a network's receptive field from its impulse response."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


MAX_STRIP = 2048  # a response still touching the ends of a strip this long: the network's reach is global


def measure_receptive_field(net: torch.nn.Module, in_channels: int, stride: int, seed: int = 0) -> int | None:
    """Radius in pixels over which one input pixel changes the output logits; None where every output depends
    on every input (global pooling, squeeze-excitation, group norm: no halo makes tiles equal one pass).

    One pixel in the middle of a random image is perturbed and the outputs are compared in
    float64, so that no change is lost to rounding. The reach is measured along y on a tall strip
    and along x on a wide one (far cheaper than a square of the same reach), each on two random
    backgrounds (ReLUs off on one may be on on the other); the largest reach is returned. A strip
    is lengthened until the response no longer touches its ends, up to ``MAX_STRIP`` px (a reach of
    ~1000 px: beyond it a halo would cost several times the chunk, and the networks that get there are global).
    """
    import torch

    was_dtype = next(net.parameters()).dtype
    net64 = net.eval().double()
    rng = np.random.default_rng(seed)
    short = 4 * stride
    length = max(256, 16 * stride)
    with torch.no_grad():
        try:
            while True:
                radius = 0
                for axis in (2, 3):
                    shape = [1, in_channels, short, short]
                    shape[axis] = length
                    centre = [0, 0, short // 2, short // 2]
                    centre[axis] = length // 2
                    for _ in range(2):
                        base = torch.from_numpy(rng.standard_normal(shape))
                        bumped = base.clone()
                        bumped[:, :, centre[2], centre[3]] += 10.0
                        diff = (net64(bumped) - net64(base)).abs().amax(dim=(0, 1)).numpy()
                        hits = np.nonzero(diff > 0)[axis - 2]
                        if hits.size:
                            radius = max(radius, int(np.abs(hits - centre[axis]).max()))
                if radius < length // 2 - stride:
                    return radius
                if length >= MAX_STRIP:
                    return None
                length *= 2
        finally:
            net.to(was_dtype)
