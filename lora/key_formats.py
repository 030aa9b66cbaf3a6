"""LoRA key naming schemes: ours (ComfyUI's generic ``diffusion_model.<layer>.<suffix>``), kohya (sd-scripts and
LyCORIS: ``lora_unet_<layer with _>``) and diffusers/PEFT (``transformer.<diffusers layer>.lora_A.weight``), converted
both ways.

Which name stands for which layer is not decided here: it comes from ComfyUI's key map for the model (``names``:
file module name → ``diffusion_model.<layer>.weight``, or ``(that key, (dim, start, size))`` where a name stands for a
slice of a fused weight, e.g. diffusers' separate to_q/to_k/to_v of Flux's one qkv layer). So every name written is one
ComfyUI reads. Which of ComfyUI's aliases a kohya or diffusers file uses is decided by the tool that reads it
(``consumers``: one name per layer, the tool's own)."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from . import consumers
from .adapter_set import KNOWN_SUFFIXES, LoraFileError

FORMATS = ("comfyui", "kohya", "diffusers")
Slice = tuple[int, int, int]  # (dim, start, size) of a fused weight, as ComfyUI's key map gives it
Transform = Callable[[torch.Tensor], torch.Tensor]
# A file module name, the part of the layer's weight it stands for, and the row transform ComfyUI applies to its
# change (diffusers stores some modulation weights with their scale and shift halves swapped).
Named = tuple[str, "Slice | None", "Transform | None"]

DOWN, UP, ALPHA = "lora_down.weight", "lora_up.weight", "alpha"
# The down/up factors under the names diffusers, PEFT and other trainers write (all of them ComfyUI reads), mapped to
# ours. The separator is part of the suffix: diffusers' attention processors append "_lora.down.weight" to the name.
FOREIGN_FACTORS = {
    ".lora_A.weight": DOWN, ".lora_B.weight": UP,  # PEFT / diffusers, ai-toolkit, SimpleTuner
    ".lora_A.default.weight": DOWN, ".lora_B.default.weight": UP,  # PEFT with its adapter name kept (Qwen-Image)
    "_lora.down.weight": DOWN, "_lora.up.weight": UP,  # diffusers' attention-processor format
    ".lora.down.weight": DOWN, ".lora.up.weight": UP,  # diffusers' LoRA-compatible layers
    ".lora_linear_layer.down.weight": DOWN, ".lora_linear_layer.up.weight": UP,  # transformers-style
    ".lora_A": DOWN, ".lora_B": UP,  # Mochi's official format
}
_SUFFIXES = sorted([("." + s, s) for s in KNOWN_SUFFIXES] + list(FOREIGN_FACTORS.items()),
                   key=lambda pair: len(pair[0]), reverse=True)  # the longest match wins


def split_key(key: str) -> tuple[str, str] | None:
    """``(module name, our suffix)`` of a LoRA file key in any naming this module knows, or None."""
    for ending, suffix in _SUFFIXES:
        if key.endswith(ending) and len(key) > len(ending):
            return key[: -len(ending)], suffix
    return None


def holds_adapters(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether any key is an adapter tensor (a LoRA/LyCORIS file in any naming), not only model weights (a
    checkpoint). ``alpha`` alone does not count: models may name a weight alpha."""
    return any((parts := split_key(key)) is not None and parts[1] != ALPHA for key in state)


def _target(value: str | Sequence) -> tuple[str, Slice | None, Transform | None]:
    if isinstance(value, str):
        return value, None, None
    key, part, *transform = value
    return key, (None if part is None else tuple(int(v) for v in part)), (transform[0] if transform else None)


def _transformed_up(module: str, tensors: dict[str, torch.Tensor], transform: Transform | None) -> dict[str, torch.Tensor]:
    """A LoRA whose change ComfyUI passes through ``transform`` (a permutation of rows that is its own inverse, like
    swapping a modulation's scale and shift halves): the same permutation of the up factor, either way."""
    if transform is None:
        return tensors
    if set(tensors) - {DOWN, UP, ALPHA} or UP not in tensors:
        raise LoraFileError(f"'{module}' names a layer stored in another row order; only plain LoRA factors can be "
                            "reordered")
    up = tensors[UP]
    moved = transform(up.float())
    if moved.shape != up.shape or not torch.equal(transform(moved), up.float()):
        raise LoraFileError(f"'{module}': ComfyUI's row transform for this layer is not a reordering of rows")
    return {**tensors, UP: moved.to(up.dtype)}


def _module_of(weight_key: str) -> str:
    return weight_key[: -len(".weight")] if weight_key.endswith(".weight") else weight_key


