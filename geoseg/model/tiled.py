"""A large window through a U-Net stage by stage, each stage in strips: the same output as one
forward pass (up to float rounding) with the memory of the window's feature maps, not of a whole
pass's activations.

One forward pass over a large window keeps every layer's activations in flight (a 4240 px window
of U-Net-resnet18 would need ~16 GB). Here the network runs one stage (the stem, each encoder
layer, each decoder block, the head) at a time over the whole window, and each stage runs strip by
strip over its output rows: a strip reads its inputs grown by the stage's reach (the sum of its
kernels' half-widths, rounded up), so its rows are exactly what the stage computes there over the
whole map, and the zero padding a stage sees is only the window's own. Full-width strips of a
channels-last map are contiguous, so nothing is gathered. Chunks can then grow until a halo of the
whole receptive field is cheap (``geoseg.tiling.plan_for``: seam-free defaults).

Measured (AVX2 fp32, one thread, worker allocator settings, U-Net-resnet18 depth 4): a 4240 px window in
strips of 256 MB 0.488 Mpx/s, peak RSS 6.1 GB; in square tiles of 24 MB 0.40; one pass over a
2176 px window 0.50-0.53.

Tried and not kept: every convolution as its own node of a line-buffered wave (rows made as the next
layer asks for them and dropped once read, so no feature map is ever whole; no row computed twice).
Same logits to the bit, and a 4240 px window's heap 0.9 GB against 1.65 GB, but 8-20% slower warm
(AMD Zen 4, bf16, one thread; small row steps make small oneDNN calls, larger steps bring the memory
back): the heap it saves is faulted in once per worker, the time it loses is paid on every window.

Only networks whose every stage is known to be local are run this way (segmentation-models-pytorch
U-Nets on ResNet encoders, no attention, the rewritten or the plain decoder blocks, with or without
geoseg's input skip); any other network runs as one pass.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

# a stage's output strip, counted at 4 bytes a value. Measured, AVX2 fp32: 128 MB 0.48, 256 MB 0.49, 512 MB 0.45
# Mpx/s; AMX bf16, a 4240 px window: 256 MB peak RSS 5.25 GB, first / warm pass 7.75 / 5.1-6.1 s; 64 MB 3.90 GB,
# 6.07 / 5.05-5.24 s (a smaller heap is faster to fault in, and strips stay nearer the cache)
STRIP_BYTES = 64 << 20
MIN_WINDOW = 2560 * 2560  # below this a window runs as one pass: as fast (measured: 2176 px, 0.44 against 0.43 Mpx/s) and small enough

_LOCAL_LEAVES = (nn.Conv2d, nn.BatchNorm2d, nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.MaxPool2d,
                 nn.Dropout, nn.Dropout2d)


def _reach(module: nn.Module) -> int | None:
    """Output pixels a stage reads beyond a strip on each side, at most: each kernel's half-width
    (dilated, in its own input's pixels, never fewer output pixels), summed, rounded up to even.
    None if the stage holds a layer this module does not know to be local."""
    total = 0
    for m in module.modules():
        if not any(True for _ in m.children()):
            if not isinstance(m, _LOCAL_LEAVES):
                return None
            if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
                k = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size,) * 2
                d = m.dilation if isinstance(m.dilation, tuple) else (m.dilation,) * 2
                if getattr(m, "padding_mode", "zeros") != "zeros":
                    return None
                total += max(math.ceil((k[i] - 1) * d[i] / 2) for i in (0, 1))
    return total + (total % 2) + 2


class RowSource:
    """A network input made a strip of rows at a time: the first stage of a stage-wise pass reads it so,
    and the window's whole input never exists. ``shape`` is (n, channels, h, w)."""

    shape: tuple[int, int, int, int]

    def rows(self, y0: int, y1: int) -> torch.Tensor:
        """Rows ``y0:y1`` as an (n, channels, y1 - y0, w) channels-last tensor on the network's device."""
        raise NotImplementedError

    def whole(self) -> torch.Tensor:
        return self.rows(0, self.shape[2])


def _whole(x: "torch.Tensor | RowSource") -> torch.Tensor:
    from geoseg.model.fuse import channels_last

    return channels_last(x.whole() if isinstance(x, RowSource) else x)  # canonical strides: see channels_last


class Stage:
    """``fn(*inputs)`` over a whole map, computed strip by strip. ``scales[i]``: input i's size over the
    output's (2: a stride-2 stage's input, 0.5: a decoder block's low-resolution input)."""

    def __init__(self, fn: Callable[..., torch.Tensor], scales: Sequence[float], reach: int, channels: int,
                 strip_bytes: int = STRIP_BYTES):
        self.fn, self.scales, self.reach, self.channels, self.strip_bytes = fn, tuple(scales), reach, channels, strip_bytes

    def __call__(self, *inputs: "torch.Tensor | RowSource", out_hw: tuple[int, int]) -> torch.Tensor:
        h, w = out_hw
        n = inputs[0].shape[0]
        rows = max(16, strip_bytes(self.strip_bytes, _device(inputs[0])) // (4 * self.channels * n * w) // 16 * 16)
        if rows + 2 * self.reach >= h:
            return self.fn(*map(_whole, inputs))
        out = None
        r = self.reach
        for y0 in range(0, h, rows):
            y1 = min(y0 + rows, h)
            gy0, gy1 = max(y0 - r, 0), min(y1 + r, h)
            y = self.fn(*(t.rows(int(gy0 * s), int(gy1 * s)) if isinstance(t, RowSource) else t[:, :, int(gy0 * s):int(gy1 * s)]
                          for t, s in zip(inputs, self.scales)))
            if out is None:
                out = torch.empty((n, y.shape[1], h, w), dtype=y.dtype, device=y.device, memory_format=torch.channels_last)
            out[:, :, y0:y1] = y[:, :, y0 - gy0:y1 - gy0]
            del y  # not alive while the next strip is computed
        assert out is not None
        return out


def _device(x: "torch.Tensor | RowSource") -> torch.device:
    return x.device if isinstance(x, torch.Tensor) else torch.device(getattr(x, "device", "cpu"))


DEVICE_SHARE = 16  # a strip on a GPU may take this share of its free memory


def strip_bytes(cpu_bytes: int, device: torch.device) -> int:
    """A stage's strip budget: ``cpu_bytes`` on the CPU (cache-sized strips are fastest there); on a GPU
    a share of its free memory, so that a GPU with room runs each stage whole (small strips are many small
    kernel launches: measured, H200, 64 MB strips of 4352 px windows kept it busy 3% of the time) and a small
    GPU still runs in strips."""
    if device.type != "cuda":
        return cpu_bytes
    free, _ = torch.cuda.mem_get_info(device)
    return max(cpu_bytes, free // DEVICE_SHARE)


def _channels(module: nn.Module) -> int:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels if convs else 64


class TiledUnet:
    """An smp U-Net (ResNet encoder) run stage by stage in strips; ``plan(net)`` makes one or returns None."""

    def __init__(self, net: nn.Module, encoder_stages: list[Stage], blocks: list[Stage], input_skip: bool = False):
        """``blocks``: the decoder's, the last one followed by the segmentation head (it gives the logits);
        ``input_skip``: the last block reads the network's input too (``geoseg.model.network.add_input_skip``)."""
        self.net, self.encoder_stages, self.blocks, self.input_skip = net, encoder_stages, blocks, input_skip

    @classmethod
    def plan(cls, net: nn.Module, strip_bytes: int = STRIP_BYTES) -> "TiledUnet | None":
        try:
            from segmentation_models_pytorch import Unet
            from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder, UnetDecoderBlock
            from segmentation_models_pytorch.encoders.resnet import ResNetEncoder
        except ImportError:
            return None
        if type(net) is not Unet or type(net.encoder) is not ResNetEncoder or net.classification_head is not None:
            return None
        enc, dec = net.encoder, net.decoder
        depth = enc._depth
        if enc.output_stride != 2 ** depth:  # dilated stages do not halve the map
            return None
        if depth < 2 or not isinstance(dec.center, nn.Identity) or len(dec.blocks) != depth:
            return None
        from geoseg.model.network import has_input_skip

        input_skip = has_input_skip(net)
        if not input_skip and type(dec) is not UnetDecoder:
            return None
        parts = [nn.Sequential(enc.conv1, enc.bn1, enc.relu), nn.Sequential(enc.maxpool, enc.layer1)]
        parts += [getattr(enc, f"layer{i}") for i in range(2, depth)]
        stages = []
        for p in parts:
            reach = _reach(p)
            if reach is None:
                return None
            stages.append(Stage(p, (2,), reach, _channels(p), strip_bytes))
        blocks = []
        for i, b in enumerate(dec.blocks):
            if not isinstance(b, UnetDecoderBlock) or not isinstance(getattr(b.attention1, "attention", None), nn.Identity):
                return None
            if getattr(b, "interpolation_mode", "nearest") != "nearest":
                return None
            reach = _reach(nn.Sequential(b.conv1, b.conv2))
            if reach is None:
                return None
            if i < depth - 1:
                def run(x, s, b=b):  # noqa: ANN001
                    return b(x, 2 * x.shape[-2], 2 * x.shape[-1], s)

                blocks.append(Stage(run, (0.5, 1), reach, _channels(b), strip_bytes))
                continue
            # the last block (its skip: none, or the network's input) and the head in one stage: its
            # full-resolution feature map only ever exists a strip at a time (measured, AMX bf16, a 4240 px
            # window: the map was 0.58 GB a fresh worker had to fault in; see the #7 note)
            head = net.segmentation_head
            head_reach = _reach(head)
            if head_reach is None:
                return None

            def last(x, s=None, b=b, head=head):  # noqa: ANN001
                return head(b(x, 2 * x.shape[-2], 2 * x.shape[-1], s))

            scales = (0.5, 1) if input_skip else (0.5,)
            blocks.append(Stage(last, scales, reach + head_reach, _channels(b), strip_bytes))
        return cls(net, stages, blocks, input_skip)

    def __call__(self, x: "torch.Tensor | RowSource") -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            from geoseg.model.fuse import channels_last

            x = channels_last(x)  # its strips are read as slices: canonical strides, or the stem runs in NCHW
        h, w = x.shape[-2:]
        if h % (1 << len(self.encoder_stages)) or w % (1 << len(self.encoder_stages)):
            return self.net(_whole(x))  # a window off the network's own stride: one pass
        feats = []
        inp = x
        for i, stage in enumerate(self.encoder_stages):
            x = stage(x, out_hw=(h >> (i + 1), w >> (i + 1)))
            feats.append(x)
        skips = feats[-2::-1]  # deepest first; each dropped once its block has used it
        if self.input_skip:  # read again by the last block, a strip at a time where it is a RowSource
            skips.append(inp)
        del feats, inp
        depth = len(self.encoder_stages)
        for i, block in enumerate(self.blocks):
            size = (h >> (depth - 1 - i), w >> (depth - 1 - i))
            x = block(x, skips.pop(0), out_hw=size) if skips else block(x, out_hw=size)
        return x


def tiled_forward(net: nn.Module, x: "torch.Tensor | RowSource") -> torch.Tensor:
    """``net(x)``, stage by stage in strips where the network is known to allow it and the window is large
    (``x`` a tensor, or a RowSource that the first stage reads a strip at a time)."""
    from geoseg.model.members import MemberMean

    if isinstance(net, MemberMean):  # each member stage by stage, one after another
        if len(net.members) > 1:
            x = _whole(x)  # every member reads it: made once, not a strip at a time per member
        return net.mean(lambda member: tiled_forward(member, x))
    if x.shape[-2] * x.shape[-1] < MIN_WINDOW:
        return net(_whole(x))
    runner = net.__dict__.get("_geoseg_tiled", False)
    if runner is False:
        runner = TiledUnet.plan(net)
        net.__dict__["_geoseg_tiled"] = runner
    return net(_whole(x)) if runner is None else runner(x)
