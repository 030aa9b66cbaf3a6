"""Finding the items of an edit data set in a folder: (target image, its reference images in order, caption).

Two layouts, the ones kohya / ai-toolkit / musubi-tuner users already have, in one folder:

- beside the target: ``name.png`` with ``name_ref.png``, ``name_ref2.png``, … (``name_ref1`` is the same as
  ``name_ref``);
- in subfolders: ``control/name.png``, ``control2/name.png``, … (the same stem, any image extension).

The caption (the edit instruction) is ``name.txt`` beside the target. It must exist: a forgotten caption file would
otherwise train the LoRA to make that edit with no instruction at all. An empty file is an explicit empty caption.

Pure Python (no ComfyUI, no torch): the node reads the images this names.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .captions import DataFolderError, read_caption

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
_REF_SUFFIX = re.compile(r"^(?P<stem>.+)_ref(?P<index>[1-9][0-9]*)?$")
_CONTROL_FOLDER = re.compile(r"^control(?P<index>[1-9][0-9]*)?$")


class EditPairsError(DataFolderError):
    """A folder that is no edit data set; the message names the file and the fix."""


@dataclass(frozen=True)
class EditPair:
    target: Path
    references: tuple[Path, ...]  # in order: _ref (or control/), _ref2 (or control2/), …
    caption: str


def _index(digits: str | None) -> int:
    return int(digits) if digits else 1


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


def _shown(path: Path, folder: Path) -> str:
    return path.relative_to(folder).as_posix()


def _by_stem(images: list[Path], folder: Path) -> dict[str, Path]:
    """stem -> image; two images with one stem (``a.png`` and ``a.jpg``) are an error: which one is meant?"""
    out: dict[str, Path] = {}
    for image in images:
        if image.stem in out:
            raise EditPairsError(f"{_shown(out[image.stem], folder)} and {_shown(image, folder)} are two images for "
                                 f"one item: keep one of them")
        out[image.stem] = image
    return out


def _numbered(found: dict[int, Path], folder: Path, target: Path, name_of: Callable[[int], str]) -> tuple[Path, ...]:
    """``found`` (index -> file) in order; a gap in the numbering is an error naming the missing name
    (``name_of(i)``)."""
    for i in range(1, max(found) + 1):
        if i not in found:
            later = found[min(k for k in found if k > i)]
            raise EditPairsError(f"{_shown(later, folder)} comes without {name_of(i)}: number the references of "
                                 f"{target.name} from 1 without gaps")
    return tuple(found[i] for i in sorted(found))


def find_pairs(folder: Path) -> list[EditPair]:
    """Every target image of ``folder`` with its references and caption, sorted by file name.

    Raises EditPairsError (naming the file and the fix) for: no target image, a target without a reference, a
    reference without a target, a target with references in both layouts, a gap in a target's reference numbers,
    two images with one name, a missing caption file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EditPairsError(f"'{folder}' is not a folder")
    targets: dict[str, Path] = {}
    beside: dict[str, dict[int, Path]] = {}
    for stem, image in _by_stem(_images(folder), folder).items():
        match = _REF_SUFFIX.match(stem)
        if match:
            refs = beside.setdefault(match["stem"], {})
            index = _index(match["index"])
            if index in refs:  # name_ref and name_ref1
                raise EditPairsError(f"{refs[index].name} and {image.name} are both reference {index} of "
                                     f"{match['stem']}: keep one of them")
            refs[index] = image
        else:
            targets[stem] = image
    controls: dict[str, dict[int, Path]] = {}
    control_folders: dict[int, Path] = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        match = _CONTROL_FOLDER.match(sub.name)
        if not match:
            continue  # other subfolders (originals, backups) are not part of the data set
        index = _index(match["index"])
        if index in control_folders:  # control/ and control1/
            raise EditPairsError(f"{control_folders[index].name}/ and {sub.name}/ both hold reference {index}: merge "
                                 f"them into one folder")
        control_folders[index] = sub
        for stem, image in _by_stem(_images(sub), folder).items():
            controls.setdefault(stem, {})[index] = image
    for stem, refs in [*sorted(beside.items()), *sorted(controls.items())]:
        if stem not in targets:
            raise EditPairsError(f"{_shown(refs[min(refs)], folder)} is a reference of {stem}, but the folder has no "
                                 f"target image {stem} (.png, .jpg, .jpeg or .webp): add it, or remove the reference")
    if not targets:
        raise EditPairsError(f"'{folder.name}' holds no target images (.png, .jpg, .jpeg, .webp); an edit data set "
                             f"is name.png with name_ref.png, name_ref2.png, … beside it, or with control/name.png, "
                             f"control2/name.png, …, and the edit instruction in name.txt")
    return [_pair(folder, stem, image, beside.get(stem), controls.get(stem)) for stem, image in sorted(targets.items())]


def _pair(folder: Path, stem: str, target: Path, beside: dict[int, Path] | None,
          controls: dict[int, Path] | None) -> EditPair:
    if beside and controls:
        raise EditPairsError(f"{target.name} has references both beside it ({_shown(beside[min(beside)], folder)}) "
                             f"and in a control folder ({_shown(controls[min(controls)], folder)}): use one layout "
                             f"per image")
    if not beside and not controls:
        raise EditPairsError(f"{target.name} has no reference image: add {stem}_ref.png beside it or "
                             f"control/{stem}.png (any of .png, .jpg, .jpeg, .webp)")
    if beside:
        references = _numbered(beside, folder, target, lambda i: f"{stem}_ref{'' if i == 1 else i}.png")
    else:
        references = _numbered(controls, folder, target, lambda i: f"control{'' if i == 1 else i}/{stem}.png")
    caption = read_caption(folder, stem, target.name, "edit instruction", EditPairsError)
    return EditPair(target, references, caption)