# -- any naming → ours ------------------------------------------------------------------------------------------------
def to_canonical(state: Mapping[str, torch.Tensor], names: Mapping[str, str | Sequence],
                 shapes: Mapping[str, Sequence[int]], prefix: str = "diffusion_model.") -> dict[str, torch.Tensor]:
    """A LoRA file in any naming ComfyUI's key map knows for the model, as our keys ``<prefix><layer>.<suffix>``.

    Every tensor is kept (alpha, dora_scale, LyCORIS factors, bias/norm diffs). LoRA factors on slices of one fused
    weight (diffusers' q/k/v of a fused qkv) are merged into one LoRA on the whole weight, exactly: the downs stacked,
    the ups (each times its own alpha/rank) placed block-diagonally, alpha = the summed rank."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        parts = split_key(key)
        if parts is None:
            raise LoraFileError(f"unrecognised key '{key}'")
        module, suffix = parts
        if suffix in modules.setdefault(module, {}):
            raise LoraFileError(f"'{key}' is given twice under different namings")
        modules[module][suffix] = tensor
    whole: dict[str, tuple[str, dict[str, torch.Tensor]]] = {}
    sliced: dict[str, list[tuple[Slice, str, dict[str, torch.Tensor]]]] = {}
    for module, tensors in modules.items():
        if module not in names:
            raise LoraFileError(f"'{module}' is not a layer of this model")
        key, part, transform = _target(names[module])
        tensors = _transformed_up(module, tensors, transform)
        if not key.startswith(prefix):
            raise LoraFileError(f"'{module}' is not a layer of the diffusion model (it is '{key}')")
        if part is None:
            if key in whole:
                raise LoraFileError(f"'{whole[key][0]}' and '{module}' both name the layer '{key}'")
            whole[key] = (module, tensors)
        else:
            sliced.setdefault(key, []).append((part, module, tensors))
    out: dict[str, torch.Tensor] = {}
    for key, (_, tensors) in whole.items():
        if key in sliced:
            raise LoraFileError(f"'{sliced[key][0][1]}' names a part of the layer '{key}', which the file also "
                                "adapts as a whole")
        out.update({f"{_module_of(key)}.{suffix}": t for suffix, t in tensors.items()})
    for key, parts in sliced.items():
        merged = _merge_slices(key, parts, int(shapes[key][0]))
        out.update({f"{_module_of(key)}.{suffix}": t for suffix, t in merged.items()})
    return out


def _merge_slices(key: str, parts: list[tuple[Slice, str, dict[str, torch.Tensor]]], rows: int) -> dict[str, torch.Tensor]:
    downs, ups = [], []
    taken = torch.zeros(rows, dtype=torch.bool)
    for (dim, start, size), module, tensors in sorted(parts, key=lambda p: p[0]):
        extra = set(tensors) - {DOWN, UP, ALPHA}
        if extra or DOWN not in tensors or UP not in tensors:
            raise LoraFileError(f"'{module}' adapts a part of the layer '{key}' with "
                                f"{', '.join(sorted(extra)) or 'incomplete factors'}; only plain LoRA factors on "
                                "parts of a layer can be merged into one adapter")
        if dim != 0 or start + size > rows or taken[start:start + size].any():
            raise LoraFileError(f"'{module}' names rows {start}..{start + size} of '{key}', which do not fit")
        taken[start:start + size] = True
        down, up = tensors[DOWN], tensors[UP]
        rank = down.shape[0]
        if up.shape[0] != size or up.shape[1] != rank:
            raise LoraFileError(f"'{module}': up factor of shape {tuple(up.shape)} does not fit a part of {size} rows "
                                f"at rank {rank}")
        scale = float(tensors[ALPHA].float()) / rank if ALPHA in tensors else 1.0
        downs.append(down.float())
        ups.append((start, size, up.float() * scale))
    if len({d.shape[1:] for d in downs}) != 1:
        raise LoraFileError(f"the parts of '{key}' disagree on its input size")
    total = sum(d.shape[0] for d in downs)
    dtype = parts[0][2][UP].dtype
    up = torch.zeros((rows, total, *downs[0].shape[2:]), dtype=torch.float32)
    column = 0
    for (start, size, part), down in zip(ups, downs):
        up[start:start + size, column:column + down.shape[0]] = part
        column += down.shape[0]
    return {DOWN: torch.cat(downs).to(dtype), UP: up.to(dtype), ALPHA: torch.tensor(float(total))}


# -- ours → a naming ----------------------------------------------------------------------------------------------------
NAMING_PREFIXES = {"kohya": ("lora_unet_",), "diffusers": ("unet.", "transformer.")}


def _candidates(names: Mapping[str, str | Sequence]) -> dict[str, list[Named]]:
    """ComfyUI's names of each layer (``<prefix><layer>``), sorted: all the aliases its key map lists."""
    out: dict[str, list[Named]] = {}
    for name, value in names.items():
        key, part, transform = _target(value)
        out.setdefault(_module_of(key), []).append((name, part, transform))
    return {module: sorted(found, key=lambda c: c[:2]) for module, found in out.items()}


