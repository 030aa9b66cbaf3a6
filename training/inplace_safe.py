"""Backward through model code written for inference, which updates tensors in place.

ComfyUI's blocks add into their own inputs and intermediates (``x += attn(norm(x))``, ``x.addcmul_(ff(y), gate)``).
Autograd keeps references to the tensors an op needs for backward; a later in-place write changes them under it.
Plain autograd then fails ("modified by an inplace operation"), and recomputation (activation checkpointing) is
worse: it silently recomputes from the overwritten values and gives wrong gradients.

The fix, for every model at once: every tensor saved for backward goes through a ``Held`` box, and a dispatch mode
watches in-place writes. Just before a write reaches storage that a box still refers to, the box takes a private copy.
Only tensors that really are overwritten after being saved are copied; nothing in the model code changes.

That watch costs a Python call per op (about 10 µs; a quarter of a tiny model's CPU step), which most models never need
(SD, SDXL, SD3, … write into nothing they saved). ``InplaceGuard`` pays it only where it is needed: each forward pass
first runs under ``Pinned`` saves, which note every saved tensor's version counter (an in-place write bumps it, also
through a view) at the cost of one hook call per saved tensor. A pass that wrote into something it saved is run
again under the watch, and so is every later pass of that model; a pass that did not is exact as it is (a write after
the check raises when backward reads the tensor, never a silent wrong gradient). Every pass is checked, so a write
that only some steps make (other shapes, conditioning, control flow) is caught on the step that makes it.

``checkpoint`` is activation checkpointing built on the same boxes: the block's inputs are held (the block may write
into them), its saved tensors are dropped in the forward pass and recomputed on first use in backward, with the same
protection during the recomputation (watched, or pinned and checked, as the pass it belongs to).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import weakref
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode


T = TypeVar("T")


class Held:
    """A saved tensor that is copied before anything overwrites it."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def get(self) -> torch.Tensor:
        return self.tensor


class Pinned:
    """A saved tensor kept as it is, with its version counter at saving time (None: an inference tensor, which
    nothing outside inference mode can write into)."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        try:
            self.version: int | None = tensor._version
        except RuntimeError:  # "Inference tensors do not track version counter"
            self.version = None

    def changed(self) -> bool:
        return self.version is not None and self.tensor._version != self.version

    def get(self) -> torch.Tensor:
        # Autograd skips its own version check for tensors saved through hooks: this is that check.
        if self.changed():
            raise RuntimeError("inplace_safe: a tensor saved for backward was written in place after its forward "
                               "pass was checked; backward through it would be wrong")
        return self.tensor


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


def _unbox(box: Held | Pinned) -> torch.Tensor:
    return box.get()


class _Pins:
    """The cheap protection of one forward pass: tensors are saved as they are, each with its version (``Pinned``);
    ``written`` says whether the pass wrote into any of them (or into a checkpointed block's input or saved tensor)."""

    def __init__(self) -> None:
        self.pins: list[Pinned] = []
        self.block_wrote = False  # set by ``checkpoint`` when a block wrote into what it saved

    def pin(self, tensor: torch.Tensor) -> Pinned:
        pinned = Pinned(tensor)
        self.pins.append(pinned)
        return pinned

    def written(self) -> bool:
        return self.block_wrote or any(p.changed() for p in self.pins)


_pins: contextvars.ContextVar[_Pins | None] = contextvars.ContextVar("inplace_safe_pins", default=None)


@contextlib.contextmanager
def _pinned() -> Iterator[_Pins]:
    pins = _Pins()
    token = _pins.set(pins)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pins.pin, _unbox):
            yield pins
    finally:
        _pins.reset(token)
        pins.pins = []  # the graph keeps what backward needs; the check's own references go


class InplaceGuard:
    """The protection of one model's forward passes (one per training run): cheap (``Pinned``) until a pass writes
    into a tensor it saved for backward, from then on the ``CopyOnWrite`` watch. ``watched`` says which."""

    def __init__(self) -> None:
        self.watched = False

    def forward(self, fn: Callable[[], T]) -> T:
        """``fn()`` (one forward pass; it may run twice, so it must not change its own inputs' values) with a graph
        whose backward is exact. Without grad mode nothing is saved and nothing needs protecting."""
        if not torch.is_grad_enabled():
            return fn()
        if not self.watched:
            with _pinned() as pins:
                out = fn()
                written = pins.written()
            if not written:
                return out
            del out  # the graph of the pass that wrote into what it saved: its gradients would be wrong
            self.watched = True
        with protected(CopyOnWrite()):
            return fn()


