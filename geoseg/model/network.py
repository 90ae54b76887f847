"""Build the torch network a card describes (segmentation-models-pytorch, no downloads)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from geoseg.errors import ModelError

_UNET_DECODER = (256, 128, 64, 32, 16)


def arch_kwargs(arch: str, encoder_depth: int, arch_params: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``smp.create_model`` with sane decoders for shallow encoders."""
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

    try:
        return smp.create_model(
            arch,
            encoder_name=encoder,
            encoder_weights=None,  # never download: weights come from the model directory
            in_channels=in_channels,
            classes=n_classes,
            **arch_kwargs(arch, encoder_depth, dict(arch_params or {})),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise ModelError(
            f"cannot build arch={arch!r} encoder={encoder!r} depth={encoder_depth}: {exc}; "
            "see segmentation-models-pytorch for the architectures and encoders it offers"
        ) from None


def network_stride(net: torch.nn.Module, encoder_depth: int) -> int:
    """Size multiple the network needs: the encoder's output stride."""
    encoder = getattr(net, "encoder", None)
    stride = getattr(encoder, "output_stride", None)
    return int(stride) if stride else 2**encoder_depth
