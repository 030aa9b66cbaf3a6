"""All adapters of one model, plus the optional bias and norm-weight deltas, and their file form."""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .adapter import Adapter, AdapterFitError
from .algorithms import ALGORITHMS, detect
from .layer_spec import LayerSpec
from .targets import NORM_TYPES, adaptable_layers, affine_norms

BIAS_SUFFIX = "diff_b"
NORM_SUFFIX = "diff"
# Every suffix a module key can end with in the files we read; the module name is what precedes it.
KNOWN_SUFFIXES = (
    "lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha", "dora_scale", "diff", "diff_b",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "oft_blocks", "rescale",
)


_FLOAT32_SUFFIXES = (".alpha", ".dora_scale")


class LoraFileError(ValueError):
    """A LoRA state dict that cannot be used with this model."""


def split_keys(state: dict[str, torch.Tensor], prefix: str) -> dict[str, dict[str, torch.Tensor]]:
    """``{module_name: {suffix: tensor}}`` for keys ``<prefix><module_name>.<suffix>``."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        suffix = next((s for s in sorted(KNOWN_SUFFIXES, key=len, reverse=True) if key.endswith("." + s)), None)
        if suffix is None or not key.startswith(prefix):
            raise LoraFileError(f"unrecognised key '{key}'")
        modules.setdefault(key[len(prefix):-len(suffix) - 1], {})[suffix] = tensor
    return modules


class AdapterSet(nn.Module):
    """Adapters by module name (relative to the model root), trained together and saved together."""

    def __init__(self, algorithm: type[Adapter], adapters: dict[str, Adapter],
                 bias_deltas: dict[str, nn.Parameter] | None = None, norm_deltas: dict[str, nn.Parameter] | None = None):
        super().__init__()
        self.algorithm = algorithm
        self.adapters = adapters
        self.bias_deltas = bias_deltas or {}
        self.norm_deltas = norm_deltas or {}
        # Registered so .to(), .parameters() and .state_dict() see them; names with dots are not allowed there.
        self._modules_list = nn.ModuleList(adapters.values())
        self._extra = nn.ParameterList([*self.bias_deltas.values(), *self.norm_deltas.values()])

    # -- building ------------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, root: nn.Module, algorithm: str, rank: int, alpha: float, generator: torch.Generator,
               patterns: str = "", train_biases_and_norms: bool = False, *, dora: bool = False,
               rs_lora: bool = False) -> "AdapterSet":
        """New adapters on every layer ``patterns`` selects. ``dora``: weight-decomposed (a trainable magnitude per
        input channel, saved as ``dora_scale``); ``rs_lora``: scale alpha/√rank, stored so ComfyUI loads it alike
        (see ``Adapter.create``). A ValueError names an option the algorithm cannot take."""
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm '{algorithm}' is not one of {', '.join(ALGORITHMS)}")
        algo = ALGORITHMS[algorithm]
        algo.check_options(dora=dora, rs_lora=rs_lora)
        layers = adaptable_layers(root, patterns)
        if not layers:
            # Starts with the input's name, as every input error of the node does (issue 10: errors name the input).
            raise ValueError(f"module_filter: '{patterns}' matches no linear or convolution layer of this model (the "
                             "module filter keeps the layers whose name contains one of its comma-separated parts)")
        adapters = {name: algo.create(spec, rank, alpha, generator, rs_lora=rs_lora,
                                      dora_layer=root.get_submodule(name) if dora else None)
                    for name, spec in sorted(layers.items())}
        biases, norms = {}, {}
        if train_biases_and_norms:
            for name in sorted(layers):
                bias = root.get_submodule(name).bias
                if bias is not None:
                    biases[name] = nn.Parameter(torch.zeros(bias.shape))
            norms = {name: nn.Parameter(torch.zeros(m.weight.shape)) for name, m in sorted(affine_norms(root, patterns).items())}
        return cls(algo, adapters, biases, norms)

    @classmethod
    def from_modules(cls, root: nn.Module, modules: dict[str, dict[str, torch.Tensor]]) -> "AdapterSet":
        """Rebuilds the adapters a LoRA file holds for this model (``modules`` as ``split_keys`` gives them, names
        relative to ``root``); every stored tensor is kept (alpha, shapes, bias and norm diffs)."""
        # Every algorithm whose marker keys occur, also several in one layer (detect() would pick one and silently
        # drop the other's tensors).
        algorithms = {algo for t in modules.values() for algo in ALGORITHMS.values()
                      if any(marker in t for marker in algo.marker_suffixes)}
        if len(algorithms) > 1:
            raise LoraFileError(f"the file mixes algorithms ({', '.join(sorted(a.name for a in algorithms))})")
        algo = algorithms.pop() if algorithms else ALGORITHMS["LoRA"]
        adapters, biases, norms = {}, {}, {}
        for name, tensors in sorted(modules.items()):
            try:
                module = root.get_submodule(name)
            except AttributeError:
                raise LoraFileError(f"the model has no layer '{name}'") from None
            spec = LayerSpec.of(module)
            try:
                _check_dimensions(tensors)
                if detect(set(tensors)) is not None:
                    if spec is None:
                        raise AdapterFitError(f"it is a {type(module).__name__}, not a linear or convolution layer")
                    adapters[name] = algo.from_tensors(spec, tensors)
                if BIAS_SUFFIX in tensors:
                    biases[name] = _delta(tensors[BIAS_SUFFIX], getattr(module, "bias", None), "bias")
                if NORM_SUFFIX in tensors:
                    if not isinstance(module, NORM_TYPES):
                        raise AdapterFitError("a full weight 'diff' is only supported for norm layers")
                    norms[name] = _delta(tensors[NORM_SUFFIX], module.weight, "weight")
            except AdapterFitError as e:
                raise LoraFileError(f"layer '{name}': {e}") from None
        if not adapters and not biases and not norms:
            raise LoraFileError("the file holds no adapter tensors")
        return cls(algo, adapters, biases, norms)

    # -- using ---------------------------------------------------------------------------------------------------
    def trainable(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def file_state(self, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Tensors under ComfyUI's generic LoRA key format ``<prefix><module>.<suffix>``, in ``dtype``."""
        out = {}
        for name, adapter in self.adapters.items():
            for suffix, tensor in adapter.tensors().items():
                out[f"{prefix}{name}.{suffix}"] = tensor
        for name, delta in self.bias_deltas.items():
            out[f"{prefix}{name}.{BIAS_SUFFIX}"] = delta.detach()
        for name, delta in self.norm_deltas.items():
            out[f"{prefix}{name}.{NORM_SUFFIX}"] = delta.detach()
        # alpha stays fp32: it is a scalar, and bf16 cannot hold every alpha a user may type. So does dora_scale: it
        # multiplies the base weight itself, and bf16 rounding (up to 2^-8) would change the model even where ΔW = 0.
        return {k: v.to(device="cpu", dtype=torch.float32 if k.endswith(_FLOAT32_SUFFIXES) else dtype)
                .contiguous().clone() for k, v in out.items()}


def _check_dimensions(tensors: dict[str, torch.Tensor]) -> None:
    """A malformed file must be a clear error, not an IndexError / RuntimeError inside an adapter's constructor."""
    for suffix, tensor in tensors.items():
        if suffix == "alpha" and tensor.numel() != 1:
            raise AdapterFitError(f"'alpha' holds {tensor.numel()} values; expected one")
        if suffix != "alpha" and tensor.ndim == 0:
            raise AdapterFitError(f"'{suffix}' is a scalar; expected a weight tensor")


def _delta(tensor: torch.Tensor, target: torch.Tensor | None, what: str) -> nn.Parameter:
    if target is None:
        raise AdapterFitError(f"the layer has no {what}")
    if tuple(tensor.shape) != tuple(target.shape):
        raise AdapterFitError(f"{what} delta has shape {tuple(tensor.shape)}, the layer's {what} is {tuple(target.shape)}")
    return nn.Parameter(tensor.detach().float().clone())
