"""LoRA: ΔW = (alpha/r) · up · down, applied unmerged as y + s · up(down(x))."""
from __future__ import annotations

import math

import torch

from .adapter import Adapter, AdapterFitError, check_shape, require, stored_alpha, zeros
from .layer_spec import LayerSpec


class LoRA(Adapter):
    name = "LoRA"
    marker_suffixes = ("lora_up.weight", "lora_down.weight")

    def __init__(self, spec: LayerSpec, down: torch.Tensor, up: torch.Tensor, alpha: float):
        super().__init__(spec, alpha)
        self.down = torch.nn.Parameter(down.reshape(down.shape[0], spec.fan_in).float())
        self.up = torch.nn.Parameter(up.reshape(spec.out_features, -1).float())

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @classmethod
    def _create(cls, spec: LayerSpec, rank: int, alpha: float, generator: torch.Generator, rs_lora: bool) -> "LoRA":
        # Kaiming-uniform-like down projection, zero up projection: the model is unchanged at step 0.
        bound = 1.0 / math.sqrt(spec.fan_in)
        down = (torch.rand((rank, spec.fan_in), generator=generator) * 2 - 1) * bound
        return cls(spec, down, zeros((spec.out_features, rank)).data, cls.resolve_alpha(alpha, rank, rs_lora))

    @classmethod
    def _from_tensors(cls, spec: LayerSpec, tensors: dict[str, torch.Tensor]) -> "LoRA":
        if "lora_mid.weight" in tensors:
            raise AdapterFitError("LoCon with a mid (Tucker) tensor is not supported for training")
        down, up = require(tensors, "lora_down.weight", spec), require(tensors, "lora_up.weight", spec)
        rank = down.shape[0]
        check_shape("lora_down.weight", down.reshape(rank, -1), (rank, spec.fan_in))
        check_shape("lora_up.weight", up.reshape(up.shape[0], -1), (spec.out_features, rank))
        return cls(spec, down, up, stored_alpha(tensors, float(rank)))

    def _factor_tensors(self) -> dict[str, torch.Tensor]:
        k = self.spec.kernel_size
        down = self.down.detach().reshape(self.rank, self.spec.in_features, *k)
        up = self.up.detach().reshape(self.spec.out_features, self.rank, *([1] * len(k)))
        return {"lora_down.weight": down, "lora_up.weight": up}

    def _add_delta(self, weight: torch.Tensor) -> torch.Tensor:
        # In place, without an (out, fan_in) up·down temporary: the largest layers make that a few hundred MB.
        return weight.addmm_(self.up, self.down, alpha=self.alpha / self.rank)

    def forward(self, x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        scale = self.alpha / self.rank
        h = self.spec.apply_down(self._input(x), self.down)
        if not self.spec.is_conv and h.dtype == y.dtype:
            # y + scale·h·upᵀ as one fused op (the adapter's cost is mostly op count on small layers)
            out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), self.up.t().to(h.dtype),
                              alpha=scale)
            return out.view(y.shape)
        return y + (self.spec.apply_pointwise(h, self.up) * scale).to(y.dtype)
