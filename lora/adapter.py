"""The interface every adapter algorithm implements, and what they share (alpha, rsLoRA, DoRA, dtype casting)."""
from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from . import dora
from .layer_spec import LayerSpec


class AdapterFitError(ValueError):
    """Stored adapter tensors do not fit the layer they are meant for."""


class Adapter(nn.Module):
    """A trainable change to one layer. Created so that it changes nothing at step 0.

    ``forward(x, y, bias)`` maps the layer's input ``x`` and its unadapted output ``y`` (bias included) to the adapted
    output, without ever forming W + ΔW. ``tensors()`` gives the file tensors by key suffix, in the format ComfyUI's
    LoRA loader reads; ``from_tensors`` rebuilds an adapter from them.

    With DoRA (``dora_scale`` set) the layer's input is first scaled per channel by ``scale_input`` (a forward
    pre-hook, see ``dora``); ``forward`` is the same as without.

    Subclasses implement ``_create``, ``_from_tensors`` and ``_factor_tensors``; the options every algorithm shares
    (rsLoRA, DoRA, alpha) are handled here.
    """

    name: ClassVar[str]
    # Key suffixes whose presence identifies the algorithm in a file.
    marker_suffixes: ClassVar[tuple[str, ...]]
    # Why the algorithm cannot take an option ("" = it can); the ValueError names the option and gives the reason.
    dora_unsupported: ClassVar[str] = ""
    rs_lora_unsupported: ClassVar[str] = ""

    def __init__(self, spec: LayerSpec, alpha: float):
        super().__init__()
        self.spec = spec
        self.alpha = float(alpha)  # a Python float: the hot path multiplies by it without a tensor op
        # DoRA's magnitude per input channel, shape dora.magnitude_shape(spec); None = no DoRA. Set after the
        # subclass's own parameters, so the first parameter (param_dtype) stays one of those.
        self.dora_scale: nn.Parameter | None = None

    @classmethod
    def default_alpha(cls, rank: int) -> float:
        """Alpha when the user leaves it at 0: scale alpha/rank = 1, so the learning rate means the same at any rank."""
        return float(rank)

    @classmethod
    def resolve_alpha(cls, alpha: float, rank: int, rs_lora: bool = False) -> float:
        """The alpha to store: the user's, or the algorithm's default when it is 0 (for the rank actually used).

        rsLoRA scales by alpha/√rank, but ComfyUI's loader divides the stored alpha by the rank: storing
        alpha·√rank makes the loader's scale alpha/√rank, and the adapter (which also uses stored alpha / rank)
        trains with it.
        """
        alpha = alpha if alpha > 0 else cls.default_alpha(rank)
        return alpha * math.sqrt(rank) if rs_lora else alpha

    @classmethod
    def check_options(cls, *, dora: bool = False, rs_lora: bool = False) -> None:
        """A ValueError naming the first option this algorithm cannot take."""
        options = (("dora", dora, cls.dora_unsupported), ("rs_lora", rs_lora, cls.rs_lora_unsupported))
        for option, wanted, reason in options:
            if wanted and reason:
                raise ValueError(f"{option}: {reason}")

    @classmethod
    def create(cls, spec: LayerSpec, rank: int, alpha: float, generator: torch.Generator, *, rs_lora: bool = False,
               dora_layer: nn.Module | None = None) -> "Adapter":
        """A new adapter that changes nothing yet; ``alpha`` 0 means the algorithm's default.

        ``rs_lora``: scale alpha/√rank instead of alpha/rank (see ``resolve_alpha``). ``dora_layer``: the layer
        itself, to decompose its weight (DoRA); its magnitude starts at the weight's norm per input channel plus
        ComfyUI's eps, which makes the loader's merge the identity at step 0. A layer with a single output gets no
        DoRA: ComfyUI's loader would take its (1, in) magnitude as one per output channel.
        """
        cls.check_options(dora=dora_layer is not None, rs_lora=rs_lora)
        adapter = cls._create(spec, rank, alpha, generator, rs_lora)
        if dora_layer is not None and spec.out_features > 1:
            # The base weight on its own device (fast for a model on the GPU); ΔW is 0 here, so this is the norm
            # that scale_input computes at step 0, bit for bit on the same device.
            norms = dora.input_channel_norms(spec, dora.base_weight(dora_layer))
            magnitude = (norms + dora.EPS).reshape(dora.magnitude_shape(spec))
            adapter.dora_scale = nn.Parameter(magnitude.to(adapter.param_device))
        return adapter

    @classmethod
    def _create(cls, spec: LayerSpec, rank: int, alpha: float, generator: torch.Generator,
                rs_lora: bool) -> "Adapter":
        raise NotImplementedError

    @classmethod
    def from_tensors(cls, spec: LayerSpec, tensors: dict[str, torch.Tensor]) -> "Adapter":
        adapter = cls._from_tensors(spec, tensors)
        if "dora_scale" in tensors:
            if cls.dora_unsupported:
                raise AdapterFitError(f"'dora_scale': {cls.dora_unsupported}")
            magnitude = require(tensors, "dora_scale", spec)
            if magnitude.shape[0] == spec.out_features:
                raise AdapterFitError(
                    f"'dora_scale' has shape {tuple(magnitude.shape)}: a magnitude per output channel, which ComfyUI's "
                    "loader divides by the norm of the base weight, not of W + ΔW; training continues only a "
                    f"magnitude per input channel, shape {dora.magnitude_shape(spec)}")
            check_shape("dora_scale", magnitude, dora.magnitude_shape(spec))
            adapter.dora_scale = nn.Parameter(magnitude)
        return adapter

    @classmethod
    def _from_tensors(cls, spec: LayerSpec, tensors: dict[str, torch.Tensor]) -> "Adapter":
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {**self._factor_tensors(), "alpha": torch.tensor(self.alpha, dtype=torch.float32)}
        if self.dora_scale is not None:
            out["dora_scale"] = self.dora_scale.detach()
        return out

    def _factor_tensors(self) -> dict[str, torch.Tensor]:
        """The algorithm's own file tensors by key suffix (alpha and dora_scale are added by ``tensors``)."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """ΔW with its alpha/rank scale, shape ``spec.weight_shape``: what ComfyUI's loader adds to the weight."""
        raise NotImplementedError

    def _add_delta(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` + ΔW, written into ``weight``: a float32 (out, fan_in) tensor the caller owns. Only the DoRA norm
        needs it (the forward stays unmerged)."""
        return weight.add_(self.delta_weight().reshape(weight.shape))

    def scale_input(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        """DoRA: the layer input times dora_scale / (‖W + ΔW‖ + eps) per input channel (see ``dora``).

        The norm is detached, as the DoRA paper (section 4.3) and PEFT do: its gradient would need W + ΔW
        (out × fan_in) kept per layer until backward and another full-size product there, for a term the paper found
        not to matter.
        The forward value, which is all ComfyUI's loader reproduces, is the same either way. Gradients reach
        ``dora_scale`` through the gain and the adapter's factors through ``forward``.
        """
        assert self.dora_scale is not None
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):  # the norm in float32, as the loader's
            weight = dora.base_weight(layer, x.device).reshape(self.spec.out_features, self.spec.fan_in)
            norms = dora.input_channel_norms(self.spec, self._add_delta(weight))
        gain = dora.channel_gain(self.spec, self.dora_scale.reshape(-1) / (norms + dora.EPS))
        # x · float32 gain computes in float32 and rounds once to x's dtype (a gain rounded to bf16 first would
        # scale whole channels by up to 2^-8 off); autograd keeps x as it is, not a float32 copy.
        return (x * gain).to(x.dtype)

    def forward(self, x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    @property
    def param_dtype(self) -> torch.dtype:
        # The first own parameter (not ``parameters()``, a generator over the module tree: this runs every forward).
        return next(iter(self._parameters.values())).dtype

    @property
    def param_device(self) -> torch.device:
        return next(iter(self._parameters.values())).device

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """The layer input in the adapter's dtype (autocast, when active, still picks the compute dtype)."""
        return x if torch.is_autocast_enabled(x.device.type) else x.to(self.param_dtype)


def require(tensors: dict[str, torch.Tensor], suffix: str, spec: LayerSpec) -> torch.Tensor:
    if suffix not in tensors:
        raise AdapterFitError(f"missing tensor '{suffix}'")
    return tensors[suffix].detach().float().clone()  # a clone: file tensors may be inference tensors


def stored_alpha(tensors: dict[str, torch.Tensor], fallback: float) -> float:
    alpha = tensors.get("alpha")
    return float(alpha.float().item()) if alpha is not None else fallback


def check_shape(what: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise AdapterFitError(f"'{what}' has shape {tuple(tensor.shape)}, the layer needs {tuple(shape)}")


def normal(shape: tuple[int, ...], std: float, generator: torch.Generator) -> nn.Parameter:
    return nn.Parameter(torch.randn(shape, generator=generator) * std)


def zeros(shape: tuple[int, ...]) -> nn.Parameter:
    return nn.Parameter(torch.zeros(shape))
