"""Finding the items of an audio data set in a folder, and giving every clip the length and channels audio VAEs take.

Layout (what ACE-Step trainers' data sets already look like): each clip ``name.wav`` (any of AUDIO_EXTENSIONS) with
its caption ``name.txt`` beside it (ACE-Step's *tags*: genre, instruments, mood) and, optionally, its lyrics in
``name.lyrics.txt``. The caption file must exist: a forgotten one would train the clip as an unprompted style. An
empty file is an explicit empty caption; a missing lyrics file means no lyrics (instrumental).

Pure Python and torch (no ComfyUI): the node decodes the files this names through ComfyUI's own audio loader.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac")
CAPTION_EXTENSION = ".txt"
LYRICS_EXTENSION = ".lyrics.txt"
STEREO = 2  # the audio VAEs of ACE-Step (1 and 1.5) and Stable Audio encode two channels


class AudioClipsError(ValueError):
    """A folder that is no audio data set, or a clip that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class AudioClip:
    audio: Path
    caption: str
    lyrics: str  # "" when the clip has no lyrics file


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as e:
        raise AudioClipsError(f"{path.name} is not UTF-8 text ({e.reason} at byte {e.start}): save it as "
                              f"UTF-8") from None


def find_clips(folder: Path) -> list[AudioClip]:
    """Every audio file of ``folder`` (not its subfolders) with its caption and lyrics, sorted by file name.

    Raises AudioClipsError (naming the file and the fix) for: no audio file, two audio files with one name
    (``a.wav`` and ``a.flac``), a clip without its caption file, a lyrics file without its clip, a caption or lyrics
    file that is not UTF-8."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AudioClipsError(f"'{folder}' is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    clips: dict[str, Path] = {}
    for path in files:
        if path.suffix.lower() not in AUDIO_EXTENSIONS:
            continue
        if path.stem in clips:
            raise AudioClipsError(f"{clips[path.stem].name} and {path.name} are two audio files for one clip: keep "
                                  f"one of them")
        clips[path.stem] = path
    for path in files:
        if path.name.lower().endswith(LYRICS_EXTENSION) and path.name[:-len(LYRICS_EXTENSION)] not in clips:
            raise AudioClipsError(f"{path.name} holds lyrics, but the folder has no clip "
                                  f"{path.name[:-len(LYRICS_EXTENSION)]} ({', '.join(AUDIO_EXTENSIONS)}): add it, or "
                                  f"remove the lyrics file")
    if not clips:
        raise AudioClipsError(f"'{folder.name}' holds no audio files ({', '.join(AUDIO_EXTENSIONS)}); an audio data "
                              f"set is name.wav with its caption (tags) in name.txt and, optionally, its lyrics in "
                              f"name.lyrics.txt")
    out = []
    for stem, audio in sorted(clips.items()):
        caption_file = folder / (stem + CAPTION_EXTENSION)
        if not caption_file.is_file():
            raise AudioClipsError(f"{audio.name} has no caption file {caption_file.name}: write its tags there (an "
                                  f"empty file trains it without a caption)")
        lyrics_file = folder / (stem + LYRICS_EXTENSION)
        out.append(AudioClip(audio, _text(caption_file), _text(lyrics_file) if lyrics_file.is_file() else ""))
    return out


def to_stereo(waveform: torch.Tensor, shown: str) -> torch.Tensor:
    """(channels, samples) as two channels: a mono clip is heard the same on both (the audio VAEs take stereo); more
    than two channels is an error naming the file, since no downmix is right for every layout."""
    channels = waveform.shape[0]
    if channels == STEREO:
        return waveform
    if channels == 1:
        return waveform.expand(STEREO, -1).clone()
    raise AudioClipsError(f"{shown} has {channels} channels: the audio VAEs encode stereo; mix it down to two (or "
                          f"one) channels")


def fit_length(waveform: torch.Tensor, samples: int) -> torch.Tensor:
    """(channels, samples) cut to the first ``samples`` or padded with silence at the end to them; ``samples`` 0 keeps
    the clip's own length."""
    have = waveform.shape[-1]
    if samples <= 0 or have == samples:
        return waveform
    if have > samples:
        return waveform[..., :samples].clone()
    return torch.nn.functional.pad(waveform, (0, samples - have))


def prepared(waveform: torch.Tensor, sample_rate: int, seconds: float, shown: str) -> torch.Tensor:
    """A decoded clip (channels, samples) as the node outputs it: stereo, ``seconds`` long (0: its own length)."""
    if waveform.shape[-1] == 0:
        raise AudioClipsError(f"{shown} holds no audio samples")
    if not torch.isfinite(waveform).all():
        raise AudioClipsError(f"{shown} holds NaN or infinite samples")
    return fit_length(to_stereo(waveform, shown), round(seconds * sample_rate))
