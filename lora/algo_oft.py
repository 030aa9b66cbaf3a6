"""OFT: rotates the layer's output channels block-wise with R = (I+Q)(I−Q)⁻¹, Q skew-symmetric (Cayley transform).

Equivalent to ComfyUI's merged form W' = Rᵀ-per-block · W (bias unchanged), applied here to the output instead:
y' = blocks(y − b) · R + b. ``rank`` is the block size (the largest divisor of out_features not above it);
``alpha`` is the norm constraint on Q (0 = unconstrained), as in ComfyUI's loader.
"""
from __future__ import annotations

import torch

from .adapter import Adapter, AdapterFitError, check_shape, require, stored_alpha, zeros
from .layer_spec import LayerSpec


def block_size_for(out_features: int, rank: int) -> int:
    size = max(1, min(rank, out_features))
    while out_features % size:
        size -= 1
    return size


class OFT(Adapter):
    name = "OFT"
    marker_suffixes = ("oft_blocks",)
    # ComfyUI's OFT merge with a dora_scale multiplies the rotation's change by alpha, here the norm constraint
    # (0 = unconstrained, which would drop the rotation): no file could load as it trained.
    dora_unsupported = ("only LoRA, LoHa and LoKr support it (ComfyUI's loader scales OFT's change by its alpha, "
                        "a norm constraint, when a dora_scale is present)")
    rs_lora_unsupported = "OFT has no alpha/rank scale to change (its alpha is a norm constraint)"

    def __init__(self, spec: LayerSpec, blocks: torch.Tensor, alpha: float):
        super().__init__(spec, alpha)
        self.blocks = torch.nn.Parameter(blocks.float())

    @classmethod
    def default_alpha(cls, rank: int) -> float:
        return 0.0

    @classmethod
    def _create(cls, spec: LayerSpec, rank: int, alpha: float, generator: torch.Generator, rs_lora: bool) -> "OFT":
        size = block_size_for(spec.out_features, rank)
        blocks = zeros((spec.out_features // size, size, size)).data  # Q = 0: R = I
        return cls(spec, blocks, cls.resolve_alpha(alpha, rank, rs_lora))

    @classmethod
    def _from_tensors(cls, spec: LayerSpec, tensors: dict[str, torch.Tensor]) -> "OFT":
        blocks = require(tensors, "oft_blocks", spec)
        size = blocks.shape[-1]
        check_shape("oft_blocks", blocks, (spec.out_features // size, size, size))
        if spec.out_features % size:
            raise AdapterFitError(f"'oft_blocks' block size {size} does not divide {spec.out_features} outputs")
        return cls(spec, blocks, stored_alpha(tensors, 0.0))

    def _factor_tensors(self) -> dict[str, torch.Tensor]:
        return {"oft_blocks": self.blocks.detach()}

    def rotation(self) -> torch.Tensor:
        q = self.blocks - self.blocks.transpose(1, 2)
        constraint = float(self.alpha)
        if constraint > 0:
            norm = torch.linalg.norm(q) + 1e-8
            q = torch.where(norm > constraint, q * (constraint / norm), q)
        eye = torch.eye(q.shape[-1], device=q.device, dtype=torch.float32)
        with torch.autocast(q.device.type, enabled=False):
            return (eye + q.float()) @ torch.linalg.inv(eye - q.float())

    def forward(self, x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # (y - b) R + b, written as y + (y - b)(R - I): the same map, but exactly y while R is the identity (step 0),
        # where subtracting and re-adding the bias would round on some CPUs' kernels.
        r = self.rotation()
        turn = r - torch.eye(r.shape[-1], device=r.device, dtype=r.dtype)
        out = y.movedim(self.spec.channel_dim, -1)  # channels last, where the bias broadcasts
        z = out if bias is None else out - bias.to(device=out.device, dtype=out.dtype)
        delta = torch.einsum("...kn,knm->...km", z.unflatten(-1, turn.shape[:2]), turn.to(z.dtype)).flatten(-2)
        return (out + delta).movedim(-1, self.spec.channel_dim)
