"""Hand-built LoRA files in the formats other trainers write, for the tiny family models (tools/family_models.py).

Each fixture is written from its format's public description (key names, tensor shapes, scaling rule; the source is
cited per format below), never from ComfyUI's key maps or this pack's own code, so that loading one is an independent
check of both. A fixture adapts a few layers of a family's first block(s): attention projections plus one MLP layer
(and, for the UNets, the transformer's 1x1 / linear projections and one 3x3 conv, as kohya LoCon and LyCORIS write
them), rank ``RANK``, with seeded random non-zero factors on both sides (``torch.Generator``) sized so each adapted
weight moves by ``STRENGTH`` of a fan-in-scaled weight's norm (a visible but mild change of the model's output: about
1e-2 relative on the transformer families, 1e-4 on the tiny random UNets, whose output barely depends on these
layers), and, where the format stores one, an alpha (``ALPHA``) different from the rank, so a loader that ignores
alpha gets the wrong strength.

    tensors, metadata = FIXTURES[name][1](built.shapes, seed)   # what the other trainer would have saved
    write_fixture(name, built.shapes, path, seed)                # the same, as a .safetensors file
    expected_deltas(name, tensors, built.shapes)                 # {native weight key: ΔW} by the format's own math

``built.shapes`` is ``family_models.build(family).shapes``: ComfyUI's native state-dict keys of the diffusion model,
without the ``diffusion_model.`` prefix; ``expected_deltas`` uses the same keys. Files are stored in bf16 (as the
trainers usually save), and the deltas are computed in fp32 from the stored values, so they are exact for the file.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

Shapes = dict[str, tuple[int, ...]]
RANK = 4
ALPHA = 2.0  # != RANK: scale alpha/rank = 0.5 where the format has an alpha
STRENGTH = 0.05  # ||ΔW||_F of each adapted layer, relative to the norm of a fan-in-scaled weight of its shape


@dataclass(frozen=True)
class Module:
    """One adapted layer as a file names it."""

    name: str  # the key stem in the file: everything before ".lora_down.weight", ".hada_w1_a", ".lokr_w1", ...
    native: str  # ComfyUI's native key of the weight it changes (Built.shapes naming)
    rows: tuple[int, int] | None = None  # [start, stop) rows of that weight, where the format splits a fused layer
    kron: tuple[int, int] | None = None  # LoKr: the (rows, columns) of lokr_w1; lokr_w2 gets the rest
    full_w2: bool = False  # LoKr: lokr_w2 stored whole instead of as lokr_w2_a @ lokr_w2_b


@dataclass(frozen=True)
class Format:
    family: str  # family_models name of the model the fixture is for
    algorithm: str  # "lora", "loha" or "lokr"
    modules: Callable[[Shapes], list[Module]]
    metadata: Callable[[str, list[Module]], dict[str, str]]
    factors: tuple[str, str] = ("lora_down.weight", "lora_up.weight")  # LoRA: (down, up) suffixes
    alpha: float | None = ALPHA  # None: the format stores no alpha (scale 1, as PEFT's default lora_alpha = r)


# -- metadata each trainer writes (safetensors metadata is str -> str) ------------------------------------------------
STEPS = 120  # the step count the fixtures record, where the format records one


def _kohya_metadata(network_module: str, base_model: str | None = None, network_args: dict | None = None):
    """sd-scripts / musubi-tuner: ss_* keys. train_network.py records the network module, dim and alpha when it
    starts, and ss_steps / ss_epoch at every save (sd-scripts train_network.py, musubi-tuner hv_train_network.py)."""
    def build(name: str, modules: list[Module]) -> dict[str, str]:
        meta = {"ss_network_module": network_module, "ss_network_dim": str(RANK), "ss_network_alpha": str(ALPHA),
                "ss_output_name": name, "ss_steps": str(STEPS), "ss_epoch": "2"}
        if base_model:
            meta["ss_base_model_version"] = base_model
        if network_args:
            meta["ss_network_args"] = json.dumps(network_args)
        return meta
    return build


AI_TOOLKIT_VERSION = "0.12.26"


def _ai_toolkit_metadata(base_model: str):
    """ai-toolkit (ostris/ai-toolkit, jobs/process/BaseSDTrainProcess.py update_training_metadata + toolkit/metadata.py
    get_meta_for_safetensors): the job config's ``meta`` section (name, version), ``training_info`` = JSON
    {"step", "epoch"}, ``ss_base_model_version`` (``get_base_model_version``: "flux.1", "wan_2.1", "qwen_image"),
    ``ss_output_name``, ``software`` = JSON {name, repo, version}; every non-string value JSON-encoded; "format": "pt".
    (It also adds sshs_model_hash / sshs_legacy_hash, file digests for the A1111 add-on, left out here.)"""
    def build(name: str, modules: list[Module]) -> dict[str, str]:
        return {"name": name, "version": "1.0", "training_info": json.dumps({"step": STEPS, "epoch": 0}),
                "ss_base_model_version": base_model, "ss_output_name": name,
                "software": json.dumps({"name": "ai-toolkit", "repo": "https://github.com/ostris/ai-toolkit",
                                        "version": AI_TOOLKIT_VERSION}),
                "format": "pt"}
    return build


def _diffusers_metadata(component: str):
    """diffusers ``save_lora_weights`` (loaders/lora_base.py write_lora_layers / _save_lora_weights): "format": "pt"
    and, in recent versions, the PEFT LoraConfig as JSON under "lora_adapter_metadata", its keys prefixed with the
    component ("transformer.r", "transformer.lora_alpha", ...). lora_alpha = r here: ComfyUI never reads it."""
    def build(name: str, modules: list[Module]) -> dict[str, str]:
        targets = sorted({m.name.split(".", 1)[1].split(".", 2)[-1] for m in modules})
        config = {"r": RANK, "lora_alpha": RANK, "target_modules": targets, "peft_type": "LORA", "bias": "none",
                  "use_dora": False, "use_rslora": False, "lora_dropout": 0.0, "init_lora_weights": True}
        packed = {f"{component}.{k}": v for k, v in config.items()}
        return {"format": "pt", "lora_adapter_metadata": json.dumps(packed, indent=2, sort_keys=True)}
    return build


def _plain_metadata(name: str, modules: list[Module]) -> dict[str, str]:
    """accelerate's ``Accelerator.save(..., safe_serialization=True)`` (DiffSynth-Studio's ModelLogger): only the
    "format": "pt" safetensors marker."""
    return {"format": "pt"}


# -- helpers on the family layouts ---------------------------------------------------------------------------------
def _need(shapes: Shapes, key: str, dims: tuple[int, ...] = (2,)) -> tuple[int, ...]:
    if key not in shapes or len(shapes[key]) not in dims:
        raise KeyError(f"the family model has no {'/'.join(map(str, dims))}-D weight {key!r} (layout changed?)")
    return shapes[key]


def _rows(shapes: Shapes, key: str) -> int:
    return _need(shapes, key, (2, 4))[0]


def _split(shapes: Shapes, key: str, parts: list[tuple[str, int]], prefix: str) -> list[Module]:
    """Modules that each adapt consecutive row blocks of one fused weight, in order (sizes in rows)."""
    out, start = [], 0
    for name, size in parts:
        out.append(Module(f"{prefix}{name}", key, (start, start + size)))
        start += size
    if start != _rows(shapes, key):
        raise KeyError(f"{key}: the parts {parts} do not add up to its {_rows(shapes, key)} rows")
    return out


def _kohya(prefix: str, native_layer: str) -> Module:
    """sd-scripts naming: the prefix, then the module's path in the trainer's model with every "." made "_"."""
    return Module(f"{prefix}_{native_layer.replace('.', '_')}", f"{native_layer}.weight")


# -- the formats ------------------------------------------------------------------------------------------------------
# kohya-ss/sd-scripts networks/lora.py (LoRANetwork): LORA_PREFIX_UNET = "lora_unet"; a LoRA for every Linear and
# 1x1 Conv2d child of the target blocks (Transformer2DModel for SD1.x), and with network_args conv_dim / conv_alpha
# ("LoCon") for the 3x3 convs of ResnetBlock2D / Downsample2D / Upsample2D too; lora_name = prefix + "." + block
# path + "." + child path, then "." -> "_"; tensors <lora_name>.lora_down.weight (rank, in) — (rank, in, kh, kw) for
# a conv —, .lora_up.weight (out, rank) — (out, rank, 1, 1) for a conv — and .alpha (scalar);
# ΔW = up @ down * alpha / rank (for a conv the same product over the flattened (in, kh, kw), LoRAInfModule.merge_to).
# SD1.x LoRAs name the layers by sd-scripts' diffusers-layout U-Net (library/original_unet.py):
# down_blocks.<level>.attentions.<i>.transformer_blocks.<j>.attn1.to_q, ...attentions.<i>.proj_in / proj_out (1x1
# convs in SD1.x), down_blocks.<level>.resnets.<i>.conv1 / conv2 (3x3). ComfyUI's LDM layout names the same layers
# input_blocks.<n>.1.transformer_blocks.<j>.attn1.to_q, input_blocks.<n>.1.proj_out, input_blocks.<n>.0.in_layers.2
# (conv1) / out_layers.3 (conv2), with n from the level and index as below.
def _ldm_input_block(shapes: Shapes, level: int, index: int) -> int:
    """ComfyUI's (LDM) input_blocks number of the ``index``-th (ResBlock, transformer) pair of down level ``level``:
    input_blocks.0 is the input conv, then each level has ``n`` such pairs and (but the last level) a Downsample
    block: 1 + level * (n + 1) + index. ``n`` is counted from the layout (ResBlocks before the first Downsample)."""
    per_level, block = 0, 1
    while f"input_blocks.{block}.0.in_layers.2.weight" in shapes:
        per_level, block = per_level + 1, block + 1
    return 1 + level * (per_level + 1) + index


def _kohya_sd15(shapes: Shapes) -> list[Module]:
    # diffusers down_blocks.0.resnets.0 / attentions.0 are the children ".0" / ".1" of the LDM input block of level 0,
    # pair 0.
    block = _ldm_input_block(shapes, 0, 0)
    pairs = [(f"attentions.0.transformer_blocks.0.{child}", f"{block}.1.transformer_blocks.0.{child}")
             for child in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_k", "ff.net.2")]
    pairs += [("attentions.0.proj_in", f"{block}.1.proj_in"), ("attentions.0.proj_out", f"{block}.1.proj_out"),
              ("resnets.0.conv2", f"{block}.0.out_layers.3")]
    out = []
    for diffusers, ldm in pairs:
        _need(shapes, f"input_blocks.{ldm}.weight", (2, 4))
        out.append(Module(f"lora_unet_down_blocks_0_{diffusers.replace('.', '_')}", f"input_blocks.{ldm}.weight"))
    return out


# LyCORIS LoHa (KohakuBlueleaf/LyCORIS lycoris/modules/loha.py; the same in sd-scripts networks/loha.py): per module
# hada_w1_a (out, rank), hada_w1_b (rank, in), hada_w2_a (out, rank), hada_w2_b (rank, in), alpha;
# ΔW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank. A conv without Tucker decomposition is flattened: in becomes
# in * kh * kw and ΔW is reshaped to (out, in, kh, kw). Trained through sd-scripts (network_module lycoris.kohya), the
# module names are sd-scripts' names: for SDXL its LDM-layout U-Net (library/sdxl_original_unet.py: input_blocks.N.1
# = Transformer2DModel with Linear proj_in / proj_out, input_blocks.N.0 = ResnetBlock2D with in_layers.2 /
# out_layers.3 convs), so lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q (sd-scripts' get_block_index
# reads "input_blocks_").
def _loha_sdxl(shapes: Shapes) -> list[Module]:
    layers = [f"input_blocks.4.1.transformer_blocks.0.{child}"  # SDXL's first transformer (level 1; level 0 has none)
              for child in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.2")]
    layers += ["input_blocks.4.1.proj_out", "input_blocks.4.0.out_layers.3"]
    for layer in layers:
        _need(shapes, f"{layer}.weight", (2, 4))
    return [_kohya("lora_unet", layer) for layer in layers]


# sd-scripts networks/lora_flux.py: LORA_PREFIX_FLUX = "lora_unet" ("make ComfyUI compatible"), target modules
# DoubleStreamBlock / SingleStreamBlock of the BFL model, so the fused BFL layers keep their names:
# lora_unet_double_blocks_0_img_attn_qkv (up: 3 * hidden rows), lora_unet_single_blocks_0_linear1 (3 * hidden + mlp
# rows), ... with .alpha; listed with shapes in sd-scripts networks/convert_flux_lora.py's docstring.
def _kohya_flux(shapes: Shapes) -> list[Module]:
    layers = ["double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj", "double_blocks.0.txt_attn.qkv",
              "double_blocks.0.img_mlp.0", "single_blocks.0.linear1", "single_blocks.0.linear2"]
    for layer in layers:
        _need(shapes, f"{layer}.weight")
    return [_kohya("lora_unet", layer) for layer in layers]


# diffusers FluxTransformer2DModel names (the PEFT LoRA of diffusers' train_dreambooth_lora_flux.py, saved by
# FluxPipeline.save_lora_weights with the "transformer." component prefix): lora_A (rank, in) / lora_B (out, rank),
# no alpha (PEFT scale lora_alpha / r, saved with lora_alpha = r). diffusers splits BFL's fused layers
# (scripts/convert_flux_to_diffusers.py, and sd-scripts networks/convert_flux_lora.py both ways):
#   double_blocks.N.img_attn.qkv rows [q | k | v] -> transformer_blocks.N.attn.to_q / to_k / to_v
#   double_blocks.N.txt_attn.qkv rows [q | k | v] -> transformer_blocks.N.attn.add_q_proj / add_k_proj / add_v_proj
#   img_attn.proj -> attn.to_out.0, txt_attn.proj -> attn.to_add_out, img_mlp.0 / .2 -> ff.net.0.proj / ff.net.2,
#   txt_mlp.0 / .2 -> ff_context.net.0.proj / ff_context.net.2
#   single_blocks.N.linear1 rows [q | k | v | mlp] -> single_transformer_blocks.N.attn.to_q / to_k / to_v / proj_mlp,
#   single_blocks.N.linear2 -> single_transformer_blocks.N.proj_out
def _flux_sizes(shapes: Shapes) -> tuple[int, int]:
    hidden = _rows(shapes, "double_blocks.0.img_attn.proj.weight")
    return hidden, _rows(shapes, "single_blocks.0.linear1.weight") - 3 * hidden


def _diffusers_flux(shapes: Shapes) -> list[Module]:
    hidden, mlp = _flux_sizes(shapes)
    d, s = "transformer.transformer_blocks.0.", "transformer.single_transformer_blocks.0."
    qkv = [("attn.to_q", hidden), ("attn.to_k", hidden), ("attn.to_v", hidden)]
    return [*_split(shapes, "double_blocks.0.img_attn.qkv.weight", qkv, d),
            *_split(shapes, "double_blocks.0.txt_attn.qkv.weight",
                    [("attn.add_q_proj", hidden), ("attn.add_k_proj", hidden), ("attn.add_v_proj", hidden)], d),
            Module(f"{d}attn.to_out.0", "double_blocks.0.img_attn.proj.weight"),
            Module(f"{d}ff.net.0.proj", "double_blocks.0.img_mlp.0.weight"),
            *_split(shapes, "single_blocks.0.linear1.weight", [*qkv, ("proj_mlp", mlp)], s)]


# ai-toolkit (ostris/ai-toolkit toolkit/lora_special.py + network_mixins.py get_state_dict): for Flux it always saves
# the "peft format": the diffusers module names under "transformer.", lora_down -> lora_A, lora_up -> lora_B, and no
# alpha (it forces alpha = rank when peft_format is on). Documented as "ai-toolkit: Based on Diffusers, QKV and MLP are
# separated into 3 modules. A is down, B is up. No alpha for each LoRA module." in sd-scripts
# networks/convert_flux_lora.py. Its default targets every linear layer of the blocks; this fixture adapts only some
# slices of the fused layers (q and v but not k; k of a single block), as a target filter does, so a fused weight
# gets a delta with zero rows.
def _aitoolkit_flux(shapes: Shapes) -> list[Module]:
    hidden, mlp = _flux_sizes(shapes)
    d, s = "transformer.transformer_blocks.0.", "transformer.single_transformer_blocks.0."
    img_qkv = _split(shapes, "double_blocks.0.img_attn.qkv.weight",
                     [("attn.to_q", hidden), ("attn.to_k", hidden), ("attn.to_v", hidden)], d)
    single = _split(shapes, "single_blocks.0.linear1.weight",
                    [("attn.to_q", hidden), ("attn.to_k", hidden), ("attn.to_v", hidden), ("proj_mlp", mlp)], s)
    _need(shapes, "double_blocks.0.txt_attn.proj.weight")
    _need(shapes, "double_blocks.0.txt_mlp.2.weight")
    _need(shapes, "single_blocks.0.linear2.weight")
    return [img_qkv[0], img_qkv[2], Module(f"{d}attn.to_add_out", "double_blocks.0.txt_attn.proj.weight"),
            Module(f"{d}ff_context.net.2", "double_blocks.0.txt_mlp.2.weight"), single[1],
            Module(f"{s}proj_out", "single_blocks.0.linear2.weight")]


# LyCORIS LoKr (lycoris/modules/lokr.py; the same rules in sd-scripts networks/lokr.py): out = a * b, in = c * d by
# ``factorization`` (the most balanced divisor pair, smaller one first, so lokr_w1 is the small factor), lokr_w1
# (a, c) and lokr_w2 (b, d) or, when the rank is below half of w2's larger side, lokr_w2_a (b, rank) @ lokr_w2_b
# (rank, d); ΔW = kron(w1, w2) * alpha / rank, except that with both factors whole ("full matrix") the scale is 1 (and
# LyCORIS stores alpha = its lora_dim). Names as any sd-scripts network (lycoris.kohya on sd-scripts' Flux model):
# lora_unet_double_blocks_0_img_attn_qkv.lokr_w1 ... One module here is in full-matrix mode (LyCORIS full_matrix=True,
# factor 8), mixed into one file with factorised ones to exercise both scale rules.
def _balanced(n: int) -> int:
    """The smaller factor of the most balanced divisor pair of ``n`` (LyCORIS factorization with factor -1)."""
    return max(m for m in range(1, math.isqrt(n) + 1) if n % m == 0)


def _lokr(shapes: Shapes, layer: str, factor: int | None = None, full_w2: bool = False) -> Module:
    rows, cols = _need(shapes, f"{layer}.weight")
    a = factor if factor else _balanced(rows)
    c = factor if factor else _balanced(cols)
    return Module(f"lora_unet_{layer.replace('.', '_')}", f"{layer}.weight", kron=(a, c), full_w2=full_w2)


def _lokr_flux(shapes: Shapes) -> list[Module]:
    return [_lokr(shapes, "double_blocks.0.img_attn.qkv"), _lokr(shapes, "double_blocks.0.img_attn.proj"),
            _lokr(shapes, "double_blocks.0.img_mlp.2"), _lokr(shapes, "single_blocks.0.linear1"),
            _lokr(shapes, "single_blocks.0.linear2", factor=8, full_w2=True)]


# musubi-tuner (kohya-ss/musubi-tuner src/musubi_tuner/networks/lora_wan.py): networks.lora.create_network with target
# WanAttentionBlock and prefix "lora_unet", names built as sd-scripts does from Wan's own module names (blocks.N.
# self_attn.q, cross_attn.k, ffn.0 ...): lora_unet_blocks_0_self_attn_q.lora_down.weight / .lora_up.weight / .alpha.
def _musubi_wan(shapes: Shapes) -> list[Module]:
    layers = ["blocks.0.self_attn.q", "blocks.0.self_attn.k", "blocks.0.self_attn.v", "blocks.0.self_attn.o",
              "blocks.0.cross_attn.k", "blocks.0.ffn.0"]
    for layer in layers:
        _need(shapes, f"{layer}.weight")
    return [_kohya("lora_unet", layer) for layer in layers]


# ai-toolkit's Wan 2.1 LoRA (toolkit/models/wan21/wan_lora_convert.py convert_to_original, called before saving):
# the diffusers WanTransformer3DModel names of its peft-format network turned back into Wan's original ones under
# "diffusion_model." (attn1 -> self_attn, attn2 -> cross_attn, to_q/k/v -> q/k/v, to_out.0 -> o, ffn.net.0.proj ->
# ffn.0, ffn.net.2 -> ffn.2): diffusion_model.blocks.0.self_attn.q.lora_A.weight / .lora_B.weight, no alpha. This is
# also what diffusion-pipe saves for Wan (its ComfyUI-format "diffusion_model." prefix).
def _aitoolkit_wan(shapes: Shapes) -> list[Module]:
    layers = ["blocks.0.self_attn.q", "blocks.0.self_attn.k", "blocks.0.self_attn.v", "blocks.0.self_attn.o",
              "blocks.0.cross_attn.q", "blocks.0.cross_attn.o", "blocks.0.ffn.2"]
    for layer in layers:
        _need(shapes, f"{layer}.weight")
    return [Module(f"diffusion_model.{layer}", f"{layer}.weight") for layer in layers]


# diffusers SD3Transformer2DModel names (train_dreambooth_lora_sd3.py, saved with the "transformer." prefix, no alpha).
# diffusers' scripts/convert_sd3_to_diffusers.py splits the MMDiT's fused layers: joint_blocks.N.x_block.attn.qkv
# chunk(3) -> transformer_blocks.N.attn.to_q / to_k / to_v, context_block.attn.qkv chunk(3) -> attn.add_q_proj /
# add_k_proj / add_v_proj, x_block.attn.proj -> attn.to_out.0, x_block.mlp.fc1 / fc2 -> ff.net.0.proj / ff.net.2.
def _diffusers_sd3(shapes: Shapes) -> list[Module]:
    width = _rows(shapes, "joint_blocks.0.x_block.attn.proj.weight")
    p = "transformer.transformer_blocks.0."
    return [*_split(shapes, "joint_blocks.0.x_block.attn.qkv.weight",
                    [("attn.to_q", width), ("attn.to_k", width), ("attn.to_v", width)], p),
            *_split(shapes, "joint_blocks.0.context_block.attn.qkv.weight",
                    [("attn.add_q_proj", width), ("attn.add_k_proj", width), ("attn.add_v_proj", width)], p),
            Module(f"{p}attn.to_out.0", "joint_blocks.0.x_block.attn.proj.weight"),
            Module(f"{p}ff.net.0.proj", "joint_blocks.0.x_block.mlp.fc1.weight")]


# Qwen-Image: ComfyUI's native names are diffusers' (transformer_blocks.N.attn.to_q, add_q_proj, to_out.0,
# to_add_out, img_mlp.net.0.proj / net.2, txt_mlp..., img_mod.1), and the trainers differ only in wrapping:
# - DiffSynth-Studio (examples/qwen_image/model_training/lora/Qwen-Image.sh; diffsynth/diffusion/training_module.py
#   add_lora_to_model + export_trainable_state_dict, logger.py ModelLogger.save_model): PEFT inject_adapter_in_model
#   with lora_alpha = rank, the trainable parameters saved under their PEFT names with "pipe.dit." removed:
#   transformer_blocks.0.attn.to_q.lora_A.default.weight (the adapter name "default" stays in the key), no prefix,
#   no alpha. Default targets to_q,to_k,to_v,add_q_proj,add_k_proj,add_v_proj,to_out.0,to_add_out,img_mlp.net.2,...
# - ai-toolkit (extensions_built_in/diffusion_models/qwen_image/qwen_image.py convert_lora_weights_before_save):
#   peft format with "transformer." replaced by "diffusion_model.": diffusion_model.transformer_blocks.0.attn.to_q.
#   lora_A.weight, no alpha.
# - diffusers (examples/dreambooth/train_dreambooth_lora_qwen_image.py, QwenImagePipeline.save_lora_weights): the
#   "transformer." component prefix, lora_A / lora_B, no alpha (metadata as for the other diffusers LoRAs).
# - musubi-tuner (networks/lora_qwen_image.py: target QwenImageTransformerBlock, prefix "lora_unet"; its model
#   qwen_image/qwen_image_model.py uses the diffusers module names): lora_unet_transformer_blocks_0_attn_to_q
#   .lora_down.weight / .lora_up.weight / .alpha.
QWEN_LAYERS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "img_mlp.net.2"]


def _qwen(shapes: Shapes, wrap: Callable[[str], str], layers: list[str] = QWEN_LAYERS) -> list[Module]:
    out = []
    for child in layers:
        native = f"transformer_blocks.0.{child}"
        _need(shapes, f"{native}.weight")
        out.append(Module(wrap(native), f"{native}.weight"))
    return out


FORMATS: dict[str, Format] = {
    "kohya_sd15": Format("sd15", "lora", _kohya_sd15,
                         _kohya_metadata("networks.lora", "sd_v1", {"conv_dim": str(RANK), "conv_alpha": str(ALPHA)})),
    "lycoris_loha_sdxl": Format("sdxl", "loha", _loha_sdxl,
                                _kohya_metadata("lycoris.kohya", "sdxl_base_v1-0",
                                                {"algo": "loha", "conv_dim": str(RANK), "conv_alpha": str(ALPHA)})),
    "kohya_flux": Format("flux_dev", "lora", _kohya_flux, _kohya_metadata("networks.lora_flux")),
    "diffusers_flux": Format("flux_dev", "lora", _diffusers_flux, _diffusers_metadata("transformer"),
                             ("lora_A.weight", "lora_B.weight"), alpha=None),
    "aitoolkit_flux": Format("flux_dev", "lora", _aitoolkit_flux, _ai_toolkit_metadata("flux.1"),
                             ("lora_A.weight", "lora_B.weight"), alpha=None),
    "lycoris_lokr_flux": Format("flux_dev", "lokr", _lokr_flux,
                                _kohya_metadata("lycoris.kohya", network_args={"algo": "lokr", "factor": -1})),
    "musubi_wan": Format("wan21_t2v", "lora", _musubi_wan, _kohya_metadata("networks.lora_wan")),
    "aitoolkit_wan": Format("wan21_t2v", "lora", _aitoolkit_wan, _ai_toolkit_metadata("wan_2.1"),
                            ("lora_A.weight", "lora_B.weight"), alpha=None),
    "diffusers_sd3": Format("sd3", "lora", _diffusers_sd3, _diffusers_metadata("transformer"),
                            ("lora_A.weight", "lora_B.weight"), alpha=None),
    "peft_qwen_image": Format("qwen_image", "lora", partial(_qwen, wrap=lambda n: n), _plain_metadata,
                              ("lora_A.default.weight", "lora_B.default.weight"), alpha=None),
    "diffusers_qwen_image": Format("qwen_image", "lora", partial(_qwen, wrap=lambda n: f"transformer.{n}"),
                                   _diffusers_metadata("transformer"), ("lora_A.weight", "lora_B.weight"), alpha=None),
    "aitoolkit_qwen_image": Format("qwen_image", "lora", partial(_qwen, wrap=lambda n: f"diffusion_model.{n}"),
                                   _ai_toolkit_metadata("qwen_image"), ("lora_A.weight", "lora_B.weight"), alpha=None),
    "musubi_qwen_image": Format("qwen_image", "lora",
                                partial(_qwen, wrap=lambda n: f"lora_unet_{n.replace('.', '_')}"),
                                _kohya_metadata("networks.lora_qwen_image")),
}


# -- building the tensors ------------------------------------------------------------------------------------------
def _cols(shapes: Shapes, m: Module) -> int:
    """Input width of the layer as a matrix: in * kh * kw for a conv."""
    return math.prod(_need(shapes, m.native, (2, 4))[1:])


def _kernel(shapes: Shapes, m: Module) -> tuple[int, ...]:
    """(in, kh, kw) of a conv weight, () for a linear one."""
    shape = shapes[m.native]
    return tuple(shape[1:]) if len(shape) == 4 else ()


def _span(shapes: Shapes, m: Module) -> int:
    return m.rows[1] - m.rows[0] if m.rows else _rows(shapes, m.native)


def _product_norm(up: torch.Tensor, down: torch.Tensor) -> float:
    """||up @ down||_F without forming the product: sqrt(sum((upᵀup) ∘ (down downᵀ)))."""
    return float(((up.T @ up) * (down @ down.T)).sum().clamp_min(0).sqrt())


def _lokr_sides(shapes: Shapes, m: Module) -> tuple[int, int, int, int]:
    rows, cols = _span(shapes, m), _cols(shapes, m)
    a, c = m.kron
    if rows % a or cols % c:
        raise ValueError(f"{m.native}: {rows}x{cols} does not split by lokr_w1 {a}x{c}")
    return a, c, rows // a, cols // c


def _module_tensors(fmt: Format, m: Module, shapes: Shapes, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The module's factors in fp32, scaled so that its ΔW (with the format's alpha scaling) has norm STRENGTH *
    sqrt(rows): STRENGTH of a fan-in-scaled weight's norm (family_models stores N(0, 1/in) weights)."""
    rows, cols = _span(shapes, m), _cols(shapes, m)
    target = STRENGTH * math.sqrt(rows)
    scale = fmt.alpha / RANK if fmt.alpha is not None else 1.0
    randn = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    if fmt.algorithm == "lora":
        down, up = randn(RANK, cols) / math.sqrt(cols), randn(rows, RANK) / math.sqrt(RANK)
        up *= target / (scale * _product_norm(up, down))
        if kernel := _kernel(shapes, m):  # a conv: down as a conv of the layer's kernel, up as a 1x1 conv
            down, up = down.reshape(RANK, *kernel), up.reshape(rows, RANK, 1, 1)
        return {fmt.factors[0]: down, fmt.factors[1]: up}
    if fmt.algorithm == "loha":
        w = {"hada_w1_a": randn(rows, RANK), "hada_w1_b": randn(RANK, cols) / math.sqrt(cols),
             "hada_w2_a": randn(rows, RANK), "hada_w2_b": randn(RANK, cols) / math.sqrt(cols)}
        norm = float(((w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"])).norm()) * scale
        w["hada_w1_a"] *= target / norm
        return w
    a, c, b, d = _lokr_sides(shapes, m)
    w1 = randn(a, c)
    if m.full_w2:
        w = {"lokr_w1": w1, "lokr_w2": randn(b, d)}
        norm = float(w1.norm() * w["lokr_w2"].norm())  # full matrices: scale 1 whatever the alpha
    else:
        w = {"lokr_w1": w1, "lokr_w2_a": randn(b, RANK), "lokr_w2_b": randn(RANK, d)}
        norm = float(w1.norm()) * _product_norm(w["lokr_w2_a"], w["lokr_w2_b"]) * scale
    w["lokr_w1"] *= target / norm
    return w


def build(name: str, shapes: Shapes, seed: int = 0,
          dtype: torch.dtype = torch.bfloat16) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The fixture ``name`` for a family model of these native shapes: (tensors as saved, metadata)."""
    fmt = FORMATS[name]
    gen = torch.Generator().manual_seed(seed)
    modules = fmt.modules(shapes)
    tensors: dict[str, torch.Tensor] = {}
    for m in modules:
        for suffix, t in _module_tensors(fmt, m, shapes, gen).items():
            tensors[f"{m.name}.{suffix}"] = t.to(dtype).contiguous()
        if fmt.algorithm == "lokr" and m.full_w2:  # LyCORIS stores alpha = lora_dim in full-matrix mode
            tensors[f"{m.name}.alpha"] = torch.tensor(float(RANK)).to(dtype)
        elif fmt.alpha is not None:
            tensors[f"{m.name}.alpha"] = torch.tensor(fmt.alpha).to(dtype)
    return tensors, fmt.metadata(name, modules)


FIXTURES: dict[str, tuple[str, Callable[..., tuple[dict[str, torch.Tensor], dict[str, str]]]]] = {
    name: (fmt.family, partial(build, name)) for name, fmt in FORMATS.items()}


def write_fixture(name: str, shapes: Shapes, path: str | Path, seed: int = 0) -> Path:
    """Saves fixture ``name`` (with its metadata) as a .safetensors file at ``path``."""
    import safetensors.torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, metadata = build(name, shapes, seed)
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return path


# -- the deltas, by each format's own math ----------------------------------------------------------------------------
def _alpha_scale(tensors: dict[str, torch.Tensor], stem: str, rank: int) -> float:
    alpha = tensors.get(f"{stem}.alpha")
    return float(alpha) / rank if alpha is not None else 1.0


def module_delta(fmt: Format, m: Module, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """ΔW of one module (its rows only, where it adapts a slice), in fp32, from the file's tensors."""
    t = lambda suffix: tensors[f"{m.name}.{suffix}"].float()  # noqa: E731
    if fmt.algorithm == "lora":  # a conv's factors as matrices: (out, rank) @ (rank, in * kh * kw)
        down, up = t(fmt.factors[0]).flatten(1), t(fmt.factors[1]).flatten(1)
        return up @ down * _alpha_scale(tensors, m.name, down.shape[0])  # no alpha stored: PEFT's scale 1
    if fmt.algorithm == "loha":
        w1a, w2a = t("hada_w1_a"), t("hada_w2_a")
        return (w1a @ t("hada_w1_b")) * (w2a @ t("hada_w2_b")) * _alpha_scale(tensors, m.name, w1a.shape[1])
    if f"{m.name}.lokr_w2" in tensors:  # LoKr with both factors whole: scale 1, the stored alpha is not used
        return torch.kron(t("lokr_w1"), t("lokr_w2"))
    w2a = t("lokr_w2_a")
    return torch.kron(t("lokr_w1"), w2a @ t("lokr_w2_b")) * _alpha_scale(tensors, m.name, w2a.shape[1])


def expected_deltas(name: str, tensors: dict[str, torch.Tensor], shapes: Shapes) -> dict[str, torch.Tensor]:
    """{native weight key: ΔW at strength 1} that fixture ``name``'s ``tensors`` mean, by the format's own rules:
    LoRA up @ down * alpha / rank (scale 1 without an alpha: PEFT); LoHa (w1a @ w1b) * (w2a @ w2b) * alpha / rank;
    LoKr kron(w1, w2) * alpha / rank (1 when both are whole); a slice's ΔW placed into its rows of the fused weight
    (the fused weight's other rows unchanged: zero delta)."""
    fmt = FORMATS[name]
    out: dict[str, torch.Tensor] = {}
    for m in fmt.modules(shapes):
        delta = module_delta(fmt, m, tensors)
        if m.rows is None:  # (a conv's ΔW comes as (out, in * kh * kw))
            out[m.native] = out.get(m.native, torch.zeros(shapes[m.native])) + delta.reshape(shapes[m.native])
        else:
            full = out.setdefault(m.native, torch.zeros(shapes[m.native]))
            full[m.rows[0]:m.rows[1]] += delta
    return out


def fixture_deltas(name: str, shapes: Shapes, seed: int = 0) -> dict[str, torch.Tensor]:
    """``expected_deltas`` of the fixture ``build`` makes (the same as of the file ``write_fixture`` saves)."""
    return expected_deltas(name, build(name, shapes, seed)[0], shapes)


# -- putting a family model where a server's "Load Diffusion Model" lists it -----------------------------------------
def install_model(base_dir: Path, family_name: str, built, cache_dir: Path) -> Path:
    """The family's generated model file (written once into ``cache_dir``), linked into ``base_dir``'s
    models/diffusion_models; returns the cached file (its name is what UNETLoader takes)."""
    import family_models as fm

    path = fm.write(fm.BY_NAME[family_name], built, cache_dir)
    link = Path(base_dir) / "models" / "diffusion_models" / path.name
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path)
    return path
