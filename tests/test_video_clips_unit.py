"""Finding the clips of a video data set in a folder (training/video_clips.py): video files and frame folders in name
order with their captions, and an error naming the file and the fix for every folder that is no video data set."""
from __future__ import annotations

from pathlib import Path

import pytest

from training.video_clips import VideoClipsError, find_clips

pytestmark = pytest.mark.fast


def make(folder: Path, *files: str, captions: dict[str, str] | None = None) -> Path:
    """Empty files (names only matter here; a name ending in / is a folder) and a caption file per clip named in
    ``captions``."""
    for name in files:
        path = folder / name
        if name.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
    for stem, text in (captions or {}).items():
        (folder / f"{stem}.txt").write_text(text, encoding="utf-8")
    return folder


def test_video_files_and_frame_folders_in_name_order(tmp_path):
    make(tmp_path, "waves.MP4", "candle/0002.png", "candle/0001.jpg", "candle/notes.md", "street.webm",
         captions={"waves": "waves on a beach\n", "candle": "a candle", "street": ""})
    clips = find_clips(tmp_path)
    assert [(c.source.name, [f.name for f in c.frames], c.caption) for c in clips] == [
        ("candle", ["0001.jpg", "0002.png"], "a candle"), ("street.webm", [], ""),
        ("waves.MP4", [], "waves on a beach")]


@pytest.mark.parametrize("files, captions, match", [
    ((), {}, r"'.*' holds no clips: a video data set is video files"),
    (("a.mp4",), {}, r"a\.mp4 has no caption file a\.txt: write its caption there"),
    (("a/0001.png",), {}, r"a/ has no caption file a\.txt"),
    (("a.mp4", "b.png"), {"a": "x"}, r"b\.png is neither a video .* nor a caption: put a clip's frame images in a "
                                     r"folder named after the clip"),
    (("a.mp4", "a/0001.png"), {"a": "x"}, r"a and a\.mp4 are two clips with one name"),
    (("a/notes.md",), {"a": "x"}, r"a/ holds no frame images"),
])
def test_a_folder_that_is_no_video_data_set_is_an_error_naming_the_file(tmp_path, files, captions, match):
    make(tmp_path, *files, captions=captions)
    with pytest.raises(VideoClipsError, match=match):
        find_clips(tmp_path)


def test_hidden_files_are_not_clips(tmp_path):
    make(tmp_path, ".DS_Store", ".cache/x.png", "a.gif", captions={"a": "x"})
    assert [c.source.name for c in find_clips(tmp_path)] == ["a.gif"]
