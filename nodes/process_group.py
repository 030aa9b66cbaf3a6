"""Which process of a data-parallel run (torchrun) writes files and reports: rank 0 only. Every rank runs the whole
workflow; the others train their share and skip every side effect, so a file is written once."""
from __future__ import annotations

from ..training.distributed import Ranks


def writes_files() -> bool:
    return Ranks.current().main


def skipped(what: str) -> dict:
    """A writing node's output on a rank that does not write: an empty name, and a note shown on the node."""
    rank = Ranks.current().rank
    return {"ui": {"text": [f"rank {rank}: {what} is written by rank 0"]}, "result": ("",)}
