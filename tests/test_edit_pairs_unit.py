"""Finding (target, references, caption) items of an edit data set in a folder (training/edit_pairs.py): both layouts,
the order of references, and an error naming the file and the fix for every folder that is no edit data set."""
from __future__ import annotations

from pathlib import Path

import pytest

from training.edit_pairs import EditPairsError, find_pairs

pytestmark = pytest.mark.fast


def make(folder: Path, *files: str, captions: dict[str, str] | None = None) -> Path:
    """Empty image files (names only matter here) and a caption file per target named in ``captions``."""
    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")
    for stem, text in (captions or {}).items():
        (folder / f"{stem}.txt").write_text(text, encoding="utf-8")
    return folder


def names(folder: Path) -> list[tuple[str, list[str], str]]:
    return [(p.target.name, [r.relative_to(folder).as_posix() for r in p.references], p.caption)
            for p in find_pairs(folder)]


def test_references_beside_the_targets_in_order(tmp_path):
    make(tmp_path, "b.png", "b_ref.jpg", "a.png", "a_ref2.webp", "a_ref.png", "a_ref3.JPEG",
         captions={"a": "make it red\n", "b": "add a hat"})
    assert names(tmp_path) == [("a.png", ["a_ref.png", "a_ref2.webp", "a_ref3.JPEG"], "make it red"),
                               ("b.png", ["b_ref.jpg"], "add a hat")]


def test_ref1_is_the_first_reference(tmp_path):
    make(tmp_path, "a.png", "a_ref1.png", "a_ref2.png", captions={"a": "x"})
    assert names(tmp_path) == [("a.png", ["a_ref1.png", "a_ref2.png"], "x")]


def test_references_in_control_folders(tmp_path):
    make(tmp_path, "a.png", "b.jpg", "control/a.jpg", "control/b.png", "control2/a.png", "notes/a.png",
         captions={"a": "one", "b": "two"})
    assert names(tmp_path) == [("a.png", ["control/a.jpg", "control2/a.png"], "one"),
                               ("b.jpg", ["control/b.png"], "two")]


def test_an_empty_caption_file_is_an_empty_caption(tmp_path):
    make(tmp_path, "a.png", "a_ref.png", captions={"a": "\n"})
    assert names(tmp_path) == [("a.png", ["a_ref.png"], "")]


def test_other_files_are_ignored(tmp_path):
    make(tmp_path, "a.png", "a_ref.png", "readme.md", ".hidden.png", "a_ref.txt", captions={"a": "x"})
    assert names(tmp_path) == [("a.png", ["a_ref.png"], "x")]


@pytest.mark.parametrize("files, captions, match", [
    ((), {}, r"'case' holds no target images .*name_ref\.png.*control/name\.png"),
    (("readme.md",), {}, r"holds no target images"),
    (("a.png",), {"a": "x"}, r"a\.png has no reference image: add a_ref\.png beside it or control/a\.png"),
    (("a.png", "a_ref.png", "b.png"), {"a": "x", "b": "y"}, r"b\.png has no reference image"),
    (("a.png", "a_ref.png", "b_ref.png"), {"a": "x"},
     r"b_ref\.png is a reference of b, but the folder has no target image b .*: add it, or remove the reference"),
    (("a.png", "a_ref.png", "control/c.png"), {"a": "x"}, r"control/c\.png is a reference of c, but .* no target"),
    (("a.png", "a_ref.png", "control/a.png"), {"a": "x"},
     r"a\.png has references both beside it \(a_ref\.png\) and in a control folder \(control/a\.png\): use one"),
    (("a.png", "a_ref.png"), {}, r"a\.png has no caption file a\.txt: write its edit instruction there"),
    (("a.png", "a_ref.png", "a_ref3.png"), {"a": "x"},
     r"a_ref3\.png comes without a_ref2\.png: number the references of a\.png from 1"),
    (("a.png", "a_ref2.png"), {"a": "x"}, r"a_ref2\.png comes without a_ref\.png"),
    (("a.png", "control2/a.png"), {"a": "x"}, r"control2/a\.png comes without control/a\.png"),
    (("a.png", "a_ref.png", "a_ref1.png"), {"a": "x"}, r"a_ref1?\.png and a_ref1?\.png are both reference 1 of a"),
    (("a.png", "a.jpg", "a_ref.png"), {"a": "x"}, r"a\.(jpg|png) and a\.(jpg|png) are two images for one item"),
    (("a.png", "control/a.png", "control/a.jpg"), {"a": "x"}, r"control/a\.(jpg|png) and control/a\.(jpg|png) are two"),
    (("a.png", "control/a.png", "control1/a.png"), {"a": "x"}, r"control/ and control1/ both hold reference 1"),
], ids=["empty", "no images", "no reference", "one of two without reference", "reference without target",
        "control without target", "both layouts", "no caption", "gap", "no first", "control gap", "ref and ref1",
        "two extensions", "two extensions in control", "control and control1"])
def test_a_folder_that_is_no_edit_data_set_is_an_error_naming_the_file(tmp_path, files, captions, match):
    folder = make(tmp_path / "case", *files, captions=captions) if files or captions else tmp_path / "case"
    folder.mkdir(exist_ok=True)
    with pytest.raises(EditPairsError, match=match):
        find_pairs(folder)


def test_a_caption_that_is_not_utf8_is_an_error(tmp_path):
    make(tmp_path, "a.png", "a_ref.png")
    (tmp_path / "a.txt").write_bytes(b"caf\xe9")
    with pytest.raises(EditPairsError, match=r"a\.txt is not UTF-8 text .* save it as UTF-8"):
        find_pairs(tmp_path)
