"""A safetensors file read lazily: its tensors are views of a memory map of the file, so opening one reads only its
header, and a tensor's bytes are read from disk when (and as far as) something reads the tensor. The pages read
are the operating system's file cache, which it drops again under memory pressure: a file larger than RAM works.
Whoever has read what it needs of a tensor can ``release`` it, so that the process's resident memory (RSS) stays one
working set, not every page the run has read so far.

The format is the published safetensors layout: an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the bytes. Only that is read: nothing is ever unpickled."""
from __future__ import annotations

import json
import math
import mmap
import platform
import struct
import sys
import warnings
import weakref
from pathlib import Path

import torch

DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    **{name: getattr(torch, attr) for name, attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                                                    ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"))
       if hasattr(torch, attr)},
}
MAX_HEADER = 100 * 1024 * 1024  # the limit the safetensors library itself applies
FAULT_AROUND = max(mmap.PAGESIZE, 64 * 1024)  # Linux's default fault_around_bytes (see _release)


# (address, length, the map) of every open map, for ``release``; a map closes when its last tensor is gone.
_MAPS: list[tuple[int, int, weakref.ref]] = []


class MappedFileError(ValueError):
    """The file is not a readable safetensors file (the message says what is wrong)."""


def open_mapped(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; the tensors are read-only-by-convention views of the file (writing
    into one changes this process's copy of that page, never the file)."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        head = f.read(8)
        if len(head) < 8:
            raise MappedFileError("shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER, size - 8):
            raise MappedFileError(f"header length {length} does not fit the file ({size} bytes)")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MappedFileError(f"header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise MappedFileError("header is not a JSON object")
        mapping = _map(f) if size > 8 + length else None
    if mapping is not None:
        _MAPS[:] = [m for m in _MAPS if m[2]() is not None]
        _MAPS.append((_address(mapping), len(mapping), weakref.ref(mapping)))
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise MappedFileError("__metadata__ is not a map of strings")
    start = 8 + length
    tensors = {name: _view(mapping, start, size, name, info) for name, info in header.items()}
    return tensors, metadata


def _map(f) -> mmap.mmap:
    """The whole file, mapped copy-on-write: torch gets a writable buffer, and the file can never be changed. Linux
    counts a private writable map against its overcommit limit (a map larger than RAM is refused) unless it is made
    MAP_NORESERVE: nothing is ever written, so nothing needs reserving. Where even that is refused (strict
    overcommit), the map is read-only (a write into a tensor would then crash instead of being private)."""
    if hasattr(mmap, "MAP_PRIVATE"):
        try:
            return mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE | _NORESERVE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            pass
    try:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except OSError:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


# MAP_NORESERVE: Python names it from 3.13 on; its value on the Linux ABIs where it is 0x4000.
_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") and
                     platform.machine().lower() in ("x86_64", "amd64", "aarch64", "arm64", "riscv64") else 0)


def _address(mapping: mmap.mmap) -> int:
    return _frombuffer(mapping, torch.uint8, 1, 0).data_ptr()


def _frombuffer(mapping: mmap.mmap, dtype: torch.dtype, count: int, offset: int) -> torch.Tensor:
    with warnings.catch_warnings():  # a read-only map (see _map) is still only ever read
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(mapping, dtype=dtype, count=count, offset=offset)


def _view(mapping: mmap.mmap | None, start: int, size: int, name: str, info) -> torch.Tensor:
    try:
        dtype = DTYPES[info["dtype"]]
        shape = [int(d) for d in info["shape"]]
        begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise MappedFileError(f"tensor '{name}': malformed header entry {info!r}") from None
    count = math.prod(shape)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != count * itemsize or start + end > size:
        raise MappedFileError(f"tensor '{name}': shape {shape} of {info['dtype']} does not match its bytes "
                              f"[{begin}, {end}) in a file of {size} bytes")
    if count == 0 or mapping is None:
        return torch.empty(shape, dtype=dtype)
    return _frombuffer(mapping, dtype, count, start + begin).reshape(shape)


def owned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, copied if it is a view of a map made here: what outlives a ``release`` of its source."""
    return tensor.clone() if _map_of(tensor) is not None else tensor


def release(*tensors: torch.Tensor) -> None:
    """Gives back this process's resident pages of each tensor's storage (one tensor of the file, whatever view of
    it the tensor is) if it lies in a map made here; for any other tensor nothing happens. The bytes stay in the
    file and the OS cache, and a later read brings them back. These tensors are inputs nobody writes into: a write
    into a released page would be undone."""
    for tensor in tensors:
        _release(tensor)


def _map_of(tensor: torch.Tensor) -> tuple[mmap.mmap, int, int] | None:
    """(the map, start, end of ``tensor``'s storage in it) when the storage lies in a map made here."""
    if not tensor.is_cpu or tensor.numel() == 0 or not _MAPS:
        return None
    storage = tensor.untyped_storage()
    first = storage.data_ptr()
    last = first + storage.nbytes()
    for address, length, ref in _MAPS:
        mapping = ref()
        if mapping is not None and address <= first and last <= address + length:
            return mapping, first - address, last - address
    return None


def _release(tensor: torch.Tensor) -> None:
    advise = getattr(mmap, "MADV_DONTNEED", None)
    found = _map_of(tensor) if advise is not None else None
    if found is not None:
        mapping, first, last = found
        # Every page a read of the tensor can have mapped: Linux maps the cached pages around a faulting one too
        # (its "fault-around", 64 KiB-aligned windows by default), so neighbours' pages are in our RSS as well.
        # Pages of the map are clean copies of the file: a neighbour still in use just reads its part again.
        start = first // FAULT_AROUND * FAULT_AROUND
        end = min(-(-last // FAULT_AROUND) * FAULT_AROUND, len(mapping))
        mapping.madvise(advise, start, end - start)
