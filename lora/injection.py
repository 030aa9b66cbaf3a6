"""Attaching an AdapterSet to a model with forward hooks, for exactly as long as a ``with`` block lasts.

Hooks leave the model's modules, parameters and state dict untouched (so ComfyUI's weight patching, casting and
offloading keep working) and are removed on exit, also when the block raises.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import Adapter
from .adapter_set import AdapterSet


def _channel_view(delta: torch.Tensor, out: torch.Tensor, channel_dim: int) -> torch.Tensor:
    delta = delta.to(device=out.device, dtype=out.dtype)
    if channel_dim == -1:
        return delta
    return delta.view(-1, *([1] * (out.ndim - 2)))


def _layer_hook(adapter: Adapter | None, bias_delta: nn.Parameter | None, channel_dim: int):
    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if adapter is not None:
            out = adapter(args[0], out, module.bias)
        if bias_delta is not None:
            out = out + _channel_view(bias_delta, out, channel_dim)
        return out

    return hook


def _input_hook(adapter: Adapter):
    """DoRA: scales the layer's input before the layer runs (the forward hook then sees the scaled input too)."""
    def hook(module: nn.Module, args: tuple) -> tuple:
        return (adapter.scale_input(args[0], module), *args[1:])

    return hook


def _norm_hook(delta: nn.Parameter):
    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x = args[0]
        if isinstance(module, nn.GroupNorm):
            normed = F.group_norm(x, module.num_groups, eps=module.eps)
            return out + normed * _channel_view(delta, out, 1)
        normed = F.layer_norm(x, module.normalized_shape, eps=module.eps)
        return out + normed * delta.to(device=out.device, dtype=out.dtype)

    return hook


@contextmanager
def attached(root: nn.Module, adapters: AdapterSet) -> Iterator[None]:
    handles = []
    try:
        for name in sorted(set(adapters.adapters) | set(adapters.bias_deltas)):
            adapter = adapters.adapters.get(name)
            spec_dim = adapter.spec.channel_dim if adapter is not None else _channel_dim_of(root.get_submodule(name))
            hook = _layer_hook(adapter, adapters.bias_deltas.get(name), spec_dim)
            handles.append(root.get_submodule(name).register_forward_hook(hook))
            if adapter is not None and adapter.dora_scale is not None:
                handles.append(root.get_submodule(name).register_forward_pre_hook(_input_hook(adapter)))
        for name, delta in adapters.norm_deltas.items():
            handles.append(root.get_submodule(name).register_forward_hook(_norm_hook(delta)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _channel_dim_of(module: nn.Module) -> int:
    """Where a bias broadcasts: channels-first for convolutions and GroupNorm, last for linear and LayerNorm."""
    return 1 if isinstance(module, (nn.modules.conv._ConvNd, nn.GroupNorm)) else -1
