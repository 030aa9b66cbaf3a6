"""Invariants every hostile case must leave intact (issue 10), checked after each case of test_hostile_inputs.py:
the server still answers, nothing appeared outside its base directory, no temporary file is left, no file that
existed under models/ or output/ changed, and no pickle payload ran."""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import harness

# Every name a case aims outside the base directory ends in this tag, so a file it produced is found by name even in
# folders other processes write to at the same time (/tmp, the home folder).
ESCAPE_TAG = f"lora_trainer_escape_{uuid.uuid4().hex[:8]}"
TEMP_PREFIX = ".tmp_"


@dataclass(frozen=True)
class FileState:
    size: int
    mtime_ns: int
    sha256: str


def _walk_files(root: Path, skip: Path | None = None, with_folders: bool = False) -> list[Path]:
    """Files and links under ``root`` (and folders, ``with_folders``), except ``skip``; symlinked folders are not
    followed (custom_nodes links to the repository)."""
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if skip is None or Path(folder, d) != skip]
        listed = [d for d in dirs if with_folders or Path(folder, d).is_symlink()]
        out += [Path(folder, name) for name in files + listed]
    return out


def _state(path: Path) -> FileState:
    stat = path.stat()
    return FileState(stat.st_size, stat.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())


class _Payload:
    """Unpickling this creates ``marker``: the proof that a loader ran pickle code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickle_payload(marker: Path, extension: str) -> bytes:
    """A hostile file for ``extension``: a torch checkpoint (zip + pickle) for .ckpt/.pt/.pth, a bare pickle else."""
    if extension == ".safetensors":
        return pickle.dumps(_Payload(marker))
    import torch

    buffer = io.BytesIO()
    torch.save({"state_dict": _Payload(marker)}, buffer)
    return buffer.getvalue()


def payload_is_live(scratch: Path) -> bool:
    """Whether the payloads really run code when unpickled (else 'the marker never appears' would prove nothing)."""
    import torch

    ok = True
    for extension in (".safetensors", ".pt"):
        marker = scratch / f"marker{extension}"
        data = pickle_payload(marker, extension)
        if extension == ".safetensors":
            pickle.loads(data)
        else:
            torch.load(io.BytesIO(data), weights_only=False)
        ok = ok and marker.exists()
    return ok


@dataclass
class Invariants:
    """A snapshot taken before a case; ``problems`` compares after it. ``plant`` writes the case's own hostile files
    (removed by ``cleanup``), so they count neither as changed files nor as leftovers for the next case."""

    server: harness.ComfyServer
    base: Path = field(init=False)
    marker: Path = field(init=False)
    planted: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.base = self.server.base_dir.resolve()
        # Outside the base directory, so a payload that ran is also caught as a file written outside.
        self.marker = self.base.parent / "UNPICKLED_BY_THE_SERVER"
        self.outside_before = set(_walk_files(self.base.parent, skip=self.base, with_folders=True))
        self.files_before = self._watched_files()
        self.temps_before = set(self._temps())

    def _watched_files(self) -> dict[Path, FileState]:
        return {p: _state(p) for sub in ("models", "output") for p in _walk_files(self.base / sub)
                if not p.is_symlink() and not p.name.startswith(TEMP_PREFIX)}

    def _temps(self) -> list[Path]:
        return [p for p in _walk_files(self.base, skip=self.base / "custom_nodes") if p.name.startswith(TEMP_PREFIX)]

    def plant(self, path: Path, data: bytes | None = None, *, link_to: Path | None = None) -> Path:
        """Writes ``data`` (or a symlink to ``link_to``, or an empty folder when both are None) at a new path."""
        assert not path.exists() and not path.is_symlink(), f"{path} exists: hostile files need unique names"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.planted.append(path)
        if link_to is not None:
            path.symlink_to(link_to)
        elif data is None:
            path.mkdir()
        else:
            path.write_bytes(data)
        return path

    def escape_targets(self) -> list[Path]:
        """Anything named after ESCAPE_TAG in the folders an escaping name could reach."""
        roots = {self.base.parent.parent, Path("/tmp"), Path.home(), harness.comfyui_dir(), harness.REPO, Path("/")}
        return [p for root in roots if root.is_dir() for p in root.iterdir() if ESCAPE_TAG in p.name]

    def problems(self) -> list[str]:
        out = []
        try:
            self.server.get("/system_stats")
        except OSError as e:
            out.append(f"the server no longer answers: {e}")
        if self.marker.exists():
            out.append("a pickle payload ran: the marker file exists")
        new_outside = set(_walk_files(self.base.parent, skip=self.base, with_folders=True)) - self.outside_before
        out += [f"written outside the base directory: {p}" for p in sorted(new_outside)]
        out += [f"written outside (escape target): {p}" for p in self.escape_targets()]
        out += [f"temporary file left: {p}" for p in sorted(set(self._temps()) - self.temps_before)]
        after = self._watched_files()
        out += [f"existing file changed or removed: {p}" for p, state in self.files_before.items()
                if after.get(p) != state]
        return out

    def cleanup(self) -> None:
        """Removes the planted files, and what a known bug (an xfail case) left: the next case starts clean."""
        for path in set(self._temps()) - self.temps_before:
            path.unlink()
        for path in reversed(self.planted):
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            else:
                path.unlink(missing_ok=True)
        self.marker.unlink(missing_ok=True)
