"""The peak memory of a training run, known before its first step (issue 23).

Two parts, both pure PyTorch:

- ``profile_activations`` runs ONE forward of the model (batch 1) under ``FakeTensorMode``: fake tensors have shapes
  and dtypes but no storage, so this costs no memory and a fraction of a step's time. ``LiveBytes`` counts what is
  still alive when it returns (what the backward needs), split into the repeated blocks' own (each block's, and its
  input, which is all gradient checkpointing keeps of it) and the rest.
- ``estimate`` adds up a ``Plan``: the weights as loaded, the adapters' fp32 master weights, their gradients and the
  optimizer's state, and the activations of a micro-batch (checkpointing on or off).

``settings_that_fit`` names the changes (checkpointing, an fp8 base, a smaller batch or resolution) that would bring
an estimate under a memory limit.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import weakref

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# fp32 values the optimizer keeps per trained value (AdamW/Adam: two moments; RMSprop: one average; SGD: none)
OPTIMIZER_STATES = {"AdamW": 2, "Adam": 2, "RMSprop": 1, "SGD": 0}
MASTER_BYTES = 4  # the pack trains fp32 master weights, with fp32 gradients (training/flat_params.py)
GiB = 1024 ** 3


@dataclass(frozen=True)
class ActivationProfile:
    """Bytes autograd keeps for the backward of one sample (batch 1), by where they are kept."""
    outside: int  # outside the repeated blocks (embedders, final layer, the loss)
    blocks: int  # inside the repeated blocks, all of them (what checkpointing drops)
    block_inputs: int  # the repeated blocks' inputs (what checkpointing keeps of them)
    largest_block: int  # the most one block keeps (what checkpointing recomputes at a time)
    largest_tensor: int  # the largest activation (its gradient is alive beside it in the backward)


@dataclass(frozen=True)
class Plan:
    """What a run's peak depends on, fixed before its first step."""
    weight_bytes: int  # the base model's weights and buffers as loaded (fp8 weights: one byte each)
    trained_values: int  # adapter values trained (fp32 master weights)
    optimizer: str
    batch_size: int
    checkpointing: bool
    activations: ActivationProfile  # of one sample at the run's latent size
    pixels_scale: float = 1.0  # activations scale with the latent's area: a smaller resolution's plan scales it


@dataclass(frozen=True)
class Estimate:
    weights: int
    adapters: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.adapters + self.gradients + self.optimizer + self.activations

    def describe(self) -> str:
        parts = ", ".join(f"{name} {getattr(self, name) / GiB:.2f}" for name in
                          ("weights", "adapters", "gradients", "optimizer", "activations"))
        return f"{self.total / GiB:.2f} GiB ({parts})"


def estimate(plan: Plan) -> Estimate:
    a = plan.activations
    kept = a.block_inputs + a.largest_block if plan.checkpointing else a.blocks
    # the backward holds an activation's gradient beside the activation itself: the largest one twice
    per_sample = (a.outside + kept + 2 * a.largest_tensor) * plan.pixels_scale
    return Estimate(weights=plan.weight_bytes, adapters=plan.trained_values * MASTER_BYTES,
                    gradients=plan.trained_values * MASTER_BYTES,
                    optimizer=plan.trained_values * MASTER_BYTES * OPTIMIZER_STATES.get(plan.optimizer, 2),
                    activations=int(per_sample * plan.batch_size))


def settings_that_fit(plan: Plan, limit: int, fp8_weight_bytes: int | None = None) -> list[str]:
    """The single changes of the run's settings whose estimate is under ``limit`` bytes, in words.

    ``fp8_weight_bytes``: the weights' bytes as an fp8 (float8_e4m3fn) base, where the base is not fp8 already."""
    changes: list[tuple[str, Plan]] = []
    if not plan.checkpointing:
        changes.append(("gradient_checkpointing on", dataclasses.replace(plan, checkpointing=True)))
    if fp8_weight_bytes is not None and fp8_weight_bytes < plan.weight_bytes:
        changes.append(("an fp8 base (Load Diffusion Model weight_dtype fp8_e4m3fn)",
                        dataclasses.replace(plan, weight_bytes=fp8_weight_bytes)))
    if plan.batch_size > 1:
        changes.append(("batch_size 1", dataclasses.replace(plan, batch_size=1)))
    changes.append(("images at half the width and height", dataclasses.replace(plan, pixels_scale=plan.pixels_scale / 4)))
    fits = [name for name, changed in changes if estimate(changed).total <= limit]
    if not fits:  # all together, as the last resort
        together = plan
        for _, changed in changes:
            together = dataclasses.replace(together, **{f.name: getattr(changed, f.name) for f in
                                                        dataclasses.fields(changed) if getattr(changed, f.name) !=
                                                        getattr(plan, f.name)})
        if estimate(together).total <= limit:
            fits.append("all of: " + "; ".join(name for name, _ in changes))
    return fits


