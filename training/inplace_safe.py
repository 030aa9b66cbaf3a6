"""Backward through model code written for inference, which updates tensors in place.

ComfyUI's blocks add into their own inputs and intermediates (``x += attn(norm(x))``, ``x.addcmul_(ff(y), gate)``).
Autograd keeps references to the tensors an op needs for backward; a later in-place write changes them under it.
Plain autograd then fails ("modified by an inplace operation"), and recomputation (activation checkpointing) is
worse: it silently recomputes from the overwritten values and gives wrong gradients.

The fix, for every model at once: every tensor saved for backward goes through a ``Held`` box, and a dispatch mode
watches in-place writes. Just before a write reaches storage that a box still refers to, the box takes a private copy.
Only tensors that really are overwritten after being saved are copied; nothing in the model code changes.

``checkpoint`` is activation checkpointing built on the same boxes: the block's inputs are held (the block may write
into them), its saved tensors are dropped in the forward pass and recomputed on first use in backward, with the same
protection during the recomputation.
"""
from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class Held:
    """A saved tensor that is copied before anything overwrites it."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def _storage_key(t: torch.Tensor) -> int | None:
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
        return None
    return storage.data_ptr() if storage.nbytes() else None


@functools.cache
def _written_arguments(func) -> tuple[tuple[int | None, str], ...]:
    """(position, name) of each argument an op writes into (``self`` of ``add_``, ``out=``, …); () for most ops."""
    schema = func._schema
    if not schema.is_mutable:
        return ()
    return tuple((None if a.kwarg_only else i, a.name) for i, a in enumerate(schema.arguments)
                 if a.alias_info is not None and a.alias_info.is_write)


class CopyOnWrite(TorchDispatchMode):
    """Copies a held tensor out of the way when an op is about to write into the storage it lives in."""

    def __init__(self) -> None:
        super().__init__()
        self._held: dict[int, list[weakref.ref[Held]]] = {}
        self.copies = 0  # how many held tensors had to be copied (tests and diagnostics)

    def hold(self, tensor: torch.Tensor) -> Held:
        box = Held(tensor)
        key = _storage_key(tensor)
        if key is not None:
            self._held.setdefault(key, []).append(weakref.ref(box))
        return box

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._held:
            for index, name in _written_arguments(func):
                target = args[index] if index is not None and index < len(args) else kwargs.get(name)
                if isinstance(target, torch.Tensor):
                    self._copy_out(target)
        return func(*args, **kwargs)

    def _copy_out(self, target: torch.Tensor) -> None:
        key = _storage_key(target)
        for ref in self._held.pop(key, ()) if key is not None else ():
            box = ref()
            if box is not None:
                box.tensor = box.tensor.clone()  # runs below this mode: no recursion
                self.copies += 1


@contextlib.contextmanager
def protected(cow: CopyOnWrite) -> Iterator[CopyOnWrite]:
    """Autograd inside the block saves every tensor through ``cow``: in-place writes after saving are safe."""
    with torch.autograd.graph.saved_tensors_hooks(cow.hold, _unbox), cow:
        yield cow


def _unbox(box: Held) -> torch.Tensor:
    return box.tensor


def _active_cow() -> CopyOnWrite | None:
    """The innermost CopyOnWrite mode of this thread, if any."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    for mode in reversed(_get_current_dispatch_mode_stack()):
        if isinstance(mode, CopyOnWrite):
            return mode
    return None


class _Recording:
    """One checkpointed call: its protected inputs, and the tensors it saved once they are recomputed."""

    def __init__(self, fn: Callable[..., Any], cow: CopyOnWrite, args: tuple, kwargs: dict):
        self.fn = fn
        self.args = [(cow.hold(a), a.requires_grad) if isinstance(a, torch.Tensor) else (a, None) for a in args]
        self.kwargs = {k: (cow.hold(v), v.requires_grad) if isinstance(v, torch.Tensor) else (v, None)
                       for k, v in kwargs.items()}
        # The autocast state of every device the inputs live on (and the CPU's): backward runs outside it.
        devices = {"cpu"} | {a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)}
        self.autocast = {d: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in sorted(devices)}
        self.count = 0
        self.saved: list[Held | None] | None = None

    def pack(self, _tensor: torch.Tensor) -> tuple["_Recording", int]:
        index = self.count
        self.count += 1
        return self, index

    def recompute(self) -> None:
        cow = CopyOnWrite()
        boxes: list[Held | None] = []

        def keep(t: torch.Tensor) -> None:
            boxes.append(cow.hold(t))

        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.enable_grad())
            for device, (enabled, dtype) in self.autocast.items():
                stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(keep, lambda _: None))
            stack.enter_context(cow)
            args = [_fresh(v, rg) for v, rg in self.args]
            kwargs = {k: _fresh(v, rg) for k, (v, rg) in self.kwargs.items()}
            self.fn(*args, **kwargs)
        if len(boxes) != self.count:
            raise RuntimeError(f"checkpoint: recomputing a block saved {len(boxes)} tensors, the forward pass "
                               f"saved {self.count} (the block's control flow changed between the two)")
        self.saved = boxes
        # The inputs are needed no more.
        self.args, self.kwargs = [], {}

    def unpack(self, index: int) -> torch.Tensor:
        if self.saved is None:
            self.recompute()
        box = self.saved[index]
        if box is None:
            raise RuntimeError("checkpoint: a recomputed tensor was used twice (backward through the graph twice?)")
        self.saved[index] = None  # free it as soon as backward has it
        return box.tensor


def _fresh(value: Any, requires_grad: bool | None) -> Any:
    """A recomputation input with the forward input's values and grad requirement, that the block may write into."""
    if requires_grad is None:
        return value
    tensor = value.tensor.detach()
    # A leaf that requires grad may not be written in place; a clone of it may (and the block gets its own copy).
    return tensor.requires_grad_(True).clone() if requires_grad else tensor


def _unpack(key: tuple[_Recording, int]) -> torch.Tensor:
    recording, index = key
    return recording.unpack(index)


def checkpoint(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` whose saved tensors are recomputed in backward instead of kept.

    The top-level tensor arguments are kept (as with torch.utils.checkpoint); ``fn`` must run the same ops when
    called again (no data-dependent control flow on values that change between forward and backward, no dropout).
    Inside ``protected`` it shares that block's protection."""
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    cow = _active_cow()
    # Outside ``protected`` the block still gets the protection its own inputs and recomputation need.
    mode = contextlib.nullcontext() if cow is not None else (cow := CopyOnWrite())
    with mode:
        recording = _Recording(fn, cow, args, kwargs)
        with torch.autograd.graph.saved_tensors_hooks(recording.pack, _unpack):
            return fn(*args, **kwargs)
