"""Convolutions that apply their ReLU (and a residual block's sum) as they write, on CPUs (oneDNN).

After batch norms are folded (``geoseg.model.fold``), most of what is left of a ResNet U-Net's
forward pass besides convolutions is ``relu`` and the residual ``+=``: passes that only move
memory, over maps that do not fit any cache on large windows. oneDNN applies both inside the
convolution (post-ops), the way PyTorch's own compiler does on CPUs
(``torch.ops.mkldnn._convolution_pointwise``); here they are used without compiling anything.

* ``ConvReLU``: a Conv2d followed (after Identity layers) by a ReLU, as one call.
* Residual blocks (torchvision's BasicBlock and Bottleneck, with folded norms): the last
  convolution adds the shortcut and applies the ReLU as it writes.

On anything else (a GPU, a CPU build without oneDNN, gradients, a dtype the weights do not
have) the modules compute exactly what the unfused ones did. Results differ from the plain
network only by float rounding (tested).
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


def _fusable_conv(conv: nn.Module) -> bool:
    return type(conv) in (nn.Conv2d, ConvReLU) and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def _onednn_ready(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dim() == 4 and torch.backends.mkldnn.is_available()
            and not (torch.is_grad_enabled() and x.requires_grad) and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))


def compute_dtype(weight: torch.Tensor, device: torch.device) -> torch.dtype:
    """The dtype a convolution computes in here: autocast's where it is on, else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return weight.dtype


def derived(owner: nn.Module, name: str, sources: tuple[torch.Tensor | None, ...], key: tuple,
            make: Callable[[], tuple]) -> tuple:
    """``make()``, kept on ``owner`` and made again only when ``sources`` change (other tensors, or written
    to) or ``key`` does. The sources are kept and compared by identity: an address alone can be reused by a
    new tensor."""
    full = (*key, torch.is_inference_mode_enabled(), *(None if t is None else (t._version, t.device) for t in sources))
    cached = owner.__dict__.get(name)
    if cached is None or cached[0] != full or any(a is not b for a, b in zip(cached[1], sources)):
        with torch.no_grad():
            cached = (full, sources, make())
        owner.__dict__[name] = cached
    return cached[2]


