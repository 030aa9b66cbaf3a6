"""One training step of a ComfyUI model at any size, on fake tensors: peak memory by component and FLOPs, no memory.

A model is built by ComfyUI's own classes (``comfy.supported_models``, detected from the keys of a state dict of the
published shapes, the way ``Load Diffusion Model`` detects a file) inside ``FakeTensorMode``: every tensor is a CPU
fake tensor with real shapes and dtypes and no storage. One step then runs

- ``pack``: this pack's path: its adapters (``AdapterSet.create``) attached by its hooks (``lora.injection``), its
  gradient checkpointing (``training.checkpointing``), its conditioning and objective (``comfy_bridge`` and
  ``loop.sample_loss``), its flat fp32 master weights (``FlatParams``) and its optimizer (``optimizers.build``);
- ``builtin``: ComfyUI's ``TrainLoraNode`` path: its weight adapters (``comfy.weight_adapter``, alpha 1, bias and
  norm offsets, in lora_dtype) as weight wrappers of ComfyUI's cast ops, its checkpointing (``nodes_train.patch`` on
  the highest child modules), autocast to the training dtype, MSE on x0, and ``torch.optim.AdamW`` over its tensors.

A small storage tracker (the pack's ``training.memory_estimate.LiveBytes``: every storage an op makes counts until
it is freed) finds the step's peak,
split into weights, adapter parameters, gradients, optimizer state and activations (the rest); ``FlopCounterMode``
counts its FLOPs. (``torch.distributed._tools.mem_tracker.MemTracker`` scans every live tensor at every op: hours for
a 12 B model's step.) The step measured is the second one, so the optimizer's state exists, as in every later step. Fake CUDA tensors cannot run a
backward (COMFYUI_FACTS "Fake tensors"), so sizes are those of CPU tensors: the CUDA caching allocator rounds each
block up to 512 bytes, which is noise at these sizes.

Needs ComfyUI importable (``harness.load_pack``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, asdict
from typing import Any, Callable

import torch

import harness

GB = 1e9
PACK = harness.PACK_NAME


@dataclass(frozen=True)
class Case:
    """One family at one size: the state-dict keys detection reads (``shapes``: key -> shape; block counts by
    ``blocks``), one latent (C, H, W) / (C, T, H, W) and one caption (tokens x width, pooled width, extras)."""
    name: str
    detected_as: str
    shapes: Callable[[], dict[str, tuple[int, ...]]]
    latent: tuple[int, ...]
    tokens: int
    context: int
    pooled: int | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    blocks: dict[str, int] = field(default_factory=dict)  # key prefix -> block count (keys "<prefix><i>.x")
    metadata: dict[str, str] | None = None
    parameters_b: float = 0.0  # the published size, billions (a check that the build is the real model)
    captions: Callable[[int], list] | None = None  # batch -> the conditioning list, where a family makes its own


@dataclass(frozen=True)
class Settings:
    node: str = "pack"  # pack | builtin
    base: str = "bf16"  # bf16 | fp8 (weights float8_e4m3fn, ComfyUI's manual cast to bf16)
    checkpointing: bool = True
    batch: int = 1
    rank: int = 16
    training_dtype: torch.dtype = torch.bfloat16
    lora_dtype: torch.dtype = torch.bfloat16


@dataclass
class Measurement:
    """Bytes at the step's peak, by component, and FLOPs of the step (and of the bare forwards for the minimum)."""
    weights: int = 0
    adapters: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    peak: int = 0
    flops: int = 0
    forward_flops: int = 0  # one forward of the adapted model (what checkpointing recomputes)
    parameters: int = 0
    adapter_parameters: int = 0
    error: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------- building
def state_dict_shapes(case: Case) -> dict[str, tuple[int, ...]]:
    shapes = dict(case.shapes())
    for prefix, count in case.blocks.items():
        shapes.update({f"{prefix}{i}.x": (1,) for i in range(count)})
    return shapes


def fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def build(case: Case, base: str):
    """ComfyUI's ModelPatcher of ``case`` with fake weights in the base dtype (call inside ``fake_mode()``)."""
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher

    sd = {k: torch.empty(s, device="meta") for k, s in state_dict_shapes(case).items()}
    unet_config = comfy.model_detection.detect_unet_config(sd, "", metadata=case.metadata)
    if unet_config is None:
        raise LookupError(f"{case.name}: ComfyUI detects no model from these keys")
    config = comfy.model_detection.model_config_from_unet_config(unet_config, sd)
    if config is None or type(config).__name__ != case.detected_as:
        raise LookupError(f"{case.name}: detected as {type(config).__name__ if config else 'nothing'}, "
                          f"not {case.detected_as}")
    weight_dtype = torch.float8_e4m3fn if base == "fp8" else torch.bfloat16
    # as comfy.sd.load_diffusion_model does with weight_dtype fp8_e4m3fn: fp8 storage, bf16 compute per layer
    config.set_inference_dtype(weight_dtype, torch.bfloat16 if base == "fp8" else None)
    model = config.get_model({}, "")
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def data(case: Case, batch: int) -> tuple[list[torch.Tensor], list]:
    """``batch`` latents and one caption each (what the VAE and text encoder nodes give), made in fake mode."""
    latents = [torch.randn(case.latent) for _ in range(batch)]
    if case.captions is not None:
        return latents, case.captions(batch)
    captions = []
    for _ in range(batch):
        extras: dict[str, Any] = {"pooled_output": None, **case.extras}
        if case.pooled:
            extras["pooled_output"] = torch.randn(1, case.pooled)
        captions.append([torch.randn(1, case.tokens, case.context), extras])
    return latents, captions


# ------------------------------------------------------------------------------------------------- the two paths
class _PackStep:
    """The pack's step (nodes/train_lora.py with training/loop.py, one optimizer step of one micro-batch)."""

    def __init__(self, patcher, latents, captions, s: Settings):
        import importlib

        self.bridge = importlib.import_module(PACK + ".nodes.comfy_bridge")
        self.loop = importlib.import_module(PACK + ".training.loop")
        adapter_set = importlib.import_module(PACK + ".lora.adapter_set")
        self.injection = importlib.import_module(PACK + ".lora.injection")
        self.checkpointing = importlib.import_module(PACK + ".training.checkpointing")
        flat_params = importlib.import_module(PACK + ".training.flat_params")
        self.optimizers = importlib.import_module(PACK + ".training.optimizers")
        self.s = s
        self.autocast, manual_cast = self.bridge.training_precision(patcher, s.training_dtype)
        if manual_cast is not None:
            patcher.set_model_compute_dtype(manual_cast)
        # the node trains a clone whose weights are frozen aliases (comfy_bridge.trainable_model)
        patcher.model.requires_grad_(False)
        self.patcher = patcher
        self.root = patcher.model.diffusion_model
        device = torch.device("cpu")
        x0 = self.bridge.ModelSpaceLatents(patcher, latents)
        self.x0 = x0.load(list(range(len(latents))))
        self.conditioning = self.bridge.SampleConditioning(patcher, captions, x0.shapes, device)
        self.schedule = self.bridge.ComfySchedule(patcher.model.model_sampling, device)
        self.adapters = adapter_set.AdapterSet.create(self.root, "LoRA", s.rank, 0.0, torch.Generator().manual_seed(0))
        self.flat = flat_params.FlatParams(self.adapters.trainable())

    def trained(self) -> list[torch.Tensor]:
        return list(self.flat.tensors)

    def optimizer(self):
        return self.optimizers.build("AdamW", self.flat.tensors, 5e-4)

    def first_state(self, opt) -> None:
        opt.step()  # the flat gradients exist (zeros) from the start

    @contextlib.contextmanager
    def attached(self, adapters: bool = True, checkpointing: bool | None = None):
        ckpt = self.s.checkpointing if checkpointing is None else checkpointing
        with (self.injection.attached(self.root, self.adapters) if adapters else contextlib.nullcontext()), \
                self.checkpointing.checkpointed(self.root, ckpt), self.bridge.training_kernels():
            yield

    def forward_loss(self) -> torch.Tensor:
        n = self.x0.shape[0]
        sigma = self.schedule.sigmas[torch.zeros(n, dtype=torch.long)] * 0 + 0.5
        noise = torch.randn(self.x0.shape)
        denoise = self.bridge.denoiser(self.patcher, self.conditioning)
        return self.loop.sample_loss(denoise, self.schedule, self.x0, list(range(n)), noise, sigma, "MSE",
                                     self.autocast).mean()

    def step(self, opt) -> None:
        self.forward_loss().backward()
        opt.step()
        self.flat.zero_grad()


