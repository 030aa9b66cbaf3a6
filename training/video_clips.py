"""Finding the clips of a video data set in a folder: (the clip's video file or frame images, caption).

A clip is either a video file (``name.mp4``, ``.webm``, ``.mov``, ``.mkv``, ``.avi``, ``.m4v``, ``.gif``) or a
subfolder of frame images (``name/0001.png``, ``name/0002.png``, … in file-name order: what a video exported as an
image sequence gives). Its caption is ``name.txt`` beside it (training/captions.py: it must exist). Other files
(caption files aside) are an error: a stray image or an unreadable video type would otherwise be left out silently.

Pure Python (no ComfyUI, no torch): the node decodes what this names.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .captions import CAPTION_EXTENSION, DataFolderError, read_caption
from .edit_pairs import IMAGE_EXTENSIONS

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v", ".gif")


class VideoClipsError(DataFolderError):
    """A folder that is no video data set; the message names the file and the fix."""


@dataclass(frozen=True)
class Clip:
    source: Path  # the video file, or the folder of frames
    frames: tuple[Path, ...]  # the frame images in order; empty for a video file
    caption: str


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _frames(folder: Path, root: Path) -> tuple[Path, ...]:
    frames = tuple(p for p in _visible(folder) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not frames:
        raise VideoClipsError(f"{folder.relative_to(root).as_posix()}/ holds no frame images "
                              f"({', '.join(IMAGE_EXTENSIONS)}): a clip folder is the clip's frames in name order")
    return frames


def find_clips(folder: Path) -> list[Clip]:
    """Every clip of ``folder`` with its caption, sorted by name.

    Raises VideoClipsError (naming the file and the fix) for: no clip, a file that is neither a video, a clip folder
    nor a caption, two clips with one name, a clip folder without frames, a missing caption file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VideoClipsError(f"'{folder}' is not a folder")
    sources: dict[str, Path] = {}
    for path in _visible(folder):
        if path.is_file() and path.suffix.lower() == CAPTION_EXTENSION:
            continue
        if path.is_file() and path.suffix.lower() not in VIDEO_EXTENSIONS:
            raise VideoClipsError(f"{path.name} is neither a video ({', '.join(VIDEO_EXTENSIONS)}) nor a caption: "
                                  f"put a clip's frame images in a folder named after the clip, or move the file out")
        name = path.name if path.is_dir() else path.stem
        if name in sources:
            raise VideoClipsError(f"{sources[name].name} and {path.name} are two clips with one name: keep one of "
                                  f"them")
        sources[name] = path
    if not sources:
        raise VideoClipsError(f"'{folder.name}' holds no clips: a video data set is video files (name.mp4, …) or "
                              f"folders of frame images (name/0001.png, …), each with its caption in name.txt")
    return [Clip(path, _frames(path, folder) if path.is_dir() else (),
                 read_caption(folder, name, path.name + ("/" if path.is_dir() else ""), "caption", VideoClipsError))
            for name, path in sorted(sources.items())]
