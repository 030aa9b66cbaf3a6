"""Which layers of a model get adapters: every linear and convolution layer (optionally filtered by name)."""
from __future__ import annotations

from torch import nn

from .layer_spec import LayerSpec

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm)


def name_filter(patterns: str) -> "callable[[str], bool]":
    """A comma-separated list of name fragments; a layer is kept when any fragment occurs in its name ('' = all)."""
    parts = [p.strip() for p in patterns.split(",") if p.strip()]
    return (lambda name: any(p in name for p in parts)) if parts else (lambda name: True)


def adaptable_layers(root: nn.Module, patterns: str = "") -> dict[str, LayerSpec]:
    keep = name_filter(patterns)
    found = {}
    for name, module in root.named_modules():
        spec = LayerSpec.of(module)
        if spec is not None and keep(name):
            found[name] = spec
    return found


def affine_norms(root: nn.Module, patterns: str = "") -> dict[str, nn.Module]:
    """Norm layers with a learnable per-channel weight."""
    keep = name_filter(patterns)
    return {name: m for name, m in root.named_modules()
            if isinstance(m, NORM_TYPES) and getattr(m, "weight", None) is not None and keep(name)}
