"""Turning the node's (list-mode) LATENT and CONDITIONING inputs into per-sample latents and captions."""
from __future__ import annotations

import torch


def one(values, name: str):
    """A widget value from list-mode input (ComfyUI passes every input as a list when INPUT_IS_LIST is set)."""
    if isinstance(values, list):
        if not values:
            raise ValueError(f"{name}: no value")
        return values[0]
    return values


def latent_samples(latents) -> list[torch.Tensor]:
    """Every image of one LATENT batch or of a list of LATENTs, as single latents (C, [T,] H, W)."""
    items = latents if isinstance(latents, list) else [latents]
    out: list[torch.Tensor] = []
    for i, item in enumerate(items):
        samples = item.get("samples") if isinstance(item, dict) else None
        if not torch.is_tensor(samples):
            raise ValueError(f"latents: item {i} is not a LATENT (no 'samples' tensor)")
        if samples.ndim not in (4, 5):
            raise ValueError(f"latents: item {i} has shape {tuple(samples.shape)}; expected 4-D images or 5-D video")
        out.extend(samples[b].detach().clone().float() for b in range(samples.shape[0]))
    if not out:
        raise ValueError("latents: the data set is empty (0 images)")
    return out


def _split_entry(entry: list) -> list[list]:
    """One conditioning entry whose tensors hold B captions, as B single-caption entries."""
    tensor, extra = entry[0], entry[1]
    rows = tensor.shape[0] if torch.is_tensor(tensor) else 1
    if rows == 1:
        return [[tensor, dict(extra)]]
    out = []
    for b in range(rows):
        row_extra = {k: (v[b : b + 1] if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == rows else v)
                     for k, v in extra.items()}
        out.append([tensor[b : b + 1], row_extra])
    return out


def captions_for(positive, count: int) -> list[list]:
    """One conditioning entry per image: a single one is repeated; otherwise the counts must match."""
    items = positive if isinstance(positive, list) and positive and isinstance(positive[0], list) and \
        positive[0] and isinstance(positive[0][0], list) else [positive]
    entries = [piece for cond in items for entry in cond for piece in _split_entry(entry)]
    if not entries:
        raise ValueError("positive: no conditioning given")
    if len(entries) == 1:
        return entries * count
    if len(entries) != count:
        raise ValueError(f"positive: {len(entries)} conditionings for {count} latent images; "
                         "give one per image or a single one for all")
    return entries
