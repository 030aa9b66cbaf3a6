"""The metadata a saved LoRA carries for hubs and UIs (kohya ss_*, modelspec, hashes), from what Train LoRA recorded
and the Save LoRA inputs (title, trigger words, thumbnail, captions)."""
from __future__ import annotations

import io
import time
from collections import Counter

import numpy as np
import torch

from ..lora import hub_metadata
from ..lora.file_format import META
from ..lora.hub_metadata import TrainingRecord
from .loss_chart import loss_map_chart

THUMBNAIL_SIDE = 256  # hubs show small previews; a larger image would only grow every file's header


def training_record(recorded: dict, *, steps: int, algorithm: str, rank: int, alpha: float, base_model: str,
                    latent_shapes: list[tuple[int, ...]], pixels_per_latent: int, started_at: float,
                    previous_steps: int) -> TrainingRecord:
    """What Train LoRA knows about a run, for ``hub_metadata`` (``recorded``: the node's settings as it records them;
    ``steps``: the total, ``previous_steps`` of them from a continued LoRA or resumed state)."""
    counts = Counter((s[-1] * pixels_per_latent, s[-2] * pixels_per_latent) for s in latent_shapes)
    resolutions = tuple(r for r, _ in counts.most_common())  # the most used first
    args = {k: recorded[k] for k in ("dora", "rs_lora", "module_filter", "train_biases_and_norms") if recorded.get(k)}
    return TrainingRecord(
        steps=steps - previous_steps, algorithm=algorithm, rank=rank, alpha=alpha, base_model=base_model,
        learning_rate=recorded["learning_rate"], optimizer=recorded["optimizer"], seed=recorded["seed"],
        batch_size=recorded["batch_size"], grad_accumulation_steps=recorded["grad_accumulation_steps"],
        training_dtype=recorded["training_dtype"], lora_dtype=recorded["lora_dtype"], images=recorded["images"],
        resolutions=resolutions, started_at=started_at, finished_at=time.time(), network_args=args,
        lr_scheduler=recorded.get("lr_schedule", "constant"), loss_function=recorded["loss_function"],
        previous_steps=previous_steps)


def for_file(lora: dict, *, fmt: str, output_name: str, title: str = "", trigger_words: str = "",
             thumbnail: torch.Tensor | None = None, loss: dict | None = None, captions: list[str] | None = None,
             steps: int | None = None, metadata: dict[str, str] | None = None) -> dict[str, str]:
    """The keys a file gets at save time: kohya's ss_* (from the LoRA's training record, when it has one), modelspec
    (title, trigger phrase, thumbnail, implementation for the file's naming) and our format marker."""
    record: TrainingRecord | None = getattr(lora, "record", None)
    metadata = metadata if metadata is not None else dict(getattr(lora, "metadata", {}) or {})
    out = {f"{META}format": fmt}
    png = _png(thumbnail) if thumbnail is not None else (_png(loss_map_chart(loss)) if loss else None)
    if record is not None:
        if steps is not None:
            record = TrainingRecord(**{**vars(record), "steps": steps - record.previous_steps})
        out.update(hub_metadata.kohya_metadata(record, output_name=output_name, captions=captions or None))
        out.update(hub_metadata.modelspec_metadata(
            record, title=title or output_name, trigger_words=trigger_words,
            implementation=hub_metadata.implementation_for(record.base_model, fmt), thumbnail_png=png))
        return out
    # A LoRA from elsewhere: the modelspec keys we know, over whatever its own metadata says.
    for key, value in (("modelspec.title", title or metadata.get("modelspec.title") or output_name),
                       ("modelspec.trigger_phrase", trigger_words), ("ss_output_name", output_name)):
        if value:
            out[key] = value
    if png is not None:
        out["modelspec.thumbnail"] = hub_metadata.thumbnail_url(png)
    if captions:
        out.update(hub_metadata.tag_frequency_metadata(captions))
    return out


def _png(image) -> bytes:
    """PNG bytes of a ComfyUI IMAGE (first of the batch, floats 0..1) or a uint8 HxWxC array, at most
    THUMBNAIL_SIDE pixels a side."""
    from PIL import Image

    if torch.is_tensor(image):
        image = (image[0].detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    picture = Image.fromarray(np.asarray(image)[..., :3])
    picture.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()
