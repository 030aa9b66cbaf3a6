"""The Training Options node: what long runs need (schedule, clipping, intermediate saves, resume), kept off the main
node so that its 16 documented inputs stay as they are. Its output is a plain dict; ``RunOptions.of`` reads it."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import folder_paths

from ..training.schedules import LR_SCHEDULES, LRSchedule
from ..training.timesteps import TIMESTEP_SAMPLINGS, TimestepSampling
from . import inputs
from .safe_files import listed
from .training_samples import SAMPLES_TYPE, SampleSpec

OPTIONS_TYPE = "LORA_TRAINING_OPTIONS"
NONE = "[None]"


def states_dir() -> Path:
    return Path(folder_paths.get_output_directory()) / "training_states"


def state_choices() -> list[str]:
    return [NONE] + listed(states_dir())


@dataclass(frozen=True)
class RunOptions:
    """The options of one run; the defaults are a run without a Training Options node (what the node always did)."""

    lr_schedule: LRSchedule = field(default_factory=LRSchedule)
    max_grad_norm: float = 0.0
    timesteps: TimestepSampling = field(default_factory=TimestepSampling)
    save_every_n_steps: int = 0
    keep_last: int = 0  # intermediate saves kept (the newest); 0 = all
    save_prefix: str = "trained/my_lora"
    resume_from: str | None = None
    ema_decay: float = 0.0
    dora: bool = False
    rs_lora: bool = False
    validate_every_n_steps: int = 0
    validation: tuple | None = None  # (LATENT list, CONDITIONING list) as the node received them
    samples: SampleSpec | None = None  # from a Training Samples node: images rendered while training

    @classmethod
    def of(cls, options: dict | None) -> "RunOptions":
        if not options:
            return cls()
        return cls(
            lr_schedule=LRSchedule(options["lr_schedule"], options["warmup_steps"], options["min_lr_ratio"],
                                   options["cycles"]),
            max_grad_norm=options["max_grad_norm"],
            timesteps=TimestepSampling(options["timestep_sampling"], options["logit_mean"], options["logit_std"],
                                       options["shift"], options["resolution_shift"], options["min_snr_gamma"],
                                       options["noise_offset"]),
            save_every_n_steps=options["save_every_n_steps"],
            keep_last=options["keep_last"], save_prefix=options["save_prefix"],
            resume_from=None if options["resume_from"] in (None, NONE) else options["resume_from"],
            ema_decay=options["ema_decay"], dora=options["dora"], rs_lora=options["rs_lora"],
            validate_every_n_steps=options["validate_every_n_steps"], validation=options.get("validation"),
            samples=options.get("samples"))

    def identity(self) -> dict:
        """What a resumed run must share with the run it resumes (saving and resuming themselves may differ)."""
        s, t = self.lr_schedule, self.timesteps
        return {"lr_schedule": s.kind, "warmup_steps": s.warmup_steps, "min_lr_ratio": s.min_lr_ratio,
                "cycles": s.cycles, "max_grad_norm": self.max_grad_norm, "timestep_sampling": t.kind,
                "logit_mean": t.logit_mean, "logit_std": t.logit_std, "shift": t.shift,
                "resolution_shift": t.resolution_shift, "min_snr_gamma": t.min_snr_gamma,
                "noise_offset": t.noise_offset, "ema_decay": self.ema_decay, "dora": self.dora,
                "rs_lora": self.rs_lora}


class TrainingOptions:
    DESCRIPTION = ("Options for long runs, for the optional 'options' input of Train LoRA: learning-rate schedule, "
                   "gradient clipping, timestep sampling and loss weighting, intermediate saves with a resumable "
                   "training state, and resuming from one.")
    CATEGORY = "LoRA Trainer"
    FUNCTION = "options"
    RETURN_TYPES = (OPTIONS_TYPE,)
    RETURN_NAMES = ("options",)
    OUTPUT_TOOLTIPS = ("Connect to the 'options' input of Train LoRA.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lr_schedule": (list(LR_SCHEDULES), {"default": "constant",
                                                 "tooltip": "How the learning rate changes over the run."}),
            "warmup_steps": ("INT", {"default": 0, "min": 0, "max": 100000,
                                     "tooltip": "Steps over which the rate rises linearly to learning_rate."}),
            "min_lr_ratio": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                       "tooltip": "Floor of linear and cosine decay, as a fraction of learning_rate."}),
            "cycles": ("INT", {"default": 1, "min": 1, "max": 1000,
                               "tooltip": "cosine_with_restarts: how many times the cosine restarts at learning_rate."}),
            "max_grad_norm": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1000000.0, "step": 0.01,
                                        "tooltip": "Clip the gradients' global L2 norm to this; 0 = off."}),
            "timestep_sampling": (list(TIMESTEP_SAMPLINGS), {
                "default": "uniform", "tooltip": "How noise levels are drawn: uniform over the model's own table, or "
                                                 "logit-normal (concentrated around the middle)."}),
            "logit_mean": ("FLOAT", {"default": 0.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                     "tooltip": "logit_normal: > 0 trains noisier levels more, < 0 cleaner ones."}),
            "logit_std": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 10.0, "step": 0.01,
                                    "tooltip": "logit_normal: spread of the levels (smaller = more concentrated)."}),
            "shift": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.01,
                                "tooltip": "Flow models: train at this timestep shift instead of the model's own "
                                           "(3 = SD3's); 0 = the model's own."}),
            "resolution_shift": ("BOOLEAN", {"default": False,
                                             "tooltip": "Flux-type flow models: the shift of each latent's size, as "
                                                        "ComfyUI's ModelSamplingFlux computes it."}),
            "min_snr_gamma": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                        "tooltip": "ε- and v-prediction models: min-SNR-γ loss weighting (5 is "
                                                   "usual); 0 = off."}),
            "noise_offset": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                       "tooltip": "Adds a per-channel constant to the noise (0.03-0.1 helps very "
                                                  "dark and bright images); 0 = off."}),
            "save_every_n_steps": ("INT", {"default": 0, "min": 0, "max": 100000,
                                           "tooltip": "Save the LoRA (and a resumable training state) every N "
                                                      "steps; 0 = off."}),
            "keep_last": ("INT", {"default": 0, "min": 0, "max": 10000,
                                  "tooltip": "Intermediate saves to keep (the newest ones); 0 = keep all."}),
            "save_prefix": ("STRING", {"default": "trained/my_lora",
                                       "tooltip": "Name prefix of the intermediate saves in the loras folder."}),
            "resume_from": (state_choices(), {"default": NONE,
                                              "tooltip": "A training state (output/training_states) to resume "
                                                         "exactly where it was saved; [None] starts a new run."}),
            "ema_decay": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.99999, "step": 0.0001, "round": 0.00001,
                                    "tooltip": "Keep an exponential moving average of the LoRA weights with this "
                                               "decay (e.g. 0.999) and return it as the result; 0 = off."}),
            "dora": ("BOOLEAN", {"default": False,
                                 "tooltip": "Weight-decomposed LoRA (DoRA): also learns each weight column's "
                                            "magnitude (saved as dora_scale). LoRA, LoHa and LoKr."}),
            "rs_lora": ("BOOLEAN", {"default": False,
                                    "tooltip": "rsLoRA scaling alpha/sqrt(rank) instead of alpha/rank (steadier "
                                               "at high ranks). LoRA, LoHa and LoKr."}),
            "validate_every_n_steps": ("INT", {"default": 0, "min": 0, "max": 100000,
                                               "tooltip": "Every N steps, the loss on the validation data at fixed "
                                                          "noise (its own chart series); 0 = off."}),
        }, "optional": {
            "validation_latents": ("LATENT", {"tooltip": "Held-out latents for the validation loss."}),
            "validation_positive": ("CONDITIONING", {"tooltip": "Their captions: one per image, or one for all."}),
            "samples": (SAMPLES_TYPE, {"tooltip": "From a Training Samples node: images rendered every N steps "
                                                  "while training."}),
        }}

    # List mode: validation data from ComfyUI's data-set nodes comes as lists (one LATENT per image).
    INPUT_IS_LIST = True

    def options(self, validation_latents=None, validation_positive=None, samples=None, **kw):
        options = {k: inputs.one(v, k) for k, v in kw.items()}
        if samples is not None:
            options["samples"] = inputs.one(samples, "samples")
        if (validation_latents is None) != (validation_positive is None):
            raise ValueError("validation_latents, validation_positive: connect both or neither")
        if validation_latents is not None:
            options["validation"] = (validation_latents, validation_positive)
        if options["validate_every_n_steps"] and validation_latents is None:
            raise ValueError("validate_every_n_steps: connect validation_latents and validation_positive, or set 0")
        RunOptions.of(options)  # refuses bad combinations here, naming the option
        return (options,)
