"""LoKr: ΔW = (alpha/r) · w1 ⊗ (w2a·w2b), a Kronecker product of a small full factor and a low-rank one.

The output and input sizes are split into balanced factors (out = o1·o2, in = i1·i2, o1 ≤ o2, i1 ≤ i2); ``rank`` is
the rank of the large factor, never the Kronecker factor itself. For convolutions the kernel stays in the large factor.
"""
from __future__ import annotations

import math

import torch

from .adapter import Adapter, AdapterFitError, check_shape, normal, require, stored_alpha, zeros
from .layer_spec import LayerSpec


def balanced_split(n: int) -> tuple[int, int]:
    """(a, b) with a·b = n, a ≤ b and a as close to √n as a divisor allows."""
    a = int(math.isqrt(n))
    while n % a:
        a -= 1
    return a, n // a


class LoKr(Adapter):
    name = "LoKr"
    marker_suffixes = ("lokr_w1", "lokr_w2_a", "lokr_w2")

    def __init__(self, spec: LayerSpec, w1, w2a, w2b, alpha: float):
        super().__init__(spec, alpha)
        self.w1 = torch.nn.Parameter(w1.float())
        self.w2a, self.w2b = torch.nn.Parameter(w2a.float()), torch.nn.Parameter(w2b.float())

    @staticmethod
    def factors(spec: LayerSpec) -> tuple[int, int, int, int]:
        o1, o2 = balanced_split(spec.out_features)
        i1, i2 = balanced_split(spec.in_features)
        return o1, o2, i1, i2 * spec.kernel_numel

    @property
    def rank(self) -> int:
        return self.w2b.shape[0]

    @classmethod
    def _create(cls, spec: LayerSpec, rank: int, alpha: float, generator: torch.Generator, rs_lora: bool) -> "LoKr":
        o1, o2, i1, i2k = cls.factors(spec)
        rank = max(1, min(rank, o2, i2k))
        w1 = normal((o1, i1), 1.0 / math.sqrt(i1), generator)
        w2a = normal((o2, rank), 1.0 / math.sqrt(rank), generator)
        # w2b = 0: ΔW = 0 at step 0. The default alpha follows the rank after clamping (scale 1).
        return cls(spec, w1.data, w2a.data, zeros((rank, i2k)).data, cls.resolve_alpha(alpha, rank, rs_lora))

    @classmethod
    def _from_tensors(cls, spec: LayerSpec, tensors: dict[str, torch.Tensor]) -> "LoKr":
        w1 = require(tensors, "lokr_w1", spec)
        if "lokr_w2" in tensors:  # full second factor: keep it trainable as a rank-full product
            w2 = require(tensors, "lokr_w2", spec).reshape(tensors["lokr_w2"].shape[0], -1)
            w2a, w2b = w2, torch.eye(w2.shape[1])
            alpha = float(w2b.shape[0])  # a full factor has no alpha scaling in ComfyUI's loader
        else:
            w2a, w2b = require(tensors, "lokr_w2_a", spec), require(tensors, "lokr_w2_b", spec)
            alpha = stored_alpha(tensors, float(w2b.shape[0]))
        if not (w1.ndim == w2a.ndim == w2b.ndim == 2) or w2a.shape[1] != w2b.shape[0]:
            raise AdapterFitError(f"lokr_w2_a {tuple(w2a.shape)} and lokr_w2_b {tuple(w2b.shape)} do not multiply "
                                  f"(lokr_w1 {tuple(w1.shape)})")
        o, i = w1.shape[0] * w2a.shape[0], w1.shape[1] * w2b.shape[1]
        check_shape("lokr_w1 ⊗ lokr_w2", torch.empty(o, i, device="meta"), (spec.out_features, spec.fan_in))
        return cls(spec, w1, w2a, w2b, alpha)

    def _factor_tensors(self) -> dict[str, torch.Tensor]:
        return {"lokr_w1": self.w1.detach(), "lokr_w2_a": self.w2a.detach(), "lokr_w2_b": self.w2b.detach()}

    def delta_weight(self) -> torch.Tensor:
        delta = torch.kron(self.w1, self.w2a @ self.w2b) * (self.alpha / self.rank)
        return delta.reshape(self.spec.weight_shape)

    def forward(self, x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x = self._input(x)
        return y + self.spec.apply(x, self.delta_weight().to(x.dtype)).to(y.dtype)
