"""Stage-by-stage execution in strips (geoseg.model.tiled) and the seam-free default plans it allows."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from geoseg.model.card import BandInfo, Normalization
from geoseg.model.fold import optimize_for_inference
from geoseg.model.network import build_network, has_input_skip
from geoseg.model.store import default_classes, make_card
from geoseg.model.tiled import TiledUnet, tiled_forward
from geoseg.tiling import DEFAULT_CHUNK, SEAM_FREE_OVERHEAD, STAGEWISE_CHUNK, plan_for, runs_stagewise
from tests.test_fold import _random_statistics


_BASE = None


def _card(arch="unet", encoder="resnet18", depth=3, arch_params=None, rf=None):
    """A card for these settings; the receptive field is measured once (for the base U-Net) or given."""
    global _BASE
    if _BASE is None:
        _BASE = make_card(build_network("unet", "resnet18", 4, 3, 3, {}).eval(), arch="unet", encoder="resnet18",
                          encoder_depth=3, bands=[BandInfo(name=f"b{i}") for i in range(4)], classes=default_classes(3),
                          normalization=Normalization(mean=(0.0,) * 4, std=(1.0,) * 4), tile_size=128,
                          provenance={"source": "test"})
    update = {"arch": arch, "encoder": encoder, "encoder_depth": depth, "arch_params": dict(arch_params or {})}
    if rf is not None:
        update["receptive_field"] = rf
    return _BASE.model_copy(update=update)


@pytest.mark.parametrize("encoder,depth,fold,skip", [("resnet18", 4, True, False), ("resnet18", 4, False, False),
                                                     ("resnet34", 5, True, False), ("resnet50", 3, True, False),
                                                     ("resnet18", 2, False, False), ("resnet18", 4, True, True),
                                                     ("resnet18", 3, False, True)])
def test_tiled_execution_equals_one_pass(encoder, depth, fold, skip):
    """Stage by stage in strips equals one pass, the U-Net given the input skip too (its last stage reads the input
    again, strip by strip)."""
    torch.manual_seed(0)
    net = _random_statistics(build_network("unet", encoder, 4, 5, depth, {"input_skip": True} if skip else {}))
    assert has_input_skip(net) is skip and net.decoder.blocks[-1].conv1[0].in_channels == 32 + (4 if skip else 0)
    if fold:
        optimize_for_inference(net)
    runner = TiledUnet.plan(net, strip_bytes=1 << 20)  # strips of 16-32 rows: many per stage
    assert runner is not None
    tiles = []
    hooks = [m.register_forward_hook(lambda m, i, o: tiles.append(o.shape[-1])) for m in [net.segmentation_head]]
    x = torch.randn(2, 4, 352, 416).contiguous(memory_format=torch.channels_last)  # a multiple of 32, not of the tiles
    with torch.inference_mode():
        a, b = net(x), runner(x)
    for h in hooks:
        h.remove()
    assert len(tiles) > 2  # the head ran strip by strip, not once
    assert a.shape == b.shape
    assert (a - b).abs().max() <= 1e-4 * max(1.0, a.abs().max().item())
    assert (a.argmax(1) == b.argmax(1)).float().mean() > 0.999


@pytest.mark.parametrize("batch", [1, 2])
def test_tiled_execution_in_bf16_equals_one_bf16_pass(batch):
    """The same in bf16 (autocast; on CPUs with bf16 instructions, AVX512-BF16 or AMX, oneDNN's fused convolutions),
    the input skip read a strip at a time, from windows made as geoseg makes them: from numpy, channels-last, a
    single window's batch stride 0."""
    torch.manual_seed(0)
    net = optimize_for_inference(_random_statistics(build_network("unet", "resnet18", 4, 5, 4, {"input_skip": True})))
    runner = TiledUnet.plan(net, strip_bytes=1 << 16)
    hwc = np.random.default_rng(0).random((batch, 256, 224, 4), dtype=np.float32)
    x = torch.from_numpy(hwc[0][None] if batch == 1 else hwc).permute(0, 3, 1, 2)
    assert x.is_contiguous(memory_format=torch.channels_last) and (x.stride()[0] == 0) is (batch == 1)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = tiled_forward(net, x), runner(x)  # a small window: one pass
    assert a.dtype == b.dtype == torch.bfloat16 and a.shape == b.shape == (batch, 5, 256, 224)
    diff, top = (a.float() - b.float()).abs(), max(1.0, a.float().abs().max().item())
    # bf16 rounding where oneDNN blocks a strip's kernels otherwise (none on Zen 4: equal to the bit); the stem in NCHW
    # on a numpy batch's strides was 2.7e-3 x the largest logit off on average
    assert diff.max() <= 5e-2 * top and diff.mean() <= 1e-3 * top
    assert (a.argmax(1) == b.argmax(1)).float().mean() > 0.995


def test_small_windows_run_as_one_pass():
    net = build_network("unet", "resnet18", 4, 3, 3, {}).eval()
    x = torch.randn(1, 4, 64, 64).contiguous(memory_format=torch.channels_last)  # as geoseg's windows reach it
    with torch.inference_mode():
        assert torch.equal(tiled_forward(net, x), net(x))
    assert "_geoseg_tiled" not in net.__dict__  # never planned for a small window


@pytest.mark.parametrize("arch,encoder,params,depth,expected", [
    ("unet", "resnet18", {}, 3, True),
    ("unet", "resnet18", {"input_skip": True}, 4, True),
    ("unet", "resnet34", {}, 3, True),
    ("unet", "resnet50", {}, 3, True),
    ("unet", "resnet18", {"output_stride": 8}, 3, True),  # no stage of a depth-3 encoder is dilated
    ("unet", "resnet18", {"output_stride": 16}, 5, False),  # layer4 dilated: it does not halve the map
    ("unet", "resnet18", {"decoder_attention_type": "scse"}, 3, False),
    ("unet", "resnet18", {"decoder_interpolation": "bilinear"}, 3, False),
    ("unet", "mobilenet_v2", {}, 3, False),
    ("fpn", "resnet18", {}, 3, False),
])
def test_the_card_says_what_the_worker_does(arch, encoder, params, depth, expected):
    """The client decides chunk sizes from the card alone; the worker decides from the network: they agree."""
    card = _card(arch, encoder, depth, params)
    net = build_network(arch, encoder, 4, 3, depth, params).eval()
    assert runs_stagewise(card) is expected
    assert (TiledUnet.plan(net) is not None) is expected


def test_default_plans_are_exact_within_the_overhead():
    card = _card(rf=142)  # a U-Net-resnet18 of depth 4 measures 142 px
    assert card.exact_halo == 144 and runs_stagewise(card)
    for side in (4096, 6000, 8192, 20000):
        plan = plan_for(card, (side, side))
        assert plan.halo == card.exact_halo  # the default is exact: tiled equals one pass
        assert plan.overhead <= SEAM_FREE_OVERHEAD
        assert plan == plan_for(card, (side, side), exact=True)
    assert plan_for(card, (4096, 4096)).chunk_size == DEFAULT_CHUNK  # 2048 px chunks where they are exact cheaply enough
    assert plan_for(card, (8192, 8192)).chunk_size == STAGEWISE_CHUNK
    # a network the workers cannot run stage by stage keeps 2048 px chunks: exactness is not worth its memory
    other = _card("fpn", rf=142)
    plan = plan_for(other, (8192, 8192))
    assert plan.chunk_size == DEFAULT_CHUNK and plan.halo < other.exact_halo and plan.overhead <= SEAM_FREE_OVERHEAD
    # a receptive field no candidate affords: the largest chunk and chunk / 32
    wide = _card(rf=400)
    plan = plan_for(wide, (20000, 20000))
    assert plan.chunk_size == STAGEWISE_CHUNK and plan.halo == 128
    # what the user asks for is what they get, and a halo alone keeps the default chunk
    assert plan_for(card, (8192, 8192), chunk_size=1024, halo=48).halo == 48
    assert plan_for(card, (8192, 8192), halo=64).chunk_size == DEFAULT_CHUNK
    assert plan_for(card, (8192, 8192), chunk_size=1024).chunk_size == 1024
    # a chunk or tile size given never trades the exact halo for seams (it fell to 32 or 128 px, silently)
    for side, chunk in ((3000, 1024), (3000, 2048), (600, 200)):
        assert plan_for(card, (side, side), chunk_size=chunk).halo == card.exact_halo
    for tile in (512, 1024):
        plan = plan_for(card, (8192, 8192), tile_size=tile)
        assert plan.halo == card.exact_halo and plan.tile_size == tile
        assert plan.chunk_size == plan_for(card, (8192, 8192)).chunk_size  # the chunk is chosen as without tiles
    # geoseg's own choice of chunks (2048 px beside an instance model) is planned as a default, not as the user's
    plan = plan_for(card, (10980, 10980), own_chunks=(DEFAULT_CHUNK,))
    assert plan.chunk_size == DEFAULT_CHUNK and plan.halo == DEFAULT_CHUNK // 32 and plan.overhead <= SEAM_FREE_OVERHEAD


def test_large_window_runs_stagewise_in_forward():
    """infer.forward on a window above the threshold gives the network's one-pass probabilities."""
    from geoseg.infer import InferenceSettings, forward
    from geoseg.model import tiled

    torch.manual_seed(1)
    net = _random_statistics(build_network("unet", "resnet18", 4, 3, 3, {}))
    x = np.random.default_rng(0).standard_normal((1, 4, 200, 232)).astype(np.float32)
    old = tiled.MIN_WINDOW
    tiled.MIN_WINDOW = 100 * 100
    try:
        p = forward(net, x, 16, InferenceSettings())
    finally:
        tiled.MIN_WINDOW = old
    assert net.__dict__["_geoseg_tiled"] is not None
    ref = forward(copy.deepcopy(net), x, 16, InferenceSettings())  # a fresh copy: under the threshold, one pass
    assert np.abs(p - ref).max() < 1e-5


def test_embedded_workers_fit_in_memory():
    """4096 px chunks need ~6 GiB per model worker: the embedded cluster never starts more than memory holds."""
    import os

    from distributed.system import MEMORY_LIMIT

    from geoseg.cluster import WORKER_MEMORY, default_workers

    n = default_workers()
    assert 1 <= n <= len(os.sched_getaffinity(0))
    assert n == 1 or n * WORKER_MEMORY <= MEMORY_LIMIT


def test_a_window_off_the_stride_runs_as_one_pass():
    torch.manual_seed(2)
    net = _random_statistics(build_network("unet", "resnet18", 4, 3, 3, {}))
    runner = TiledUnet.plan(net, strip_bytes=1 << 20)
    x = torch.randn(1, 4, 100, 84).contiguous(memory_format=torch.channels_last)  # 100 is no multiple of 8: stage sizes would not halve exactly
    with torch.inference_mode():
        assert torch.equal(runner(x), net(x))


def test_classes_from_logits_equal_argmax_and_max_of_the_probabilities():
    """forward_classes (the class and its probability from the logits, in row strips) = argmax / max of forward."""
    from geoseg.infer import CLASS_ROWS, InferenceSettings, forward, forward_classes
    from geoseg.model.fold import optimize_for_inference
    from geoseg.model.network import build_network

    torch.manual_seed(0)
    net = optimize_for_inference(build_network("unet", "resnet18", 4, 5, 3, {}).eval())
    x = np.random.default_rng(0).standard_normal((2, 4, 2 * CLASS_ROWS + 40, 72)).astype(np.float32)
    st = InferenceSettings(precision="fp32", batch_size=2, device="cpu")
    probs = forward(net, x, 8, st)
    index, prob = forward_classes(net, x, 8, st)
    assert index.shape == prob.shape == (2, x.shape[2], 72)
    assert (index == probs.argmax(axis=1)).mean() > 0.9999
    # two float paths (softmax, and exp/sum of the same logits) over two passes: after other tests in the same
    # process the passes differed by ~3e-5 relative on this AMX machine (oneDNN picks its kernels per process)
    np.testing.assert_allclose(prob, probs.max(axis=1), rtol=1e-3, atol=1e-5)


def test_channels_last_input_is_made_in_strips_with_the_same_values(monkeypatch):
    """The channels-last input is made strip by strip (no window-sized temporaries for a fresh worker to
    fault in); every value equals the band-first result, bands, missing values and indices alike."""
    import geoseg.infer
    from geoseg.infer import normalize

    roles = ("blue", "green", "red", "nir")
    card = _card().model_copy(update={"index_channels": ("ndvi", "ndwi"), "bands": [BandInfo(name=r, role=r) for r in roles],
                                      "normalization": Normalization(mean=(300.0, 400.0, 500.0, 900.0),
                                                                     std=(50.0, 60.0, 70.0, 200.0))})
    rng = np.random.default_rng(0)
    data = rng.integers(0, 3000, (4, 203, 171)).astype(np.uint16)
    data[3, :5] = 0  # nir and red both 0: the index has no value
    data[2, :5] = 0
    band_valid = rng.random(data.shape) > 0.05
    valid = band_valid.any(axis=0)  # missing_bands: fill, a pixel with a band missing is classified from the others
    monkeypatch.setattr(geoseg.infer, "NORMALIZE_BYTES", 4 * 6 * 171 * 7)  # strips of 7 rows: the last one short
    for bv in (None, band_valid):
        ref = normalize(data, valid, card, bv)
        got = normalize(data, valid, card, bv, channels_last=True)
        assert got.shape == ref.shape == (6, 203, 171) and got.strides[0] == 4  # a view of (h, w, channels) memory
        np.testing.assert_array_equal(got, ref)
        assert np.isfinite(got).all() and (got[:, ~valid] == 0).all()
        if bv is not None:
            assert (got[:4][~band_valid] == 0).all() and (got[:4][band_valid & valid] != 0).any()


def test_the_first_convolution_reads_and_writes_channels_last():
    """A window's input reaches the network in channels-last memory with canonical strides, whole (a small window,
    one pass) or a strip at a time (a large one, stage by stage). Made from numpy, a batch of one had a batch stride
    of 0 or of the channels: with weights that are not channels-last (these), torch took it for NCHW and computed the
    first convolution in NCHW, writing NCHW (geoseg's workers make their weights channels-last, where it did not; the
    input skip's derived weights are not, where bf16 then crashed: test_fold)."""
    from geoseg.infer import InputWindow, _batch_tensor

    torch.manual_seed(0)
    net = optimize_for_inference(_random_statistics(build_network("unet", "resnet18", 4, 3, 3, {"input_skip": True})))
    net = net.to(memory_format=torch.channels_last)
    seen = []
    hook = net.encoder.conv1.register_forward_hook(lambda m, i, o: seen.append((i[0].stride(), i[0].shape, o)))
    card = _card(depth=3, arch_params={"input_skip": True})
    rng = np.random.default_rng(0)
    data = rng.integers(0, 3000, (4, 96, 80)).astype(np.uint16)
    window = InputWindow(data, np.ones((96, 80), bool), card)
    rows = window.rows(8, "cpu")
    with torch.inference_mode():
        for x in (_batch_tensor(window.array()[None], 8, "cpu"), rows.rows(0, 48), rows.whole()):
            net.encoder.conv1(x)
    hook.remove()
    assert len(seen) == 3
    for stride, (n, c, h, w), out in seen:
        assert stride == (c * h * w, 1, w * c, c), stride
        assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous(), out.stride()


@pytest.mark.parametrize("dtype", ["uint16", "int16", "float32", "float64"])
def test_the_device_normalisation_equals_numpys(dtype):
    """A GPU worker normalises on the device (``normalized_on_device``): the same float32 values as the CPU path,
    missing bands and invalid pixels 0; its rows, padded to the stride, equal the CPU rows. Run here on torch's CPU
    device: the same torch code a GPU runs. Cards with index channels keep the CPU path (None)."""
    from geoseg.infer import _window_rows_class, InputWindow, normalize, normalized_on_device

    card = _card().model_copy(update={"normalization": Normalization(mean=(300.0, 400.0, 500.0, 900.0),
                                                                       std=(50.0, 60.0, 70.0, 200.0))})
    rng = np.random.default_rng(7)
    data = (rng.integers(-200, 3000, (4, 61, 45)) if dtype == "int16" else rng.integers(0, 3000, (4, 61, 45))).astype(dtype)
    if dtype.startswith("float"):
        data = data + rng.random(data.shape).astype(dtype)
        data[1, 3, :7] = np.nan
    band_valid = (rng.random(data.shape) > 0.05) & np.isfinite(data)
    valid = band_valid.any(axis=0)
    before = data.copy()
    for bv in (None, band_valid):
        ref = normalize(data, valid, card, bv)
        got = normalized_on_device(data, valid, card, bv, "cpu")
        np.testing.assert_array_equal(data, before)  # the caller's bands are left as they were
        assert got is not None and got.dtype == torch.float32
        np.testing.assert_array_equal(got.numpy(), ref)
        window = InputWindow(data, valid, card, bv)
        rows = _window_rows_class()(window, 32, "cpu")  # padded to 64 x 64
        for y0, y1 in ((0, 64), (16, 48), (48, 64)):
            dev = rows._device_rows(y0, y1)
            assert dev.shape == (1, 4, y1 - y0, 64) and dev.is_contiguous(memory_format=torch.channels_last)
            np.testing.assert_array_equal(dev.numpy(), rows.rows(y0, y1).numpy())
    indexed = card.model_copy(update={"index_channels": ("ndvi",), "bands": [BandInfo(name=r, role=r) for r in
                                                                            ("blue", "green", "red", "nir")]})
    assert normalized_on_device(data, valid, indexed, None, "cpu") is None


@pytest.mark.parametrize("shape,skip", [((200, 232), False), ((203, 229), False), ((203, 229), True)])  # on the stride,
# and padded to it; with the input skip the last stage reads the input again
def test_a_stagewise_pass_makes_its_input_a_strip_at_a_time(monkeypatch, shape, skip):
    """The default path (tile = chunk) gives the network an InputWindow's rows as its first stage reads
    them (and, with the input skip, as its last stage does): the window's whole input is never made, and
    classes and confidences equal those from the whole normalised array."""
    import geoseg.infer
    from geoseg.infer import InferenceSettings, InputWindow, normalize, segment_window
    from geoseg.model import tiled
    from geoseg.tiling import Box, Tile

    roles = ("blue", "green", "red", "nir")
    card = _card().model_copy(update={"index_channels": ("ndvi", "ndwi"), "bands": [BandInfo(name=r, role=r) for r in roles],
                                      "normalization": Normalization(mean=(300.0, 400.0, 500.0, 900.0),
                                                                     std=(50.0, 60.0, 70.0, 200.0))})
    torch.manual_seed(2)
    net = _random_statistics(build_network("unet", "resnet18", 6, 3, 3, {"input_skip": True} if skip else {}))
    optimize_for_inference(net)
    net.__dict__["_geoseg_tiled"] = TiledUnet.plan(net, strip_bytes=1 << 18)  # strips of a few rows
    monkeypatch.setattr(tiled, "MIN_WINDOW", 64 * 64)
    rng = np.random.default_rng(3)
    h, w = shape
    data = rng.integers(0, 3000, (4, h, w)).astype(np.uint16)
    band_valid = rng.random(data.shape) > 0.05
    valid = band_valid.any(axis=0)
    box = Box(0, h, 0, w)
    made: list[int] = []
    real = geoseg.infer._normalized
    monkeypatch.setattr(geoseg.infer, "_normalized", lambda d, *a, **k: made.append(d.shape[1]) or real(d, *a, **k))
    window = InputWindow(data, valid, card, band_valid)
    got = segment_window(net, card, window, valid, box, [Tile(box, box)], box, InferenceSettings())
    assert window._array is None and len(made) > 2 and max(made) < h / 2  # strips, never the whole window
    assert (sum(made) > 3 * h) is skip  # the input skip's rows are made again (the stem's overlap: under 2 h)
    ref = segment_window(net, card, normalize(data, valid, card, band_valid, channels_last=True), valid, box,
                         [Tile(box, box)], box, InferenceSettings())
    # The same arithmetic on tensors of other shapes (strips of a window off the stride): some CPUs' convolution
    # kernels round differently by shape (an AMD EPYC, with oneDNN or without: 194 of 46487 confidences differ
    # by up to 1e-4, the classes not at all). Classes may differ only at a near-tie of the top two (3 classes: a
    # confidence of at most one half), confidences by rounding.
    near_tie = ref[1] <= 0.5 + 1e-3
    assert ((got[0] == ref[0]) | near_tie).all() and (got[0] != ref[0]).mean() < 1e-3
    np.testing.assert_allclose(got[1], ref[1], rtol=0, atol=1e-3)
    assert (got[0] != 255).sum() == valid.sum()


def test_several_networks_share_one_whole_input(monkeypatch):
    """With several networks (a MemberMean), the input is made once, whole, not once per network in strips."""
    from geoseg.infer import InferenceSettings, InputWindow, segment_window
    from geoseg.model import tiled
    from geoseg.model.members import MemberMean
    from geoseg.tiling import Box, Tile

    torch.manual_seed(4)
    nets = [_random_statistics(build_network("unet", "resnet18", 4, 3, 3, {})) for _ in range(2)]
    for net in nets:
        net.__dict__["_geoseg_tiled"] = TiledUnet.plan(net, strip_bytes=1 << 18)  # strips of a few rows
    monkeypatch.setattr(tiled, "MIN_WINDOW", 64 * 64)
    data = np.random.default_rng(5).integers(0, 3000, (4, 96, 128)).astype(np.uint16)
    valid = np.ones((96, 128), bool)
    box = Box(0, 96, 0, 128)
    card = _card()
    one = InputWindow(data, valid, card)
    segment_window(nets[0], card, one, valid, box, [Tile(box, box)], box, InferenceSettings())
    assert one._array is None  # one network: strips
    both = InputWindow(data, valid, card)
    segment_window(MemberMean(nets), card, both, valid, box, [Tile(box, box)], box, InferenceSettings())
    assert both._array is not None


def test_a_segmented_window_is_freed_without_the_cycle_collector(monkeypatch):
    """Once a window is segmented, nothing keeps its input alive but the caller: no reference cycle holds it
    for Python's cyclic collector, which in a worker may run many windows later (the memory of every
    window in between stays taken: a worker's RSS grew from 3.1 to 6.0 GB over 30 windows)."""
    import gc
    import weakref

    from geoseg.infer import InferenceSettings, InputWindow, segment_window
    from geoseg.model import tiled
    from geoseg.tiling import Box, Tile

    torch.manual_seed(8)
    net = _random_statistics(build_network("unet", "resnet18", 4, 3, 3, {}))
    net.__dict__["_geoseg_tiled"] = TiledUnet.plan(net, strip_bytes=1 << 18)
    monkeypatch.setattr(tiled, "MIN_WINDOW", 64 * 64)
    data = np.random.default_rng(9).integers(0, 3000, (4, 96, 128)).astype(np.uint16)
    valid = np.ones((96, 128), bool)
    box, card = Box(0, 96, 0, 128), _card()
    gc.collect()
    gc.disable()
    try:
        window = InputWindow(data, valid, card)
        got = segment_window(net, card, window, valid, box, [Tile(box, box)], box, InferenceSettings())
        assert window._array is None  # the stage-wise path: rows made a strip at a time
        gone = weakref.ref(window)
        del window
        assert gone() is None
    finally:
        gc.enable()
    assert (got[0] != 255).all()
