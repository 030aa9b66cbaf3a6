"""The header metadata that model hubs (Civitai, Hugging Face), A1111/Forge/SD.Next and kohya's tools read from a LoRA
.safetensors file: kohya sd-scripts' ``ss_*`` keys, Stability AI's ``modelspec.*`` keys and the ``sshs_*`` hashes.

Values follow what kohya-ss/sd-scripts (``train_network.py``, ``library/train_util.py``, ``library/sai_model_spec.py``)
and, for the video/image families it trains, kohya-ss/musubi-tuner write, so that readers written against those files
read ours the same way. Every value is a string (safetensors metadata is ``str → str``). Pure Python: no ComfyUI.

Base models are named by ComfyUI's model-config class (``type(model.model_config).__name__``). Their names in kohya's
and the modelspec's vocabulary (``family_of``; modelspec.architecture is the name below + "/lora"):

  base_model             ss_base_model_version  architecture                       names from
  SD15                   sd_v1                  stable-diffusion-v1                sd-scripts
  SD20                   sd_v2                  stable-diffusion-v2                sd-scripts (1)
  SD21UnclipL, ..H       sd21unclipl, ..h       stable-diffusion-v2-unclip-l, ..h  modelspec's list
  SDXL                   sdxl_base_v1-0         stable-diffusion-xl-v1-base        sd-scripts
  SDXLRefiner            sdxlrefiner            stable-diffusion-xl-v1-refiner     modelspec's list
  SDXL_instructpix2pix   sdxl_instructpix2pix   stable-diffusion-xl-v1-edit        modelspec's list, ComfyUI
  SVD_img2vid            svd_img2vid            stable-video-diffusion-img2vid-v1  modelspec's list
  Stable_Cascade_C, ..B  stable_cascade_c, ..b  stable-cascade-v1-stage-c, ..b     modelspec's list
  SD3                    sd3                    stable-diffusion-3                 sd-scripts (2)
  Flux                   flux1                  flux-1-dev                         sd-scripts
  FluxSchnell            flux1                  flux-1-schnell                     sd-scripts
  Chroma                 chroma                 chroma                             sd-scripts
  Lumina2                lumina2                lumina-2                           sd-scripts
  HunyuanImage21         hunyuan-image-2.1      hunyuan-image-2.1                  sd-scripts
  HunyuanVideo           hunyuan_video          hunyuan-video                      musubi-tuner
  HunyuanVideo15         hunyuan_video_1_5      hunyuan-video-1.5                  musubi-tuner
  WAN21_T2V, WAN21_I2V   wan                    wan2.1                             musubi-tuner (3)
  QwenImage              qwen_image             Qwen-Image                         musubi-tuner (4)
  ZImage                 z_image                Z-Image                            musubi-tuner (4)
  any other              lower-cased name       the same with "-" for "_"          derived: LTXV → ltxv / ltxv,
                                                                                    WAN22_T2V → wan22_t2v / wan22-t2v

Where no kohya tool names a family (the "modelspec's list" rows), its ss name is derived the same way.
(1) ComfyUI's SD20 class covers SD 2.x with epsilon and with v prediction; kohya's "sd_v2_v" and
"stable-diffusion-v2-768-v" need that distinction, which the class name does not carry, so the unsuffixed names are
written (ss_v2 is "True": A1111 tells SD 2 LoRAs by it). (2) kohya writes the SD3 variant ("medium", "5-large";
architecture "stable-diffusion-3-medium"); ComfyUI's one SD3 class does not say which, so the family name without a
variant is written. (3) musubi-tuner names every Wan 2.1 task "wan". (4) musubi-tuner's mixed-case architecture
strings are kept as it writes them. Every algorithm's architecture, the LyCORIS ones' included, ends in "/lora":
kohya writes that for any network module, and the modelspec defines no other suffix for such adapters.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field

import safetensors.torch
import torch

ALGORITHMS = ("LoRA", "LoHa", "LoKr", "OFT")
# The LyCORIS ``algo`` that stores each algorithm's tensors under the names we use ("diag-oft" is LyCORIS's OFT with
# per-block ``oft_blocks``; plain "oft" is no LyCORIS algo).
LYCORIS_ALGOS = {"LoHa": "loha", "LoKr": "lokr", "OFT": "diag-oft"}
MODELSPEC_VERSION = "1.0.1"  # what kohya's sai_model_spec.py writes

IMPL_STABILITY = "https://github.com/Stability-AI/generative-models"
IMPL_FLUX = "https://github.com/black-forest-labs/flux"
IMPL_COMFYUI = "https://github.com/comfyanonymous/ComfyUI"
IMPL_DIFFUSERS = "diffusers"

# kohya's loss_type names for our loss functions, and its mixed_precision names for our training dtypes.
_KOHYA_LOSS = {"MSE": "l2", "L1": "l1", "Huber": "huber", "SmoothL1": "smooth_l1"}
_KOHYA_PRECISION = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_LEGACY_HASH_SPAN = (0x100000, 0x110000)  # the bytes A1111's old 8-hex-digit hash covers


@dataclass(frozen=True)
class TrainingRecord:
    """What a training run did, in the terms the metadata needs.

    ``steps`` are this run's optimizer steps and ``previous_steps`` those the weights already had when it started
    (a continued LoRA or a resumed state), so the weights have seen ``total_steps``. ``resolutions`` are the distinct
    (width, height) of the training images in pixels, the most used first."""

    steps: int
    algorithm: str
    rank: int
    alpha: float
    base_model: str
    learning_rate: float
    optimizer: str
    seed: int
    batch_size: int
    grad_accumulation_steps: int
    training_dtype: str
    lora_dtype: str
    images: int
    resolutions: tuple[tuple[int, int], ...]
    started_at: float
    finished_at: float
    network_args: dict = field(default_factory=dict)
    lr_scheduler: str = "constant"
    loss_function: str = "MSE"
    previous_steps: int = 0

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm '{self.algorithm}' is not one of {', '.join(ALGORITHMS)}")

    @property
    def total_steps(self) -> int:
        return self.previous_steps + self.steps


@dataclass(frozen=True)
class Family:
    """A base model's names in kohya's and the modelspec's vocabulary."""

    ss_base_model_version: str
    architecture: str  # without the "/lora" adapter suffix
    implementation: str  # the reference code base whose layer names the model's keys follow
    v2: bool = False  # kohya's ss_v2, which A1111 uses to tell SD 2.x LoRAs from SD 1.x ones


