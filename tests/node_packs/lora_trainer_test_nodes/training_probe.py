"""Test-only nodes that show which image and which caption every training forward of a model received.

``RecordTrainingCalls`` wraps a MODEL's ``apply_model`` (ComfyUI's APPLY_MODEL wrapper, which ``transformer_options``
carry to every call) and records, for each forward with gradients on, each row's noisy latent, sigma and text
context. ``TrainingPairs`` then names, for each recorded row, the data-set image whose latent explains the noisy
latent best and the data-set caption whose encoding equals the context. Training that pairs every image with its own
caption gives image == caption wherever the noise level leaves the image recognisable.
"""
from __future__ import annotations

import torch

RECORDS: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
WRAPPER_KEY = "lora_trainer_test_probe"


class RecordTrainingCalls:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "key": ("STRING", {"default": "probe"})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "wrap"
    CATEGORY = "testing"

    def wrap(self, model, key):
        import comfy.patcher_extension

        RECORDS[key] = records = []

        def record(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
            if torch.is_grad_enabled() and c_crossattn is not None:
                for b in range(x.shape[0]):
                    records.append((x[b].detach().float().cpu().clone(), t[b].detach().float().cpu().clone(),
                                    c_crossattn[b].detach().float().cpu().clone()))
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

        out = model.clone()  # clones copy model_options: the input MODEL keeps no wrapper
        comfy.patcher_extension.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY,
                                                     record, out.model_options, is_model_options=True)
        return (out,)


def _caption_distance(context: torch.Tensor, caption: torch.Tensor) -> float:
    """Max difference to a caption's encoding; ComfyUI batches contexts of different lengths by repeating them."""
    if context.shape[-1] != caption.shape[-1] or context.shape[0] % caption.shape[0]:
        return float("inf")
    return float((context - caption.repeat(context.shape[0] // caption.shape[0], 1)).abs().max())


class TrainingPairs:
    """For every recorded training row: [sigma, image, caption, z]; -1 names no match.

    With x_t = noised(x0, sigma, n), the row's image is the data-set latent that leaves the least residual
    (x_t - noised(x0_i, sigma, 0)) / sigma, which is unit noise for the right image. z is the margin over the runner-up
    in standard deviations of what the noise alone could give: above about 3 the image is certain, near 0 (high
    sigma, similar images) the row shows nothing."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "latents": ("LATENT",), "conditioning": ("CONDITIONING",),
                             "key": ("STRING", {"default": "probe"}), "after": ("INT", {"default": 0})}}

    INPUT_IS_LIST = True
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "report"
    CATEGORY = "testing"

    def report(self, model, latents, conditioning, key, after):
        model, key = model[0], key[0]
        images, captions = [], []
        for latent, cond in zip(latents, conditioning, strict=True):  # one image and one caption per item
            assert latent["samples"].shape[0] == 1 and len(cond) == 1, "expects MakeTrainingDataset's outputs"
            images.append(model.model.process_latent_in(latent["samples"].float().cpu())[0])
            captions.append(cond[0][0][0].float().cpu())
        rows = [[float(sigma), *_image(model.model.model_sampling, x, sigma, images), _caption(context, captions)]
                for x, sigma, context in RECORDS.get(key, [])]
        return {"ui": {"pairs": [[s, image, caption, z] for s, image, z, caption in rows]}}


def _caption(context: torch.Tensor, captions: list[torch.Tensor]) -> int:
    distances = [_caption_distance(context, c) for c in captions]
    best = min(range(len(captions)), key=distances.__getitem__)
    return best if distances[best] <= 1e-3 * float(captions[best].abs().max()) else -1


def _image(sampling, x: torch.Tensor, sigma: torch.Tensor, images: list[torch.Tensor]) -> tuple[int, float]:
    sigma = sigma.reshape(1)
    # What x would be without noise for each candidate image, in units of sigma (the noise is sigma * unit noise).
    clean = {i: sampling.noise_scaling(sigma, torch.zeros_like(x0)[None], x0[None])[0] / sigma
             for i, x0 in enumerate(images) if x0.shape == x.shape}
    scores = {i: float((x / sigma - c).pow(2).sum()) for i, c in clean.items()}
    ranked = sorted(scores, key=scores.__getitem__)
    if len(ranked) < 2:
        return (ranked[0] if ranked else -1), 0.0
    best, second = ranked[:2]
    # For the right image the two scores differ by |D|^2 + 2 D·n (D: difference of the clean parts, n: unit
    # noise); the noise term's standard deviation is 2 |D|.
    return best, (scores[second] - scores[best]) / max(2 * float((clean[best] - clean[second]).norm()), 1e-12)
