"""The algorithms by name (the node's ``algorithm`` combo) and detection of the algorithm stored in a file."""
from __future__ import annotations

from .adapter import Adapter
from .algo_loha import LoHa
from .algo_lokr import LoKr
from .algo_lora import LoRA
from .algo_oft import OFT

ALGORITHMS: dict[str, type[Adapter]] = {cls.name: cls for cls in (LoRA, LoHa, LoKr, OFT)}


def detect(suffixes: set[str]) -> type[Adapter] | None:
    """The algorithm whose marker keys appear among one module's key suffixes, or None."""
    for cls in ALGORITHMS.values():
        if any(marker in suffixes for marker in cls.marker_suffixes):
            return cls
    return None
