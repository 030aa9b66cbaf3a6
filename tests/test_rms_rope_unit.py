"""The PyTorch RMSNorm + RoPE (``training.rms_rope``) that training uses in place of ComfyUI 0.33's fused
``comfy_kitchen`` ops, which have no backward (issue 22): its math against independent formulations (a complex
rotation for interleaved pairs, rotate-half for split-half pairs, an einsum for any 2x2 matrices, torch's own
RMSNorm), its gradients, and its forward against the fused ops themselves where comfy_kitchen is importable (ComfyUI
0.33's dependency: run with ``PYTHONPATH=<0.33's packages>``; 0.3.75 has none, and that one test is skipped there)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training import rms_rope  # noqa: E402

pytestmark = pytest.mark.fast

B, L, H, D = 2, 6, 3, 16


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def angles(length: int, pairs: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(length, pairs, generator=gen(seed), dtype=torch.float64) * 6.0


def rotation_table(theta: torch.Tensor) -> torch.Tensor:
    """(..., pairs, 2, 2) rotation matrices [[cos, -sin], [sin, cos]], as ComfyUI's rope embedders build them."""
    cos, sin = theta.cos(), theta.sin()
    return torch.stack([cos, -sin, sin, cos], dim=-1).unflatten(-1, (2, 2))


def reference_norm(x: torch.Tensor, scale: torch.Tensor | None, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight=scale, eps=eps)


def complex_rotation(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE as a complex product: channels (2p, 2p+1) are one complex number, times e^(iθ_p)."""
    pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(theta), theta)).flatten(-2)


def rotate_half(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Split-half RoPE as GPT-NeoX / Llama write it: x·cos + rotate_half(x)·sin, the angles repeated per half."""
    cos, sin = torch.cat([theta.cos()] * 2, -1), torch.cat([theta.sin()] * 2, -1)
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], -1) * sin


def data(seed: int, *shape: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=dtype)


