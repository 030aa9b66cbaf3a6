"""Finding NaN and infinity in tensors and in nested containers of them (state dicts, conditioning entries)."""
from __future__ import annotations

from typing import Any

import torch


def first_non_finite(value: Any, path: str = "") -> str | None:
    """The path (``'key'[1]['other']``…) of the first floating-point tensor inside ``value`` that holds NaN or ±inf, ``"."``
    when ``value`` itself is one, or None when there is none. Walks dicts, lists and tuples; other objects are
    not looked into (a conditioning entry may carry models or hooks)."""
    if torch.is_tensor(value):
        bad = (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all())
        return (path or ".") if bad else None
    if isinstance(value, dict):
        children = ((f"{path}['{k}']" if path else f"'{k}'", v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        children = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    return next((found for child_path, child in children if (found := first_non_finite(child, child_path))), None)
