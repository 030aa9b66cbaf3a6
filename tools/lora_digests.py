"""Digests of the LoRAs a checkout of the pack trains on several fixed configurations (in-process, CPU), to show that
a change leaves what training computes bit for bit as it was:

    git worktree add /tmp/before <rev>
    .venv/bin/python tools/lora_digests.py /tmp/before > before.txt
    .venv/bin/python tools/lora_digests.py . > after.txt && diff before.txt after.txt

Configurations (Train LoRA at its defaults otherwise, 4 steps): tiny SD3 with one LATENT batch at batch 2, with a
list of items in fp32, with captions of two token lengths in one batch of 4, and with validation, EMA, noise offset
and logit-normal timesteps (Training Options); tiny SD1.5 with two resolutions, one caption for all and accumulation
2; tiny Wan with video latents. Each line: the configuration and the first 16 hex digits of a SHA-256 over the LoRA's
tensors in key order (the validation run also prints its validation losses)."""
from __future__ import annotations

import hashlib
import sys
import tempfile
from importlib import import_module
from pathlib import Path

import torch

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
sys.path.insert(0, str(TOOLS.parent / "benchmarks"))

import bench_common  # noqa: E402
import harness  # noqa: E402


def digest(lora: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(lora):
        h.update(key.encode())
        h.update(lora[key].float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def train(model, latents: list, positive: list, options: dict | None = None, **settings):
    """Train LoRA called as ComfyUI calls it (every input a list, in inference mode): (model, lora, loss map, steps)."""
    node = import_module("lora_trainer.nodes.train_lora").TrainLoRA
    args = {k: [v] for k, v in {**bench_common.ours_defaults(), "steps": 4, **settings}.items()}
    if options is not None:
        args["options"] = [options]
    with torch.inference_mode():
        return node().train(model=[model], latents=latents, positive=positive, **args)["result"]


def training_options(**fields) -> dict:
    node = import_module("lora_trainer.nodes.training_options").TrainingOptions
    validation = fields.pop("validation")
    defaults = {n: spec[1]["default"] for n, spec in node.INPUT_TYPES()["required"].items()
                if len(spec) > 1 and "default" in spec[1]}
    return node().options(validation_latents=validation[0], validation_positive=validation[1],
                          **{k: [v] for k, v in {**defaults, **fields}.items()})[0]


def main(repo: Path) -> None:
    harness.REPO = repo  # the pack is imported from the checkout given
    harness.put_comfyui_on_path()
    harness.load_pack()
    import comfy.sd
    import tiny_models

    tmp = Path(tempfile.mkdtemp())
    with torch.inference_mode():
        sd3 = comfy.sd.load_diffusion_model(str(tiny_models.write_tiny_sd3(tmp / "sd3.safetensors")))
        wan = comfy.sd.load_diffusion_model(str(tiny_models.write_model(tmp / "wan.safetensors",
                                                                        tiny_models.tiny_wan_state_dict)))
    sd15 = tiny_models.tiny_sd15_patcher(0)
    latents = tiny_models.smooth_latents(4, 16, 8, 8, seed=3)
    emb = tiny_models.caption_embeddings(4, 8, 64, seed=4)
    captions = [[emb[i : i + 1].clone(), {"pooled_output": emb[i].mean(0, keepdim=True)}] for i in range(4)]
    short = tiny_models.caption_embeddings(1, 5, 64, seed=9)
    mixed = [captions[0], captions[1], [short, {"pooled_output": short[0].mean(0, keepdim=True)}], captions[3]]
    runs = {
        "sd3 one batch, batch 2": lambda: train(sd3, [{"samples": latents}], [captions], batch_size=2),
        "sd3 list of items, fp32": lambda: train(sd3, [{"samples": latents[i : i + 1]} for i in range(4)],
                                                 [[c] for c in captions], training_dtype="fp32", lora_dtype="fp32"),
        "sd3 two token lengths, batch 4": lambda: train(sd3, [{"samples": latents}], [mixed], batch_size=4,
                                                        training_dtype="fp32"),
        "sd15 two resolutions, one caption, accumulation 2": lambda: train(
            sd15, [{"samples": tiny_models.smooth_latents(2, 4, 8, 8, seed=5)},
                   {"samples": tiny_models.smooth_latents(3, 4, 6, 10, seed=6)}],
            [[[tiny_models.caption_embeddings(1, 6, 64, seed=7), {}]]], grad_accumulation_steps=2,
            training_dtype="fp32"),
        "wan video, batch 2": lambda: train(
            wan, [{"samples": torch.randn(2, 16, 3, 4, 4, generator=torch.Generator().manual_seed(8))}],
            [[[torch.randn(1, 7, 4096, generator=torch.Generator().manual_seed(9)), {}]]], batch_size=2),
    }
    for name, run in runs.items():
        print(name, digest(run()[1]), flush=True)
    options = training_options(validation=([{"samples": latents[:2]}], [[captions[0]]]), validate_every_n_steps=2,
                               ema_decay=0.9, noise_offset=0.1, timestep_sampling="logit_normal")
    result = train(sd3, [{"samples": latents}], [captions], batch_size=2, options=options)
    print("sd3 validation, EMA, noise offset, logit-normal", digest(result[1]), result[2]["validation"]["loss"])


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve())
