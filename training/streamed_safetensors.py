"""Writing a safetensors file tensor by tensor, so that a file larger than RAM can be written.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's dtype, shape and byte
range, then the tensors' bytes in that order (the published layout; ``mapped_safetensors`` reads it). Every byte range
follows from the dtypes and shapes alone, so the header is written first and each tensor is made only when its bytes
are due, written and dropped: at most one tensor is in memory at a time, whatever the file's size. (The safetensors
library's ``save_file`` builds the whole file in memory first.)
"""
from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import torch

from .mapped_safetensors import DTYPES

NAMES = {dtype: name for name, dtype in DTYPES.items()}
WRITE_CHUNK = 16 * 1024 * 1024  # bytes handed to the file per write call (a view of the tensor, never a copy)


@dataclass(frozen=True)
class Entry:
    """One tensor of a file to write: what the header says of it, and how to make it when its bytes are due."""
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def header(entries: Sequence[Entry], metadata: dict[str, str] | None) -> bytes:
    """The length prefix and JSON header of a file holding ``entries`` in this order (padded with spaces to a
    multiple of 8 bytes, so every tensor starts aligned, as the safetensors library writes it)."""
    fields: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for entry in entries:
        if entry.dtype not in NAMES:
            raise TypeError(f"{entry.name}: safetensors cannot hold {entry.dtype}")
        fields[entry.name] = {"dtype": NAMES[entry.dtype], "shape": list(entry.shape),
                              "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    if len(fields) != len(entries) + (1 if metadata else 0):
        raise ValueError("two tensors of one file have the same name")
    raw = json.dumps(fields, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write(out: BinaryIO, entries: Sequence[Entry], metadata: dict[str, str] | None = None,
          check: Callable[[str, torch.Tensor], None] | None = None,
          done: Callable[[Entry], None] | None = None) -> int:
    """Writes the file to ``out``: the header, then each entry's tensor, made, checked (``check`` may raise to stop
    the write) and dropped in turn; ``done`` is told after each. Returns the number of bytes written."""
    written = out.write(header(entries, metadata))
    for entry in entries:
        tensor = entry.make()
        if tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
            raise ValueError(f"{entry.name}: made a {tensor.dtype} tensor of shape {tuple(tensor.shape)}, "
                             f"the header says {entry.dtype} {entry.shape}")
        if check is not None:
            check(entry.name, tensor)
        written += _write_bytes(out, tensor)
        del tensor
        if done is not None:
            done(entry)
    return written


def _write_bytes(out: BinaryIO, tensor: torch.Tensor) -> int:
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # little-endian, as the format is
    view = memoryview(data.numpy())
    for start in range(0, len(view), WRITE_CHUNK):
        out.write(view[start:start + WRITE_CHUNK])
    return len(view)


def entries_of(tensors: dict[str, torch.Tensor]) -> list[Entry]:
    """Entries for tensors that already exist (each written as it is)."""
    return [Entry(name, t.dtype, tuple(t.shape), lambda t=t: t) for name, t in tensors.items()]


def total_bytes(entries: Iterable[Entry]) -> int:
    return sum(entry.nbytes for entry in entries)
