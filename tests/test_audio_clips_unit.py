"""Finding (clip, caption, lyrics) items of an audio data set in a folder, and fitting clips to the length and
channels the audio VAEs take (training/audio_clips.py): an error naming the file and the fix for every folder that is
no audio data set."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.audio_clips import AudioClipsError, find_clips, fit_length, prepared, to_stereo

pytestmark = pytest.mark.fast


def make(folder: Path, *files: str, texts: dict[str, str] | None = None) -> Path:
    """Empty audio files (names only matter here) and text files (captions, lyrics) with their contents."""
    for name in files:
        (folder / name).write_bytes(b"")
    for name, text in (texts or {}).items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def test_clips_with_captions_and_optional_lyrics_in_name_order(tmp_path):
    make(tmp_path, "b.flac", "a.wav", "c.MP3", "notes.md", ".hidden.wav",
         texts={"a.txt": "rock, guitar\n", "b.txt": "", "c.txt": "jazz", "a.lyrics.txt": "[verse]\nla la\n",
                "readme.txt": "a caption file without a clip is not part of the set"})
    clips = find_clips(tmp_path)
    assert [(c.audio.name, c.caption, c.lyrics) for c in clips] == [
        ("a.wav", "rock, guitar", "[verse]\nla la"), ("b.flac", "", ""), ("c.MP3", "jazz", "")]


@pytest.mark.parametrize("files, texts, message", [
    ((), {"a.txt": "x"}, r"'.*' holds no audio files \(\.wav, .*name\.lyrics\.txt"),
    (("a.wav",), {}, r"a\.wav has no caption file a\.txt: write its tags there"),
    (("a.wav", "a.flac"), {"a.txt": "x"}, r"a\.flac and a\.wav are two audio files for one clip"),
    (("a.wav",), {"a.txt": "x", "b.lyrics.txt": "la"}, r"b\.lyrics\.txt holds lyrics, but the folder has no clip b "),
])
def test_a_folder_that_is_no_audio_data_set_names_the_file(tmp_path, files, texts, message):
    make(tmp_path, *files, texts=texts)
    with pytest.raises(AudioClipsError, match=message):
        find_clips(tmp_path)


def test_a_caption_that_is_not_utf8_names_the_file(tmp_path):
    make(tmp_path, "a.wav")
    (tmp_path / "a.txt").write_bytes(b"caf\xe9")
    with pytest.raises(AudioClipsError, match=r"a\.txt is not UTF-8 text .* save it as UTF-8"):
        find_clips(tmp_path)


def test_clips_are_cut_or_padded_with_silence_to_the_length():
    wave = torch.arange(1.0, 11.0).reshape(2, 5)
    assert torch.equal(fit_length(wave, 3), wave[:, :3])
    assert torch.equal(fit_length(wave, 7), torch.cat([wave, torch.zeros(2, 2)], dim=1))
    assert fit_length(wave, 0) is wave and fit_length(wave, 5) is wave


def test_mono_is_heard_on_both_channels_and_more_than_two_is_an_error():
    mono = torch.randn(1, 4)
    assert torch.equal(to_stereo(mono, "m.wav"), mono.repeat(2, 1))
    with pytest.raises(AudioClipsError, match=r"s\.wav has 6 channels: .* mix it down"):
        to_stereo(torch.zeros(6, 4), "s.wav")


def test_prepared_gives_stereo_of_the_chosen_seconds_and_refuses_empty_or_non_finite_clips():
    assert prepared(torch.ones(1, 300), 100, 2.5, "a.wav").shape == (2, 250)
    assert prepared(torch.ones(2, 300), 100, 0.0, "a.wav").shape == (2, 300)
    with pytest.raises(AudioClipsError, match=r"e\.wav holds no audio samples"):
        prepared(torch.zeros(2, 0), 100, 1.0, "e.wav")
    with pytest.raises(AudioClipsError, match=r"n\.wav holds NaN or infinite samples"):
        prepared(torch.tensor([[0.0, float("nan")]]), 100, 1.0, "n.wav")
