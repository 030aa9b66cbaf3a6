"""Training through model code that writes into tensors in place (ComfyUI's Flux, Chroma, HunyuanVideo and LTXV
blocks do): gradients must equal those of the same block written without in-place ops, with and without
checkpointing, with adapters attached. No ComfyUI, no server."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torch.utils.checkpoint  # noqa: E402
from torch import nn  # noqa: E402

from lora.adapter_set import AdapterSet  # noqa: E402
from lora.injection import attached  # noqa: E402
from training import checkpointing  # noqa: E402
from training.inplace_safe import CopyOnWrite, checkpoint, protected  # noqa: E402

pytestmark = pytest.mark.fast

D = 8


class InplaceBlock(nn.Module):
    """The in-place patterns of ComfyUI's blocks: ``x += f(norm(x))`` on the block's own input, ``addcmul_`` after a
    norm saved ``x``, ``+=`` into a slice (a view), and a chained ``torch.addcmul(y, y, s).add_(b)``.
    ``inplace=False`` is the same arithmetic without in-place ops: the reference."""

    def __init__(self, inplace: bool = True):
        super().__init__()
        self.inplace = inplace
        self.attn, self.ff, self.gate = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        h = F.layer_norm(x, (D,))
        gate = self.gate(vec)
        if self.inplace:
            x += self.attn(h)
            y = F.layer_norm(x, (D,))
            y = torch.addcmul(y, y, gate).add_(vec)
            x.addcmul_(self.ff(y), gate)
            x[:, :2] += 1.0
            return x
        x = x + self.attn(h)
        y = F.layer_norm(x, (D,))
        y = y + y * gate + vec
        x = x + self.ff(y) * gate
        return torch.cat([x[:, :2] + 1.0, x[:, 2:]], dim=1)


class Net(nn.Module):
    def __init__(self, inplace: bool):
        super().__init__()
        self.embed = nn.Linear(D, D)
        self.blocks = nn.ModuleList(InplaceBlock(inplace) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        vec = x.mean(0, keepdim=True)
        for block in self.blocks:
            h = block(h, vec)
        return h


def net(inplace: bool) -> Net:
    torch.manual_seed(0)
    return Net(inplace)


def gradients(model: nn.Module, params: list[nn.Parameter], run) -> torch.Tensor:
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(1))
    out = run(lambda: model(x))
    out.square().mean().backward()
    return torch.cat([p.grad.flatten() for p in params])


def plain(forward):
    return forward()


def guarded(forward):
    with protected(CopyOnWrite()):
        return forward()


def test_the_inplace_block_breaks_plain_autograd():
    """The case this module exists for: without protection, backward refuses."""
    model = net(True)
    with pytest.raises(RuntimeError, match="inplace operation"):
        gradients(model, list(model.parameters()), plain)


@pytest.mark.parametrize("with_checkpointing", [False, True])
def test_protected_gives_the_out_of_place_gradients(with_checkpointing):
    reference = net(False)
    want = gradients(reference, list(reference.parameters()), plain)
    model = net(True)
    with checkpointing.checkpointed(model, with_checkpointing) as count:
        assert count == (3 if with_checkpointing else 0)
        got = gradients(model, list(model.parameters()), guarded)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_torch_checkpoint_is_silently_wrong_on_inplace_blocks():
    """Why training/ has its own checkpoint: torch's recomputation reruns the block on overwritten values."""
    reference = net(False)
    want = gradients(reference, list(reference.parameters()), plain)
    model = net(True)
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(1))  # as in gradients()
    h, vec = model.embed(x), x.mean(0, keepdim=True)
    for block in model.blocks:  # the clone keeps the block's writes off the inputs torch keeps for recomputation
        h = torch.utils.checkpoint.checkpoint(lambda t, v, b=block: b(t.clone(), v), h, vec, use_reentrant=False)
    h.square().mean().backward()
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert not torch.allclose(got, want, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("algorithm,dora", [("LoRA", False), ("LoHa", False), ("LoKr", False), ("OFT", False),
                                            ("LoRA", True), ("LoHa", True)])
@pytest.mark.parametrize("with_checkpointing", [False, True])
def test_adapters_train_through_inplace_blocks(algorithm, dora, with_checkpointing):
    """Adapter hooks save the layer inputs that the block later overwrites: same adapter gradients as out of place."""
    grads = []
    for inplace in (False, True):
        model = net(inplace)
        adapters = AdapterSet.create(model, algorithm, 2, 0.0, torch.Generator().manual_seed(3), "", False, dora=dora)
        with torch.no_grad():  # non-zero up weights, so every adapter tensor gets a gradient
            for p in adapters.trainable():
                p.add_(0.1)
        with attached(model, adapters), checkpointing.checkpointed(model, with_checkpointing and inplace):
            grads.append(gradients(model, list(adapters.trainable()), guarded if inplace else plain))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_only_overwritten_saved_tensors_are_copied():
    """Out-of-place code costs no copies; each in-place write after a save costs one copy of what was saved."""
    for inplace, expect_copies in ((False, False), (True, True)):
        model = net(inplace)
        cow = CopyOnWrite()
        x = torch.randn(4, D)
        with protected(cow):
            out = model(x)
        out.sum().backward()
        assert (cow.copies > 0) == expect_copies


def test_checkpoint_recomputes_once_and_keeps_autocast():
    calls = []

    def block(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        calls.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return t @ w

    w = torch.randn(D, D, requires_grad=True)
    x = torch.randn(4, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = checkpoint(block, x, w)
    out.float().sum().backward()
    assert calls == [torch.bfloat16, torch.bfloat16], "the backward pass reruns the block once, under the same autocast"
    torch.testing.assert_close(w.grad, x.sum(0, keepdim=True).t().expand(D, D).bfloat16().float(), rtol=2e-2,
                               atol=2e-2)
