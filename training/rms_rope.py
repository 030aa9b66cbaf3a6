"""Per-head RMSNorm followed by rotary position embedding (RoPE), in plain PyTorch so autograd differentiates it.

ComfyUI 0.33 runs this step of some models (Anima, JoyImage, Cosmos Predict2) as one fused ``comfy_kitchen`` op,
which has no backward. These functions take the same arguments and compute the same thing, step for step as those
kernels do (the norm in fp32, its output rounded to the input's dtype, the rotation in the frequencies' dtype, the
result in the input's dtype), so a training step can use them instead (see ``nodes/comfy_bridge.py``).

Layouts: ``x`` is (..., head_dim); ``freqs_cis`` is (..., rot_dim / 2, 2, 2), one 2x2 matrix per pair of
channels, broadcast against x's leading dimensions (a frequency table longer than x's sequence is cut to it). Pair p
is channels (2p, 2p + 1) in the interleaved layout and (p, p + rot_dim / 2) in the split-half one; the rotated
channels are the first ``rot_dim`` (0: all), the norm always spans the whole head.
"""
from __future__ import annotations

import torch


def rms_rope1(x: torch.Tensor, freqs_cis: torch.Tensor, scale: torch.Tensor | None,
              epsilon: float = 1e-6) -> torch.Tensor:
    """One tensor, interleaved pairs."""
    return normed_and_rotated(x, freqs_cis, scale, epsilon, split_half=False)


def rms_rope_split_half1(x: torch.Tensor, freqs_cis: torch.Tensor, scale: torch.Tensor | None,
                         epsilon: float = 1e-6) -> torch.Tensor:
    """One tensor, split-half pairs."""
    return normed_and_rotated(x, freqs_cis, scale, epsilon, split_half=True)


def rms_rope(q: torch.Tensor, k: torch.Tensor, freqs_cis: torch.Tensor, q_scale: torch.Tensor | None,
             k_scale: torch.Tensor | None = None, epsilon: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key, interleaved pairs; the key's norm scale defaults to the query's."""
    return (normed_and_rotated(q, freqs_cis, q_scale, epsilon, split_half=False),
            normed_and_rotated(k, freqs_cis, q_scale if k_scale is None else k_scale, epsilon, split_half=False))


def rms_rope_split_half(q: torch.Tensor, k: torch.Tensor, freqs_cis: torch.Tensor, q_scale: torch.Tensor | None,
                        k_scale: torch.Tensor | None = None, epsilon: float = 1e-6,
                        rot_dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key, split-half pairs over the first ``rot_dim`` channels (0: all)."""
    k_scale = q_scale if k_scale is None else k_scale
    return (normed_and_rotated(q, freqs_cis, q_scale, epsilon, split_half=True, rot_dim=rot_dim),
            normed_and_rotated(k, freqs_cis, k_scale, epsilon, split_half=True, rot_dim=rot_dim))


# The fused ops these stand in for, by their comfy_kitchen names (same signatures).
DROP_INS = {"rms_rope": rms_rope, "rms_rope1": rms_rope1, "rms_rope_split_half": rms_rope_split_half,
            "rms_rope_split_half1": rms_rope_split_half1}


def normed_and_rotated(x: torch.Tensor, freqs_cis: torch.Tensor, scale: torch.Tensor | None, epsilon: float, *,
                       split_half: bool, rot_dim: int = 0) -> torch.Tensor:
    head_dim = x.shape[-1]
    rot_dim = rot_dim or head_dim
    if rot_dim % 2 or rot_dim > head_dim or tuple(freqs_cis.shape[-3:]) != (rot_dim // 2, 2, 2):
        raise ValueError(f"rms_rope: frequencies of shape {tuple(freqs_cis.shape)} do not fit {rot_dim} rotated "
                         f"channels of a {head_dim}-channel head (expected (..., {rot_dim // 2}, 2, 2))")
    wide = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 at least (the kernels: fp32)
    normed = wide * torch.rsqrt(wide.square().mean(-1, keepdim=True) + epsilon)
    if scale is not None:
        normed = normed * scale.to(wide.dtype)
    compute = freqs_cis.dtype if freqs_cis.is_floating_point() else torch.float32
    normed = normed.to(x.dtype).to(compute)  # the kernels round the norm's output to x's dtype before rotating
    rotated = _rotated(normed[..., :rot_dim], _fitted(freqs_cis, x.shape[:-1]), split_half)
    if rot_dim < head_dim:
        rotated = torch.cat((rotated, normed[..., rot_dim:]), dim=-1)
    return rotated.to(x.dtype)


def _rotated(x: torch.Tensor, freqs: torch.Tensor, split_half: bool) -> torch.Tensor:
    """Each pair (a, b) of channels times its 2x2 matrix M: (M00·a + M01·b, M10·a + M11·b), back in x's layout."""
    half = x.shape[-1] // 2
    pairs = x.unflatten(-1, (2, half)).transpose(-1, -2) if split_half else x.unflatten(-1, (half, 2))
    first, second = pairs[..., :1], pairs[..., 1:]  # (..., pairs, 1) each, against the matrices' rows
    out = freqs[..., 0] * first + freqs[..., 1] * second  # (..., pairs, 2): row r of M applied to its pair
    return out.transpose(-1, -2).flatten(-2) if split_half else out.flatten(-2)


def _fitted(freqs: torch.Tensor, leading: torch.Size) -> torch.Tensor:
    """The frequency table cut to x's leading sizes where it is longer (a table made for a longer sequence), so it
    broadcasts (dimensions aligned from the right, as broadcasting does)."""
    table = freqs.shape[:-3]
    cut = [slice(None)] * len(table)
    for i in range(1, min(len(table), len(leading)) + 1):
        if table[-i] > leading[-i] > 1:
            cut[-i] = slice(0, leading[-i])
    return freqs[tuple(cut)] if any(c != slice(None) for c in cut) else freqs
