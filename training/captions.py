"""Caption files of the data-set folders (edit pairs, video clips): ``name.txt`` beside the item, UTF-8.

A caption file must exist: a forgotten one would otherwise train the LoRA on that item with no caption at all. An
empty file is an explicit empty caption. Pure Python (no ComfyUI, no torch)."""
from __future__ import annotations

from pathlib import Path

CAPTION_EXTENSION = ".txt"


class DataFolderError(ValueError):
    """A folder that is no data set of its kind; the message names the file and the fix."""


def read_caption(folder: Path, stem: str, item: str, what: str,
                 error: type[DataFolderError] = DataFolderError) -> str:
    """The stripped text of ``folder/stem.txt``, the caption of the item shown as ``item``; ``what`` says what the
    caption is (for the error asking to write it), ``error`` the data set's own error."""
    caption_file = folder / (stem + CAPTION_EXTENSION)
    if not caption_file.is_file():
        raise error(f"{item} has no caption file {caption_file.name}: write its {what} there (an empty file "
                              f"trains it without one)")
    try:
        return caption_file.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as e:
        raise error(f"{caption_file.name} is not UTF-8 text ({e.reason} at byte {e.start}): save it as "
                              f"UTF-8") from None