# ---------------------------------------------------------------------------------------------------- profiling
class LiveBytes(TorchDispatchMode):
    """Bytes of the storages ops make while active: live (until freed) and at their peak; ``largest`` is the largest
    single one. An op's output on the storage of one of its inputs (a view, an in-place write) is no new memory, so
    tensors made before (weights) never count. ``at_peak`` is what ``probe`` returned at the moment of the peak."""

    def __init__(self, probe: Callable[[], int] = lambda: 0):
        super().__init__()
        self.live = self.peak = self.at_peak = self.largest = 0
        self.probe = probe
        self._counted: set[int] = set()
        self._fake = None

    def __enter__(self):
        from torch._guards import detect_fake_mode

        self._fake = detect_fake_mode()
        return super().__enter__()

    def _as_seen(self, t: torch.Tensor) -> torch.Tensor:
        """A real tensor (a weight) in a fake forward: the fake twin the op's output shares storage with."""
        from torch._subclasses.fake_tensor import FakeTensor

        return t if self._fake is None or isinstance(t, FakeTensor) else self._fake.from_tensor(t)

    def _free(self, key: int, nbytes: int) -> None:
        self._counted.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_key(self._as_seen(t)) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        grew = False
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key = st._cdata
            if key in inputs or key in self._counted:
                continue
            self._counted.add(key)
            nbytes = st.nbytes()
            self.live += nbytes
            self.largest = max(self.largest, nbytes)
            weakref.finalize(st, self._free, key, nbytes)
            grew = True
        if grew and self.live > self.peak:
            self.peak = self.live
            self.at_peak = self.probe()
        return out


def profile_activations(forward: Callable[[], torch.Tensor], blocks: Iterable[nn.Module]) -> ActivationProfile:
    """What the graph of ``forward()`` keeps for the backward (run it inside ``FakeTensorMode`` to cost no memory):
    the bytes still alive once it returned (whatever keeps them: autograd's saved tensors, the in-place protection's
    copies), and for each of ``blocks`` what it left alive and its input (its first tensor argument)."""
    tracker = LiveBytes()
    entry: dict[int, int] = {}
    kept: list[int] = []
    inputs: list[int] = []
    handles = []
    for index, block in enumerate(blocks):
        def pre(module, args, kwargs, index=index):
            entry[index] = tracker.live
            first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
            inputs.append(first.untyped_storage().nbytes() if first is not None else 0)

        def post(module, args, kwargs, out, index=index):
            kept.append(tracker.live - entry.pop(index, tracker.live))

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block.register_forward_hook(post, with_kwargs=True))
    try:
        with tracker:
            out = forward()
        total = tracker.live
        del out
    finally:
        for h in handles:
            h.remove()
    blocks_kept = sum(kept)
    return ActivationProfile(outside=max(total - blocks_kept, 0), blocks=blocks_kept, block_inputs=sum(inputs),
                             largest_block=max(kept, default=0), largest_tensor=tracker.largest)


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata  # the StorageImpl: one key however many Python wrappers it gets


@contextlib.contextmanager
def fake_tensors() -> Iterable[None]:
    """``FakeTensorMode`` that takes the model's real tensors as inputs (each gets a fake twin, no copy); the active
    one where there is one already (a model built of fake tensors)."""
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensorMode

    with contextlib.nullcontext() if detect_fake_mode() is not None else FakeTensorMode(allow_non_fake_inputs=True):
        yield
