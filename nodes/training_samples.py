"""Sample images while training: the Training Samples node (what to render), the renderer Train LoRA calls every N
steps (ComfyUI's own sampling on the training model with the current LoRA, decoded by the node's VAE, shown on the
node and saved as PNG with its settings), and the Sample Grid node (the run's grid as an IMAGE).

When to sample is training.sample_schedule's; the loop calls the renderer without gradients and puts the global RNG
back after it, so a run with samples trains the same LoRA as one without."""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

import comfy.model_management
import comfy.samplers
import folder_paths

from ..training.sample_schedule import SampleSchedule
from . import comfy_bridge, events, inputs, process_group
from .companions import confined

log = logging.getLogger("lora_trainer")
SAMPLES_TYPE = "LORA_TRAINER_SAMPLES"
SEED_MAX = 0xFFFFFFFFFFFFFFFF
PREVIEW_SIZE = 1024  # the longest side of the live preview on the node
LABEL_HEIGHT = 18  # pixels of the grid's header row (step numbers)


@dataclass(frozen=True)
class SampleSpec:
    """What the Training Samples node asks for. ``positive`` holds one CONDITIONING per prompt (a grid row);
    ``negative`` one for all prompts or one per prompt."""

    positive: list
    negative: list
    vae: object
    width: int = 512
    height: int = 512
    length: int = 1
    latent: torch.Tensor | None = None
    sampler_name: str = "euler"
    scheduler: str = "simple"
    steps: int = 20
    cfg: float = 5.0
    seed: int = 0
    every_n_steps: int = 100
    sample_at_start: bool = True
    filename_prefix: str = "my_lora"
    labels: tuple[str, ...] = ()

    @property
    def schedule(self) -> SampleSchedule:
        return SampleSchedule(self.every_n_steps, self.sample_at_start)

    def label(self, i: int) -> str:
        return self.labels[i] if i < len(self.labels) and self.labels[i] else f"prompt {i + 1}"

    def settings(self) -> dict:
        """The sampler settings a PNG records."""
        return {"sampler_name": self.sampler_name, "scheduler": self.scheduler, "steps": self.steps, "cfg": self.cfg,
                "seed": self.seed}


class TrainingSamples:
    DESCRIPTION = ("Sample images while training: every N steps (and before the first, and after the last) Train "
                   "LoRA renders each prompt with ComfyUI's own sampler on the model with the LoRA as trained so "
                   "far, shows them on its node and saves them as PNG in output/<filename_prefix>_samples/ (step, "
                   "prompt and sampler settings in the PNG), with a grid of all of them at the end. Connect to the "
                   "'samples' input of Training Options. Training is unchanged by it: same LoRA with or without.")
    CATEGORY = "LoRA Trainer"
    FUNCTION = "samples"
    RETURN_TYPES = (SAMPLES_TYPE,)
    RETURN_NAMES = ("samples",)
    OUTPUT_TOOLTIPS = ("Connect to the 'samples' input of Training Options.",)
    # List mode: several prompts come as a list of CONDITIONINGs (one grid row each).
    INPUT_IS_LIST = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "positive": ("CONDITIONING", {"tooltip": "The prompts to sample: one CONDITIONING, or a list of them "
                                                     "(one row of the grid each)."}),
            "negative": ("CONDITIONING", {"tooltip": "The negative prompt: one for all prompts, or one per prompt."}),
            "vae": ("VAE", {"tooltip": "Decodes the samples; must be the model's VAE (its latent channels)."}),
            "width": ("INT", {"default": 512, "min": 16, "max": 16384, "step": 8,
                              "tooltip": "Sample width in pixels (unless a latent is connected)."}),
            "height": ("INT", {"default": 512, "min": 16, "max": 16384, "step": 8,
                               "tooltip": "Sample height in pixels (unless a latent is connected)."}),
            "length": ("INT", {"default": 1, "min": 1, "max": 1024,
                               "tooltip": "Video models: frames of a sample clip (1 = a single frame)."}),
            "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"default": "euler",
                                                                "tooltip": "ComfyUI's sampler."}),
            "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"default": "simple",
                                                               "tooltip": "ComfyUI's scheduler."}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000, "tooltip": "Sampling steps per image."}),
            "cfg": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Classifier-free guidance scale."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX,
                             "tooltip": "The noise of every sample: the same seed gives the same images."}),
            "every_n_steps": ("INT", {"default": 100, "min": 1, "max": 100000,
                                      "tooltip": "Sample after every N training steps (and after the last step)."}),
            "sample_at_start": ("BOOLEAN", {"default": True,
                                            "tooltip": "Also sample before the first step (step 0: the model "
                                                       "without what this run trains)."}),
            "filename_prefix": ("STRING", {"default": "my_lora",
                                           "tooltip": "Samples go to output/<filename_prefix>_samples/."}),
        }, "optional": {
            "latent": ("LATENT", {"tooltip": "Sample at this latent's size instead of width/height/length (e.g. "
                                             "an Empty Latent node's output; its first item)."}),
            "prompt_labels": ("STRING", {"default": "", "multiline": True,
                                         "tooltip": "One line per prompt: its text, for the PNG metadata and file "
                                                    "names (conditioning carries no text)."}),
        }}

    def samples(self, positive, negative, vae, latent=None, prompt_labels=None, **kw):
        settings = {k: inputs.one(v, k) for k, v in kw.items()}
        vae = inputs.one(vae, "vae")
        if len(negative) not in (1, len(positive)):
            raise ValueError(f"negative: {len(negative)} negative prompts for {len(positive)} prompts; give one for "
                             "all or one per prompt")
        if latent is not None:
            samples = inputs.one(latent, "latent").get("samples")
            if not torch.is_tensor(samples) or getattr(samples, "is_nested", False):
                raise ValueError("latent: a LATENT of one tensor is needed (its size is the samples' size)")
            latent = samples[:1].clone()
        labels = tuple(line.strip() for line in (inputs.one(prompt_labels, "prompt_labels") or "").splitlines())
        return (SampleSpec(list(positive), list(negative), vae, latent=latent, labels=labels, **settings),)


