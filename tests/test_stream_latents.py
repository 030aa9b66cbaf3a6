"""Latents of several streams (ComfyUI's NestedTensor, e.g. LTX-2's audio+video LATENT) in the pack's ComfyUI glue,
on any ComfyUI version: read per image as views, packed the way ComfyUI's samplers pack them, refused by name where
the model takes one latent. In-process, ComfyUI as a library, the tiny SD1.5 UNet. LTX-2 itself trains on such
latents through the server in test_family_matrix.py (ComfyUI 0.33+)."""
from __future__ import annotations

from importlib import import_module

import pytest
import torch

import harness

pytestmark = pytest.mark.fast


def pack_modules():
    pack = harness.load_pack()
    return (import_module(f"{pack.__name__}.nodes.inputs"), import_module(f"{pack.__name__}.nodes.comfy_bridge"))


def av_latent(video_shape=(2, 4, 8, 8), audio_shape=(2, 2, 5, 4)) -> dict:
    """A LATENT of two streams, as ComfyUI's LTXVConcatAVLatent makes one (the shapes of the tiny SD1.5 model)."""
    import comfy.nested_tensor

    g = torch.Generator().manual_seed(0)
    video, audio = torch.randn(video_shape, generator=g), torch.randn(audio_shape, generator=g)
    return {"samples": comfy.nested_tensor.NestedTensor((video, audio))}


def test_a_latent_of_streams_is_read_per_image_and_packed_as_comfyui_samplers_pack_it(monkeypatch):
    inputs, bridge = pack_modules()
    import comfy.utils
    import tiny_models

    latent = av_latent()
    video, audio = latent["samples"].unbind()
    samples = inputs.latent_samples(latent, (2, "SD15"))
    assert [s.shapes for s in samples] == [(tuple(video.shape[1:]), tuple(audio.shape[1:]))] * 2
    assert all(t.untyped_storage().data_ptr() == src.untyped_storage().data_ptr()
               for s in samples for t, src in zip(s.tensors, (video, audio))), "views of the inputs, not copies"

    patcher = tiny_models.tiny_sd15_patcher(0)
    model = patcher.model
    told = []
    original = model.process_latent_in
    monkeypatch.setattr(model, "process_latent_in",
                        lambda x: told.append(getattr(model, "latent_shapes", "none")) or original(x))
    with torch.inference_mode(False):
        x0 = bridge.ModelSpaceLatents(patcher, samples)
        packed, shapes = comfy.utils.pack_latents([video[[1, 0]], audio[[1, 0]]])
        assert torch.equal(x0.load([1, 0]), original(packed)), "the latent format applied to the packed rows"
        assert x0.shapes == [tuple(packed.shape[1:])] * 2
        assert x0.layouts[0].shapes == tuple(tuple(s[1:]) for s in shapes)
        group, = x0.groups()
        assert group.layout == x0.layouts[0]
        noise = group.noise(3, lambda s, g: torch.randn(s, generator=g), torch.Generator())
        assert noise.shape == (3, *packed.shape[1:])
    if hasattr(model, "latent_shapes"):  # ComfyUI 0.33+: what its samplers tell the model, and put back after
        assert told[-1] == [torch.Size((1, *video.shape[1:])), torch.Size((1, *audio.shape[1:]))]
        assert model.latent_shapes is None
    else:
        assert set(told) == {"none"}


def test_a_model_that_takes_one_latent_refuses_streams_naming_latents():
    inputs, bridge = pack_modules()
    import tiny_models

    patcher = tiny_models.tiny_sd15_patcher(0)
    samples = inputs.latent_samples(av_latent(), (2, "SD15"))
    caption = [tiny_models.caption_embeddings(1, 6, tiny_models.SD15_CONTEXT_DIM, seed=2), {}]
    with torch.inference_mode(False):
        x0 = bridge.ModelSpaceLatents(patcher, samples)
        with pytest.raises(ValueError, match=r"latents: image 0 is a latent of 2 streams .*this SD15 model takes one"):
            bridge.SampleConditioning(patcher, [caption] * 2, x0.shapes, torch.device("cpu"), layouts=x0.layouts)


@pytest.mark.parametrize("latent, message", [
    (lambda: av_latent(audio_shape=(3, 2, 5, 4)), r"latents: item 0 has streams of different batch sizes"),
    (lambda: av_latent(audio_shape=(2, 5)), r"latents: item 0 is a latent of streams that are not all batches"),
])
def test_streams_that_do_not_pair_up_are_refused(latent, message):
    inputs, _ = pack_modules()
    with pytest.raises(ValueError, match=message):
        inputs.latent_samples(latent())


def test_a_non_finite_stream_is_named():
    inputs, _ = pack_modules()
    latent = av_latent()
    latent["samples"].unbind()[1][1, 0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"latents: item 0, image 1 \(stream 1\) holds NaN or infinite values"):
        inputs.latent_samples(latent)
