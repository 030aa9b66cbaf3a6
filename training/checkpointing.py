"""Gradient checkpointing of a model's repeated blocks, for exactly as long as a ``with`` block lasts."""
from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch.utils.checkpoint
from torch import nn


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
    # No RNG state juggling: the models have no dropout in training here, and the global RNG must stay untouched.
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)


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