_MUSUBI = {  # reference implementations as kohya-ss/musubi-tuner names them
    "hunyuan_video": "https://github.com/Tencent/HunyuanVideo",
    "hunyuan_video_1_5": "https://github.com/Tencent-Hunyuan/HunyuanVideo-1.5",
    "wan": "https://github.com/Wan-Video/Wan2.1",
    "qwen_image": "https://github.com/QwenLM/Qwen-Image",
    "z_image": "https://github.com/Tongyi-MAI/Z-Image",
}
# base_model → (ss_base_model_version or None to derive it, architecture or None to derive it, implementation, v2)
_KNOWN: dict[str, tuple[str | None, str | None, str, bool]] = {
    "SD15": ("sd_v1", "stable-diffusion-v1", IMPL_STABILITY, False),
    "SD20": ("sd_v2", "stable-diffusion-v2", IMPL_STABILITY, True),
    "SD21UnclipL": (None, "stable-diffusion-v2-unclip-l", IMPL_STABILITY, True),
    "SD21UnclipH": (None, "stable-diffusion-v2-unclip-h", IMPL_STABILITY, True),
    "SDXL": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base", IMPL_STABILITY, False),
    "SDXLRefiner": (None, "stable-diffusion-xl-v1-refiner", IMPL_STABILITY, False),
    "SDXL_instructpix2pix": (None, "stable-diffusion-xl-v1-edit", IMPL_STABILITY, False),
    "SVD_img2vid": (None, "stable-video-diffusion-img2vid-v1", IMPL_STABILITY, False),
    "Stable_Cascade_C": (None, "stable-cascade-v1-stage-c", IMPL_COMFYUI, False),
    "Stable_Cascade_B": (None, "stable-cascade-v1-stage-b", IMPL_COMFYUI, False),
    "SD3": (None, "stable-diffusion-3", IMPL_STABILITY, False),
    "Flux": ("flux1", "flux-1-dev", IMPL_FLUX, False),
    "FluxSchnell": ("flux1", "flux-1-schnell", IMPL_FLUX, False),
    "Chroma": ("chroma", "chroma", "https://huggingface.co/lodestones/Chroma", False),
    "Lumina2": ("lumina2", "lumina-2", "https://github.com/Alpha-VLLM/Lumina-Image-2.0", False),
    "HunyuanImage21": ("hunyuan-image-2.1", "hunyuan-image-2.1", "https://github.com/Tencent-Hunyuan/HunyuanImage-2.1",
                       False),
    "HunyuanVideo": ("hunyuan_video", "hunyuan-video", _MUSUBI["hunyuan_video"], False),
    "HunyuanVideo15": ("hunyuan_video_1_5", "hunyuan-video-1.5", _MUSUBI["hunyuan_video_1_5"], False),
    "WAN21_T2V": ("wan", "wan2.1", _MUSUBI["wan"], False),
    "WAN21_I2V": ("wan", "wan2.1", _MUSUBI["wan"], False),
    "QwenImage": ("qwen_image", "Qwen-Image", _MUSUBI["qwen_image"], False),
    "ZImage": ("z_image", "Z-Image", _MUSUBI["z_image"], False),
}
# Other SD-UNet models: their names are derived, but their keys follow Stability's code like SD's.
_STABILITY_UNETS = {"SD15_instructpix2pix", "SD_X4Upscaler", "SSD1B", "Segmind_Vega", "KOALA_700M", "KOALA_1B",
                    "SV3D_u", "SV3D_p", "Stable_Zero123"}


