"""What an adapter needs to know about the layer it adapts: its kind, sizes and convolution geometry."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@dataclass(frozen=True)
class LayerSpec:
    in_features: int  # in_channels for a convolution
    out_features: int  # out_channels for a convolution
    kernel_size: tuple[int, ...] = ()  # () for a linear layer
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()

    @property
    def is_conv(self) -> bool:
        return bool(self.kernel_size)

    @property
    def kernel_numel(self) -> int:
        return math.prod(self.kernel_size) if self.kernel_size else 1

    @property
    def fan_in(self) -> int:
        return self.in_features * self.kernel_numel

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features, *self.kernel_size)

    @property
    def channel_dim(self) -> int:
        """Where the output channels are in the layer's output: last for linear, 1 for convolutions."""
        return 1 if self.is_conv else -1

    @staticmethod
    def of(module: nn.Module) -> "LayerSpec | None":
        """The spec of a layer we can adapt, or None (grouped or non-zero-padded convolutions, other modules)."""
        if isinstance(module, nn.Linear):
            return LayerSpec(module.in_features, module.out_features)
        if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
            if module.groups != 1 or module.padding_mode != "zeros":
                return None
            return LayerSpec(
                module.in_channels, module.out_channels, tuple(module.kernel_size), tuple(module.stride),
                module.padding if isinstance(module.padding, str) else tuple(module.padding), tuple(module.dilation),
            )
        return None

    def apply(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The layer's operation with another weight (shape ``weight_shape``) and no bias."""
        if not self.is_conv:
            return F.linear(x, weight)
        return _CONV[len(self.kernel_size)](x, weight, None, self.stride, self.padding, self.dilation)

    def apply_down(self, x: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """A rank-r projection with this layer's geometry: ``down`` is (r, fan_in)."""
        return self.apply(x, down.view(down.shape[0], self.in_features, *self.kernel_size))

    def apply_pointwise(self, h: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """A per-position linear map on channels (1×…×1 convolution for conv layers): ``up`` is (out, r)."""
        if not self.is_conv:
            return F.linear(h, up)
        return _CONV[len(self.kernel_size)](h, up.view(*up.shape, *([1] * len(self.kernel_size))))
