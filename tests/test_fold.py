"""Inference rewrites (geoseg.model.fold): the same function as the network they rewrite."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from geoseg.model.fold import _interleave, _phase_weights, optimize_for_inference
from geoseg.model.network import build_network, has_input_skip


def _batchnorm_calls(net: torch.nn.Module, x: torch.Tensor) -> int:
    """How many BatchNorm2d modules a forward pass runs (unused modules, as smp keeps for shallow encoders, aside)."""
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.inference_mode():
        net(x)
    for h in hooks:
        h.remove()
    return len(calls)


def _without_caches(net: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``net`` that makes every derived weight afresh (phase kernels, cast weights)."""
    reference = copy.deepcopy(net)
    for m in reference.modules():
        m.__dict__.pop("_geoseg_phases", None)
        m.__dict__.pop("_geoseg_cast", None)
    return reference


def _random_statistics(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return net.eval()


@pytest.mark.parametrize("arch,depth,params", [("unet", 5, {}), ("unet", 3, {}), ("fpn", 5, {}), ("unet", 4, {"input_skip": True})])
@pytest.mark.parametrize("channels_last", [False, True])
def test_rewritten_network_computes_the_same(arch, depth, params, channels_last):
    torch.manual_seed(0)
    net = _random_statistics(build_network(arch, "resnet18", 4, 5, depth, params))
    assert has_input_skip(net) is bool(params)  # the last decoder block reads the input: its rewrite takes a skip
    plain = copy.deepcopy(net)
    fast = optimize_for_inference(net)
    assert _batchnorm_calls(plain, torch.zeros(1, 4, 64, 64)) > 0
    assert _batchnorm_calls(fast, torch.zeros(1, 4, 64, 64)) == 0  # every batch norm that runs is folded
    if arch == "unet":
        assert sum(type(m).__name__ == "SplitSkipDecoderBlock" for m in fast.modules()) == depth
    x = torch.randn(2, 4, 96, 160)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        plain, fast = plain.to(memory_format=torch.channels_last), fast.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        a, b = plain(x), fast(x)
    assert a.shape == b.shape
    assert (a - b).abs().max() <= 1e-4 * max(1.0, a.abs().max().item())
    assert (a.argmax(1) == b.argmax(1)).float().mean() > 0.999


def test_upsampled_convolution_at_low_resolution():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 6, 7, 9, generator=g)
    w = torch.randn(3, 6, 3, 3, generator=g)
    want = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), w, padding=1)
    got = _interleave(F.conv2d(x, _phase_weights(w), padding=1), 7, 9)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the channels-last path (one strided copy) puts the phases in the same places
    xl = x.contiguous(memory_format=torch.channels_last)
    got = _interleave(F.conv2d(xl, _phase_weights(w).contiguous(memory_format=torch.channels_last), padding=1), 7, 9)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_training_mode_is_refused():
    net = build_network("unet", "resnet18", 3, 2, 3, {})
    with pytest.raises(ValueError, match="eval"):
        optimize_for_inference(net.train())


def test_load_model_rewrites_unless_asked(tmp_path):
    from geoseg.model.store import init_model, load_model

    init_model(tmp_path / "m", n_bands=3, n_classes=2, encoder="resnet18", seed=0, encoder_depth=3)
    fast, plain = load_model(tmp_path / "m"), load_model(tmp_path / "m", optimize=False)
    x = torch.randn(1, 3, 64, 64)
    assert _batchnorm_calls(fast.net, x) == 0 and _batchnorm_calls(plain.net, x) > 0
    with torch.inference_mode():
        torch.testing.assert_close(fast.net(x), plain.net(x), rtol=1e-4, atol=1e-4)


def test_shared_or_training_batch_norms_are_left_alone():
    """A conv or batch norm used twice, or a batch norm in training mode, is not folded (the function would change)."""
    from torch import nn

    from geoseg.model.fold import fold_batchnorm

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) + self.conv(x)

    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x))

    shared = _random_statistics(Shared())
    assert fold_batchnorm(shared) == 0
    training = _random_statistics(Plain())
    training.bn.train()
    assert fold_batchnorm(training) == 0 and isinstance(training.bn, nn.BatchNorm2d)
    plain = _random_statistics(Plain())
    x = torch.randn(1, 3, 16, 16)
    with torch.inference_mode():
        want = plain(x)
    assert fold_batchnorm(plain) == 1 and isinstance(plain.bn, nn.Identity)
    with torch.inference_mode():
        torch.testing.assert_close(plain(x), want, rtol=1e-5, atol=1e-5)


def test_phase_kernels_follow_new_weights():
    """Weights loaded after the first pass are used (the phase kernels are made again)."""
    torch.manual_seed(0)
    net = optimize_for_inference(_random_statistics(build_network("unet", "resnet18", 3, 2, 3, {})))
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        net(x)
    block = next(m for m in net.modules() if type(m).__name__ == "SplitSkipDecoderBlock")
    with torch.no_grad():
        block.conv1[0].weight.mul_(2.0)
    reference = _without_caches(net)
    with torch.inference_mode():
        torch.testing.assert_close(net(x), reference(x))


