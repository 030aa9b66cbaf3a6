"""Where the data set lives while training (issue 14): the inputs are read, never copied whole; each micro-batch is
made (latent format, conditioning encoding) when drawn, on ComfyUI's data device (the CPU), and goes to the training
device as one concatenation; one caption given for every image is checked and encoded once up front. In-process,
ComfyUI as a library, the tiny SD1.5 UNet."""
from __future__ import annotations

from importlib import import_module

import torch

import harness
import pytest

pytestmark = pytest.mark.fast


def test_one_caption_for_all_images_is_encoded_once_and_batches_are_made_when_drawn(monkeypatch):
    pack = harness.load_pack()
    bridge = import_module(f"{pack.__name__}.nodes.comfy_bridge")
    import comfy.samplers
    import tiny_models

    patcher = tiny_models.tiny_sd15_patcher(0)
    count = 40
    batch = tiny_models.smooth_latents(count, tiny_models.SD15_LATENT_CHANNELS, 8, 8, seed=1)
    latents = list(batch)
    shared = [tiny_models.caption_embeddings(1, 6, tiny_models.SD15_CONTEXT_DIM, seed=2), {}]
    own = [[tiny_models.caption_embeddings(1, 6, tiny_models.SD15_CONTEXT_DIM, seed=3 + i), {}] for i in range(2)]
    # each image's entry a new list around the one shared tensor, as ComfyUI's data-set nodes and our loader give it
    captions = [[shared[0], shared[1]] for _ in range(count - 2)] + own
    encodes = []
    original = comfy.samplers.encode_model_conds
    monkeypatch.setattr(comfy.samplers, "encode_model_conds", lambda *a, **k: encodes.append(1) or original(*a, **k))
    with torch.inference_mode(False):
        x0 = bridge.ModelSpaceLatents(patcher, latents)
        conditioning = bridge.SampleConditioning(patcher, captions, x0.shapes, torch.device("cpu"))
        assert len(encodes) == 3, "up front: the shared caption once, the two own captions once each"
        assert all(x.untyped_storage().data_ptr() == batch.untyped_storage().data_ptr() for x in x0.samples), \
            "the latents are the inputs themselves, not copies"
        assert x0.shapes == [tuple(batch.shape[1:])] * count
        drawn = x0.load([3, 0])
        assert drawn.device == bridge.data_device()
        assert torch.equal(drawn, patcher.model.process_latent_in(batch[[3, 0]]))
        groups = x0.groups()
        assert len(groups) == 1 and torch.equal(groups[0].rows([0, 3]), drawn.flip(0))
        encodes.clear()
        cond = conditioning.batch([0, count - 1])
        assert len(encodes) == 2, "a batch's conditioning is encoded when it is drawn"
    assert cond["c_crossattn"].shape[0] == 2
    assert torch.equal(cond["c_crossattn"][0], shared[0][0]) and torch.equal(cond["c_crossattn"][1], own[-1][0][0])
