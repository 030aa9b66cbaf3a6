"""The interface every adapter algorithm implements, and what they share (alpha, dtype casting)."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from .layer_spec import LayerSpec


class AdapterFitError(ValueError):
    """Stored adapter tensors do not fit the layer they are meant for."""


class Adapter(nn.Module):
    """A trainable change to one layer. Created so that it changes nothing at step 0.

    ``forward(x, y, bias)`` maps the layer's input ``x`` and its unadapted output ``y`` (bias included) to the adapted
    output, without ever forming W + ΔW. ``tensors()`` gives the file tensors by key suffix, in the format ComfyUI's
    LoRA loader reads; ``from_tensors`` rebuilds an adapter from them.
    """

    name: ClassVar[str]
    # Key suffixes whose presence identifies the algorithm in a file.
    marker_suffixes: ClassVar[tuple[str, ...]]

    def __init__(self, spec: LayerSpec, alpha: float):
        super().__init__()
        self.spec = spec
        self.alpha = float(alpha)  # a Python float: the hot path multiplies by it without a tensor op

    @classmethod
    def default_alpha(cls, rank: int) -> float:
        """Alpha when the user leaves it at 0: scale alpha/rank = 1, so the learning rate means the same at any rank."""
        return float(rank)

    @classmethod
    def resolve_alpha(cls, alpha: float, rank: int) -> float:
        """The alpha to store: the user's, or the algorithm's default when it is 0 (for the rank actually used)."""
        return alpha if alpha > 0 else cls.default_alpha(rank)

    @classmethod
    def create(cls, spec: LayerSpec, rank: int, alpha: float, generator: torch.Generator) -> "Adapter":
        """A new adapter that changes nothing yet; ``alpha`` 0 means the algorithm's default."""
        raise NotImplementedError

    @classmethod
    def from_tensors(cls, spec: LayerSpec, tensors: dict[str, torch.Tensor]) -> "Adapter":
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    @property
    def param_dtype(self) -> torch.dtype:
        # The first own parameter (not ``parameters()``, a generator over the module tree: this runs every forward).
        return next(iter(self._parameters.values())).dtype

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """The layer input in the adapter's dtype (autocast, when active, still picks the compute dtype)."""
        return x if torch.is_autocast_enabled(x.device.type) else x.to(self.param_dtype)

    def _alpha_tensor(self) -> torch.Tensor:
        return torch.tensor(self.alpha, dtype=torch.float32)


def require(tensors: dict[str, torch.Tensor], suffix: str, spec: LayerSpec) -> torch.Tensor:
    if suffix not in tensors:
        raise AdapterFitError(f"missing tensor '{suffix}'")
    return tensors[suffix].detach().float().clone()  # a clone: file tensors may be inference tensors


def stored_alpha(tensors: dict[str, torch.Tensor], fallback: float) -> float:
    alpha = tensors.get("alpha")
    return float(alpha.float().item()) if alpha is not None else fallback


def check_shape(what: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise AdapterFitError(f"'{what}' has shape {tuple(tensor.shape)}, the layer needs {tuple(shape)}")


def normal(shape: tuple[int, ...], std: float, generator: torch.Generator) -> nn.Parameter:
    return nn.Parameter(torch.randn(shape, generator=generator) * std)


def zeros(shape: tuple[int, ...]) -> nn.Parameter:
    return nn.Parameter(torch.zeros(shape))
