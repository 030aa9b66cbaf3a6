"""Everything that knows ComfyUI internals: the model's schedule, per-sample conditioning, the trainable view of a
MODEL, and applying a LoRA the way ComfyUI's loader does. One guarded code path per version difference lives here."""
from __future__ import annotations

import contextlib
import logging
import math
import sys
from collections.abc import Callable, Iterator

import torch

import comfy.lora
import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.sampler_helpers
import comfy.samplers
import comfy.sd
import comfy.utils

from ..lora import key_formats
from ..lora.adapter_set import LoraFileError, split_keys
from ..lora.file_format import MODEL_PREFIX
from ..lora.key_formats import ModelNaming
from ..training import rms_rope
from ..training.data import Group, groups_of, out_of_inference, to_device
from ..training.mapped_safetensors import owned, release
from ..training.streams import Layout, Streams, parts
from .inputs import caption_identity, release_caption

log = logging.getLogger("lora_trainer")


class ComfySchedule:
    """training.objectives.Schedule backed by the model's own ``model_sampling`` (any prediction type)."""

    def __init__(self, model_sampling, device: torch.device):
        self.ms = model_sampling
        self.sigmas = model_sampling.sigmas.detach().float().cpu().clone()  # a normal tensor, not an inference one
        self.prediction = _prediction(model_sampling)
        self.flow_shift = _own_flow_shift(model_sampling) if self.prediction == "flow" else None

    def flow_shift_for(self, latent_shape: tuple[int, ...]) -> float | None:
        """The shift Flux-type sampling gives latents of this size, as ComfyUI's ModelSamplingFlux node computes it:
        exp(μ), μ linear in the image's tokens, BASE_SHIFT at 256 tokens (256²) and the model's own μ at 4096 (1024²,
        where Flux's own settings give it). Tokens are 2×2 patches of a 16-channel 8× VAE latent, the layout that
        node assumes; other layouts (Flux.2's, LTXV's, pixel space) and fixed-shift samplings get None."""
        flux = getattr(comfy.model_sampling, "ModelSamplingFlux", None)
        if self.prediction != "flow" or flux is None or not isinstance(self.ms, flux):
            return None
        if len(latent_shape) not in (4, 5) or latent_shape[1] != 16 or math.prod(latent_shape[2:-2]) != 1:
            return None  # not one image of that layout (a 5-D latent is one with a single frame, e.g. Qwen-Image's)
        tokens = math.ceil(latent_shape[-2] / 2) * math.ceil(latent_shape[-1] / 2)
        own = float(self.ms.shift)
        mu = BASE_SHIFT + (own - BASE_SHIFT) * (tokens - 256) / (4096 - 256)
        return math.exp(mu)

    def noisy(self, sigma: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return self.ms.noise_scaling(sigma.reshape(-1), noise, x0, max_denoise=False)

    def output_scale(self, sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        sigma = sigma.reshape(-1).to(like.device)
        ones = torch.ones((like.shape[0],) + (1,) * (like.ndim - 1), device=like.device)
        return self.ms.calculate_denoised(sigma, ones, torch.zeros_like(ones)).float()


BASE_SHIFT = 0.5  # μ at 256 tokens: the default of ComfyUI's ModelSamplingFlux node (and of Flux's reference code)


def _prediction(model_sampling) -> str:
    """What the network predicts, from the model_sampling's prediction class (subclasses first: EDM is a
    V_PREDICTION, V_PREDICTION and X0 are EPS). Classes this ComfyUI lacks are skipped."""
    for name, prediction in (("EDM", "other"), ("COSMOS_RFLOW", "other"), ("V_PREDICTION", "v"), ("X0", "x0"),
                             ("EPS", "eps"), ("CONST", "flow")):
        cls = getattr(comfy.model_sampling, name, None)
        if cls is not None and isinstance(model_sampling, cls):
            if prediction == "v" and float(getattr(model_sampling, "sigma_data", 1.0)) != 1.0:
                return "other"  # min-SNR's v formula (SNR = 1/σ²) assumes σ_data = 1
            return prediction
    return "other"


def _own_flow_shift(model_sampling) -> float | None:
    """The multiplicative shift s a flow model's table is built from (σ = s·t/(1+(s−1)·t)): ModelSamplingDiscreteFlow
    stores s, ModelSamplingFlux stores μ with s = exp(μ). None for any other sampling."""
    shift = getattr(model_sampling, "shift", None)
    flux = getattr(comfy.model_sampling, "ModelSamplingFlux", None)
    discrete = getattr(comfy.model_sampling, "ModelSamplingDiscreteFlow", None)
    if shift is None:
        return None
    if flux is not None and isinstance(model_sampling, flux):
        return math.exp(float(shift))
    if discrete is not None and isinstance(model_sampling, discrete):
        return float(shift)
    return None


def compute_dtype(patcher) -> torch.dtype:
    """The dtype ComfyUI runs the model in (its manual-cast dtype when weights are stored in another one)."""
    return getattr(patcher.model, "manual_cast_dtype", None) or patcher.model.get_dtype()


def training_precision(patcher, wanted: torch.dtype) -> tuple[torch.dtype | None, torch.dtype | None]:
    """(autocast dtype, manual-cast dtype) that make ``wanted`` the compute dtype of training.

    An fp32 model is autocast. A half-precision model (ComfyUI runs SDXL in fp16 on most GPUs) is switched to
    ComfyUI's own per-layer weight casting instead: autocasting fp16 weights into bf16 breaks norms on the CPU.
    """
    current = compute_dtype(patcher)
    if current == torch.float32:
        return (wanted if wanted != torch.float32 else None), None
    return None, (wanted if wanted != current else None)


def base_model_name(patcher) -> str:
    """ComfyUI's model class of the model (its ``comfy.supported_models`` entry): the family, which also decides
    which tools read which LoRA format (lora/consumers.py)."""
    return type(patcher.model.model_config).__name__


def pixels_per_latent(patcher) -> int:
    """Image pixels per latent pixel (a side) of the model's VAE: 8 for most, from its latent format."""
    return int(getattr(patcher.model.latent_format, "spacial_downscale_ratio", 8))


# Samplings whose model input is a source latent, not noise (image-to-image models: Lotus, FlowRVS)
IMAGE_TO_IMAGE = ("IMG_TO_IMG", "IMG_TO_IMG_FLOW")
# Model classes whose forward takes every batch as a sampler's (cond, uncond) pair of one latent batch: it runs the
# first half with the second half's conditioning and the reverse, and swaps the halves of its output back (Hunyuan 3D
# 2.1; 0.3.75 fails on a batch of one, 0.33 swaps batches of two or more). A training batch of different latents
# would train each latent with another's conditioning, so these get each batch as a pair of itself.
CFG_PAIR_MODELS = ("Hunyuan3Dv2_1",)


def check_trainable(patcher) -> None:
    """An error on ``model`` for a model the trainer's objectives cannot train: an image-to-image model starts from a
    source latent instead of noise and moves it to a target, so it trains on (source, target) pairs. With noise in
    place of the source it would train without an error on an objective it never uses (learning the identity)."""
    for name in IMAGE_TO_IMAGE:
        cls = getattr(comfy.model_sampling, name, None)  # IMG_TO_IMG_FLOW is newer than 0.3.75
        if cls is not None and isinstance(patcher.model.model_sampling, cls):
            raise ValueError(f"model: this {base_model_name(patcher)} model maps a source latent to a target "
                             f"(ComfyUI's {name} sampling: its input is the source, not noise); training it needs "
                             "(source, target) latent pairs, which this trainer does not take")


def latent_dims(patcher) -> tuple[int, str]:
    """(spatial dimensions, model name) of the latents the model takes, from its latent format."""
    return getattr(patcher.model.latent_format, "latent_dimensions", 2), base_model_name(patcher)


def data_device() -> torch.device:
    """Where the data set waits between micro-batches: ComfyUI's device for data between nodes (the CPU, unless
    --gpu-only), so the training device holds one micro-batch of it at a time, however large the data set."""
    return comfy.model_management.intermediate_device()


class ModelSpaceLatents:
    """The training latents in the model's latent format (scale/shift, frame folding, as ComfyUI's samplers apply it
    before denoising), made when a micro-batch is drawn: the inputs are read, never copied whole, so a data set costs
    no memory beyond what its source holds (e.g. a memory-mapped file) and one micro-batch.

    A latent of several streams (``training.streams.Streams``, e.g. LTX-2's video + audio) is packed into one row
    the way ComfyUI's samplers pack a NestedTensor (``comfy.utils.pack_latents``), and the model's latent format is
    applied to that row, as they apply it; ``layouts`` says which streams each row holds.

    The channels the format gives are checked against what the model takes for each distinct input shape before any
    training: a latent from another VAE is blamed on ``latents`` before any forward."""

    def __init__(self, patcher, samples: list[torch.Tensor | Streams]):
        self.patcher, self.samples = patcher, samples
        fmt = patcher.model.latent_format
        in_model_space: dict[tuple, tuple[tuple[int, ...], Layout | None]] = {}
        self.shapes: list[tuple[int, ...]] = []  # each sample's shape in the model's latent space
        self.layouts: list[Layout | None] = []  # each sample's streams (None: one latent)
        for i, sample in enumerate(samples):
            shapes = tuple(tuple(t.shape) for t in parts(sample))
            if shapes not in in_model_space:
                try:
                    x = self.load([i])[0]
                except RuntimeError as e:  # per-channel statistics that do not broadcast
                    raise ValueError(f"latents: image {i} (shape {_described(shapes)}) does not fit this "
                                     f"{base_model_name(patcher)} model's latent format ({e})") from None
                widest = max(s[0] for s in shapes)  # a format of streams counts the widest's (LTX-2: the video's)
                if (widest if isinstance(sample, Streams) else x.shape[0]) != fmt.latent_channels:
                    raise ValueError(f"latents: image {i} has {widest} channels (shape {_described(shapes)}); "
                                     f"this {base_model_name(patcher)} model takes latents of its own VAE "
                                     f"({fmt.latent_channels} channels in its latent space)")
                layout = Layout(shapes, _pack) if isinstance(sample, Streams) else None
                in_model_space[shapes] = (tuple(x.shape), layout)
            shape, layout = in_model_space[shapes]
            self.shapes.append(shape)
            self.layouts.append(layout)

    def load(self, ids: list[int]) -> torch.Tensor:
        """These samples in the model's latent space, stacked on ``data_device()`` (fp32, a new tensor, never an
        inference tensor: see ``out_of_inference``)."""
        batch = torch.stack([self._in_model_space(self.samples[i]) for i in ids])
        release(*(t for i in ids for t in parts(self.samples[i])))
        return out_of_inference(batch)

    def _in_model_space(self, sample: torch.Tensor | Streams) -> torch.Tensor:
        tensors = [t.unsqueeze(0).to(data_device(), torch.float32) for t in parts(sample)]
        x, latent_shapes = (_pack(tensors), [t.shape for t in tensors]) if len(tensors) > 1 else (tensors[0], None)
        with _latent_shapes_told(self.patcher.model, latent_shapes or [x.shape]):
            return self.patcher.model.process_latent_in(x)[0]

    def groups(self) -> list[Group]:
        return groups_of(self.shapes, self.load, self.layouts)


def _pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Batches of each stream packed into one (n, 1, N) latent, as ComfyUI's samplers pack a NestedTensor."""
    return comfy.utils.pack_latents(tensors)[0]


def _described(shapes: tuple[tuple[int, ...], ...]) -> str:
    return str(shapes[0]) if len(shapes) == 1 else " + ".join(map(str, shapes))


@contextlib.contextmanager
def _latent_shapes_told(model, latent_shapes: list) -> Iterator[None]:
    """The streams of the latent being worked on, set as ComfyUI 0.33's samplers set them on the model
    (``model.latent_shapes``) for what reads them outside the forward (MiniMax H3 scales its audio stream by them in
    ``process_latent_in``), and put back after, as the model is shared. 0.3.75's models have no such attribute."""
    if not hasattr(model, "latent_shapes"):
        yield
        return
    before = model.latent_shapes
    model.latent_shapes = latent_shapes
    try:
        yield
    finally:
        model.latent_shapes = before


class SampleConditioning:
    """Each sample's own conditioning, encoded by the model (``extra_conds``) when its micro-batch is drawn and moved
    to the training device as one concatenation. Nothing per sample is kept: the data set's memory is its captions'
    own, and a caption given for all images is one tensor however many images share it.

    Every distinct caption is encoded once up front (and dropped) so that one the model cannot use is an input error
    before any training step."""

    def __init__(self, patcher, captions: list[list], shapes: list[tuple[int, ...]], device: torch.device,
                 seed: int = 0, layouts: list[Layout | None] | None = None):
        self.patcher, self.captions, self.shapes, self.device, self.seed = patcher, captions, shapes, device, seed
        self.streams = layouts if layouts is not None else [None] * len(shapes)  # ModelSpaceLatents.layouts
        # ComfyUI's data device, unless encoding runs part of the diffusion model (LTX-2's and MiniMax H3's text
        # connectors): then the training device, where its weights are and where ComfyUI's samplers encode too.
        runs_model = hasattr(patcher.model.diffusion_model, "preprocess_text_embeds")
        self.encoding_device = device if runs_model else data_device()
        self.unchecked: int | None = None  # the sample whose layout the first training forward checks (see check)
        self.layouts: dict[tuple, int] = {}  # (latent shape, streams, conditioning layout) -> its first sample
        layout_of: dict[tuple, tuple] = {}  # (caption identity, latent shape, streams) -> its layout
        for i, (caption, shape, streams) in enumerate(zip(captions, shapes, self.streams)):
            # samples sharing one caption and latent shape encode alike
            shared = (caption_identity(caption), shape, streams)
            if shared not in layout_of:
                conds = self.encode(i)
                layout_of[shared] = (shape, streams, tuple(sorted((k, tuple(getattr(v.cond, "shape", ()))[1:])
                                                                  for k, v in conds.items())))
            self.layouts.setdefault(layout_of[shared], i)

    def latent_shapes(self, i: int) -> list[torch.Size]:
        """What ComfyUI's samplers pass as ``latent_shapes`` for sample i alone: each stream's shape (batch 1)."""
        layout = self.streams[i]
        return [torch.Size((1, *s)) for s in (layout.shapes if layout is not None else (self.shapes[i],))]

    def encode(self, i: int) -> dict:
        """Sample i's model conditioning, on ``encoding_device``; an error if the model cannot use it."""
        noise_like = torch.zeros((1, *self.shapes[i]), device=self.encoding_device)
        latent_shapes = self.latent_shapes(i)
        try:
            # What ComfyUI's samplers pass too: some models read them (the x4 upscaler the seed of its noise
            # augmentation; image-to-video models the latent_image as their start image when the conditioning
            # has none; LTX-2 the streams its packed latent holds). The start image is empty: the training latent
            # itself would hand the model its target.
            encoded = comfy.samplers.encode_model_conds(
                self.patcher.model.extra_conds, comfy.sampler_helpers.convert_cond([self.captions[i]]), noise_like,
                self.encoding_device, "positive", latent_image=torch.zeros_like(noise_like), seed=self.seed,
                latent_shapes=latent_shapes)
            conds = {k: v.process_cond(batch_size=1, device=self.encoding_device, area=None)
                     for k, v in encoded[0]["model_conds"].items()}
        except Exception as e:  # the model could not use this conditioning at all
            raise self.misfit(i, e) from e
        if not conds:
            raise ValueError(f"positive: conditioning {i} gives this model no inputs (is it from the right encoder?)")
        if len(latent_shapes) > 1 and "latent_shapes" not in conds:
            # ComfyUI unpacks the streams for a model only where its conditioning carries them (model_base)
            raise ValueError(f"latents: image {i} is a latent of {len(latent_shapes)} streams (shapes "
                             f"{_described(self.streams[i].shapes)}); this {base_model_name(self.patcher)} model "
                             "takes one latent")
        return conds

    def batch(self, ids: list[int], encoded: list[dict] | None = None) -> dict:
        """The samples' conditioning concatenated (where it waits) and moved to the training device in one go.

        Whatever in it was made under ``torch.inference_mode`` (every node's output is) is copied out of it here,
        one micro-batch at a time: tensors a concatenation passes through as they are (a constant's, e.g. a dict of
        reference tensors, or a single sample's on the CPU) would otherwise reach autograd, which cannot save them."""
        encoded = encoded if encoded is not None else [self.encode(i) for i in ids]
        batch = out_of_inference({k: _on(v, self.device) for k, v in comfy.samplers.cond_cat(encoded).items()})
        for i in ids:
            release_caption(self.captions[i])
        return batch

    def concat_groups(self, encoded: list[dict]) -> list[list[int]]:
        """Positions in a micro-batch's ``encoded`` conditionings split into runs ComfyUI can batch
        (``cond_equal_size``, as its samplers decide), e.g. captions of different token lengths go to different
        forwards. Usually one group."""
        groups: list[list[int]] = []
        for pos, conds in enumerate(encoded):
            for group in groups:
                if comfy.samplers.cond_equal_size(encoded[group[0]], conds):
                    group.append(pos)
                    break
            else:
                groups.append([pos])
        return groups

    @staticmethod
    def misfit(i: int, error: Exception) -> ValueError:
        return ValueError(f"positive: conditioning {i} does not fit this model ({type(error).__name__}: {error})")

    def check(self, patcher, latents: ModelSpaceLatents) -> None:
        """Conditioning that lacks what the model needs (e.g. SD3 without a pooled output) must be a clear input error
        before any training step, not a crash inside one. With one (latent shape, conditioning layout) for all
        samples, the usual case, the first training forward is the check (``denoiser`` turns its failure into this
        error) and costs nothing extra; with several, each gets one no-grad forward here."""
        if len(self.layouts) == 1:
            self.unchecked = 0
            return
        sigma = patcher.model.model_sampling.sigmas[len(patcher.model.model_sampling.sigmas) // 2].reshape(1)
        for i in self.layouts.values():
            try:
                with torch.no_grad():
                    self.forward(patcher, to_device(latents.load([i]), self.device), sigma.to(self.device), [i])
            except Exception as e:
                raise self.misfit(i, e) from e

    def forward(self, patcher, x_t: torch.Tensor, sigma: torch.Tensor, ids: list[int],
                encoded: list[dict] | None = None, transformer_options: dict | None = None) -> torch.Tensor:
        """The model's denoised estimate for these samples (one batchable run of them; a latent of streams packed),
        as a sampler's forward gets it. A CFG_PAIR_MODELS model gets the batch twice, as a sampler's (cond, uncond)
        pair of the same latents with the same conditioning, so that each half is paired with itself."""
        paired = base_model_name(patcher) in CFG_PAIR_MODELS
        if paired:
            encoded = encoded if encoded is not None else [self.encode(i) for i in ids]
            x_t, sigma, ids, encoded = torch.cat([x_t, x_t]), torch.cat([sigma, sigma]), ids + ids, encoded + encoded
        kwargs = self.batch(ids, encoded)
        with _latent_shapes_told(patcher.model, self.latent_shapes(ids[0])):
            out = patcher.model.apply_model(x_t, sigma, transformer_options=transformer_options or {}, **kwargs)
        return out[:len(ids) // 2] if paired else out


def _on(value, device: torch.device):
    """A concatenated conditioning value on ``device``: tensors, and the tensors in lists (e.g. reference latents);
    constants as they are."""
    if torch.is_tensor(value):
        return owned(to_device(value, device))  # a copy, never a view of a data-set file the batch then releases
    if isinstance(value, (list, tuple)):
        return type(value)(_on(v, device) for v in value)
    return value


def denoiser(patcher, conditioning: SampleConditioning):
    transformer_options = dict(patcher.model_options.get("transformer_options", {}))
    unchecked = conditioning.unchecked

    def apply(x_t: torch.Tensor, sigma: torch.Tensor, ids: list[int], encoded: list[dict]) -> torch.Tensor:
        return conditioning.forward(patcher, x_t, sigma, ids, encoded, transformer_options)

    def batched(x_t: torch.Tensor, sigma: torch.Tensor, ids: list[int]) -> torch.Tensor:
        encoded = [conditioning.encode(i) for i in ids]
        groups = conditioning.concat_groups(encoded)
        if len(groups) == 1:
            return apply(x_t, sigma, ids, encoded)
        parts = [apply(x_t[g], sigma[g], [ids[p] for p in g], [encoded[p] for p in g]) for g in groups]
        order = torch.tensor([p for g in groups for p in g], device=x_t.device)
        return torch.cat(parts)[torch.argsort(order)]  # back in the micro-batch's order

    def denoise(x_t: torch.Tensor, sigma: torch.Tensor, ids: list[int]) -> torch.Tensor:
        nonlocal unchecked
        if unchecked is None:
            return batched(x_t, sigma, ids)
        try:
            out = batched(x_t, sigma, ids)
        except (comfy.model_management.InterruptProcessingException, torch.cuda.OutOfMemoryError):
            raise
        except Exception as e:
            raise conditioning.misfit(unchecked, e) from e
        unchecked = None
        return out

    return denoise


@contextlib.contextmanager
def trainable_model(patcher, manual_cast: torch.dtype | None = None) -> Iterator[object]:
    """A clone of the MODEL loaded by ComfyUI's memory manager with weights autograd may save for backward.

    ComfyUI builds models under ``torch.inference_mode``, so their weights are inference tensors that backward
    cannot use. The clone gets an object patch per parameter: an ordinary tensor over the same memory (no copy, so no
    extra RAM or VRAM and no per-weight work). ComfyUI applies object patches on load and puts the originals back on
    unload; weights it patches or moves while loading (an upstream LoRA, a device move) are new ordinary tensors
    anyway. The input MODEL, its patches and options are never touched."""
    # Another clone of this model loaded earlier (e.g. a LoRA-patched MODEL a sampler used) leaves its patched
    # weights in the modules until it is unloaded: training must read, and alias, the base weights.
    _unload(lambda loaded: loaded.model is patcher.model)
    clone = patcher.clone()
    clone.weight_inplace_update = False  # in-place writes into inference tensors are not allowed outside inference
    if manual_cast is not None:
        clone.set_model_compute_dtype(manual_cast)
    for key, param in clone.model.named_parameters():
        current = clone.object_patches.get(key, param)  # another node's object patch on a weight is kept, aliased
        # The diffusion model's weights, and the model's others made under inference mode: conditioning can run
        # through those (on 0.33 Zero123's cc_projection is a Parameter that requires grad, so autograd saves it).
        if isinstance(current, torch.Tensor) and (key.startswith(MODEL_PREFIX) or current.is_inference()):
            clone.add_object_patch(key, _ordinary_alias(current))
    # Buffers made at load time are inference tensors too, and some are multiplied with activations (e.g. ACE-Step
    # 1.5's rotary cos/sin tables), which makes autograd save them. Those get a plain-tensor alias (a Parameter
    # would turn the buffer into a parameter).
    for key, buffer in clone.model.named_buffers():
        current = clone.object_patches.get(key, buffer)
        if key.startswith(MODEL_PREFIX) and isinstance(current, torch.Tensor) and current.is_inference():
            clone.add_object_patch(key, _ordinary_alias(current, parameter=False))
    comfy.model_management.load_models_gpu([clone])
    try:
        with training_kernels():
            yield clone
    finally:
        _unload(lambda loaded: loaded is clone)  # the memory manager puts the original weights back


@contextlib.contextmanager
def training_kernels() -> Iterator[None]:
    """While training: the kernels ComfyUI uses are ones autograd can differentiate; the fused ones come back after.

    Newer ComfyUI (0.33) has an ``in_training`` switch that some models read to skip fused ``comfy_kitchen`` ops,
    which have no backward. Others (Anima, JoyImage, Cosmos Predict2) call the fused RMSNorm+RoPE ops without asking
    it: those ops are swapped in the ``comfy_kitchen`` module, which every call site reaches them through
    (``comfy_kitchen.rms_rope``, ``comfy.quant_ops.ck.rms_rope_split_half``), for our PyTorch equivalents
    (``training.rms_rope``). 0.3.75 has neither the switch nor comfy_kitchen, and needs neither."""
    has_switch = hasattr(comfy.model_management, "in_training")
    was_training = getattr(comfy.model_management, "in_training", False)
    kitchen = sys.modules.get("comfy_kitchen")  # ComfyUI imports it at start-up where it uses it
    fused = {name: getattr(kitchen, name) for name in rms_rope.DROP_INS if hasattr(kitchen, name)}
    if has_switch:
        comfy.model_management.in_training = True
    for name in fused:
        setattr(kitchen, name, rms_rope.DROP_INS[name])
    try:
        yield
    finally:
        for name, op in fused.items():
            setattr(kitchen, name, op)
        if has_switch:
            comfy.model_management.in_training = was_training


def _ordinary_alias(tensor: torch.Tensor, parameter: bool = True) -> torch.Tensor:
    """A tensor (a frozen Parameter unless ``parameter`` is False) that shares ``tensor``'s memory but is not an
    inference tensor."""
    alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    with torch.no_grad():
        alias.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())
    return torch.nn.Parameter(alias, requires_grad=False) if parameter else alias


def _unload(which: Callable[[object], bool]) -> None:
    """Unloads, through ComfyUI's memory manager, every loaded model patcher ``which`` selects: unloading puts each
    patched weight back to its original."""
    loaded_models = comfy.model_management.current_loaded_models
    for i in reversed(range(len(loaded_models))):
        loaded = loaded_models[i].model  # None when 0.33 has already dropped it (a weak reference)
        if loaded is not None and which(loaded):
            loaded_models[i].model_unload()
            loaded_models.pop(i)


def key_map(patcher) -> dict[str, str | tuple]:
    """ComfyUI's own map from LoRA key prefixes (all naming schemes it knows) to diffusion-model weight keys, or to
    ``(key, (dim, start, size))`` where a name stands for a slice of a fused weight."""
    return comfy.lora.model_lora_keys_unet(patcher.model, {})


def model_naming(patcher, lora: dict[str, torch.Tensor]) -> ModelNaming:
    """The names ComfyUI knows for the layers a LoRA (in any naming) adapts on this model, and their weight shapes:
    what saving it in another format and checking the saved file need, kept with the LoRA."""
    names = key_map(patcher)
    state = patcher.model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items() if k.startswith(MODEL_PREFIX)}
    canonical = key_formats.to_canonical(lora, names, shapes, MODEL_PREFIX)
    targets = {m + ".weight" for m in {key_formats.split_key(k)[0] for k in canonical}}
    keep = {n: v for n, v in names.items() if (v if isinstance(v, str) else v[0]) in targets}
    return ModelNaming(keep, {k: shapes[k] for k in targets if k in shapes}, base_model_name(patcher))


def modules_of_file(patcher, state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A LoRA state dict in any naming scheme ComfyUI reads, as ``{layer name in diffusion_model: {suffix: tensor}}``
    (see ``check_comfy_reads`` for ComfyUI's own verdict on the file)."""
    return split_keys(model_naming(patcher, state).canonical(state), MODEL_PREFIX)


def check_comfy_reads(patcher, state: dict[str, torch.Tensor]) -> None:
    """Every key of a LoRA is one ComfyUI's loader reads for this model (else a LoraFileError names one): a file
    ComfyUI applies only in part would be continued as something else than what users load."""
    unread = comfy_unloaded_keys(ModelNaming(key_map(patcher), {}), state)
    if unread:
        raise LoraFileError(f"ComfyUI's LoRA loader does not read {len(unread)} of its keys for this "
                            f"{base_model_name(patcher)} model (e.g. '{unread[0]}')")


class _Unloaded(logging.Handler):
    """Collects the keys ComfyUI's ``load_lora`` reports as not loaded (its own judgement, in its log)."""

    MESSAGE = "lora key not loaded: "

    def __init__(self):
        super().__init__(logging.WARNING)
        self.keys: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(self.MESSAGE):
            self.keys.append(message[len(self.MESSAGE):])


def comfy_patches(naming: ModelNaming, state: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """What ComfyUI's LoRA loader makes of ``state`` on this model: (its patches by weight key, or by (key, slice)
    for a part of a fused weight; the keys it left unloaded)."""
    import comfy.lora_convert

    collector = _Unloaded()
    root = logging.getLogger()
    level = root.level
    root.addHandler(collector)
    root.setLevel(min(level, logging.WARNING))  # the loader reports at WARNING: it must reach the collector
    try:
        patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(dict(state)), naming.names)
    except Exception as e:  # a malformed file (e.g. a LoHa without its second factor) crashes the loader itself
        raise LoraFileError(f"ComfyUI's LoRA loader cannot read it ({type(e).__name__}: {e})") from None
    finally:
        root.removeHandler(collector)
        root.setLevel(level)
    return patches, collector.keys


def comfy_unloaded_keys(naming: ModelNaming, state: dict[str, torch.Tensor]) -> list[str]:
    return comfy_patches(naming, state)[1]


def check_loads_as(naming: ModelNaming, saved: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    """The self-check of a saved file: ComfyUI's loader reads every key of ``saved`` and patches exactly the weights
    (whole, or slices that tile them) it patches for ``reference``, our own naming of the same LoRA."""
    got, unread = comfy_patches(naming, saved)
    if unread:
        raise LoraFileError(f"ComfyUI's LoRA loader leaves {len(unread)} keys of the saved file unloaded "
                            f"(e.g. '{unread[0]}')")
    wanted, _ = comfy_patches(naming, reference)
    whole, rows = set(), {}
    for key in got:  # a weight key, or (key, slice[, row transform]) for names of parts or reordered rows
        weight, part = (key, None) if isinstance(key, str) else key[:2]
        if weight not in wanted:
            raise LoraFileError(f"the saved file patches '{weight}', which the LoRA does not adapt")
        if part is None:
            whole.add(weight)
        else:
            rows.setdefault(weight, []).append((int(part[1]), int(part[2])))
    for weight in wanted:
        if weight in whole:
            continue
        covered = 0
        for start, size in sorted(rows.get(weight, [])):
            covered = covered + size if start == covered else -1
        if covered != naming.shapes.get(weight, (None,))[0]:
            raise LoraFileError(f"the saved file does not patch all of '{weight}'")


def with_lora(patcher, lora: dict[str, torch.Tensor], strength: float = 1.0):
    """The MODEL with a LoRA applied exactly as ComfyUI's LoRA loaders apply it; a LoRA ComfyUI reads only in part
    (keys of another model or naming) is an error naming a key, not a half-applied LoRA."""
    check_comfy_reads(patcher, lora)
    model, _ = comfy.sd.load_lora_for_models(patcher, None, lora, strength, 0)
    return model


def empty_latent(patcher, vae, width: int, height: int, length: int) -> torch.Tensor:
    """The zero LATENT ComfyUI's Empty Latent nodes give for this model and VAE: the model's latent channels, the
    VAE's spatial (and, for a video VAE, temporal) compression; ``length`` frames for a video model."""
    fmt = patcher.model.latent_format
    ratio = vae.downscale_ratio  # an int, or (frames function, height, width) for video VAEs
    spatial = ratio if isinstance(ratio, int) else ratio[1]
    size = (max(1, height // spatial), max(1, width // spatial))
    if getattr(fmt, "latent_dimensions", 2) == 3:
        frames = ratio[0](length) if not isinstance(ratio, int) else length
        return torch.zeros((1, fmt.latent_channels, max(1, frames), *size))
    return torch.zeros((1, fmt.latent_channels, *size))


def latent_channels(patcher) -> int:
    return patcher.model.latent_format.latent_channels


def render(patcher, positive: list, negative: list, latent: torch.Tensor, *, seed: int, steps: int, cfg: float,
           sampler_name: str, scheduler: str, on_step: Callable[[], None]) -> torch.Tensor:
    """ComfyUI's KSampler path (``comfy.sample``: its noise from ``seed``, its sampler and scheduler) on the model
    as it is now; ``on_step`` after every sampler step (where a cancel is checked)."""
    latent = comfy.sample.fix_empty_latent_channels(patcher, latent)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(patcher, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                               callback=lambda *args: on_step(), disable_pbar=True, seed=seed)


def decode_frames(vae, latent: torch.Tensor) -> torch.Tensor:
    """The VAE's pixels of a sampled latent as frames (N, H, W, 3) in 0..1: one for an image, every frame of a clip."""
    pixels = vae.decode(latent)
    return pixels.reshape(-1, *pixels.shape[-3:]).float().clamp(0, 1)


def decode_audio(path: str) -> tuple[torch.Tensor, int]:
    """An audio file decoded as ComfyUI's own Load Audio node decodes it (PyAV): (channels, samples) float32 in
    [-1, 1] and its sample rate. ComfyUI's audio nodes (this decoder, VAEEncodeAudio) import torchaudio: without it
    ComfyUI does not load them, and an audio data set has nothing to be encoded by."""
    try:
        from comfy_extras.nodes_audio import load
    except ImportError as e:
        raise RuntimeError(f"ComfyUI's audio nodes cannot be loaded ({e}); they need torchaudio (and PyAV), which "
                           f"ComfyUI's requirements list: install them into ComfyUI's Python") from None
    return load(path)
