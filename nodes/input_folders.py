"""Data-set nodes that read a subfolder of ComfyUI's input folder (Load Edit Pairs, Load Audio Clips): the folder
input, the folder's path (refused outside the input folder), and what tells ComfyUI's cache that its files changed."""
from __future__ import annotations

import hashlib
from pathlib import Path

import folder_paths

from .safe_files import inside


def folder_input() -> tuple:
    """The ``folder`` input: a COMBO of the input folder's subfolders."""
    return (folder_paths.get_input_subfolders(), {"tooltip": "A folder of ComfyUI's input folder."})


def folder_path(folder: str) -> Path:
    return inside(Path(folder_paths.get_input_directory()), folder, "folder", folders=True)


def folder_changes(folder: str) -> str:
    """A digest of the folder's files (names, sizes, times), for a node's IS_CHANGED: adding or editing a file loads
    the set again instead of reusing ComfyUI's cached result of the same folder name."""
    try:
        root = folder_path(folder)
    except ValueError:
        return ""  # the node itself reports it
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()
