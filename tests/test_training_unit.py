"""Unit tests of the pure-PyTorch ``training`` package: checkpointing, data order, objectives, the loop, the data-set
file, latents of several streams. No ComfyUI and no server: tiny models on the CPU."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from lora.adapter_set import AdapterSet  # noqa: E402
from lora.injection import attached  # noqa: E402
from training import checkpointing, data, dataset_file, loop, objectives, optimizers  # noqa: E402
from training.flat_params import FlatParams  # noqa: E402
from training.streams import Layout, Streams, parts  # noqa: E402
from training.timesteps import TimestepSampling  # noqa: E402
from training.validation import Validation  # noqa: E402

pytestmark = pytest.mark.fast


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def init_module(module: nn.Module, seed: int) -> nn.Module:
    g = gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


# -- 4a. checkpointing ---------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x, scale=1.0):
        return x + scale * self.fc2(F.gelu(self.fc1(x)))


class Net(nn.Module):
    def __init__(self, d: int = 6, n: int = 3):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.body = nn.Module()
        self.body.blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.out = nn.Linear(d, d)

    def forward(self, x):
        h = self.inp(x)
        for b in self.body.blocks:
            h = b(h, scale=0.5)
        return self.out(h)


def grads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    model(x).square().sum().backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    out["<input>"] = x.grad.clone()
    return out


def test_repeated_blocks_finds_outermost_module_lists():
    net = Net()
    assert checkpointing.repeated_blocks(net) == list(net.body.blocks)
    outer = nn.Module()
    outer.stages = nn.ModuleList([nn.Sequential(nn.Linear(2, 2)), nn.ModuleList([nn.Linear(2, 2)])])
    assert checkpointing.repeated_blocks(outer) == list(outer.stages)


def test_checkpointed_same_gradients_and_recomputes():
    net = init_module(Net(), 0)
    x = torch.randn(4, 6, generator=gen(1))
    plain = grads(net, x)
    calls = []
    handle = net.body.blocks[1].fc1.register_forward_hook(lambda *a: calls.append(1))
    with checkpointing.checkpointed(net) as n:
        assert n == 3
        assert all("forward" in vars(b) for b in net.body.blocks)
        calls.clear()
        ckpt = grads(net, x)
        assert len(calls) == 2, "a checkpointed block runs again in the backward pass"
    handle.remove()
    assert set(ckpt) == set(plain)
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-6, atol=1e-6, msg=k)
    assert all("forward" not in vars(b) for b in net.body.blocks)
    calls.clear()


def test_checkpointed_with_lora_attached_same_gradients():
    net = init_module(Net(), 0)
    for p in net.parameters():
        p.requires_grad_(False)
    aset = AdapterSet.create(net, "LoRA", 2, 0.0, gen(2))
    with torch.no_grad():
        for p in aset.parameters():
            p.add_(torch.randn(p.shape, generator=gen(3)) * 0.1)
    x = torch.randn(4, 6, generator=gen(1))

    def adapter_grads():
        aset.zero_grad(set_to_none=True)
        net(x).square().sum().backward()
        return [p.grad.clone() for p in aset.parameters()]

    with attached(net, aset):
        plain = adapter_grads()
        with checkpointing.checkpointed(net):
            ckpt = adapter_grads()
    for a, b in zip(ckpt, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_checkpointed_removes_overrides_after_exception_and_respects_existing_ones():
    net = init_module(Net(), 0)
    own = net.body.blocks[0].forward = lambda x, scale=1.0: x  # someone else's per-instance override
    with pytest.raises(KeyError):
        with checkpointing.checkpointed(net) as n:
            assert n == 2
            raise KeyError("boom")
    assert net.body.blocks[0].forward is own
    assert all("forward" not in vars(b) for b in list(net.body.blocks)[1:])
    with checkpointing.checkpointed(net, enabled=False) as n:
        assert n == 0
        assert all("forward" not in vars(b) for b in list(net.body.blocks)[1:])


def test_checkpointed_leaves_global_rng_alone():
    net = init_module(Net(), 0)
    x = torch.randn(2, 6, generator=gen(1))
    state = torch.get_rng_state()
    with checkpointing.checkpointed(net):
        net(x).sum().backward()
    assert torch.equal(torch.get_rng_state(), state)


# -- 4b. data ------------------------------------------------------------------------------------------------------
def mixed_samples() -> list[torch.Tensor]:
    g = gen(0)
    shapes = [(4, 8, 8), (4, 6, 10), (4, 8, 8), (4, 2, 6, 10), (4, 6, 10), (4, 8, 8), (4, 8, 8)]
    return [torch.randn(s, generator=g) for s in shapes]


def test_group_by_shape_groups_mixed_shapes():
    samples = mixed_samples()
    groups = data.group_by_shape(samples)
    assert [g.sample_ids for g in groups] == [[0, 2, 5, 6], [1, 4], [3]]
    for g in groups:
        assert g.all().shape[0] == len(g.sample_ids) and g.shape == tuple(samples[g.sample_ids[0]].shape)
        for row, i in enumerate(g.sample_ids):
            assert torch.equal(g.all()[row], samples[i])
    assert data.epoch_micro_batches(groups, 3) == 2 + 1 + 1


def test_group_by_shape_rejects_an_empty_data_set():
    with pytest.raises(data.DataError, match="empty"):
        data.group_by_shape([])
    assert issubclass(data.DataError, ValueError)


def take_epochs(groups, batch_size, seed, epochs):
    it = data.micro_batches(groups, batch_size, gen(seed))
    per_epoch = data.epoch_micro_batches(groups, batch_size)
    return [[next(it) for _ in range(per_epoch)] for _ in range(epochs)]


@pytest.mark.parametrize("batch_size", [1, 2, 3, 5])
def test_micro_batches_cover_each_epoch_once_never_mix_shapes(batch_size):
    samples = mixed_samples()
    groups = data.group_by_shape(samples)
    epochs = take_epochs(groups, batch_size, seed=3, epochs=4)
    orders = []
    for epoch in epochs:
        seen = []
        for group, rows in epoch:
            assert any(group is g for g in groups)
            assert 1 <= len(rows) <= batch_size
            batch = group.rows(rows)  # stacking works: one shape per batch
            ids = [group.sample_ids[r] for r in rows]
            assert all(samples[i].shape == batch.shape[1:] for i in ids)
            seen += ids
        assert sorted(seen) == list(range(len(samples)))
        orders.append(seen)
    if batch_size == 1:
        assert len({tuple(o) for o in orders}) > 1, "epochs should be shuffled differently"


def test_micro_batches_shuffle_rows_and_batches():
    samples = [torch.full((2, 2), float(i)) for i in range(6)] + [torch.full((3,), float(i)) for i in range(2)]
    groups = data.group_by_shape(samples)
    epochs = take_epochs(groups, 2, seed=0, epochs=20)
    # rows are shuffled within a group: the pairs of the 6-sample group change from epoch to epoch
    pairs = {frozenset(group.sample_ids[r] for r in rows) for e in epochs for group, rows in e if len(group.sample_ids) == 6}
    assert len(pairs) > 3
    # batches are shuffled across groups: the 2-sample group's batch is not always at the same place
    places = {next(j for j, (group, _) in enumerate(e) if len(group.sample_ids) == 2) for e in epochs}
    assert len(places) > 1


def test_micro_batches_deterministic_per_seed():
    groups = data.group_by_shape(mixed_samples())

    def flat(seed):
        return [(id(g), tuple(r)) for e in take_epochs(groups, 2, seed, 3) for g, r in e]

    assert flat(5) == flat(5)
    assert flat(5) != flat(6)
    state = torch.get_rng_state()
    flat(7)
    assert torch.equal(torch.get_rng_state(), state)


# -- 4c. objectives ------------------------------------------------------------------------------------------------
class EpsSchedule:
    """x_t = x0 + σ·ε, x̂0 = x_t − σ·out: b(σ) = −σ."""

    def __init__(self, sigmas=(0.5, 1.0, 2.0, 4.0)):
        self.sigmas = torch.tensor(sigmas)

    @staticmethod
    def _b(sigma, like):
        return sigma.reshape(-1, *([1] * (like.ndim - 1))).to(like)

    def noisy(self, sigma, noise, x0):
        return x0 + self._b(sigma, x0) * noise

    def output_scale(self, sigma, like):
        return -self._b(sigma, like)

    def denoised(self, x_t, sigma, out):
        return x_t - self._b(sigma, x_t) * out


class FlowSchedule(EpsSchedule):
    """x_t = σ·ε + (1−σ)·x0, x̂0 = x_t − σ·out: b(σ) = −σ, target ε − x0."""

    def __init__(self):
        super().__init__((0.1, 0.4, 0.7, 1.0))

    def noisy(self, sigma, noise, x0):
        s = self._b(sigma, x0)
        return s * noise + (1 - s) * x0


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_native_error_zero_for_perfect_output_and_native_scale(kind):
    g = gen(0)
    sched = EpsSchedule() if kind == "eps" else FlowSchedule()
    x0 = torch.randn(4, 3, 5, 5, generator=g)
    eps = torch.randn(4, 3, 5, 5, generator=g)
    sigma = sched.sigmas
    x_t = sched.noisy(sigma, eps, x0)
    target = eps if kind == "eps" else eps - x0
    scale = sched.output_scale(sigma, x0)
    err = objectives.native_error(sched.denoised(x_t, sigma, target), x0, scale)
    assert err.dtype == torch.float32
    assert err.abs().max() < 1e-5
    # off by d in the native output space: the error is exactly d, whatever σ
    d = torch.randn(4, 3, 5, 5, generator=g)
    err = objectives.native_error(sched.denoised(x_t, sigma, target + d), x0, scale)
    torch.testing.assert_close(err, d, rtol=1e-4, atol=1e-4)
    # bf16 inputs are computed in fp32
    err16 = objectives.native_error(x0.bfloat16(), x0.bfloat16(), scale.bfloat16())
    assert err16.dtype == torch.float32 and not err16.any()


def test_per_sample_loss_values():
    err = torch.tensor([[0.5, -2.0, 0.0, 1.0], [3.0, 0.0, -0.25, 0.0]]).reshape(2, 2, 2)
    mse = objectives.per_sample_loss(err, "MSE")
    l1 = objectives.per_sample_loss(err, "L1")
    huber = objectives.per_sample_loss(err, "Huber")
    smooth = objectives.per_sample_loss(err, "SmoothL1")
    torch.testing.assert_close(mse, torch.tensor([(0.25 + 4 + 0 + 1) / 4, (9 + 0 + 0.0625 + 0) / 4]))
    torch.testing.assert_close(l1, torch.tensor([(0.5 + 2 + 0 + 1) / 4, (3 + 0 + 0.25 + 0) / 4]))
    # delta = beta = 1: 0.5·e² below 1, |e| − 0.5 above
    expected_h = torch.tensor([(0.125 + 1.5 + 0 + 0.5) / 4, (2.5 + 0 + 0.03125 + 0) / 4])
    torch.testing.assert_close(huber, expected_h)
    torch.testing.assert_close(smooth, expected_h)
    assert mse.shape == (2,)
    assert set(objectives.LOSSES) == {"MSE", "L1", "Huber", "SmoothL1"}
    with pytest.raises(ValueError, match="loss_function"):
        objectives.per_sample_loss(err, "L2")


def test_flat_params_train_exactly_like_separate_tensors():
    """One AdamW over the flat buffer gives the same values as AdamW over the separate tensors, step for step, and the
    parameters stay the module's own objects."""
    def make():
        net = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3, bias=False))
        return init_module(net, 0)

    x = torch.randn(4, 5, generator=gen(1))
    ref, net = make(), make()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.05, weight_decay=0.01)
    ids = [id(p) for p in net.parameters()]
    flat = FlatParams(list(net.parameters()) + [net[1].weight])  # a repeated tensor is kept once
    assert [id(p) for p in net.parameters()] == ids and len(flat.tensors) == 1
    assert flat.tensors[0].numel() == sum(p.numel() for p in net.parameters())
    opt = torch.optim.AdamW(flat.tensors, lr=0.05, weight_decay=0.01)
    for _ in range(3):
        for model, o, zero in ((ref, ref_opt, lambda: ref_opt.zero_grad()), (net, opt, flat.zero_grad)):
            model(x).pow(2).mean().backward()
            o.step()
            zero()
    for a, b in zip(ref.parameters(), net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert net[0].weight.untyped_storage().data_ptr() == flat.tensors[0].untyped_storage().data_ptr()
    flat.release_grads()
    assert all(p.grad is None for p in net.parameters()) and flat.tensors[0].grad is None


def test_optimizers_by_name():
    p = [nn.Parameter(torch.zeros(2))]
    for name in optimizers.OPTIMIZERS:
        opt = optimizers.build(name, p, 0.1)
        assert opt.param_groups[0]["lr"] == 0.1
    assert isinstance(optimizers.build("AdamW", p, 0.1), torch.optim.AdamW)
    with pytest.raises(ValueError, match="optimizer"):
        optimizers.build("Lion", p, 0.1)


# -- 5. the loop ---------------------------------------------------------------------------------------------------
D = 8


def toy_problem(seed: int = 0, algo: str = "LoRA"):
    """A frozen linear ε-predictor with an adapter, a few latents of two shapes, an EPS schedule."""
    net = nn.Linear(D, D)
    net.requires_grad_(False)
    init_module(net, 100)
    aset = AdapterSet.create(net, algo, 4, 0.0, gen(seed))
    g = gen(200)
    base = torch.randn(D, generator=g)
    samples = [base + 0.1 * torch.randn(3, D, generator=g) for _ in range(4)]
    samples += [base + 0.1 * torch.randn(2, D, generator=g) for _ in range(2)]
    groups = data.group_by_shape(samples)
    sched = EpsSchedule((0.25, 0.5, 1.0, 2.0))

    def denoise(x_t, sigma, ids):
        assert len(ids) == x_t.shape[0]
        return sched.denoised(x_t, sigma, net(x_t))

    return net, aset, groups, sched, denoise


def eval_loss(aset, net, groups, sched, denoise) -> float:
    """The loss on fixed noise and all sigmas: comparable before and after training."""
    g = gen(999)
    total = 0.0
    with torch.no_grad(), attached(net, aset):
        for group in groups:
            for sigma in sched.sigmas:
                x0 = group.all()
                noise = torch.randn(x0.shape, generator=g)
                s = sigma.repeat(len(x0))
                total += float(loop.sample_loss(denoise, sched, x0, group.sample_ids, noise, s, "MSE").mean())
    return total


def run_train(seed=0, steps=30, callbacks=loop.Callbacks(), algo="LoRA", **settings):
    net, aset, groups, sched, denoise = toy_problem(seed, algo)
    kw = dict(steps=steps, batch_size=2, learning_rate=0.05, optimizer="Adam")
    kw.update(settings)
    with attached(net, aset):
        result = loop.train(aset.trainable(), groups, denoise, sched, loop.Settings(**kw), gen(seed), callbacks)
    return result, aset, (net, groups, sched, denoise)


def params_of(aset) -> list[torch.Tensor]:
    return [p.detach().clone() for p in aset.parameters()]


@pytest.mark.parametrize("algo", ["LoRA", "OFT"])
def test_train_reduces_loss(algo):
    net, aset, groups, sched, denoise = toy_problem(0, algo)
    before = eval_loss(aset, net, groups, sched, denoise)
    reports = []
    with attached(net, aset):
        result = loop.train(aset.trainable(), groups, denoise, sched,
                            loop.Settings(steps=30, batch_size=2, learning_rate=0.05, optimizer="Adam"), gen(0),
                            loop.Callbacks(step=reports.append))
    after = eval_loss(aset, net, groups, sched, denoise)
    assert len(result.losses) == 30 and result.steps_done == 30 and not result.cancelled
    assert all(math.isfinite(v) for v in result.losses)
    assert after < 0.8 * before, (before, after)
    if algo == "LoRA":  # the per-step losses are noisy (random σ and ε); OFT learns too slowly here to see it in them
        assert sum(result.losses[-10:]) < sum(result.losses[:10])
    assert [r.step for r in reports] == list(range(1, 31))
    assert all(r.steps == 30 for r in reports) and reports[-1].eta_s == 0
    assert [r.loss for r in reports] == result.losses


def test_train_grad_accumulation_calls_micro_step_per_micro_batch():
    count = [0]

    def micro():
        count[0] += 1

    result, _, _ = run_train(steps=4, grad_accumulation_steps=3, callbacks=loop.Callbacks(micro_step=micro))
    assert count[0] == 4 * 3
    assert len(result.losses) == 4


def test_train_grad_accumulation_averages_micro_batch_gradients():
    """With SGD at lr 1, one step over 2 accumulated micro-batches moves the parameters by exactly minus the mean of
    the two micro-batch gradients, replayed here by hand from the same generator."""
    net, aset, groups, sched, denoise = toy_problem(0)
    with torch.no_grad():
        for p in aset.parameters():
            p.add_(torch.randn(p.shape, generator=gen(1)) * 0.1)
    start = params_of(aset)
    with attached(net, aset):
        loop.train(aset.trainable(), groups, denoise, sched,
                   loop.Settings(steps=1, batch_size=1, grad_accumulation_steps=2, learning_rate=1.0, optimizer="SGD"),
                   gen(5))
    trained = params_of(aset)
    # replay the same draws with the same generator, by hand
    with torch.no_grad():
        for p, v in zip(aset.parameters(), start):
            p.copy_(v)
    g = gen(5)
    batches = data.micro_batches(groups, 1, g)
    aset.zero_grad(set_to_none=True)
    with attached(net, aset):
        for _ in range(2):
            group, rows = next(batches)
            x0 = group.rows(rows)
            noise = torch.randn(x0.shape, generator=g)
            sigma = TimestepSampling().sigmas(sched, len(rows), g)
            loss = loop.sample_loss(denoise, sched, x0, [group.sample_ids[r] for r in rows], noise, sigma, "MSE")
            (loss.mean() / 2).backward()
    for p, s, t in zip(aset.parameters(), start, trained):
        torch.testing.assert_close(t, s - p.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cancel_after,accum,expect_steps", [(0, 1, 0), (3, 1, 3), (5, 2, 2), (4, 2, 2), (7, 3, 2)])
def test_train_cancel_stops_at_once_keeping_finished_steps(cancel_after, accum, expect_steps):
    count = [0]

    def micro():
        count[0] += 1

    cb = loop.Callbacks(cancelled=lambda: count[0] >= cancel_after, micro_step=micro)
    result, aset, _ = run_train(seed=0, steps=10, grad_accumulation_steps=accum, callbacks=cb)
    assert result.cancelled
    assert count[0] == cancel_after, "no micro-step may run after the cancel"
    assert len(result.losses) == expect_steps
    assert all(p.grad is None for p in aset.parameters()), "half-accumulated gradients are dropped"
    # the parameters are those of a run of exactly the finished steps
    reference, ref_set, _ = run_train(seed=0, steps=expect_steps, grad_accumulation_steps=accum)
    assert result.losses == reference.losses
    assert all(torch.equal(a, b) for a, b in zip(params_of(aset), params_of(ref_set)))


def test_train_cancel_exception_from_micro_step_callback():
    class Interrupted(Exception):
        pass

    count = [0]

    def micro():
        count[0] += 1
        if count[0] == 3:
            raise Interrupted()

    cb = loop.Callbacks(micro_step=micro, cancel_exceptions=(Interrupted,))
    result, aset, _ = run_train(steps=10, grad_accumulation_steps=2, callbacks=cb)
    assert result.cancelled and len(result.losses) == 1
    # other exceptions propagate
    with pytest.raises(ZeroDivisionError):
        run_train(steps=2, callbacks=loop.Callbacks(micro_step=lambda: 1 / 0))


class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradients are not (e.g. a bf16 overflow in backward)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


def poisoned(denoise, bad_calls: set[int], kind: str):
    """``denoise`` whose output on the given (0-based) calls has a NaN/inf loss or NaN gradients."""
    calls = [0]

    def wrapped(x_t, sigma, ids):
        out = denoise(x_t, sigma, ids)
        calls[0] += 1
        if calls[0] - 1 not in bad_calls:
            return out
        if kind == "grad":
            return _NanGradient.apply(out)
        return out + float(kind)  # "nan" or "inf"

    return wrapped


@pytest.mark.parametrize("kind", ["nan", "inf", "grad"])
def test_a_non_finite_step_is_skipped_and_never_reaches_the_weights(kind):
    net, aset, groups, sched, denoise = toy_problem(0)
    snapshots, reports = {}, []

    def on_step(report):
        reports.append(report)
        snapshots[report.step] = params_of(aset)

    with attached(net, aset):
        result = loop.train(aset.trainable(), groups, poisoned(denoise, {4, 5}, kind), sched,
                            loop.Settings(steps=8, batch_size=2, grad_accumulation_steps=2, learning_rate=0.05,
                                          optimizer="AdamW"), gen(0), loop.Callbacks(step=on_step))
    assert result.skipped == [3] and result.steps_done == 7 and not result.diverged
    assert all(math.isfinite(v) for v in result.losses)
    assert all(torch.equal(a, b) for a, b in zip(snapshots[2], snapshots[3])), "a skipped step leaves the weights"
    assert all(torch.isfinite(p).all() for p in aset.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[3], snapshots[4])), "training goes on after it"
    assert [(r.step, r.skipped, r.loss is None) for r in reports[1:4]] == [(2, False, False), (3, True, True),
                                                                         (4, False, False)]


def test_non_finite_steps_in_a_row_stop_the_run_keeping_the_last_finite_weights():
    net, aset, groups, sched, denoise = toy_problem(0)
    snapshots = {}
    every_call_from_the_third = set(range(2, 1000))
    with attached(net, aset):
        result = loop.train(aset.trainable(), groups, poisoned(denoise, every_call_from_the_third, "nan"), sched,
                            loop.Settings(steps=30, batch_size=2, learning_rate=0.05), gen(0),
                            loop.Callbacks(step=lambda r: snapshots.setdefault(r.step, params_of(aset))))
    assert result.diverged and not result.cancelled
    assert result.steps_done == 2 and result.skipped == list(range(3, 3 + loop.MAX_NON_FINITE_IN_A_ROW))
    assert max(snapshots) == 2 + loop.MAX_NON_FINITE_IN_A_ROW, "it stops right after the last one in a row"
    assert all(torch.equal(a, b) for a, b in zip(snapshots[2], params_of(aset)))
    assert all(p.grad is None for p in aset.parameters())


def test_train_is_deterministic_per_seed_and_leaves_global_rng():
    problems = {name: toy_problem(seed) for name, seed in (("a", 3), ("b", 3), ("c", 4))}  # nn.Linear uses the global RNG
    state = torch.get_rng_state()
    results = {}
    for name, (net, aset, groups, sched, denoise) in problems.items():
        seed = 3 if name != "c" else 4
        with attached(net, aset):
            results[name] = loop.train(aset.trainable(), groups, denoise, sched,
                                       loop.Settings(steps=8, batch_size=2, learning_rate=0.05), gen(seed))
        assert torch.equal(torch.get_rng_state(), state), "training must not draw from the global RNG"
    pa, pb, pc = (params_of(problems[n][1]) for n in "abc")
    assert results["a"].losses == results["b"].losses
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert any(not torch.equal(x, y) for x, y in zip(pa, pc))
    assert results["a"].losses != results["c"].losses


def test_train_each_sample_gets_its_own_ids():
    """The denoiser receives the data-set index of every row it is given (the caption to use), and each row's x0 is
    that sample's latent."""
    net, aset, groups, _, _ = toy_problem(0)
    latents_by_id = {i: g.all()[r] for g in groups for r, i in enumerate(g.sample_ids)}
    seen = []

    class Recording(EpsSchedule):
        def noisy(self, sigma, noise, x0):
            self.last_x0 = x0
            return super().noisy(sigma, noise, x0)

    sched = Recording()

    def denoise(x_t, sigma, ids):
        for row, i in enumerate(ids):
            assert torch.equal(sched.last_x0[row], latents_by_id[i])
        seen.extend(ids)
        return sched.denoised(x_t, sigma, net(x_t))

    with attached(net, aset):
        loop.train(aset.trainable(), groups, denoise, sched, loop.Settings(steps=6, batch_size=2), gen(0))
    # 6 samples in groups of 4 and 2, batch size 2: 3 micro-batches an epoch, so 6 steps are 2 whole epochs
    assert sorted(seen) == sorted(list(range(len(latents_by_id))) * 2)


def test_uniform_sigmas_come_from_the_table():
    sched = EpsSchedule((0.1, 0.2, 0.3))
    s = TimestepSampling().sigmas(sched, 200, gen(0))
    assert s.shape == (200,)
    assert set(s.tolist()) <= set(sched.sigmas.tolist()) and len(set(s.tolist())) == 3


# -- 6. data-set file ----------------------------------------------------------------------------------------------
def test_dataset_pack_unpack_round_trip(tmp_path):
    import safetensors.torch

    g = gen(0)
    samples = [torch.randn(4, 8, 8, generator=g), torch.randn(4, 6, 10, generator=g)]
    captions = [
        [torch.randn(1, 7, 16, generator=g), {"pooled_output": torch.randn(1, 16, generator=g), "guidance": 3.5,
                                              "tags": ["a", "b"], "meta": {"k": None, "n": 2}}],
        [torch.randn(1, 5, 16, generator=g), {"not_json": object()}],
    ]
    tensors, metadata = dataset_file.pack(samples, captions)
    assert all(isinstance(v, str) for v in metadata.values())
    path = tmp_path / "ds.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    with safetensors.safe_open(str(path), "pt") as f:
        loaded_meta = f.metadata()
    s2, c2 = dataset_file.unpack(safetensors.torch.load_file(str(path)), loaded_meta, "ds")
    assert len(s2) == 2 and len(c2) == 2
    for a, b in zip(s2, samples):
        assert torch.equal(a, b)
    assert torch.equal(c2[0][0], captions[0][0]) and torch.equal(c2[1][0], captions[1][0])
    assert set(c2[0][1]) == {"pooled_output", "guidance", "tags", "meta"}
    assert torch.equal(c2[0][1]["pooled_output"], captions[0][1]["pooled_output"])
    assert c2[0][1]["guidance"] == 3.5 and c2[0][1]["tags"] == ["a", "b"] and c2[0][1]["meta"] == {"k": None, "n": 2}
    assert c2[1][1] == {}  # a value that is neither tensor nor JSON is dropped (with a warning)


@pytest.mark.parametrize("manifest", [
    None, "not json", "[]", "null", "5", json.dumps({"format": "something/else", "captions": []}),
    json.dumps({"format": dataset_file.FORMAT}), json.dumps({"format": dataset_file.FORMAT, "captions": [5]}),
    json.dumps({"format": dataset_file.FORMAT, "captions": [{"tensors": [], "values": {}}]}),  # no latent.0
    json.dumps({"format": dataset_file.FORMAT, "captions": [{"tensors": ["missing"], "values": {}}]}),
])
def test_dataset_unpack_rejects_broken_manifest(manifest):
    tensors = {"latent.1": torch.zeros(1)}
    metadata = {} if manifest is None else {"manifest": manifest}
    with pytest.raises(ValueError, match="'my_set'"):
        dataset_file.unpack(tensors, metadata, "my_set")


# -- latents of several streams (e.g. LTX-2's video + audio), packed as ComfyUI's samplers pack them ---------------
VIDEO, AUDIO = (4, 2, 3, 3), (2, 5, 4)  # one sample's streams (C, T, H, W) and (C, T, F)


def pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Batches of each stream as one (n, 1, N) row each, the layout of ComfyUI's samplers."""
    return torch.cat([t.reshape(t.shape[0], 1, -1) for t in tensors], dim=-1)


def test_a_sample_of_streams_reports_its_first_stream_and_its_parts():
    video, audio = torch.zeros(VIDEO), torch.zeros(AUDIO)
    sample = Streams([video, audio])
    assert sample.shape == video.shape, "the first stream's shape, as ComfyUI's NestedTensor reports it"
    assert sample.shapes == (VIDEO, AUDIO)
    assert parts(sample) == (video, audio) and parts(video) == (video,)
    with pytest.raises(ValueError):
        Streams([])


def test_noise_is_drawn_per_stream_with_its_own_channel_offsets_then_packed():
    layout = Layout((VIDEO, AUDIO), pack)
    sampling = TimestepSampling(noise_offset=10.0)  # large: each channel's offset dominates its noise
    noise = layout.noise(3, sampling.noise, gen(4))
    assert noise.shape == (3, 1, layout.size)
    g = gen(4)
    video, audio = sampling.noise((3, *VIDEO), g), sampling.noise((3, *AUDIO), g)
    assert torch.equal(noise, pack([video, audio])), "stream by stream, in stream order, from one generator"
    got_audio = noise[:, 0, math.prod(VIDEO):].reshape(3, *AUDIO)
    spread = got_audio.flatten(2).std(-1).max()  # within a channel: the unit noise
    between = got_audio.flatten(2).mean(-1).std()  # between the audio stream's channels: their own offsets
    assert spread < 3 < between


def test_groups_keep_different_streams_apart_even_at_one_packed_length():
    a, b = Layout(((2, 3), (1, 4)), pack), Layout(((1, 6), (1, 4)), pack)  # both pack into (1, 10)
    shapes = [(1, 10), (1, 10), (1, 10), (1, 10)]
    groups = data.groups_of(shapes, lambda ids: torch.zeros(len(ids), 1, 10), [a, b, a, None])
    assert [(g.sample_ids, g.layout) for g in groups] == [([0, 2], a), ([1], b), ([3], None)]
    with pytest.raises(ValueError):  # one layout per sample
        data.groups_of(shapes, lambda ids: None, [a])


def test_a_plain_group_draws_its_noise_as_before():
    group = data.groups_of([(3, 4, 4)], lambda ids: torch.zeros(len(ids), 3, 4, 4))[0]
    assert torch.equal(group.noise(2, lambda s, g: torch.randn(s, generator=g), gen(1)),
                       torch.randn((2, 3, 4, 4), generator=gen(1)))
    validation = Validation([group], EpsSchedule((0.25, 0.5, 1.0, 2.0)), seed=5, points=4)
    assert torch.equal(validation.noise[0], torch.randn((4, 1, 3, 4, 4), generator=gen(5)))


def streams_problem():
    """Four clips of video + audio streams, packed rows in the model's space; a frozen linear predictor over the
    packed row, with an adapter."""
    layout = Layout((VIDEO, AUDIO), pack)
    g = gen(200)
    rows = pack([torch.randn(4, *VIDEO, generator=g), torch.randn(4, *AUDIO, generator=g)])
    groups = data.groups_of([(1, layout.size)] * 4, lambda ids: rows[ids], [layout] * 4)
    net = nn.Linear(layout.size, layout.size)
    net.requires_grad_(False)
    with torch.no_grad():
        net.weight.copy_(torch.randn(net.weight.shape, generator=gen(100)) * 0.02)
    return net, AdapterSet.create(net, "LoRA", 4, 0.0, gen(0)), groups


def test_the_loop_trains_on_packed_streams_noised_stream_by_stream():
    net, adapters, groups = streams_problem()
    schedule = EpsSchedule((0.25, 0.5, 1.0, 2.0))
    sampling = TimestepSampling(noise_offset=0.1)
    seen = []

    def denoise(x_t, sigma, ids):
        seen.append(x_t.detach().clone())
        return schedule.denoised(x_t, sigma, net(x_t))

    settings = loop.Settings(steps=6, batch_size=2, learning_rate=0.02, optimizer="Adam", timesteps=sampling)
    with attached(net, adapters):
        result = loop.train(adapters.trainable(), groups, denoise, schedule, settings, gen(3))
    assert result.steps_done == 6 and all(math.isfinite(v) for v in result.losses)
    assert all(x.shape == (2, 1, groups[0].layout.size) for x in seen), "the model gets the packed rows"
    # the first micro-batch replayed by hand: its noise is each stream's, packed
    g = gen(3)
    group, rows = next(data.micro_batches(groups, 2, g))
    noise = group.layout.noise(len(rows), sampling.noise, g)
    sigma = sampling.sigmas(schedule, len(rows), g, (len(rows), *group.shape))
    torch.testing.assert_close(seen[0], schedule.noisy(sigma, noise, group.rows(rows)))