def _safe(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:limit] or "prompt"


def _pil(frame: torch.Tensor) -> Image.Image:
    return Image.fromarray((frame.cpu().numpy() * 255.0).round().astype(np.uint8))


@dataclass
class SampleRun:
    """What a run sampled: per step, per prompt, the image (first frame) and the file (relative to output/)."""

    steps: list[int] = field(default_factory=list)
    images: dict[int, list[Image.Image]] = field(default_factory=dict)
    files: dict[int, list[str]] = field(default_factory=dict)


class Renderer:
    """Renders a SampleSpec on the training model (``patcher``, the LoRA attached as hooks): called by the loop at a
    sampling step without gradients. Only the process that writes files (rank 0) samples."""

    def __init__(self, spec: SampleSpec, patcher, node_id, preview=None):
        self.spec, self.patcher, self.node_id, self.preview = spec, patcher, node_id, preview
        self.run = SampleRun()
        self.output = Path(folder_paths.get_output_directory())
        directory, stem = confined(self.output, spec.filename_prefix, "filename_prefix")
        self.dir = directory / f"{stem}_samples"
        self.number = 0
        self.latent = self._latent()

    def _latent(self) -> torch.Tensor:
        spec, model = self.spec, self.patcher
        dims, name = comfy_bridge.latent_dims(model)
        if dims == 1:
            raise ValueError(f"samples: sampling this {name} audio model is not supported yet; disconnect samples")
        channels = comfy_bridge.latent_channels(model)
        vae_channels = getattr(spec.vae, "latent_channels", None)
        if vae_channels is not None and vae_channels != channels:
            raise ValueError(f"samples: vae: this VAE takes {vae_channels}-channel latents; the {name} model makes "
                             f"{channels}-channel ones: connect the model's own VAE to Training Samples")
        vae_dims = getattr(spec.vae, "latent_dim", dims)
        if vae_dims != dims:
            kinds = {1: "audio", 2: "image", 3: "video"}
            raise ValueError(f"samples: vae: this is {'an' if vae_dims == 1 else 'a'} {kinds.get(vae_dims, '?')} VAE "
                             f"({vae_dims}-D latents); the {name} model samples {dims}-D latents: connect the "
                             "model's own VAE to Training Samples")
        if spec.latent is None:
            return comfy_bridge.empty_latent(model, spec.vae, spec.width, spec.height, spec.length)
        latent = spec.latent
        empty = torch.count_nonzero(latent) == 0  # ComfyUI's samplers widen an empty latent to the model's channels
        if latent.ndim != dims + 2 and not (dims == 3 and latent.ndim == 4 and empty):
            raise ValueError(f"samples: latent: a {latent.ndim - 2}-D latent; the {name} model samples "
                             f"{dims}-D latents (shape (1, {channels}, {'T, ' if dims == 3 else ''}H, W))")
        if latent.shape[1] != channels and not empty:
            raise ValueError(f"samples: latent: {latent.shape[1]} channels; the {name} model samples {channels}")
        return latent

    def check(self, device: torch.device) -> None:
        """Conditioning the model cannot use is an error naming the input before any training step (the model's
        ``extra_conds`` encode it; no forward)."""
        latent = self.latent
        frames = (1,) if comfy_bridge.latent_dims(self.patcher)[0] == 3 and latent.ndim == 4 else ()
        shape = (comfy_bridge.latent_channels(self.patcher), *frames, *latent.shape[2:])  # as the sampler widens it
        for what, conds in (("positive", self.spec.positive), ("negative", self.spec.negative)):
            try:
                entries = [entry for cond in conds for entry in cond]
                comfy_bridge.SampleConditioning(self.patcher, entries, [shape] * len(entries), device)
            except ValueError as e:
                raise ValueError(f"samples: {what}: {str(e).split(': ', 1)[-1]}") from None

    def __call__(self, step: int) -> None:
        if not process_group.writes_files():
            return
        spec = self.spec
        if not self.number:  # the run's number: the next free one in the folder, so runs never overwrite
            self.dir.mkdir(parents=True, exist_ok=True)
            taken = [int(m.group(1)) for p in self.dir.iterdir() if (m := re.match(r"(\d{5})_", p.name))]
            self.number = max(taken, default=0) + 1
        images, files = [], []
        for i, positive in enumerate(spec.positive):
            negative = spec.negative[i if len(spec.negative) > 1 else 0]
            latent = comfy_bridge.render(self.patcher, positive, negative, self.latent, seed=spec.seed,
                                         steps=spec.steps, cfg=spec.cfg, sampler_name=spec.sampler_name,
                                         scheduler=spec.scheduler,
                                         on_step=comfy.model_management.throw_exception_if_processing_interrupted)
            frames = comfy_bridge.decode_frames(spec.vae, latent)
            comfy.model_management.throw_exception_if_processing_interrupted()
            image = _pil(frames[0])
            files.append(self._save(step, i, image, frames))
            images.append(image)
        self.run.steps.append(step)
        self.run.images[step], self.run.files[step] = images, files
        if self.preview is not None:
            self.preview(_row(images))
        events.send("sample", {"node": self.node_id, "step": step, "files": files})
        log.info("step %d: samples %s", step, ", ".join(files))

    def _save(self, step: int, i: int, image: Image.Image, frames: torch.Tensor) -> str:
        spec = self.spec
        info = PngInfo()
        record = {"step": step, "prompt": spec.label(i), "prompt_index": i, "width": image.width,
                  "height": image.height, "frames": len(frames), **spec.settings()}
        info.add_text("lora_trainer_sample", json.dumps(record))
        info.add_text("parameters", f"{spec.label(i)}\nStep: {step}, Sampler: {spec.sampler_name}, Schedule type: "
                                    f"{spec.scheduler}, Steps: {spec.steps}, CFG scale: {spec.cfg}, Seed: {spec.seed}, "
                                    f"Size: {image.width}x{image.height}")
        name = f"{self.number:05d}_step{step:06d}_p{i + 1}_{_safe(spec.label(i))}"
        path = self.dir / f"{name}.png"
        image.save(path, pnginfo=info, compress_level=4)
        if len(frames) > 1:  # a video model's clip beside its first frame
            clip = [_pil(f) for f in frames]
            clip[0].save(self.dir / f"{name}.webp", save_all=True, append_images=clip[1:], duration=125, loop=0)
        return path.relative_to(self.output.resolve()).as_posix()

    def finish(self) -> dict:
        """Writes the grid (rows = prompts, columns = steps) and returns the run's samples for the LOSS_MAP."""
        summary = {"steps": list(self.run.steps), "prompts": [self.spec.label(i) for i in range(len(self.spec.positive))],
                   "files": [self.run.files[s] for s in self.run.steps], "grid": None}
        if self.run.steps and process_group.writes_files():
            grid = _grid([self.run.images[s] for s in self.run.steps], self.run.steps)
            path = self.dir / f"{self.number:05d}_grid.png"
            grid.save(path, compress_level=4)
            summary["grid"] = path.relative_to(self.output.resolve()).as_posix()
        return summary