def _derived(base_model: str, separator: str) -> str:
    name = re.sub(r"[^a-z0-9.]+", separator, base_model.strip().lower()).strip(separator)
    return name or "unknown"


def family_of(base_model: str) -> Family:
    """The kohya/modelspec names of a ComfyUI model-config class name (the table in this module's docstring)."""
    ss, arch, impl, v2 = _KNOWN.get(base_model, (None, None, None, False))
    if impl is None:
        impl = IMPL_STABILITY if base_model in _STABILITY_UNETS else IMPL_COMFYUI
    return Family(ss or _derived(base_model, "_"), arch or _derived(base_model, "-"), impl, v2)


def implementation_for(base_model: str, file_format: str) -> str:
    """modelspec.implementation: the code base whose layer names a file's keys follow. A diffusers-format file's
    keys are diffusers' names whatever the model; the other formats name the model's own layers, whose reference
    implementation is the one kohya names for that family (ComfyUI's for families it names none for)."""
    if file_format == "diffusers":
        return IMPL_DIFFUSERS
    return family_of(base_model).implementation


def tag_frequency(captions: list[str]) -> dict[str, int]:
    """How often each tag occurs over all captions, as kohya counts it: a caption's tags are its comma-separated
    parts, stripped and lower-cased; empty parts are no tag; a tag twice in one caption counts twice."""
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(tag.strip().lower() for tag in caption.split(",") if tag.strip())
    return dict(counts)


def _optimizer_name(name: str) -> str:
    # kohya records an optimizer as its class's module path + name ("torch.optim.adamw.AdamW"); it appends
    # "(key=value,...)" only for arguments the user set, and ours use torch's defaults apart from speed flags.
    cls = getattr(torch.optim, name, None)
    if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer):
        return f"{cls.__module__}.{cls.__name__}"
    return name


def _main_resolution(record: TrainingRecord, counts: dict[tuple[int, int], int] | None) -> tuple[int, int] | None:
    if counts:
        return max(counts, key=counts.__getitem__)  # the first of equally common ones, by the dict's order
    return tuple(record.resolutions[0]) if record.resolutions else None


def _network_args(record: TrainingRecord) -> dict | None:
    # LyCORIS takes its algorithm as the network argument "algo" and kohya stores the network arguments as given;
    # kohya writes ss_network_args only when there are any.
    args = dict(record.network_args)
    if record.algorithm in LYCORIS_ALGOS:
        args.pop("algo", None)
        args = {"algo": LYCORIS_ALGOS[record.algorithm], **args}
    return args or None


