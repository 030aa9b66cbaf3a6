"""Everything that knows ComfyUI internals: the model's schedule, per-sample conditioning, the trainable view of a
MODEL, and applying a LoRA the way ComfyUI's loader does. One guarded code path per version difference lives here."""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator

import torch

import comfy.lora
import comfy.model_management
import comfy.model_sampling
import comfy.sampler_helpers
import comfy.samplers
import comfy.sd

from ..lora import key_formats
from ..lora.adapter_set import LoraFileError, split_keys
from ..lora.file_format import MODEL_PREFIX
from ..lora.key_formats import ModelNaming
from ..training.data import Group, groups_of, to_device
from ..training.mapped_safetensors import owned, release
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

    The channels the format gives are checked against what the model takes for each distinct input shape before any
    training: a latent from another VAE is blamed on ``latents`` before any forward."""

    def __init__(self, patcher, samples: list[torch.Tensor]):
        self.patcher, self.samples = patcher, samples
        fmt = patcher.model.latent_format
        in_model_space: dict[tuple[int, ...], tuple[int, ...]] = {}
        self.shapes: list[tuple[int, ...]] = []  # each sample's shape in the model's latent space
        for i, sample in enumerate(samples):
            shape = tuple(sample.shape)
            if shape not in in_model_space:
                try:
                    x = self.load([i])[0]
                except RuntimeError as e:  # per-channel statistics that do not broadcast
                    raise ValueError(f"latents: image {i} (shape {shape}) does not fit this "
                                     f"{base_model_name(patcher)} model's latent format ({e})") from None
                if x.shape[0] != fmt.latent_channels:
                    raise ValueError(f"latents: image {i} has {shape[0]} channels (shape {shape}); "
                                     f"this {base_model_name(patcher)} model takes latents of its own VAE "
                                     f"({fmt.latent_channels} channels in its latent space)")
                in_model_space[shape] = tuple(x.shape)
            self.shapes.append(in_model_space[shape])

    def load(self, ids: list[int]) -> torch.Tensor:
        """These samples in the model's latent space, stacked on ``data_device()`` (fp32, a new tensor)."""
        process = self.patcher.model.process_latent_in
        batch = torch.stack([process(self.samples[i].unsqueeze(0).to(data_device(), torch.float32))[0] for i in ids])
        release(*(self.samples[i] for i in ids))
        return batch

    def groups(self) -> list[Group]:
        return groups_of(self.shapes, self.load)


class SampleConditioning:
    """Each sample's own conditioning, encoded by the model (``extra_conds``) when its micro-batch is drawn and moved
    to the training device as one concatenation. Nothing per sample is kept: the data set's memory is its captions'
    own, and a caption given for all images is one tensor however many images share it.

    Every distinct caption is encoded once up front (and dropped) so that one the model cannot use is an input error
    before any training step."""

    def __init__(self, patcher, captions: list[list], shapes: list[tuple[int, ...]], device: torch.device,
                 seed: int = 0):
        self.patcher, self.captions, self.shapes, self.device, self.seed = patcher, captions, shapes, device, seed
        self.unchecked: int | None = None  # the sample whose layout the first training forward checks (see check)
        self.layouts: dict[tuple, int] = {}  # (latent shape, conditioning layout) -> its first sample
        layout_of: dict[tuple, tuple] = {}  # (caption identity, latent shape) -> its layout
        for i, (caption, shape) in enumerate(zip(captions, shapes)):
            shared = (caption_identity(caption), shape)  # samples sharing one caption and latent shape encode alike
            if shared not in layout_of:
                conds = self.encode(i)
                layout_of[shared] = (shape, tuple(sorted((k, tuple(getattr(v.cond, "shape", ()))[1:])
                                                         for k, v in conds.items())))
            self.layouts.setdefault(layout_of[shared], i)

    def encode(self, i: int) -> dict:
        """Sample i's model conditioning, on ``data_device()``; an error if the model cannot use it."""
        noise_like = torch.zeros((1, *self.shapes[i]), device=data_device())
        try:
            # What ComfyUI's samplers pass too: some models read them (the x4 upscaler the seed of its noise
            # augmentation; image-to-video models the latent_image as their start image when the conditioning
            # has none). The start image is empty: the training latent itself would hand the model its target.
            encoded = comfy.samplers.encode_model_conds(
                self.patcher.model.extra_conds, comfy.sampler_helpers.convert_cond([self.captions[i]]), noise_like,
                data_device(), "positive", latent_image=torch.zeros_like(noise_like), seed=self.seed)
            conds = {k: v.process_cond(batch_size=1, device=data_device(), area=None)
                     for k, v in encoded[0]["model_conds"].items()}
        except Exception as e:  # the model could not use this conditioning at all
            raise self.misfit(i, e) from e
        if not conds:
            raise ValueError(f"positive: conditioning {i} gives this model no inputs (is it from the right encoder?)")
        return conds

    def batch(self, ids: list[int], encoded: list[dict] | None = None) -> dict:
        """The samples' conditioning concatenated (where it waits) and moved to the training device in one go."""
        encoded = encoded if encoded is not None else [self.encode(i) for i in ids]
        batch = {k: _on(v, self.device) for k, v in comfy.samplers.cond_cat(encoded).items()}
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
                    patcher.model.apply_model(to_device(latents.load([i]), self.device), sigma.to(self.device),
                                              **self.batch([i]))
            except Exception as e:
                raise self.misfit(i, e) from e


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
        kwargs = conditioning.batch(ids, encoded)
        return patcher.model.apply_model(x_t, sigma, transformer_options=transformer_options, **kwargs)

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
    # Parameters only: patching a buffer would turn it into a Parameter for good.
    for key, param in clone.model.named_parameters():
        current = clone.object_patches.get(key, param)  # another node's object patch on a weight is kept, aliased
        if key.startswith(MODEL_PREFIX) and isinstance(current, torch.Tensor):
            clone.add_object_patch(key, _ordinary_alias(current))
    comfy.model_management.load_models_gpu([clone])
    # Newer ComfyUI (0.33) has an `in_training` switch that picks differentiable kernels (e.g. rope without the
    # fused comfy_kitchen op, which has no backward); 0.3.75 has no such switch and needs none.
    has_switch = hasattr(comfy.model_management, "in_training")
    was_training = getattr(comfy.model_management, "in_training", False)
    if has_switch:
        comfy.model_management.in_training = True
    try:
        yield clone
    finally:
        if has_switch:
            comfy.model_management.in_training = was_training
        _unload(lambda loaded: loaded is clone)  # the memory manager puts the original weights back


def _ordinary_alias(param: torch.Tensor) -> torch.nn.Parameter:
    """A frozen Parameter that shares ``param``'s memory but is not an inference tensor."""
    alias = torch.empty(0, dtype=param.dtype, device=param.device)
    with torch.no_grad():
        alias.set_(param.untyped_storage(), param.storage_offset(), param.size(), param.stride())
    return torch.nn.Parameter(alias, requires_grad=False)


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
