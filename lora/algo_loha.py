"""LoHa: ΔW = (alpha/r) · (w1a·w1b) ⊙ (w2a·w2b), a Hadamard product of two low-rank matrices."""
from __future__ import annotations

import torch

from .adapter import Adapter, AdapterFitError, check_shape, normal, require, stored_alpha, zeros
from .layer_spec import LayerSpec

_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


class LoHa(Adapter):
    name = "LoHa"
    marker_suffixes = ("hada_w1_a", "hada_w2_b")

    def __init__(self, spec: LayerSpec, w1a, w1b, w2a, w2b, alpha: float):
        super().__init__(spec, alpha)
        self.w1a, self.w1b = torch.nn.Parameter(w1a.float()), torch.nn.Parameter(w1b.float())
        self.w2a, self.w2b = torch.nn.Parameter(w2a.float()), torch.nn.Parameter(w2b.float())

    @property
    def rank(self) -> int:
        return self.w1b.shape[0]

    @classmethod
    def _create(cls, spec: LayerSpec, rank: int, alpha: float, generator: torch.Generator, rs_lora: bool) -> "LoHa":
        # Normal factors with standard deviation 0.1; w2a starts at zero so ΔW = 0 at step 0.
        out, fan_in = spec.out_features, spec.fan_in
        w1a, w1b = normal((out, rank), 0.1, generator), normal((rank, fan_in), 0.1, generator)
        w2b = normal((rank, fan_in), 0.1, generator)
        return cls(spec, w1a.data, w1b.data, zeros((out, rank)).data, w2b.data, cls.resolve_alpha(alpha, rank, rs_lora))

    @classmethod
    def _from_tensors(cls, spec: LayerSpec, tensors: dict[str, torch.Tensor]) -> "LoHa":
        if "hada_t1" in tensors or "hada_t2" in tensors:
            raise AdapterFitError("LoHa with Tucker tensors (hada_t1/hada_t2) is not supported for training")
        w1a, w1b, w2a, w2b = (require(tensors, k, spec) for k in _KEYS)
        rank = w1b.shape[0]
        for key, t in zip(_KEYS, (w1a, w1b, w2a, w2b)):
            want = (spec.out_features, rank) if key.endswith("_a") else (rank, spec.fan_in)
            check_shape(key, t, want)
        return cls(spec, w1a, w1b, w2a, w2b, stored_alpha(tensors, float(rank)))

    def _factor_tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k.replace("hada_", "").replace("_", "")).detach() for k in _KEYS}

    def delta_weight(self) -> torch.Tensor:
        delta = (self.w1a @ self.w1b) * (self.w2a @ self.w2b) * (self.alpha / self.rank)
        return delta.reshape(self.spec.weight_shape)

    def forward(self, x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x = self._input(x)
        return y + self.spec.apply(x, self.delta_weight().to(x.dtype)).to(y.dtype)