def _diffusers_path(found: list[Named]) -> str | None:
    """The layer's path in diffusers' UNet, where ComfyUI's map names the layer by it (SD 1.x/2.x/SDXL)."""
    paths = [consumers.diffusers_module(c[0]) for c in found if c[0].startswith("unet.") and c[1] is None]
    return paths[0] if paths else None


def choose_names(names: Mapping[str, str | Sequence], modules: Iterable[str], fmt: str, family: str = "",
                 prefix: str = "diffusion_model.") -> dict[str, list[Named]]:
    """For each of our modules (``<prefix><layer>``), the names format ``fmt`` gives it: the one name per layer the
    family's consumer uses (``consumers``), which ComfyUI's key map must also list (so the file can be checked by
    ComfyUI's own loader). kohya: the names of kohya's trainer for the family. diffusers: the module of the family's
    diffusers model; where that model splits a fused layer (Flux's and SD3's qkv), the slices, which must cover it.
    A format no tool reads for the family, or a layer without such a name, is an error that names it."""
    if fmt == "comfyui":
        return {m: [(m, None, None)] for m in modules}
    if fmt not in NAMING_PREFIXES:
        raise ValueError(f"format: '{fmt}' is not one of {', '.join(FORMATS)}")
    consumers.require_format(family, fmt)
    candidates = _candidates(names)
    out = {}
    for module in modules:
        found = candidates.get(module, [])
        chosen = _kohya_choice(module, found, family, prefix) if fmt == "kohya" else _diffusers_choice(found, family)
        if not chosen:
            raise LoraFileError(f"{family or 'this model'}: ComfyUI knows no {fmt} name that its consumer reads for "
                                f"the layer '{module[len(prefix):]}'")
        out[module] = chosen
    return out


def _kohya_choice(module: str, found: list[Named], family: str, prefix: str) -> list[Named]:
    want = consumers.kohya_name(family, module[len(prefix):], _diffusers_path(found))
    return [c for c in found if c[0] == want and c[1] is None and c[2] is None][:1]


def _diffusers_choice(found: list[Named], family: str) -> list[Named]:
    mine = [c for c in found if c[0].startswith(NAMING_PREFIXES["diffusers"]) and consumers.is_diffusers_name(family, c[0])]
    wholes = [c for c in mine if c[1] is None]
    if wholes:
        return wholes[:1]
    parts = sorted({c[1]: c for c in mine if c[1] is not None and c[1][0] == 0}.items())
    return [c for _, c in parts] if parts and _tiles(p for p, _ in parts) else []


def _tiles(parts: Iterable[Slice]) -> bool:
    end = 0
    for _, start, size in parts:
        if start != end:
            return False
        end = start + size
    return True


def _rows_cover(parts: list[Named], rows: int) -> bool:
    return parts[-1][1] is not None and parts[-1][1][1] + parts[-1][1][2] == rows


