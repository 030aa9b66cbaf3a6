"""LoRA files: the key prefix ComfyUI's loader maps to diffusion-model layers, our metadata, atomic saving."""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .finite import first_non_finite

if TYPE_CHECKING:
    from .hub_metadata import TrainingRecord
    from .key_formats import ModelNaming

MODEL_PREFIX = "diffusion_model."
META = "lora_trainer."  # our metadata keys; kohya-style "ss_*" keys are written too so other tools show them


class LoraWeights(dict):
    """A LORA_MODEL: a plain ``str → tensor`` dict (what ComfyUI's own nodes pass around) that also carries what our
    Save LoRA writes besides the tensors: the metadata, the training record (for hub metadata) and the model's layer
    names (for the kohya/diffusers namings and the self-check). ComfyUI's consumers see an ordinary dict."""

    metadata: dict[str, str]

    def __init__(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None, *,
                 naming: "ModelNaming | None" = None, record: "TrainingRecord | None" = None):
        super().__init__(tensors)
        self.metadata = dict(metadata or {})
        self.naming = naming
        self.record = record


def build_metadata(*, steps: int, algorithm: str, rank: int, alpha: float, base_model: str, settings: dict,
                   date: str) -> dict[str, str]:
    return {
        "format": "pt",
        f"{META}version": "1",
        f"{META}steps": str(steps),
        f"{META}algorithm": algorithm,
        f"{META}rank": str(rank),
        f"{META}alpha": repr(float(alpha)),
        f"{META}base_model": base_model,
        f"{META}training_settings": json.dumps(settings, sort_keys=True),
        f"{META}date": date,
        "ss_steps": str(steps),
        "ss_network_dim": str(rank),
        "ss_network_alpha": repr(float(alpha)),
        "ss_base_model_version": base_model,
        "ss_training_finished_at": date,
    }


def stored_steps(metadata: dict[str, str] | None) -> int | None:
    """Training steps recorded in a file's metadata (ours, else kohya's ``ss_steps``, else ai-toolkit's
    ``training_info`` JSON ``{"step": N, ...}``), or None when it has none."""
    metadata = metadata or {}
    values = [metadata.get(f"{META}steps"), metadata.get("ss_steps")]
    try:
        info = json.loads(metadata.get("training_info", "null"))
    except ValueError:
        info = None
    if isinstance(info, dict):
        values.append(info.get("step"))
    for value in values:
        if isinstance(value, int) and value >= 0:
            return value
        if value is not None and str(value).isascii() and str(value).isdecimal():
            return int(value)
    return None


TEMP_PREFIX = ".tmp_"
# The temporary file's extension is none that ComfyUI lists as a model, so a save killed half-way never shows up in
# a loader's list; such leftovers are removed by a later save into the same folder once they are this old.
TEMP_SUFFIX = ".partial"
STALE_TEMP_S = 3600
NAME_MAX_BYTES = 255  # one path component, on every common file system
# A name prefix's last part leaves room for what saving appends: "_<steps>_steps", "_00001", ".safetensors".
SUFFIX_BYTES = 55
STEM_MAX_BYTES = NAME_MAX_BYTES - SUFFIX_BYTES


PATH_MAX_BYTES = 4096  # a whole path, on Linux; saving appends up to SUFFIX_BYTES to the stem


def check_name_parts(parts: list[str], what: str) -> None:
    """A clear error naming the input for a name no file system can hold (instead of a raw ``OSError``) or one that
    would be taken for a temporary file (never listed, and removed by a later save)."""
    if any(ord(ch) < 32 or ch == "\x7f" for part in parts for ch in part):
        raise ValueError(f"{what}: {'/'.join(parts)!r} contains a control character (e.g. a NUL byte or a line "
                         "break); use plain characters")
    if parts and parts[-1].startswith(TEMP_PREFIX):
        raise ValueError(f"{what}: '{parts[-1]}' starts with '{TEMP_PREFIX}', which is reserved for temporary files "
                         "(they are never listed and are removed later); use another name")
    for i, part in enumerate(parts):
        limit = STEM_MAX_BYTES if i == len(parts) - 1 else NAME_MAX_BYTES
        size = len(part.encode())
        if size > limit:
            raise ValueError(f"{what}: '{part[:40]}...' is {size} bytes long; a name part may have at most {limit} "
                             "(file systems allow 255 per file or folder name): use a shorter name")


def _remove_stale_temps(directory: Path) -> None:
    now = time.time()
    for old in directory.glob(TEMP_PREFIX + "*"):
        try:
            if now - old.stat().st_mtime > STALE_TEMP_S:
                shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
        except OSError:
            pass  # another process removed it first, or it is not ours to remove


def save_new(directory: Path, stem: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
             what: str = "lora") -> Path:
    """Writes ``<stem>_NNNNN.safetensors`` with the first free counter (``claim_new``). Tensors holding NaN or inf
    are never written: the error names ``what`` (the input they came from)."""
    import safetensors.torch

    if where := first_non_finite(tensors):
        raise ValueError(non_finite_message(what, where))
    return claim_new(directory, stem, lambda tmp: safetensors.torch.save_file(
        {k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata))


def non_finite_message(what: str, where: str) -> str:
    return f"{what}: holds NaN or infinite values (in {where}); nothing was written"


def claim_new(directory: Path, stem: str, write: Callable[[str], None], suffix: str = ".safetensors") -> Path:
    """``write(tmp)`` fills a temporary file in ``directory``, which then becomes ``<stem>_NNNNN<suffix>`` with the
    first free counter. The file appears complete or not at all (if ``write`` raises, or the process dies, only a
    hidden temporary file is left, removed by a later save), and an existing file is never replaced (the final name
    is claimed with a hard link, which fails if it exists)."""
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(directory)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=directory)
    os.close(fd)
    try:
        write(tmp)
        return _first_free(directory, stem, suffix, lambda path: os.link(tmp, path))
    finally:
        os.unlink(tmp)


def claim_new_folder(directory: Path, stem: str, fill: Callable[[Path], None]) -> Path:
    """``fill(tmp)`` fills a temporary folder in ``directory``, which then becomes ``<stem>_NNNNN/`` with the first
    free counter, in one rename: the folder appears with all of its files or not at all. A folder that holds
    anything is never replaced (renaming onto it fails); an empty one may be."""
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(directory)
    tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=directory))
    try:
        fill(tmp)
        return _first_free(directory, stem, "", lambda path: os.rename(tmp, path))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _first_free(directory: Path, stem: str, suffix: str, claim: Callable[[Path], None]) -> Path:
    counter = 1
    while True:
        path = directory / f"{stem}_{counter:05}{suffix}"
        try:
            claim(path)
            return path
        except (FileExistsError, IsADirectoryError, NotADirectoryError):
            counter += 1
        except OSError as e:
            if e.errno != errno.ENOTEMPTY:
                raise
            counter += 1
