"""The demo: trains a LoRA on a tiny embedded SD3-architecture model through a real ComfyUI's HTTP API.

Steps: write the seeded tiny model into models/diffusion_models and a small encoded data set into
output/training_datasets, start ComfyUI with this pack, post the demo workflow (Load Diffusion Model → Load Training
Data Set → Train LoRA → Save LoRA + Loss Graph), print progress and the loss of every step, then the saved files.
Exits non-zero on any failure.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import tiny_models  # noqa: E402
import workflows  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "demo-output"
STEPS = 40


def write_dataset(base: Path) -> str:
    import safetensors.torch

    sys.path.insert(0, str(REPO))
    from training.dataset_file import pack

    count = 8
    latents = tiny_models.smooth_latents(count, tiny_models.SD3_LATENT_CHANNELS, 16, 16, seed=7)
    embeds = tiny_models.caption_embeddings(count, 8, tiny_models.SD3_CONTEXT_DIM, seed=8)
    captions = [[embeds[i : i + 1], {"pooled_output": embeds[i].mean(0, keepdim=True)}] for i in range(count)]
    tensors, metadata = pack(list(latents), captions)
    path = base / "output" / "training_datasets" / "demo.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return path.name


def main() -> int:
    shutil.rmtree(OUT, ignore_errors=True)
    base = OUT / "comfy_base"
    harness.put_comfyui_on_path()
    tiny_models.write_tiny_sd3(base / "models" / "diffusion_models" / "tiny_sd3.safetensors")
    dataset = write_dataset(base)
    wf = workflows.demo(dataset, STEPS)
    print(f"[demo] ComfyUI: {harness.comfyui_dir()}  base directory: {base}")
    with harness.ComfyServer(base) as server:
        print(f"[demo] server up at {server.url}; posting the demo workflow ({STEPS} steps)")

        def on_message(msg: dict) -> None:
            data = msg.get("data", {})
            if msg.get("type") == "lora_trainer.progress":
                print(f"[demo] step {data['step']:3d}/{data['steps']}  loss {data['loss']:.5f}  "
                      f"smoothed {data['smoothed_loss']:.5f}  eta {data['eta_s']:.1f}s", flush=True)
            elif msg.get("type") == "executing" and data.get("node"):
                print(f"[demo] running node {data['node']}", flush=True)

        stop = server.listen(on_message)
        start = time.monotonic()
        prompt_id = None
        try:
            prompt_id = server.queue(wf)
            entry = server.wait(prompt_id, timeout=600)
        except Exception as e:
            print(f"[demo] FAILED: {e}\n--- server log ---\n{server.log_text()[-5000:]}", file=sys.stderr)
            return 1
        finally:
            stop(prompt_id)  # after the prompt's last progress message
    lora_name = entry["outputs"]["save"]["text"][0]
    lora_path = base / "models" / "loras" / lora_name
    graph = entry["outputs"]["graph"]["images"][0]
    graph_path = base / "output" / graph["subfolder"] / graph["filename"]
    from safetensors import safe_open

    with safe_open(str(lora_path), framework="pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
    losses = entry["outputs"]["train"]["lora_trainer_loss"]
    print(f"[demo] trained in {time.monotonic() - start:.1f}s")
    print(f"[demo] LoRA file:   {lora_path}  ({len(keys)} tensors, algorithm {metadata['lora_trainer.algorithm']})")
    print(f"[demo] steps:       {metadata['lora_trainer.steps']}")
    print(f"[demo] loss:        first {losses[0]:.5f}  last {losses[-1]:.5f}")
    print(f"[demo] loss graph:  {graph_path}")
    if not graph_path.is_file() or int(metadata["lora_trainer.steps"]) != STEPS:
        print("[demo] FAILED: missing output", file=sys.stderr)
        return 1
    print(json.dumps({"lora": str(lora_path), "steps": STEPS, "loss_graph": str(graph_path)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