def renderer_for(spec: SampleSpec | None, patcher, node_id, pbar, device: torch.device) -> Renderer | None:
    """The run's renderer, its inputs checked against the model (errors before any step), or None without samples.
    Each step's images go to the node as ComfyUI's live previews do (through its progress bar)."""
    if spec is None:
        return None
    def preview(image: Image.Image) -> None:  # ComfyUI scales a preview to its max size: never up
        pbar.update_absolute(pbar.current, pbar.total, ("PNG", image, min(PREVIEW_SIZE, max(image.size))))

    renderer = Renderer(spec, patcher, node_id, preview)
    renderer.check(device)
    return renderer


def loop_hooks(renderer: Renderer | None) -> dict:
    """The loop.Callbacks fields that make the loop call ``renderer`` on its schedule (none without samples)."""
    return {} if renderer is None else {"sample_schedule": renderer.spec.schedule, "sample": renderer}


def _row(images: list[Image.Image]) -> Image.Image:
    """The prompts of one step side by side: the live preview."""
    out = Image.new("RGB", (sum(im.width for im in images), max(im.height for im in images)))
    x = 0
    for im in images:
        out.paste(im, (x, 0))
        x += im.width
    return out


def _grid(columns: list[list[Image.Image]], steps: list[int]) -> Image.Image:
    """Columns = steps (labelled on top), rows = prompts."""
    width, height = max(im.width for c in columns for im in c), max(im.height for c in columns for im in c)
    rows = len(columns[0])
    grid = Image.new("RGB", (width * len(columns), LABEL_HEIGHT + height * rows), "white")
    draw = ImageDraw.Draw(grid)
    for c, (column, step) in enumerate(zip(columns, steps)):
        draw.text((c * width + 3, 3), f"step {step}", fill="black")
        for r, image in enumerate(column):
            grid.paste(image, (c * width, LABEL_HEIGHT + r * height))
    return grid