def from_canonical(state: Mapping[str, torch.Tensor], chosen: Mapping[str, list[Named]], fmt: str,
                   shapes: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
    """Our keys renamed into ``fmt`` (``chosen`` from ``choose_names``). kohya keeps every suffix (LyCORIS names
    LoHa/LoKr/OFT and the diffs the same way). diffusers holds plain LoRA factors only, with alpha folded into the up
    factor (diffusers and PEFT assume alpha = rank when a file has none), one copy of the down factor per slice."""
    modules = _group(state)
    if fmt == "diffusers":
        _require_plain_lora(modules)
    out: dict[str, torch.Tensor] = {}
    for module, tensors in modules.items():
        named = chosen[module]
        if fmt != "diffusers":
            out.update({f"{named[0][0]}.{suffix}": t for suffix, t in tensors.items()})  # kohya: whole, untransformed
            continue
        down, up = tensors[DOWN], tensors[UP]
        if ALPHA in tensors:
            up = (up.float() * (float(tensors[ALPHA].float()) / down.shape[0])).to(up.dtype)
        if named[0][1] is not None and not _rows_cover(named, int(shapes[module + ".weight"][0])):
            raise LoraFileError(f"the diffusers names of '{module}' do not cover all of its rows")
        for name, part, transform in named:
            piece = up if part is None else up[part[1]:part[1] + part[2]]
            piece = _transformed_up(name, {UP: piece}, transform)[UP]
            down_key, up_key = _diffusers_factor_keys(name)
            out[down_key], out[up_key] = down.clone(), piece.contiguous().clone()
    return out


def _group(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        parts = split_key(key)
        if parts is None:
            raise LoraFileError(f"unrecognised key '{key}'")
        modules.setdefault(parts[0], {})[parts[1]] = tensor
    return modules


def _require_plain_lora(modules: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    for module, tensors in modules.items():
        extra = set(tensors) - {DOWN, UP, ALPHA}
        if extra:
            raise LoraFileError(f"the diffusers format holds plain LoRA factors only; the layer "
                                f"'{module}' has {', '.join(sorted(extra))} (LyCORIS algorithms, DoRA, bias and norm "
                                "offsets): save it as kohya or comfyui")


def _diffusers_factor_keys(name: str) -> tuple[str, str]:
    """The factor keys diffusers writes for a name: attention processors (UNets) ``<name>_lora.down.weight``, other
    UNet layers ``<name>.lora.down.weight`` (both diffusers' own UNet LoRA formats), transformers PEFT's
    ``<name>.lora_A.weight``."""
    if ".processor." in name:
        return f"{name}_lora.down.weight", f"{name}_lora.up.weight"
    if name.startswith("unet."):
        return f"{name}.lora.down.weight", f"{name}.lora.up.weight"
    return f"{name}.lora_A.weight", f"{name}.lora_B.weight"


@dataclass(frozen=True)
class ModelNaming:
    """ComfyUI's key map for a model (all of it, or the part for the layers one LoRA adapts) and those layers' weight
    shapes: all that converting a LoRA of that model between namings needs. Kept with a trained LoRA."""
    names: dict[str, str | tuple]
    shapes: dict[str, tuple[int, ...]]
    family: str = ""  # ComfyUI's model class (comfy.supported_models), which decides who reads each format

    def canonical(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return to_canonical(state, self.names, self.shapes)

    def convert(self, state: Mapping[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
        """``state`` (any naming) in format ``fmt``."""
        canonical = self.canonical(state)
        if fmt == "diffusers":
            _require_plain_lora(_group(canonical))
        modules = sorted({split_key(k)[0] for k in canonical})
        return from_canonical(canonical, choose_names(self.names, modules, fmt, self.family), fmt, self.shapes)

    def not_canonical(self, state: Mapping[str, torch.Tensor], fmt: str) -> list[str]:
        """The names of a file in ``fmt`` that are not its consumer's own name of their layer (``consumers``): the
        save-time check, worked out from the key map again rather than from the names ``convert`` chose."""
        files = sorted({split_key(k)[0] for k in state})
        if fmt != "kohya":
            return consumers.not_canonical(self.family, fmt, files)
        candidates = _candidates(self.names)
        layers = {_module_of(_target(self.names[n])[0]) for n in files if n in self.names}
        expected = {consumers.kohya_name(self.family, layer.split(".", 1)[1], _diffusers_path(candidates[layer]))
                    for layer in layers}
        return consumers.not_canonical(self.family, fmt, files, expected)


# What multiplies ΔW of each algorithm linearly (one factor of a product): scaling it bakes a strength into the file.
_LINEAR_FACTOR = (("lora_up.weight",), ("hada_w1_a",), ("lokr_w1", "lokr_w1_a"), ("diff",), ("diff_b",))


def with_strength(state: Mapping[str, torch.Tensor], strength: float) -> dict[str, torch.Tensor]:
    """Our-naming LoRA whose every ΔW (and bias/norm offset) is ``strength`` times the original: what loading it at
    that strength gives, baked in. OFT and DoRA are not linear in any one tensor, so they take strength 1 only."""
    if strength == 1:
        return dict(state)
    out = dict(state)
    for module, tensors in _group(state).items():
        if "oft_blocks" in tensors or "dora_scale" in tensors:
            kind = "OFT" if "oft_blocks" in tensors else "DoRA"
            raise LoraFileError(f"the layer '{module}' is {kind}, whose change is not proportional to any one tensor: "
                                "only strength 1 can be baked in")
        for choices in _LINEAR_FACTOR:
            suffix = next((s for s in choices if s in tensors), None)
            if suffix is not None:
                t = tensors[suffix]
                out[f"{module}.{suffix}"] = (t.float() * strength).to(t.dtype)
    return out