def _active_cow() -> CopyOnWrite | None:
    """The innermost CopyOnWrite mode of this thread, if any."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    for mode in reversed(_get_current_dispatch_mode_stack()):
        if isinstance(mode, CopyOnWrite):
            return mode
    return None


class _Recording:
    """One checkpointed call: its protected inputs, and the tensors it saved once they are recomputed. Under ``cow``
    the inputs are held and the recomputation is watched; under ``pins`` (the cheap pass) the inputs are pinned in the
    pass's own pins (checked at its end) and the recomputation pins what it saves."""

    def __init__(self, fn: Callable[..., Any], holder: CopyOnWrite | _Pins, args: tuple, kwargs: dict):
        self.fn = fn
        self.watched = isinstance(holder, CopyOnWrite)
        keep = holder.hold if isinstance(holder, CopyOnWrite) else holder.pin
        self.args = [(keep(a), a.requires_grad) if isinstance(a, torch.Tensor) else (a, None) for a in args]
        self.kwargs = {k: (keep(v), v.requires_grad) if isinstance(v, torch.Tensor) else (v, None)
                       for k, v in kwargs.items()}
        # The autocast state of every device the inputs live on (and the CPU's): backward runs outside it.
        devices = {"cpu"} | {a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)}
        self.autocast = {d: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in sorted(devices)}
        self.count = 0
        self.saved: list[Held | Pinned | None] | None = None
        self.block_pins: list[Pinned] = []  # cheap pass: what the block saved, until it returns

    def pack(self, _tensor: torch.Tensor) -> tuple["_Recording", int]:
        index = self.count
        self.count += 1
        return self, index

    def pack_pinned(self, tensor: torch.Tensor) -> tuple["_Recording", int]:
        """``pack`` that also pins the tensor until the block returns: whether the block wrote into it then says
        whether the recomputation would (it runs the same ops)."""
        self.block_pins.append(Pinned(tensor))
        return self.pack(tensor)

    def recompute(self) -> None:
        cow = CopyOnWrite() if self.watched else None
        boxes: list[Held | Pinned | None] = []

        def keep(t: torch.Tensor) -> None:
            boxes.append(cow.hold(t) if cow is not None else Pinned(t))

        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.enable_grad())
            for device, (enabled, dtype) in self.autocast.items():
                stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(keep, lambda _: None))
            if cow is not None:
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
        return box.get()


def _fresh(value: Any, requires_grad: bool | None) -> Any:
    """A recomputation input with the forward input's values and grad requirement, that the block may write into."""
    if requires_grad is None:
        return value
    tensor = value.get().detach()
    # A leaf that requires grad may not be written in place; a clone of it may (and the block gets its own copy).
    return tensor.requires_grad_(True).clone() if requires_grad else tensor


def _unpack(key: tuple[_Recording, int]) -> torch.Tensor:
    recording, index = key
    return recording.unpack(index)


def checkpoint(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` whose saved tensors are recomputed in backward instead of kept.

    The top-level tensor arguments are kept (as with torch.utils.checkpoint); ``fn`` must run the same ops when
    called again (no data-dependent control flow on values that change between forward and backward, no dropout).
    Inside ``protected`` it shares that block's protection; inside an ``InplaceGuard``'s cheap pass it pins, and
    tells the pass when the block wrote into its inputs or what it saved."""
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    cow = _active_cow()
    pins = _pins.get() if cow is None else None
    if pins is not None:
        recording = _Recording(fn, pins, args, kwargs)
        with torch.autograd.graph.saved_tensors_hooks(recording.pack_pinned, _unpack):
            out = fn(*args, **kwargs)
        pins.block_wrote = pins.block_wrote or any(p.changed() for p in recording.block_pins)
        recording.block_pins = []
        return out
    # Outside ``protected`` the block still gets the protection its own inputs and recomputation need.
    mode = contextlib.nullcontext() if cow is not None else (cow := CopyOnWrite())
    with mode:
        recording = _Recording(fn, cow, args, kwargs)
        with torch.autograd.graph.saved_tensors_hooks(recording.pack, _unpack):
            return fn(*args, **kwargs)
