"""DoRA (weight-decomposed adaptation) in the form ComfyUI's loader applies it (``weight_decompose``).

The loader merges W' = dora_scale · (W + ΔW) / (‖W + ΔW‖ + eps). Which norm it takes depends on the shape of
``dora_scale``: when its first size equals the layer's output count the loader divides by the norm of the *base*
weight per output channel (not of W + ΔW: that is not DoRA, and an open ComfyUI pull request changes it); otherwise
by the norm of W + ΔW per *input* channel (over the outputs and kernel positions). We train and save only the second
form, ``dora_scale`` of shape (1, in, 1, …): the one that is DoRA, that LyCORIS-style loaders compute alike, and
that the pending ComfyUI fixes leave as it is.

A per-input-channel gain is a gain on the layer's input: W' x = (W + ΔW)(g ⊙ x) with
g = dora_scale / (‖W + ΔW‖ + eps). So training scales the input before the layer runs (a forward pre-hook), and the
base layer and the adapter then run unmerged as always (no second pass of the base layer, as PEFT's per-output form
needs); only the norm needs W + ΔW.
"""
from __future__ import annotations

import torch
from torch import nn

from .layer_spec import LayerSpec

# ComfyUI adds the eps of the merged weight's dtype, float32 (its patcher merges in float32).
EPS = torch.finfo(torch.float32).eps


def magnitude_shape(spec: LayerSpec) -> tuple[int, ...]:
    """The shape of a per-input-channel ``dora_scale``: (1, in) for linear, (1, in, 1, …) for convolutions."""
    return (1, spec.in_features, *([1] * len(spec.kernel_size)))


def base_weight(layer: nn.Module, device: torch.device | None = None) -> torch.Tensor:
    """The layer's weight as ComfyUI's patcher sees it when it merges a LoRA: a float32 copy, passed through the
    layer's ``convert_weight`` where ComfyUI's ops define one (scaled fp8 multiplies by its scale there).

    A fresh tensor the caller may overwrite: the layer's own weight is never written.
    """
    weight = layer.weight
    with torch.no_grad():
        copy = weight.to(device=weight.device if device is None else device, dtype=torch.float32, copy=True)
        convert = getattr(layer, "convert_weight", None)
        return convert(copy, inplace=True) if convert is not None else copy


def input_channel_norms(spec: LayerSpec, weight: torch.Tensor) -> torch.Tensor:
    """‖weight‖ per input channel, over the outputs and kernel positions: shape (in,)."""
    return torch.linalg.vector_norm(weight.reshape(spec.out_features, spec.in_features, -1), dim=(0, 2))


def channel_gain(spec: LayerSpec, gain: torch.Tensor) -> torch.Tensor:
    """A per-input-channel gain (in,) shaped to broadcast over the layer's input (channels last or at dim 1)."""
    return gain.view(-1, *([1] * len(spec.kernel_size))) if spec.is_conv else gain