def test_interleaved_is_a_complex_rotation_of_the_rms_normed_head():
    q, k, scale = data(1, B, L, H, D), data(2, B, L, H, D), data(3, D)
    theta = angles(L, D // 2)
    freqs = rotation_table(theta)[None, :, None]  # (1, L, 1, pairs, 2, 2): one table for all heads (B, L, H, D)
    got_q, got_k = rms_rope.rms_rope(q, k, freqs, scale, None, 1e-6)
    t = theta[:, None]  # against (L, H, pairs)
    torch.testing.assert_close(got_q, complex_rotation(reference_norm(q, scale, 1e-6), t), rtol=0, atol=1e-12)
    torch.testing.assert_close(got_k, complex_rotation(reference_norm(k, scale, 1e-6), t), rtol=0, atol=1e-12)
    torch.testing.assert_close(rms_rope.rms_rope1(q, freqs, scale, 1e-6), got_q, rtol=0, atol=0)


def test_split_half_is_rotate_half_and_rot_dim_rotates_a_prefix():
    q, k, q_scale, k_scale = data(4, B, H, L, D), data(5, B, H, L, D), data(6, D), data(7, D)
    theta = angles(L, D // 2, seed=1)
    freqs = rotation_table(theta)[None, None]  # (1, 1, L, pairs, 2, 2) for (B, H, L, D)
    got_q, got_k = rms_rope.rms_rope_split_half(q, k, freqs, q_scale, k_scale, 1e-5)
    torch.testing.assert_close(got_q, rotate_half(reference_norm(q, q_scale, 1e-5), theta), rtol=0, atol=1e-12)
    torch.testing.assert_close(got_k, rotate_half(reference_norm(k, k_scale, 1e-5), theta), rtol=0, atol=1e-12)
    torch.testing.assert_close(rms_rope.rms_rope_split_half1(k, freqs, k_scale, 1e-5), got_k, rtol=0, atol=0)

    rot = D // 2  # partial rotary: the norm over the whole head, the rotation over its first rot channels
    partial = rotation_table(theta[:, : rot // 2])[None, None]
    got, _ = rms_rope.rms_rope_split_half(q, k, partial, q_scale, None, 1e-5, rot_dim=rot)
    normed = reference_norm(q, q_scale, 1e-5)
    torch.testing.assert_close(got[..., :rot], rotate_half(normed[..., :rot], theta[:, : rot // 2]), rtol=0, atol=1e-12)
    torch.testing.assert_close(got[..., rot:], normed[..., rot:], rtol=0, atol=0)


@pytest.mark.parametrize("split_half", [False, True])
def test_any_matrices_per_pair_and_a_longer_table_is_cut_to_the_sequence(split_half):
    x = data(8, B, H, L, D)
    matrices = data(9, 1, 1, L + 5, D // 2, 2, 2)  # not rotations; a table made for a longer sequence
    got = rms_rope.normed_and_rotated(x, matrices, None, 1e-6, split_half=split_half)
    normed = reference_norm(x, None, 1e-6)
    pairs = normed.unflatten(-1, (2, -1)).transpose(-1, -2) if split_half else normed.unflatten(-1, (-1, 2))
    out = torch.einsum("...pij,...pj->...pi", matrices[:, :, :L], pairs)
    want = out.transpose(-1, -2).flatten(-2) if split_half else out.flatten(-2)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_gradients_flow_and_match_finite_differences():
    q, k = data(10, 1, 3, 2, 8).requires_grad_(), data(11, 1, 3, 2, 8).requires_grad_()
    scale = data(12, 8).requires_grad_()
    freqs = rotation_table(angles(3, 4, seed=2))[None, :, None]
    assert torch.autograd.gradcheck(lambda a, b, s: rms_rope.rms_rope(a, b, freqs, s, None, 1e-6), (q, k, scale))
    assert torch.autograd.gradcheck(lambda a, b, s: rms_rope.rms_rope_split_half(a, b, freqs, s, s, 1e-6),
                                    (q, k, scale))


def test_half_precision_rounds_the_norm_then_rotates_in_the_tables_dtype():
    """The kernels' steps: the norm in fp32, its output in x's dtype, the rotation in the table's (fp32), the result
    in x's dtype."""
    x, scale = data(13, B, L, H, D, dtype=torch.bfloat16), data(14, D, dtype=torch.bfloat16)
    theta = angles(L, D // 2).float()
    freqs = rotation_table(theta)[None, :, None]
    got = rms_rope.rms_rope1(x, freqs, scale, 1e-6)
    normed = reference_norm(x.double(), scale.double(), 1e-6).to(torch.bfloat16).float()
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, complex_rotation(normed, theta[:, None]).to(torch.bfloat16), rtol=0, atol=0)


def test_a_table_that_does_not_fit_the_head_is_an_error_naming_both_shapes():
    with pytest.raises(ValueError, match=r"frequencies of shape \(1, 6, 1, 4, 2, 2\) do not fit 16 rotated"):
        rms_rope.rms_rope1(data(15, B, L, H, D), rotation_table(angles(L, 4))[None, :, None], None)


def outputs(result) -> tuple[torch.Tensor, ...]:
    return result if isinstance(result, tuple) else (result,)


def test_the_same_forward_as_comfy_kitchens_fused_ops():
    """Every drop-in against the fused op of its name (on this machine's backend: CUDA or Triton on a GPU, eager on a
    CPU) on the same inputs, both layouts ComfyUI uses, within 1e-5; the fused op itself has no backward."""
    kitchen = pytest.importorskip(
        "comfy_kitchen", reason="comfy_kitchen (ComfyUI 0.33's dependency) is not importable: put 0.33's packages on "
                                "PYTHONPATH to compare with the fused ops; the math tests above check the same "
                                "functions against independent references")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    theta = angles(L, D // 2, seed=3).float()
    layouts = {"BLHD": ((B, L, H, D), rotation_table(theta)[None, :, None]),
               "BHLD": ((B, H, L, D), rotation_table(theta)[None, None])}
    for layout, (shape, freqs) in layouts.items():
        q, k = data(16, *shape, dtype=torch.float32).to(device), data(17, *shape, dtype=torch.float32).to(device)
        q_scale, k_scale = data(18, D, dtype=torch.float32).to(device), data(19, D, dtype=torch.float32).to(device)
        freqs = freqs.to(device)
        calls = {"rms_rope": (q, k, freqs, q_scale, k_scale, 1e-6), "rms_rope1": (q, freqs, q_scale, 1e-6),
                 "rms_rope_split_half": (q, k, freqs, q_scale, None, 1e-6),
                 "rms_rope_split_half1": (k, freqs, k_scale, 1e-6)}
        assert set(calls) == set(rms_rope.DROP_INS)
        for name, args in calls.items():
            fused, ours = getattr(kitchen, name)(*args), rms_rope.DROP_INS[name](*args)
            for f, o in zip(outputs(fused), outputs(ours), strict=True):
                assert (f - o).abs().max().item() < 1e-5, f"{name}, {layout}"
    rot = D // 2  # partial rotary (split-half only)
    partial = rotation_table(theta[:, : rot // 2])[None, :, None].to(device)
    q, k = data(20, B, L, H, D, dtype=torch.float32).to(device), data(21, B, L, H, D, dtype=torch.float32).to(device)
    args = (q, k, partial, q_scale, k_scale, 1e-6, rot)
    for f, o in zip(kitchen.rms_rope_split_half(*args), rms_rope.rms_rope_split_half(*args)):
        assert (f - o).abs().max().item() < 1e-5, "rms_rope_split_half, rot_dim"
    with pytest.raises(RuntimeError, match="no autograd formula"):
        kitchen.rms_rope(q.requires_grad_(), k, freqs, q_scale, k_scale, 1e-6)[0].sum().backward()