def test_fused_relus_and_sums_run_as_one_call_and_match_the_plain_network():
    """ReLUs and residual sums go into the convolutions (oneDNN post-ops): fewer ops run, same logits."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    net = _random_statistics(build_network("unet", "resnet18", 4, 5, 4, {}))
    plain = copy.deepcopy(net).to(memory_format=torch.channels_last)
    fast = optimize_for_inference(net).to(memory_format=torch.channels_last)
    names = {type(m).__name__ for m in fast.modules()}
    assert {"ConvReLU", "FusedBasicBlock", "StripedMaxPool2d"} <= names
    x = torch.randn(1, 4, 160, 224).contiguous(memory_format=torch.channels_last)

    def relus(model):
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
            y = model(x)
        return y, sum(e.count for e in prof.key_averages() if e.key in ("aten::relu_", "aten::relu", "aten::clamp_min_"))

    (a, n_plain), (b, n_fast) = relus(plain), relus(fast)
    assert n_plain > 20 and n_fast == 0  # every ReLU of this U-Net is applied by a convolution
    assert (a - b).abs().max() <= 1e-4 * max(1.0, a.abs().max().item())
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):  # bf16: the same classes as the plain network
        a16, b16 = plain(x), fast(x)
    assert b16.dtype == torch.bfloat16 and b16.is_contiguous(memory_format=torch.channels_last)
    assert (a16.argmax(1) == b16.argmax(1)).float().mean() > 0.995
    assert (a.argmax(1) == b16.argmax(1)).float().mean() > 0.995


@pytest.mark.parametrize("h,w", [(200, 131), (201, 64), (131, 77), (67, 40)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_striped_max_pool_equals_the_max_pool(h, w, channels_last):
    from geoseg.model.fuse import StripedMaxPool2d

    x = torch.randn(2, 8, h, w)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    pool = torch.nn.MaxPool2d(3, 2, 1)
    want = pool(x)
    pool.__class__ = StripedMaxPool2d
    pool.ROWS = 8  # several strips on these small maps
    got = pool(x)
    assert torch.equal(got, want) and got.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_rewritten_network_keeps_gradients_and_follows_new_biases():
    """Training through a loaded (rewritten) network still reaches every weight; a bias written after the
    first pass is used; a dtype oneDNN does not fuse gives the plain convolution's geometry."""
    from geoseg.model.fuse import ConvReLU

    torch.manual_seed(0)
    net = optimize_for_inference(_random_statistics(build_network("unet", "resnet18", 3, 2, 3, {})))
    x = torch.randn(1, 3, 64, 64)
    net(x).sum().backward()
    assert all(p.grad is not None for p in net.decoder.parameters() if p.requires_grad)
    net.zero_grad()
    with torch.inference_mode():
        before = net(x)
    block = next(m for m in net.modules() if type(m).__name__ == "SplitSkipDecoderBlock")
    with torch.no_grad():
        block.conv1[0].bias.add_(5.0)
    reference = _without_caches(net)
    with torch.inference_mode():
        after = net(x)
        torch.testing.assert_close(after, reference(x))
    assert not torch.allclose(before, after)
    conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
    plain = copy.deepcopy(conv).double()
    conv.__class__ = ConvReLU
    conv = conv.double()
    xd = torch.randn(1, 3, 11, 11, dtype=torch.float64)
    with torch.inference_mode():
        torch.testing.assert_close(conv(xd), torch.relu(plain(xd)))


@pytest.mark.parametrize("arch, depth", [("fpn", 3), ("fpn", 4), ("fpn", 5), ("pspnet", 1), ("pspnet", 2), ("pspnet", 4)])
def test_every_depth_gives_a_map_of_the_input_size(arch, depth):
    """smp's FPN and PSPNet heads upsample by a factor made for one depth: at depth 4 FPN gave a map twice the input,
    and inference kept its top-left quarter without a word."""
    net = build_network(arch, "resnet18", 3, 4, depth).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 64, 96))
    assert tuple(out.shape[-2:]) == (64, 96)


def test_a_head_of_another_size_is_refused_at_inference():
    import numpy as np

    from geoseg.errors import ModelError
    from geoseg.infer import InferenceSettings, forward

    net = build_network("fpn", "resnet18", 3, 4, 4, {"upsampling": 4}).eval()  # made for depth 5
    with pytest.raises(ModelError, match="does not upsample to the input's size"):
        forward(net, np.zeros((1, 3, 64, 64), np.float32), 32, InferenceSettings())


@pytest.mark.parametrize("encoder", ["mit_b0", "tu-convnext_atto"])
def test_u_nets_on_encoders_with_an_empty_skip_run_rewritten(encoder):
    """mit_b* and ConvNeXt encoders report a stage of 0 channels; the concatenation-free decoder block crashed on it."""
    net = _random_statistics(build_network("unet", encoder, 3, 4, 5)).eval()
    plain = copy.deepcopy(net)
    fast = optimize_for_inference(net)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-4)


