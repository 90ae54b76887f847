"""Inference-only rewrites of a network that compute the same function with less memory traffic
(see also ``geoseg.model.fuse``: ReLUs and residual sums inside the convolutions, on CPUs).

On CPUs a large tile's activations do not fit any cache, so the passes that only move memory
(batch normalisation, nearest upsampling, the U-Net's skip concatenation) cost as much as a third
of a forward pass (measured: U-Net-resnet18, one 2176 px tile, one thread: 0.36 -> 0.54 Mpx/s
with both rewrites).

* ``fold_batchnorm``: every BatchNorm2d whose input is a Conv2d used by nothing else is folded
  into that convolution's weights and bias (eval statistics), and replaced by Identity.
* ``split_skip_concat``: a U-Net decoder block convolves ``cat(upsample(x), skip)``; the same
  convolution is a convolution of ``skip`` plus one of ``upsample(x)``, and the latter is four
  2x2 "phase" convolutions of ``x`` at its own resolution, so neither the upsampled map nor the
  concatenation is ever made.

Both change results only by float rounding (tested against the plain network). A network they
do not recognise is left as it is.
"""

from __future__ import annotations

import inspect
import logging
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


def optimize_for_inference(net: nn.Module) -> nn.Module:
    """``net`` (in eval mode) rewritten in place by both rewrites where they apply; returns it."""
    if net.training:
        raise ValueError("optimize_for_inference needs a network in eval mode")
    folded = fold_batchnorm(net)
    split = split_skip_concat(net)
    from geoseg.model.fuse import fuse_relu

    # a split block's first convolution is run by its own forward, which applies the ReLU after the sum
    own = {id(m.conv1) for m in net.modules() if type(m) in _SPLIT.values()}
    fused = fuse_relu(net, skip=own)
    log.debug("inference rewrites: %d batch norms folded, %d skip concatenations split, %d ReLUs fused", folded, split,
              fused)
    return net


def fold_batchnorm(net: nn.Module) -> int:
    """Fold each BatchNorm2d that directly follows a Conv2d (its only user) into it; returns how many.

    The network is traced with torch.fx; a module fx cannot trace (control flow on values) is
    searched child by child."""
    n = 0
    for module, graph in _traced(net):
        modules = dict(module.named_modules())
        # a module called twice, or reachable under two names, is shared: folding it would change its other uses
        calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
        names = Counter(id(m) for _, m in module.named_modules(remove_duplicate=False))
        for node in graph.nodes:
            bn = modules.get(node.target) if node.op == "call_module" else None
            if (not isinstance(bn, nn.BatchNorm2d) or bn.training or not bn.track_running_stats or bn.running_var is None
                    or calls[node.target] != 1 or names[id(bn)] != 1):
                continue
            src = node.args[0] if node.args else None
            conv = modules.get(src.target) if isinstance(src, torch.fx.Node) and src.op == "call_module" else None
            if (type(conv) is not nn.Conv2d or len(src.users) != 1 or calls[src.target] != 1 or names[id(conv)] != 1):
                continue
            _fold(conv, bn)
            parent, _, attr = node.target.rpartition(".")
            setattr(modules[parent] if parent else module, attr, nn.Identity())
            n += 1
    return n


def _traced(module: nn.Module):
    try:
        yield module, torch.fx.symbolic_trace(module).graph
    except Exception as exc:  # control flow fx cannot trace: try the parts
        log.debug("%s not traced (%s); tracing its children", type(module).__name__, exc)
        for child in module.children():
            yield from _traced(child)


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    with torch.no_grad():
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.affine:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale + (bn.bias if bn.affine else 0.0)
        bias = shift if conv.bias is None else conv.bias * scale + shift
        conv.weight = nn.Parameter(conv.weight * scale.reshape(-1, 1, 1, 1), requires_grad=False)
        conv.bias = nn.Parameter(bias, requires_grad=False)


def _unet_block_class() -> type | None:
    try:
        from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoderBlock
    except ImportError:
        return None
    # the forward this rewrite reproduces (segmentation-models-pytorch 0.5-0.6)
    params = list(inspect.signature(UnetDecoderBlock.forward).parameters)
    return UnetDecoderBlock if params == ["self", "feature_map", "target_height", "target_width", "skip_connection"] else None


def split_skip_concat(net: nn.Module) -> int:
    """Give every plain U-Net decoder block (no attention) the concatenation-free forward; returns how many."""
    block = _unet_block_class()
    if block is None:
        return 0
    n = 0
    for m in net.modules():
        conv = m.conv1[0] if type(m) is block else None
        if (conv is not None and isinstance(getattr(m.attention1, "attention", None), nn.Identity) and type(conv) is nn.Conv2d
                and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
                and conv.dilation == (1, 1) and conv.groups == 1 and conv.bias is not None
                and conv.padding_mode == "zeros"):
            m.__class__ = _split_class(block)
            n += 1
    return n


