"""Files of the pack outside ComfyUI's model folders (data sets, training states): listing them for a combo input and
reading one safely (safetensors only: reading never unpickles anything)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..lora.file_format import TEMP_PREFIX


def listed(root: Path) -> list[str]:
    """The ``.safetensors`` files under ``root`` (relative, sorted), without folders and temporary files."""
    if not root.is_dir():
        return []
    # Temporary files and folders of an interrupted save (older versions named them *.safetensors) are never offered.
    found = (p.relative_to(root).as_posix() for p in root.rglob("*.safetensors") if p.is_file())
    return sorted(rel for rel in found if not any(part.startswith(TEMP_PREFIX) for part in rel.split("/")))


def inside(root: Path, name: str, what: str, folders: bool = False) -> Path:
    """``root / name``, refused unless it is a file (or, with ``folders``, a folder) inside ``root`` (no '..', no
    link out)."""
    path = root / name
    if not path.resolve().is_relative_to(root.resolve()) or not (path.is_file() or folders and path.is_dir()):
        raise ValueError(f"{what}: '{name}' is not in {root}")
    return path


def read_safetensors(path: str | Path, what: str, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; anything unreadable is an error naming the input."""
    import safetensors
    import safetensors.torch

    try:
        tensors = safetensors.torch.load_file(str(path))
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:
        raise ValueError(f"{what}: '{name}' is not a readable safetensors file ({e})") from None
    return tensors, metadata
