"""Load Video Clips: a folder of short clips (video files or folders of frame images) with caption files, as lists of
frames and captions for ComfyUI's MakeTrainingDataset, which encodes each clip with a video VAE (Wan's, …) into one
5-D latent. ComfyUI 0.3.75 has no loader for a folder of videos (0.33's LoadVideoTextDataSetFromFolder reads video
files only); the folder layout is training/video_clips.py's."""
from __future__ import annotations

from pathlib import Path

import comfy.utils
import folder_paths
import torch
from comfy_api.latest import InputImpl

from ..training.video_clips import Clip, VideoClipsError, find_clips
from .edit_pairs import read_image
from .input_folders import folder_changes, folder_input, folder_path

WAN_FRAMES = 81  # Wan 2.1's usual clip length (4k + 1 frames, what its VAE encodes whole)


def read_frames(clip: Clip, root: Path, max_frames: int) -> torch.Tensor:
    """The clip's first ``max_frames`` frames (all for 0) as ComfyUI's IMAGE (F, H, W, 3)."""
    shown = clip.source.relative_to(root).as_posix()
    if not clip.frames:
        try:  # ComfyUI's own decoder, as its Load Video node reads the file
            frames = InputImpl.VideoFromFile(str(clip.source)).get_components().images
        except Exception as e:
            raise ValueError(f"folder: {shown} is not a video that can be read ({e})") from None
        return frames[:max_frames] if max_frames else frames
    paths = clip.frames[:max_frames] if max_frames else clip.frames
    images = [read_image(p, p.relative_to(root).as_posix()) for p in paths]
    sizes = sorted({tuple(image.shape[1:3]) for image in images})
    if len(sizes) > 1:
        raise ValueError(f"folder: the frames of {shown}/ have different sizes (height x width: "
                         f"{', '.join(f'{h}x{w}' for h, w in sizes)}): one clip is one size")
    return torch.cat(images)


class LoadVideoClips:
    DESCRIPTION = (
        "Loads a video data set from a folder of ComfyUI's input folder: video files (name.mp4, .webm, .mov, .mkv, "
        ".avi, .m4v, .gif) and folders of frame images (name/0001.png, … in name order), each with its caption in "
        "name.txt. Outputs each clip's frames and the captions, for ComfyUI's Make Training Dataset with a video VAE "
        "(one 5-D latent per clip) and Save LoRA's captions.")
    CATEGORY = "LoRA Trainer"
    FUNCTION = "load"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("frames", "captions")
    OUTPUT_IS_LIST = (True, True)
    OUTPUT_TOOLTIPS = ("One IMAGE batch of frames per clip.", "One caption per clip.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "folder": folder_input(),
            "max_frames": ("INT", {"default": WAN_FRAMES, "min": 0, "max": 100000, "tooltip": (
                "The first this many frames of each clip (0: all). Wan's VAE encodes 4k + 1 frames (81 is Wan 2.1's "
                "usual length) and leaves out frames after the last such count.")}),
        }}

    @classmethod
    def IS_CHANGED(cls, folder, **_):
        return folder_changes(folder)

    def load(self, folder, max_frames):
        root = folder_path(folder)
        try:
            clips = find_clips(root)
        except VideoClipsError as e:
            raise ValueError(f"folder: {e}") from None
        progress = comfy.utils.ProgressBar(len(clips))
        frames = []
        for clip in clips:
            frames.append(read_frames(clip, root, max_frames))
            progress.update(1)
        return frames, [clip.caption for clip in clips]