class _BuiltinStep:
    """ComfyUI's TrainLoraNode step (comfy_extras/nodes_train.py: execute's set-up and TrainSampler.fwd_bwd)."""

    def __init__(self, patcher, latents, captions, s: Settings):
        import comfy.weight_adapter
        import comfy_extras.nodes_train as nt

        self.nt, self.s = nt, s
        patcher.set_model_compute_dtype(s.training_dtype)
        self.patcher = patcher
        self.root = patcher.model.diffusion_model
        self.x0 = torch.stack(latents).to(s.training_dtype)
        self.captions = captions
        self.params: list[torch.nn.Parameter] = []
        self.wrapped: list[tuple[torch.nn.Module, str, Any]] = []
        adapter_cls = comfy.weight_adapter.adapter_maps["LoRA"]
        for name, m in patcher.model.named_modules():
            if not hasattr(m, "weight_function"):
                continue
            if m.weight is not None:
                if m.weight.ndim >= 2:
                    train = adapter_cls.create_train(m.weight, rank=s.rank, alpha=1.0)
                    for p in train.parameters():  # the node's .to(lora_dtype); Module.to cannot swap fake tensors
                        p.data = p.data.to(s.lora_dtype)
                    self.params += [p for p in train.parameters() if p.requires_grad]
                else:
                    train = nt.BiasDiff(torch.nn.Parameter(torch.zeros(m.weight.shape, dtype=s.lora_dtype)))
                    self.params.append(train.bias)
                self.wrapped.append((m, "weight_function", train))
            if getattr(m, "bias", None) is not None:
                diff = nt.BiasDiff(torch.nn.Parameter(torch.zeros(m.bias.shape, dtype=s.lora_dtype)))
                self.params.append(diff.bias)
                self.wrapped.append((m, "bias_function", diff))
        patcher.model.requires_grad_(False)

    def trained(self) -> list[torch.Tensor]:
        return self.params

    def optimizer(self):
        return torch.optim.AdamW(self.params, lr=5e-4)

    def first_state(self, opt) -> None:
        for p in self.params:
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad()  # set_to_none: the built-in's gradients are made again by every backward

    @contextlib.contextmanager
    def attached(self, adapters: bool = True, checkpointing: bool | None = None):
        ckpt = self.s.checkpointing if checkpointing is None else checkpointing
        # what ModelPatcher.load does with the node's add_weight_wrapper entries
        if adapters:
            for m, kind, f in self.wrapped:
                setattr(m, kind, [*getattr(m, kind), f])
        blocks = self.nt.find_all_highest_child_module_with_forward(self.root) if ckpt else []
        for m in blocks:
            self.nt.patch(m)
        try:
            yield
        finally:
            for m in blocks:
                self.nt.unpatch(m)
            for m, kind, _ in self.wrapped:
                setattr(m, kind, [])

    def forward_loss(self) -> torch.Tensor:
        import comfy.sampler_helpers
        import comfy.samplers

        model = self.patcher.model
        n = self.x0.shape[0]
        sigma = torch.full((n,), 0.5)
        ms = model.model_sampling
        xt = ms.noise_scaling(sigma, torch.randn(self.x0.shape, dtype=self.x0.dtype), self.x0, False)
        encoded = comfy.samplers.encode_model_conds(model.extra_conds, comfy.sampler_helpers.convert_cond(
            self.captions), xt, xt.device, "positive", latent_image=xt)
        conds = comfy.samplers.cond_cat([{k: v.process_cond(batch_size=1, device=xt.device, area=None)
                                          for k, v in e["model_conds"].items()} for e in encoded])
        with torch.autocast(xt.device.type, dtype=self.s.training_dtype):
            pred = model.apply_model(xt.requires_grad_(True), sigma.requires_grad_(True), **conds)
            return torch.nn.functional.mse_loss(pred, self.x0)

    def step(self, opt) -> None:
        self.forward_loss().backward()
        opt.step()
        opt.zero_grad()


PATHS = {"pack": _PackStep, "builtin": _BuiltinStep}


