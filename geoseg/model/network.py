"""Build the torch network a card describes (segmentation-models-pytorch, no downloads)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from geoseg.errors import ModelError

_UNET_DECODER = (256, 128, 64, 32, 16)

# geoseg's own arch_params key (not passed to smp): the U-Net's last decoder block also reads the network's input
INPUT_SKIP = "input_skip"


def arch_kwargs(arch: str, encoder_depth: int, arch_params: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``smp.create_model`` with sane decoders for shallow encoders."""
    arch_params = {k: v for k, v in arch_params.items() if k != INPUT_SKIP}
    kwargs: dict[str, Any] = {"encoder_depth": encoder_depth}
    if arch.lower() in {"unet", "unetplusplus", "manet"} and "decoder_channels" not in arch_params:
        kwargs["decoder_channels"] = list(_UNET_DECODER[-encoder_depth:])
    # smp's heads upsample by a fixed factor made for their default depth (FPN: 4 at depth 5, PSPNet: 8 at depth 3):
    # at another depth the output would not be the input's size
    if arch.lower() == "fpn":
        kwargs["upsampling"] = 2 ** (encoder_depth - 3)
    elif arch.lower() == "pspnet":
        kwargs["upsampling"] = 2**encoder_depth
    kwargs.update(arch_params)
    return kwargs


def build_network(
    arch: str,
    encoder: str,
    in_channels: int,
    n_classes: int,
    encoder_depth: int = 5,
    arch_params: dict[str, Any] | None = None,
) -> torch.nn.Module:
    import segmentation_models_pytorch as smp

    params = dict(arch_params or {})
    input_skip = bool(params.get(INPUT_SKIP, False))
    if input_skip and arch.lower() != "unet":
        raise ModelError(f"arch_params {INPUT_SKIP!r} is for arch 'unet' (its decoder), not {arch!r}")
    try:
        net = smp.create_model(
            arch,
            encoder_name=encoder,
            encoder_weights=None,  # never download: weights come from the model directory
            in_channels=in_channels,
            classes=n_classes,
            **arch_kwargs(arch, encoder_depth, params),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise ModelError(
            f"cannot build arch={arch!r} encoder={encoder!r} depth={encoder_depth}: {exc}; "
            "see segmentation-models-pytorch for the architectures and encoders it offers"
        ) from None
    if input_skip:
        first = net.encoder.out_channels[0]
        if first == 0:
            raise ModelError(f"encoder {encoder!r} gives no full-resolution feature for arch_params {INPUT_SKIP!r} to pass on")
        norm = params.get("decoder_use_norm", params.get("decoder_use_batchnorm", "batchnorm"))
        add_input_skip(net, first, norm, params.get("decoder_attention_type"))
    return net


def gives_input_skip(net: torch.nn.Module) -> bool:
    """Whether ``net`` (an smp model) is a U-Net whose encoder hands on a full-resolution feature (``add_input_skip``)."""
    enc = getattr(net, "encoder", None)
    return type(net).__name__ == "Unet" and enc is not None and getattr(enc, "out_channels", (0,))[0] > 0


def add_input_skip(net: torch.nn.Module, channels: int, use_norm: Any = "batchnorm", attention_type: str | None = None) -> None:
    """Give an smp U-Net's last decoder block the encoder's first feature, the network's input, as its skip
    connection (in place; ``channels`` its channels).

    smp's U-Net drops the encoder's full-resolution feature, which for most encoders (ResNet, for one)
    is the input itself: its last block upsamples stride-2 features with no skip, so the class of a
    pixel is drawn from features that never saw that pixel alone, and a boundary or a feature one
    pixel wide (30 m imagery: a road, a stream, a field's edge) is blurred over two. The original
    U-Net (Ronneberger et al. 2015) has a skip at every resolution. Here the last block concatenates
    the input (bands and index channels, as normalised) to its upsampled features, as every other
    block concatenates its encoder stage: one 3x3 convolution over a few more channels.
    Measured (NC Landsat 7, train west 60%, score east 40%, `geoseg train` defaults): see README."""
    from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoderBlock

    dec = net.decoder
    last = dec.blocks[-1]
    dec.blocks[-1] = UnetDecoderBlock(last.conv1[0].in_channels, channels, last.conv2[0].out_channels, use_norm=use_norm,
                                      attention_type=attention_type, interpolation_mode=last.interpolation_mode)
    dec.__class__ = _input_skip_decoder(type(dec))


_INPUT_SKIP_DECODERS: dict[type, type] = {}


def _input_skip_decoder(base: type) -> type:
    """smp's UnetDecoder whose last block takes the network's input (the encoder's first feature) as its skip."""
    if base not in _INPUT_SKIP_DECODERS:

        class InputSkipUnetDecoder(base):  # type: ignore[misc, valid-type]
            def forward(self, features):  # noqa: ANN001, ANN201
                shapes = [f.shape[2:] for f in features][::-1]
                skips = features[:-1][::-1]  # deepest first, the input last
                x = self.center(features[-1])
                for i, block in enumerate(self.blocks):
                    height, width = shapes[i + 1]
                    x = block(x, height, width, skip_connection=skips[i])
                return x

        _INPUT_SKIP_DECODERS[base] = InputSkipUnetDecoder
    return _INPUT_SKIP_DECODERS[base]


def has_input_skip(net: torch.nn.Module) -> bool:
    """Whether ``net`` is a U-Net given the input skip (``add_input_skip``)."""
    return type(getattr(net, "decoder", None)) in _INPUT_SKIP_DECODERS.values()


def network_stride(net: torch.nn.Module, encoder_depth: int) -> int:
    """Size multiple the network needs: the encoder's output stride."""
    encoder = getattr(net, "encoder", None)
    stride = getattr(encoder, "output_stride", None)
    return int(stride) if stride else 2**encoder_depth
