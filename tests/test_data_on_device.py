"""Where the data set lives while training (issue 14, first part): on ComfyUI's data device (the CPU) between
micro-batches, one caption given for every image encoded and stored once, and each batch's conditioning moved to the
training device as one concatenation. In-process, ComfyUI as a library, the tiny SD1.5 UNet."""
from __future__ import annotations

from importlib import import_module

import torch

import harness


def test_one_caption_for_all_images_is_encoded_and_stored_once():
    pack = harness.load_pack()
    bridge = import_module(f"{pack.__name__}.nodes.comfy_bridge")
    import tiny_models

    patcher = tiny_models.tiny_sd15_patcher(0)
    count = 40
    latents = list(tiny_models.smooth_latents(count, tiny_models.SD15_LATENT_CHANNELS, 8, 8, seed=1))
    shared = [tiny_models.caption_embeddings(1, 6, tiny_models.SD15_CONTEXT_DIM, seed=2), {}]
    own = [[tiny_models.caption_embeddings(1, 6, tiny_models.SD15_CONTEXT_DIM, seed=3 + i), {}] for i in range(2)]
    captions = [shared] * (count - 2) + own
    with torch.inference_mode(False):
        x0 = bridge.latents_in_model_space(patcher, latents)
        conditioning = bridge.SampleConditioning(patcher, captions, x0, torch.device("cpu"))
    assert all(x.device == bridge.data_device() for x in x0)
    stored = {id(c) for c in conditioning.per_sample}
    assert len(stored) == 3, "the shared caption once, the two own captions once each"
    first, last = conditioning.per_sample[0]["c_crossattn"].cond, conditioning.per_sample[-1]["c_crossattn"].cond
    assert torch.equal(first, shared[0]) and torch.equal(last, own[-1][0])
    batch = conditioning.batch([0, count - 1])
    assert batch["c_crossattn"].shape[0] == 2 and torch.equal(batch["c_crossattn"][1], own[-1][0][0])