def test_the_exact_halo_reaches_past_the_receptive_field():
    """The receptive field is measured from a pixel on the stride lattice; the one just outside a lattice-aligned
    window reaches a pixel further. A U-Net of depth 1 (receptive field 6, stride 2) with a halo of exactly 6
    differed from one pass on 14 pixels."""
    import numpy as np

    from geoseg.infer import InferenceSettings, segment_array, segment_chunk
    from geoseg.model.card import BandInfo, Normalization
    from geoseg.model.store import default_classes, make_card
    from geoseg.tiling import TilingPlan

    torch.manual_seed(0)
    net = _random_statistics(build_network("unet", "resnet18", 3, 4, 1)).eval()
    card = make_card(net, arch="unet", encoder="resnet18", encoder_depth=1, bands=[BandInfo(name=f"b{i}") for i in range(3)],
                     classes=default_classes(4), normalization=Normalization(mean=(0.0,) * 3, std=(1.0,) * 3))
    assert card.exact_halo > card.receptive_field
    data = np.random.default_rng(0).standard_normal((3, 96, 96)).astype(np.float32) * 3
    valid = np.ones((96, 96), bool)
    s = InferenceSettings()
    ref, conf_ref = segment_array(net, card, data, valid, s)
    plan = TilingPlan.make((96, 96), stride=card.stride, chunk_size=32, halo=card.exact_halo, tile_size=32)
    got, conf = np.empty_like(ref), np.empty_like(conf_ref)
    for ch in plan:
        i = ch.input
        a, b = segment_chunk(net, card, plan, ch, data[:, i.y0:i.y1, i.x0:i.x1], valid[i.y0:i.y1, i.x0:i.x1], s)
        got[ch.core.y0:ch.core.y1, ch.core.x0:ch.core.x1], conf[ch.core.y0:ch.core.y1, ch.core.x0:ch.core.x1] = a, b
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_allclose(conf, conf_ref, rtol=0, atol=1e-5)


def test_a_global_reach_is_recorded_and_exact_tiling_refused():
    """Squeeze-excitation, global pooling and group norm make every output depend on every input: the measurement
    doubled its strip to 8192 px (minutes) and recorded ~4096 px as if finite, and --exact promised what no halo
    can give."""
    from geoseg.errors import ConfigError
    from geoseg.model.card import BandInfo, ModelCard, Normalization
    from geoseg.model.receptive_field import measure_receptive_field
    from geoseg.model.store import default_classes
    from geoseg.tiling import plan_for

    class SqueezeExcite(torch.nn.Module):  # a 3x3 convolution scaled by the image's mean, as an SE block does
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            return y * torch.sigmoid(y.mean(dim=(2, 3), keepdim=True))

    assert measure_receptive_field(SqueezeExcite().eval(), 3, 1) is None
    assert measure_receptive_field(torch.nn.Conv2d(3, 4, 5, padding=2).eval(), 3, 1) == 2
    card = ModelCard(bands=tuple(BandInfo(name=f"b{i}") for i in range(3)), classes=tuple(default_classes(4)),
                     normalization=Normalization(mean=(0.0,) * 3, std=(1.0,) * 3), stride=32, receptive_field=1024,
                     global_reach=True, default_halo=64)
    assert "global" in card.reach
    with pytest.raises(ConfigError, match="no halo makes tiles equal one pass"):
        plan_for(card, (4096, 4096), exact=True)
    assert plan_for(card, (4096, 4096)).overhead <= 1.15  # the default plan still runs, with a bounded halo


@pytest.mark.parametrize("batch_stride", ["numpy", "canonical"])
def test_input_skip_in_bf16_takes_a_window_made_from_numpy(batch_stride):
    """The input skip's convolution adds the upsampled map as it writes. On a CPU with bf16 instructions a window
    made from numpy (``a[None]``: its batch stride is 0, which torch calls channels-last and oneDNN does not) sent
    oneDNN to its unfused fallback, whose add_relu has no bf16 kernel: an internal assert on every small window."""
    import numpy as np

    torch.manual_seed(0)
    net = _random_statistics(build_network("unet", "resnet18", 4, 5, 4, {"input_skip": True}))
    plain = copy.deepcopy(net).to(memory_format=torch.channels_last)
    fast = optimize_for_inference(net).to(memory_format=torch.channels_last)
    hwc = np.random.default_rng(0).standard_normal((96, 128, 4), dtype=np.float32)
    x = torch.from_numpy(hwc.transpose(2, 0, 1)[None])  # how geoseg's windows reach the network
    if batch_stride == "canonical":
        x = x.clone(memory_format=torch.channels_last)
    assert x.is_contiguous(memory_format=torch.channels_last) and (x.stride()[0] == 0) is (batch_stride == "numpy")
    with torch.inference_mode():
        ref = plain(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            b = fast(x)
    assert b.dtype == torch.bfloat16 and b.shape == ref.shape
    assert (b.float() - ref).abs().max() <= 0.05 * ref.abs().max()
    assert (ref.argmax(1) == b.argmax(1)).float().mean() > 0.97