def ui_images(summary: dict | None) -> list[dict]:
    """The grid as ComfyUI's ui images (shown on the training node when the run ends)."""
    if not summary or not summary.get("grid"):
        return []
    subfolder, _, name = summary["grid"].rpartition("/")
    return [{"filename": name, "subfolder": subfolder, "type": "output"}]


def ui_output(summary: dict | None, sampling_s: float) -> dict:
    """What Train LoRA's UI output adds for a run with samples: the grid (ComfyUI shows it on the node) and the
    time sampling took (apart from training's); nothing for a run without."""
    if summary is None:
        return {}
    return {"images": ui_images(summary), "lora_trainer_sampling_s": [sampling_s]}


class SampleGrid:
    DESCRIPTION = ("The grid of a run's training samples (rows = prompts, columns = steps) as an IMAGE, from the "
                   "loss output of Train LoRA; the grid file itself is in output/<filename_prefix>_samples/.")
    CATEGORY = "LoRA Trainer"
    FUNCTION = "grid"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("grid",)
    OUTPUT_NODE = True  # shows the grid, so it runs without a consumer of its IMAGE
    OUTPUT_TOOLTIPS = ("The grid of the samples: rows = prompts, columns = the steps they were rendered at.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"loss": ("LOSS_MAP", {"tooltip": "The loss output of Train LoRA (its run had "
                                                              "Training Samples connected)."})}}

    def grid(self, loss):
        summary = (loss or {}).get("samples")
        if not summary:
            raise ValueError("loss: this run sampled no images: connect a Training Samples node to the 'samples' "
                             "input of its Training Options")
        if not summary.get("grid"):  # a rank that writes no files has no grid: a placeholder keeps the graph going
            return {"ui": {"text": ["the grid is written by rank 0"]}, "result": (torch.zeros((1, 64, 64, 3)),)}
        path = Path(folder_paths.get_output_directory()) / summary["grid"]
        with Image.open(path) as image:
            pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]
        return {"ui": {"images": ui_images(summary)}, "result": (pixels,)}
