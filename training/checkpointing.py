"""Gradient checkpointing of a model's repeated blocks, for exactly as long as a ``with`` block lasts."""
from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from .inplace_safe import checkpoint


def repeated_blocks(root: nn.Module) -> list[nn.Module]:
    """The elements of the outermost ModuleLists (transformer blocks, UNet stages): one checkpoint each."""
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, nn.ModuleList):
                found.extend(child)
            else:
                visit(child)

    visit(root)
    return found


def _checkpointed(forward, *args, **kwargs):
    # Our own checkpoint, not torch.utils.checkpoint's: ComfyUI's blocks write into their inputs and intermediates,
    # which torch's recomputation silently turns into wrong gradients (see inplace_safe). No RNG state juggling:
    # the models have no dropout in training here, and the global RNG must stay untouched.
    return checkpoint(forward, *args, **kwargs)


@contextmanager
def checkpointed(root: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Yields the number of checkpointed blocks. The per-instance ``forward`` overrides are removed on exit, also
    when the block raises, so a shared model never keeps them."""
    blocks = repeated_blocks(root) if enabled else []
    patched = []
    try:
        for block in blocks:
            if "forward" in vars(block):
                continue  # someone else already overrides this instance's forward; leave it alone
            block.forward = functools.partial(_checkpointed, block.forward)
            patched.append(block)
        yield len(patched)
    finally:
        for block in patched:
            del block.forward