def kohya_metadata(record: TrainingRecord, *, output_name: str, captions: list[str] | None = None,
                   dataset_name: str = "dataset",
                   images_per_resolution: dict[tuple[int, int], int] | None = None) -> dict[str, str]:
    """kohya sd-scripts' ``ss_*`` keys for a run, with its value formats (``str()`` of ints, floats, bools; JSON for
    structures; the resolution as a Python tuple "(512, 512)"; times as epoch-second floats).

    ``dataset_name`` stands where kohya writes the image folder's name (ss_tag_frequency, ss_dataset_dirs).
    ``images_per_resolution`` (pixels → image count) makes ss_bucket_info and the batch/epoch counts exact when there
    are several resolutions: batches never mix resolutions, so their number depends on how the images split. Without
    it those keys are written only for a single resolution, where every image has it."""
    family = family_of(record.base_model)
    counts = dict(images_per_resolution) if images_per_resolution else None
    if counts is None and len(record.resolutions) == 1:
        counts = {tuple(record.resolutions[0]): record.images}
    total = record.total_steps
    lr = str(float(record.learning_rate))
    meta = {
        "ss_network_module": "networks.lora" if record.algorithm == "LoRA" else "lycoris.kohya",
        "ss_network_dim": str(int(record.rank)),
        "ss_network_alpha": str(float(record.alpha)),
        "ss_base_model_version": family.ss_base_model_version,
        "ss_v2": str(family.v2),
        "ss_output_name": output_name,
        "ss_steps": str(total),
        # kohya's planned length of the run; a record knows the steps done, which is that for a finished run.
        "ss_max_train_steps": str(total),
        "ss_learning_rate": lr,
        "ss_unet_lr": lr,  # only the diffusion model is trained, at the learning rate
        "ss_text_encoder_lr": "0.0",  # kohya leaves a module whose lr is 0 out of training: the text encoders
        "ss_optimizer": _optimizer_name(record.optimizer),
        "ss_lr_scheduler": record.lr_scheduler,
        "ss_loss_type": _KOHYA_LOSS.get(record.loss_function, record.loss_function.lower()),
        "ss_seed": str(int(record.seed)),
        "ss_mixed_precision": _KOHYA_PRECISION.get(record.training_dtype, record.training_dtype),
        "ss_num_train_images": str(int(record.images)),
        "ss_batch_size_per_device": str(int(record.batch_size)),
        "ss_gradient_accumulation_steps": str(int(record.grad_accumulation_steps)),
        "ss_total_batch_size": str(int(record.batch_size * record.grad_accumulation_steps)),
        "ss_training_started_at": str(float(record.started_at)),
        "ss_training_finished_at": str(float(record.finished_at)),
        "ss_dataset_dirs": json.dumps({dataset_name: {"n_repeats": 1, "img_count": int(record.images)}}),
    }
    main = _main_resolution(record, counts)
    if main is not None:
        meta["ss_resolution"] = str((int(main[0]), int(main[1])))
    args = _network_args(record)
    if args is not None:
        meta["ss_network_args"] = json.dumps(args)
    if counts:
        # kohya's bucket list: index → resolution and image count; our images are trained at their own size (no
        # resize to a bucket), so the mean aspect-ratio error is 0.
        buckets = {i: {"resolution": [int(w), int(h)], "count": int(n)} for i, ((w, h), n) in enumerate(counts.items())}
        meta["ss_bucket_info"] = json.dumps({"buckets": buckets, "mean_img_ar_error": 0.0})
        batches = sum(math.ceil(n / record.batch_size) for n in counts.values())
        meta["ss_num_batches_per_epoch"] = str(batches)
        # kohya: epochs = ceil(steps / optimizer steps per epoch), an optimizer step taking grad_accumulation batches
        per_epoch = math.ceil(batches / record.grad_accumulation_steps)
        meta["ss_num_epochs"] = str(math.ceil(total / per_epoch)) if per_epoch else "0"
    if captions is not None:
        meta.update(tag_frequency_metadata(captions, dataset_name))
    return meta


def modelspec_metadata(record: TrainingRecord, *, title: str, trigger_words: str = "", implementation: str,
                       date: str | None = None, thumbnail_png: bytes | None = None,
                       description: str = "") -> dict[str, str]:
    """Stability AI's modelspec keys (spec 1.0.1, as kohya's sai_model_spec.py writes them for a LoRA). ``date``
    defaults to the end of training, ISO 8601 in UTC; the resolution is the most used one, as "WIDTHxHEIGHT"."""
    meta = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": f"{family_of(record.base_model).architecture}/lora",
        "modelspec.implementation": implementation,
        "modelspec.title": title,
        "modelspec.date": date if date is not None else datetime.datetime.fromtimestamp(
            int(record.finished_at), tz=datetime.timezone.utc).isoformat(),
    }
    main = _main_resolution(record, None)
    if main is not None:
        meta["modelspec.resolution"] = f"{int(main[0])}x{int(main[1])}"
    if trigger_words:
        meta["modelspec.trigger_phrase"] = trigger_words
    if description:
        meta["modelspec.description"] = description
    if thumbnail_png is not None:
        meta["modelspec.thumbnail"] = thumbnail_url(thumbnail_png)
    return meta


def thumbnail_url(png: bytes) -> str:
    """modelspec.thumbnail: the image as a data URL."""
    if not png.startswith(_PNG_SIGNATURE):
        raise ValueError("thumbnail_png is not a PNG image (its signature is missing)")
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def tag_frequency_metadata(captions: list[str], dataset_name: str = "dataset") -> dict[str, str]:
    """ss_tag_frequency: kohya's tag counts per data-set folder (one folder, ``dataset_name``)."""
    return {"ss_tag_frequency": json.dumps({dataset_name: tag_frequency(captions)})}


def sshs_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` as kohya precalculates them for sd-webui-additional-networks and A1111.

    Both hash the safetensors serialisation of ``tensors`` with only the ``ss_*`` keys of ``metadata`` (the training
    record, which later edits of other keys must not change). The model hash is the SHA-256 of everything after the
    header (8-byte little-endian length + JSON), i.e. of the tensor data, so it equals that hash of the saved file
    whatever else its header holds. The legacy hash is the first 8 hex digits of the SHA-256 of the 64 KiB at 1 MiB
    into that serialisation (of nothing when it is shorter)."""
    kept = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    blob = safetensors.torch.save(tensors, kept)
    header_end = 8 + int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(blob[header_end:]).hexdigest()
    legacy_hash = hashlib.sha256(blob[_LEGACY_HASH_SPAN[0]:_LEGACY_HASH_SPAN[1]]).hexdigest()[:8]
    return model_hash, legacy_hash