def _onednn_dtype(dtype: torch.dtype) -> bool:
    """oneDNN's fused convolutions take fp32, and bf16 only where the CPU has the instructions for it (they
    raise otherwise, where a plain convolution falls back to a slow kernel)."""
    if dtype == torch.float32:
        return True
    if dtype != torch.bfloat16:
        return False
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check is not None and check())


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` channels-last with the canonical strides, size-1 dimensions' included (torch's contiguity checks
    ignore those; its convolutions do not: a batch of one made from numpy, ``a[None]`` or ``permute(...)[None]``,
    has a batch stride of 0 or of the channels, and with weights that are not channels-last either oneDNN then
    computes in NCHW and writes NCHW); a view where the memory is channels-last already, else a copy."""
    t = t.contiguous(memory_format=torch.channels_last)
    n, c, h, w = t.shape
    want = (c * h * w, 1, w * c, c)
    return t if t.stride() == want else t.as_strided(t.shape, want, t.storage_offset())


def conv2d(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, padding: Sequence[int], *, relu: bool = False,
           add: torch.Tensor | None = None, stride: Sequence[int] = (1, 1), dilation: Sequence[int] = (1, 1),
           groups: int = 1) -> torch.Tensor:
    """``relu(conv2d(x, w, b) + add)`` (each part optional), in ``w``'s dtype; one oneDNN call on CPUs."""
    x = x.to(w.dtype)
    if add is not None:
        add = add.to(w.dtype)
    if _onednn_ready(x) and _onednn_dtype(w.dtype) and not (torch.is_grad_enabled() and w.requires_grad):
        geo = (list(padding), list(stride), list(dilation), groups)
        if add is not None:
            # the fused sum needs both maps channels-last in their strides: otherwise oneDNN falls back to a
            # convolution and aten's add_relu, which has no bf16 kernel on CPUs (an internal assert on bf16 CPUs,
            # AMX and Zen 4, where a U-Net's input skip read a window made from numpy: its batch stride is 0)
            x, add = channels_last(x), channels_last(add)
            return torch.ops.mkldnn._convolution_pointwise.binary(x, add, w, b, *geo, "add", None,
                                                                  "relu" if relu else None, [None], "")
        return torch.ops.mkldnn._convolution_pointwise(x, w, b, *geo, "relu" if relu else "none", [None], "")
    y = F.conv2d(x, w, b, stride, padding, dilation, groups)
    if add is not None:
        y += add
    return F.relu(y, inplace=True) if relu else y


def _run(conv: nn.Conv2d, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
    """``relu(conv(x) + add)``: with the weights in the compute dtype (cast once), or as they are where
    gradients must reach them."""
    w, b = conv.weight, conv.bias
    if not (torch.is_grad_enabled() and w.requires_grad):
        dtype = compute_dtype(w, x.device)
        w, b = derived(conv, "_geoseg_cast", (w, b), (dtype,),
                       lambda: tuple(None if t is None else t.detach().to(dtype) for t in (w, b)))
    return conv2d(x, w, b, conv.padding, relu=True, add=add, stride=conv.stride, dilation=conv.dilation,
                  groups=conv.groups)


def conv_relu(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``relu(conv(x))``, fused where oneDNN runs it."""
    return _run(conv, x)


def conv_add_relu(conv: nn.Conv2d, x: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
    """``relu(conv(x) + shortcut)``, fused where oneDNN runs it (into a new tensor: the shortcut may be the
    block's input, which strips of a larger map share)."""
    return _run(conv, x, shortcut)


class ConvReLU(nn.Conv2d):
    """A Conv2d that applies the ReLU which followed it (that ReLU is now an Identity)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_relu(self, x)


def _is_folded(m: nn.Module | None) -> bool:
    return m is None or isinstance(m, nn.Identity)


class FusedBasicBlock(nn.Module):
    """torchvision's BasicBlock with folded norms: conv1+relu, then conv2 + shortcut + relu."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = conv_relu(self.conv1, x)
        shortcut = x if self.downsample is None else self.downsample(x)
        return conv_add_relu(self.conv2, out, shortcut)


class FusedBottleneck(nn.Module):
    """torchvision's Bottleneck with folded norms: conv1+relu, conv2+relu, conv3 + shortcut + relu."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = conv_relu(self.conv2, conv_relu(self.conv1, x))
        shortcut = x if self.downsample is None else self.downsample(x)
        return conv_add_relu(self.conv3, out, shortcut)


class StripedMaxPool2d(nn.MaxPool2d):
    """A ResNet stem's 3x3 stride-2 max pool (padding 1) over a large CPU map, a few output rows at a
    time so each part stays in cache (measured: 64x2192x2192 bf16, 0.48 s whole, 0.21 s in strips)."""

    ROWS = 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[-2]
        out_h = (h - 1) // 2 + 1
        if x.device.type != "cpu" or x.dim() != 4 or out_h <= 2 * self.ROWS:
            return super().forward(x)
        out = None
        for o0 in range(0, out_h, self.ROWS):
            o1 = min(o0 + self.ROWS, out_h)
            # with padding 1, output row k of a slice from input row s covers rows s+2k-1..s+2k+1: from
            # s = 2*o0 - 2 the first is a padded row to drop, and the rest are rows o0..o1 of the whole map
            s0 = max(2 * o0 - 2, 0)
            part = F.max_pool2d(x[:, :, s0:min(2 * o1, h)], 3, 2, 1)[:, :, (1 if o0 else 0):]
            if out is None:
                fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
                out = torch.empty((*x.shape[:2], out_h, part.shape[-1]), dtype=x.dtype, device=x.device, memory_format=fmt)
            out[:, :, o0:o1] = part
        return out


def _stripable_pool(m: nn.Module) -> bool:
    def two(v):  # noqa: ANN001
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

    return (type(m) is nn.MaxPool2d and two(m.kernel_size) == (3, 3) and two(m.stride) == (2, 2)
            and two(m.padding) == (1, 1) and two(m.dilation) == (1, 1) and not m.ceil_mode and not m.return_indices)


_BLOCKS: dict[type, type] = {}


def _block_class(cls: type) -> type | None:
    """The fused class for torchvision's residual blocks, None for anything else."""
    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck
    except ImportError:
        return None
    if cls not in (BasicBlock, Bottleneck):
        return None
    if cls not in _BLOCKS:
        base = FusedBasicBlock if cls is BasicBlock else FusedBottleneck
        _BLOCKS[cls] = type(base.__name__, (cls,), {"forward": base.forward, "__doc__": base.__doc__})
    return _BLOCKS[cls]


def fuse_relu(net: nn.Module, skip: set[int] | frozenset[int] = frozenset()) -> int:
    """Fuse ReLUs (and residual sums) into the convolutions before them, in place; returns how many
    convolutions now apply them. Modules whose id is in ``skip`` are left alone (their forward reads
    the convolution's weights itself)."""
    n = 0
    for m in list(net.modules()):
        if id(m) in skip:
            continue
        fused = _block_class(type(m))
        if fused is not None:
            convs = [m.conv1, m.conv2] + ([m.conv3] if hasattr(m, "conv3") else [])
            norms = [m.bn1, m.bn2] + ([m.bn3] if hasattr(m, "bn3") else [])
            if all(_fusable_conv(c) for c in convs) and all(_is_folded(b) for b in norms) and isinstance(m.relu, nn.ReLU):
                m.__class__ = fused
                n += len(convs)
            continue
        if isinstance(m, nn.Sequential):
            n += _fuse_sequential(m)
    n += _fuse_stem(net, skip)
    return n


def _fuse_sequential(seq: nn.Sequential) -> int:
    """[Conv2d, Identity..., ReLU] runs inside a Sequential: the conv applies the ReLU, the ReLU becomes Identity."""
    names = list(seq._modules)
    n = 0
    for i, name in enumerate(names):
        conv = seq._modules[name]
        if not _fusable_conv(conv) or type(conv) is ConvReLU:
            continue
        j = i + 1
        while j < len(names) and isinstance(seq._modules[names[j]], nn.Identity):
            j += 1
        if j < len(names) and type(seq._modules[names[j]]) is nn.ReLU:
            conv.__class__ = ConvReLU
            seq._modules[names[j]] = nn.Identity()
            n += 1
    return n


def _fuse_stem(net: nn.Module, skip: set[int] | frozenset[int]) -> int:
    """A ResNet encoder's stem (conv1, bn1, relu called one after another by its forward)."""
    n = 0
    for m in net.modules():
        if id(m) in skip or type(m).__name__ not in ("ResNetEncoder", "ResNet"):
            continue
        conv, bn, relu = getattr(m, "conv1", None), getattr(m, "bn1", None), getattr(m, "relu", None)
        if _fusable_conv(conv) and type(conv) is nn.Conv2d and _is_folded(bn) and type(relu) is nn.ReLU:
            conv.__class__ = ConvReLU
            m.relu = nn.Identity()
            n += 1
        if _stripable_pool(getattr(m, "maxpool", None)):
            m.maxpool.__class__ = StripedMaxPool2d
    return n
