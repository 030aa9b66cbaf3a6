"""A Flux dev-size model for the GPU benchmark: the architecture ComfyUI detects as Flux dev (width 3072, 19 double +
38 single blocks, 4096-wide T5 context, 768-wide pooled CLIP output, guidance embedder), seeded random weights written
once as an fp8_e4m3fn safetensors file (about 12 GB) and loaded the way "Load Diffusion Model" (UNETLoader) loads
with weight_dtype fp8_e4m3fn: ``comfy.sd.load_diffusion_model(path, model_options={"dtype": float8_e4m3fn})``.

The layout comes from ComfyUI itself through ``tools/family_models.py`` (its Flux dev probe, deepened and given the
real context and pooled widths). The reduced model (``--dry-run``) is the same probe at depth 1 + 1 and the smallest
width the running ComfyUI detects as Flux (128 on 0.33; 0.3.75 fixes the width at 3072).
"""
from __future__ import annotations

import dataclasses
import hashlib
import shutil
import time
from pathlib import Path

import torch

import bench_common  # noqa: F401  (puts tools/ on sys.path)
import family_models
import tiny_models

DEPTH = (19, 38)  # double, single blocks of Flux dev
CONTEXT, POOLED = 4096, 768  # T5-XXL width, CLIP-L pooled width
TOKENS = 512  # Flux dev's T5 caption length
DRY_TOKENS = 8
WEIGHT_DTYPE = torch.float8_e4m3fn


def family(size: int, reduced: bool) -> family_models.Family:
    """Flux dev at full depth (or depth 1 + 1 when ``reduced``), latents 16 x size x size."""
    base = family_models.BY_NAME["flux_dev"]
    double, single = (1, 1) if reduced else DEPTH

    def probe(width: int) -> family_models.Shapes:
        shapes = base.probe(width)
        shapes.update({"txt_in.weight": (width, CONTEXT), "vector_in.in_layer.weight": (width, POOLED)})
        shapes.update(family_models._count("double_blocks.", double))
        shapes.update(family_models._count("single_blocks.", single))
        return shapes

    return dataclasses.replace(base, name="flux_dev_bench", probe=probe, widths=base.widths if reduced else (3072,),
                               latent=(16, size, size), context=CONTEXT, pooled=POOLED,
                               tokens=DRY_TOKENS if reduced else TOKENS)


def write_fp8(built: family_models.Built, directory: Path, device: torch.device, seed: int = 0) -> Path:
    """The model file in ``directory`` (written once, atomically, fp8_e4m3fn). Weights are drawn on ``device`` from a
    seeded generator (``tiny_models.seeded_tensor``'s scaling), so 12 B of them take seconds on a GPU; the name carries
    a digest of the layout so that a different ComfyUI build never reuses a stale file."""
    import safetensors.torch

    layout = hashlib.sha256(repr(sorted(built.shapes.items())).encode()).hexdigest()[:10]
    path = directory / f"flux_dev_w{built.width}_{layout}_s{seed}_fp8.safetensors"
    if path.exists():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < built.parameters * 1.1:  # one byte per fp8 weight
        raise OSError(f"{directory}: {free / 2**30:.1f} GiB free, the fp8 Flux file needs {built.parameters / 2**30:.1f}")
    start = time.perf_counter()
    gen = torch.Generator(device).manual_seed(seed)
    tensors = {}
    with torch.device(device):  # seeded_tensor's factory calls draw on the generator's device
        for key in sorted(built.shapes):
            tensors[key] = tiny_models.seeded_tensor(built.shapes[key], gen).to(WEIGHT_DTYPE).cpu()
    tmp = path.with_suffix(".partial")
    safetensors.torch.save_file(tensors, str(tmp))
    tmp.replace(path)
    print(f"   wrote {path} ({path.stat().st_size / 2**30:.1f} GiB, {time.perf_counter() - start:.0f} s)", flush=True)
    return path


def prepare(size: int, reduced: bool, directory: Path,
            device: torch.device) -> tuple[family_models.Family, int, Path]:
    """The family at this latent size, its width and its weights file (built through ComfyUI's detection, written if
    absent)."""
    fam = family(size, reduced)
    built = family_models.build(fam)
    return fam, built.width, write_fp8(built, directory, device)


def load(path: Path):
    """The MODEL patcher, as UNETLoader with weight_dtype fp8_e4m3fn returns it."""
    import comfy.sd

    with torch.inference_mode():
        return comfy.sd.load_diffusion_model(str(path), model_options={"dtype": WEIGHT_DTYPE})
