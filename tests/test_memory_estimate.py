"""The pre-run memory estimate (issue 23): its arithmetic, its profile of a forward on fake tensors, and its agreement
(within ±15 %) with the fake-tensor measurement of a whole training step (tools/fake_step.py, what
benchmarks/real_size.py runs) for the tiny families and for real-size configurations."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import harness

from training import memory_estimate as me

TOLERANCE = 0.15
GiB = 1024 ** 3


def _plan(**changes) -> me.Plan:
    profile = me.ActivationProfile(outside=100, blocks=1000, block_inputs=40, largest_block=300, largest_tensor=50)
    return dataclasses.replace(me.Plan(weight_bytes=10_000, trained_values=100, optimizer="AdamW", batch_size=2,
                                       checkpointing=False, activations=profile), **changes)


@pytest.mark.fast
def test_estimate_adds_up_the_components():
    est = me.estimate(_plan())
    assert (est.weights, est.adapters, est.gradients, est.optimizer) == (10_000, 400, 400, 800)
    assert est.activations == 2 * (100 + 1000 + 2 * 50)
    on = me.estimate(_plan(checkpointing=True))
    assert on.activations == 2 * (100 + 40 + 300 + 2 * 50) < est.activations
    assert me.estimate(_plan(optimizer="SGD")).optimizer == 0
    assert "GiB (weights" in est.describe()


@pytest.mark.fast
def test_settings_that_fit_names_only_changes_under_the_limit():
    plan = _plan(weight_bytes=1000)
    full = me.estimate(plan).total
    on = me.estimate(dataclasses.replace(plan, checkpointing=True)).total
    fits = me.settings_that_fit(plan, on, fp8_weight_bytes=500)
    assert "gradient_checkpointing on" in fits
    assert me.settings_that_fit(plan, full - 1, fp8_weight_bytes=500)  # something fits just under
    assert me.settings_that_fit(plan, 10) == []  # nothing makes it fit


@pytest.mark.fast
def test_profile_counts_what_the_graph_keeps_and_splits_blocks():
    blocks = nn.ModuleList([nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)) for _ in range(3)])
    blocks.requires_grad_(False)
    head = nn.Linear(64, 8)

    def profile(rows: int) -> me.ActivationProfile:
        def forward():
            x = torch.randn(rows, 64).requires_grad_(True)
            for b in blocks:
                x = b(x)
            return head(x).sum()

        with me.fake_tensors():
            return me.profile_activations(forward, list(blocks))

    one, two = profile(32), profile(64)
    # each block keeps the GELU's input (rows x 256 fp32) and its output, the next block's input (rows x 64); the
    # frozen second linear needs no input for a weight gradient
    assert one.largest_block == 32 * 256 * 4 + 32 * 64 * 4 and one.blocks == 3 * one.largest_block
    # activations only: twice the rows, exactly twice the bytes (weights, which do not grow, are not counted)
    assert (two.blocks, two.block_inputs, two.largest_block) == (2 * one.blocks, 2 * one.block_inputs,
                                                                2 * one.largest_block)
    assert one.block_inputs == 3 * 32 * 64 * 4
    est_off = me.estimate(me.Plan(0, 0, "SGD", 1, False, one)).activations
    est_on = me.estimate(me.Plan(0, 0, "SGD", 1, True, one)).activations
    assert est_on < est_off


def _agreement(case, checkpointing: bool) -> tuple[float, float]:
    import fake_step

    settings = fake_step.Settings(checkpointing=checkpointing)
    measured = fake_step.measure(case, settings, flops=False)
    assert not measured.error, measured.error
    return fake_step.estimate(case, settings).total, measured.peak


def _families():
    import family_models

    return [f for f in family_models.FAMILIES if not f.untestable]


@pytest.mark.slow("a fake-tensor training step and a profile of every tiny family (~10-30 s each)")
@pytest.mark.parametrize("checkpointing", [True, False], ids=["ckpt", "no-ckpt"])
@pytest.mark.parametrize("family", _families(), ids=lambda f: f.name)
def test_estimate_within_15_percent_of_the_fake_step_for_every_tiny_family(family, checkpointing):
    harness.load_pack()  # ComfyUI importable, the pack as ComfyUI loads it (what fake_step drives)
    import fake_step
    import family_models

    try:
        family_models.build(family)
    except LookupError as e:  # a family of a newer ComfyUI than the one running: it is not in this matrix
        pytest.skip(str(e))
    case = fake_step.family_case(family)
    try:
        with fake_step.fake_mode():
            fake_step.build(case, "bf16")
    except RuntimeError as e:  # ComfyUI computes this model's set-up from real values (numpy): no fake twin
        pytest.skip(f"{family.name} cannot be built on fake tensors ({e}); the node estimates it from its real model")
    estimated, measured = _agreement(case, checkpointing)
    assert abs(estimated / measured - 1) <= TOLERANCE, (estimated, measured)


@pytest.mark.slow("real-size models on fake tensors: a Flux dev and an SDXL step (~2-4 min each on 2 cores)")
@pytest.mark.parametrize("name,base", [("flux_dev", "fp8"), ("sdxl", "bf16")])
def test_estimate_within_15_percent_at_real_size(name, base):
    harness.load_pack()
    import fake_step
    import real_size_models

    case = real_size_models.BY_NAME[name]
    settings = fake_step.Settings(base=base, checkpointing=True)
    measured = fake_step.measure(case, settings, flops=False)
    assert not measured.error, measured.error
    estimated = fake_step.estimate(case, settings).total
    assert abs(estimated / measured.peak - 1) <= TOLERANCE, (estimated / GiB, measured.peak / GiB)
