"""Load Audio Clips: a folder of audio clips with their captions (and lyrics) as a data set for audio models
(ACE-Step 1.5): one AUDIO per clip, decoded by ComfyUI's own audio loader, for ComfyUI's VAEEncodeAudio; the captions
and lyrics as STRING lists, for ComfyUI's ACE-Step text encode node. The folder layout is training/audio_clips.py's."""
from __future__ import annotations

import comfy.utils

from ..training.audio_clips import AudioClipsError, find_clips, prepared
from .comfy_bridge import decode_audio
from .input_folders import folder_changes, folder_input, folder_path

MAX_SECONDS = 600.0


class LoadAudioClips:
    DESCRIPTION = (
        "Loads an audio data set from a folder of ComfyUI's input folder: each clip (name.wav, .flac, .mp3, .ogg, …) "
        "with its caption (tags) in name.txt and, optionally, its lyrics in name.lyrics.txt. Outputs one AUDIO per "
        "clip (stereo, cut or padded with silence to the chosen length) for ComfyUI's VAE Encode Audio, and the "
        "captions and lyrics for ComfyUI's ACE-Step text encode node, to train a LoRA on ACE-Step 1.5.")
    CATEGORY = "LoRA Trainer"
    FUNCTION = "load"
    RETURN_TYPES = ("AUDIO", "STRING", "STRING")
    RETURN_NAMES = ("audio", "captions", "lyrics")
    OUTPUT_IS_LIST = (True, True, True)
    OUTPUT_TOOLTIPS = ("One audio per clip, in file-name order: for VAE Encode Audio.",
                       "The captions (tags), one per clip: for the ACE-Step text encode node's tags and Save LoRA's "
                       "captions.",
                       "The lyrics, one per clip ('' where a clip has no lyrics file): for the text encode node's "
                       "lyrics.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "folder": folder_input(),
            "seconds": ("FLOAT", {"default": 0.0, "min": 0.0, "max": MAX_SECONDS, "step": 0.1, "tooltip": (
                "Every clip cut to its first this many seconds, or padded with silence at the end to them (clips of "
                "one length train in one batch). 0 keeps each clip's own length.")}),
        }}

    @classmethod
    def IS_CHANGED(cls, folder, **_):
        return folder_changes(folder)

    def load(self, folder, seconds):
        root = folder_path(folder)
        try:
            clips = find_clips(root)
        except AudioClipsError as e:
            raise ValueError(f"folder: {e}") from None
        progress = comfy.utils.ProgressBar(len(clips))
        audios = []
        for clip in clips:
            try:
                waveform, sample_rate = decode_audio(str(clip.audio))
            except (OSError, ValueError) as e:  # PyAV's errors are OSErrors; no audio stream is a ValueError
                raise ValueError(f"folder: {clip.audio.name} is not an audio file that can be read ({e})") from None
            try:
                waveform = prepared(waveform, sample_rate, seconds, clip.audio.name)
            except AudioClipsError as e:
                raise ValueError(f"folder: {e}") from None
            # ComfyUI's AUDIO: a batch of one (1, channels, samples) and its sample rate, as Load Audio gives it;
            # VAE Encode Audio resamples it to its VAE's rate
            audios.append({"waveform": waveform[None], "sample_rate": sample_rate})
            progress.update(1)
        return audios, [clip.caption for clip in clips], [clip.lyrics for clip in clips]