_SPLIT: dict[type, type] = {}


def _phase_weights(w: torch.Tensor) -> torch.Tensor:
    """A 3x3 kernel over a 2x nearest-upsampled map as four 2x2 kernels over the map itself.

    Output pixel (2i+a, 2j+b) reads rows i-1+a..i+a and columns j-1+b..j+b of the zero-padded
    map; the 3x3 taps that fall on the same source pixel add up. Returns ``(4 * out, in, 2, 2)``,
    phase (a, b) in the block ``2a + b``."""
    rows = {0: ((0,), (1, 2)), 1: ((0, 1), (2,))}  # phase -> 3x3 taps landing on each of the two source rows
    out = []
    for a in (0, 1):
        for b in (0, 1):
            k = w.new_zeros((*w.shape[:2], 2, 2))
            for r, taps_r in enumerate(rows[a]):
                for c, taps_c in enumerate(rows[b]):
                    k[:, :, r, c] = w[:, :, list(taps_r)][:, :, :, list(taps_c)].sum(dim=(2, 3))
            out.append(k)
    return torch.cat(out)


def _interleave(z: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The 2x map whose pixel (2i+a, 2j+b) is phase (a, b)'s pixel (i+a, j+b) of ``z`` (n, 4c, h+1, w+1):
    the four phase outputs of a 3x3 convolution over an upsampled map, put in place in one copy."""
    n, c = z.shape[0], z.shape[1] // 4
    if z.is_contiguous(memory_format=torch.channels_last):
        # z's memory is (n, h+1, w+1, a, b, c): a view with (i, a, j, b, c) steps that moves a row and a phase at once
        sn, sc, sh, sw = z.stride()
        src = z.as_strided((n, h, 2, w, 2, c), (sn, sh, sh + 2 * c, sw, sw + c, 1))
        out = torch.empty((n, c, 2 * h, 2 * w), dtype=z.dtype, device=z.device, memory_format=torch.channels_last)
        out.permute(0, 2, 3, 1).view(n, h, 2, w, 2, c).copy_(src)
        return out
    out = z.new_empty((n, c, 2 * h, 2 * w))
    for a in (0, 1):
        for b in (0, 1):
            g = 2 * a + b
            out[:, :, a::2, b::2] = z[:, g * c:(g + 1) * c, a:a + h, b:b + w]
    return out


def _split_class(block: type) -> type:
    if block not in _SPLIT:

        class SplitSkipDecoderBlock(block):  # type: ignore[misc, valid-type]
            """A U-Net decoder block that never materialises the upsampled map or the concatenation:
            the upsampled part of its first convolution runs at the low resolution (four 2x2 phase
            kernels), the skip part at full resolution, and the two are added."""

            def forward(self, feature_map, target_height, target_width, skip_connection=None):  # noqa: ANN001
                from geoseg.model.fuse import compute_dtype, conv2d, derived

                if skip_connection is not None and skip_connection.shape[1] == 0:
                    skip_connection = None  # an encoder stage of no channels (mit_b*, tu-convnext*): concatenates nothing
                layers = list(self.conv1)
                conv, k = layers[0], feature_map.shape[1]
                h, w = feature_map.shape[-2:]
                if (self.interpolation_mode != "nearest" or (target_height, target_width) != (2 * h, 2 * w)
                        or (torch.is_grad_enabled() and conv.weight.requires_grad)):  # gradients: the plain forward
                    return super().forward(feature_map, target_height, target_width, skip_connection)
                # [conv, folded norm (Identity)..., ReLU]: the ReLU is applied by the last convolution as it writes
                rest = layers[1:]
                relu = bool(rest) and type(rest[-1]) is nn.ReLU and all(isinstance(m, nn.Identity) for m in rest[:-1])
                dtype = compute_dtype(conv.weight, feature_map.device)
                # the phase kernels and the skip half of the weights, made again whenever the weights change
                phases, bias, bias4, w_skip = derived(self, "_geoseg_phases", (conv.weight, conv.bias), (dtype,), lambda: (
                    _phase_weights(conv.weight[:, :k].detach().float()).to(dtype), conv.bias.detach().to(dtype),
                    conv.bias.detach().repeat(4).to(dtype), conv.weight[:, k:].detach().to(dtype).contiguous()))
                if skip_connection is None:  # every output pixel is one phase's: bias and ReLU go to the phase kernels
                    y = _interleave(conv2d(feature_map, phases, bias4, (1, 1), relu=relu), h, w)
                else:
                    up = _interleave(conv2d(feature_map, phases, None, (1, 1)), h, w)
                    y = conv2d(skip_connection, w_skip, bias, (1, 1), relu=relu, add=up)
                if not relu:
                    for layer in rest:
                        y = layer(y)
                return self.attention2(self.conv2(y))

        _SPLIT[block] = SplitSkipDecoderBlock
    return _SPLIT[block]