# ------------------------------------------------------------------------------------------------- measuring
@contextlib.contextmanager
def device_attention():
    """ComfyUI's attention as it runs on a CUDA GPU (``attention_pytorch``: scaled_dot_product_attention, no N x N
    score matrix kept), not the CPU's sub-quadratic or split attention, in every model module that imported it."""
    import sys

    import comfy.ldm.modules.attention as attention

    cpu_only = {attention.attention_basic, attention.attention_sub_quad, attention.attention_split}
    swapped = []
    for module in list(sys.modules.values()):
        if not getattr(module, "__name__", "").startswith("comfy."):
            continue
        for name in ("optimized_attention", "optimized_attention_masked"):
            if getattr(module, name, None) in cpu_only:
                swapped.append((module, name, getattr(module, name)))
                setattr(module, name, attention.attention_pytorch)
    try:
        yield
    finally:
        for module, name, original in swapped:
            setattr(module, name, original)

def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages under ``tensors`` (views into one buffer count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[id(st)] = st.nbytes()
    return sum(seen.values())


def _flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def measure(case: Case, s: Settings, flops: bool = True) -> Measurement:
    """The peak of one training step of ``case`` on node path ``s.node``, by component; with ``flops`` the step's
    FLOPs and the bare forwards' (for the minimum)."""
    import importlib

    memory_estimate = importlib.import_module(PACK + ".training.memory_estimate")
    out = Measurement()
    with fake_mode(), torch.inference_mode(False), device_attention():
        patcher = build(case, s.base)
        latents, captions = data(case, s.batch)
        path = PATHS[s.node](patcher, latents, captions, s)
        opt = path.optimizer()
        weights = list(patcher.model.parameters()) + list(patcher.model.buffers())
        out.parameters = sum(p.numel() for p in patcher.model.diffusion_model.parameters())
        out.adapter_parameters = sum(p.numel() for p in path.trained())
        path.first_state(opt)  # what the first step leaves: the optimizer's state (no forward needed for it)
        out.weights = _storage_bytes(weights)
        out.adapters = _storage_bytes(path.trained())
        out.optimizer = _storage_bytes([v for state in opt.state.values() for v in state.values()
                                        if isinstance(v, torch.Tensor)])
        grads = lambda: _storage_bytes([p.grad for p in path.trained() if p.grad is not None])  # noqa: E731
        before = grads()  # the pack's flat gradient buffer lives across steps; the built-in's is made by backward
        tracker = memory_estimate.LiveBytes(grads)
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with path.attached(), tracker, (counter if flops else contextlib.nullcontext()):
            path.step(opt)
        out.gradients = max(tracker.at_peak, before)
        out.peak = out.weights + out.adapters + out.optimizer + before + tracker.peak
        out.activations = out.peak - out.weights - out.adapters - out.optimizer - out.gradients
        if flops:
            out.flops = int(counter.get_total_flops())
            if s.checkpointing:
                with torch.no_grad(), path.attached(checkpointing=False):
                    out.forward_flops = _flops(path.forward_loss)
    return out


def estimate(case: Case, s: Settings):
    """The pack's pre-run estimate (nodes/memory_plan.py, training/memory_estimate.py) of the step ``measure``
    measures: the plan the node makes, from the same fake model and data."""
    import importlib

    memory_plan = importlib.import_module(PACK + ".nodes.memory_plan")
    memory_estimate = importlib.import_module(PACK + ".training.memory_estimate")
    with fake_mode(), torch.inference_mode(False), device_attention():
        patcher = build(case, s.base)
        latents, captions = data(case, s.batch)
        path = _PackStep(patcher, latents, captions, s)
        with path.injection.attached(path.root, path.adapters):
            plan = memory_plan.plan_of(patcher, path.adapters, path.conditioning, path.schedule,
                                       tuple(path.x0.shape[1:]), 0, optimizer="AdamW", batch_size=s.batch,
                                       checkpointing=s.checkpointing, loss_function="MSE", autocast=path.autocast)
    return memory_estimate.estimate(plan)


def family_case(family) -> Case:
    """A tiny family of tools/family_models.py as a Case (its model at the smallest width this ComfyUI detects)."""
    import family_models

    built = family_models.build(family)
    extras = {k: v for k, v in family.extras.items() if not callable(v)}
    return Case(family.name, family.detected_as, lambda: built.shapes, family.latent, family.tokens, family.context,
                pooled=family.pooled, extras=extras, metadata=family_models.metadata(family),
                captions=lambda batch: family_models.conditioning(family, batch, seed=0))


def safe_measure(case: Case, s: Settings, flops: bool = True) -> Measurement:
    try:
        return measure(case, s, flops)
    except Exception as e:  # one family's failure is a row with its reason, not the end of the table
        return Measurement(error=f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
