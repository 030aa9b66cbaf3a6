"""API-format workflow builders shared by the demo, the tests and the benchmarks."""
from __future__ import annotations

from typing import Any

TRAIN = "LoraTrainer_TrainLoRA"

# The node's documented defaults, fp32 so CPU runs are fast and exact.
TRAIN_DEFAULTS: dict[str, Any] = {
    "batch_size": 1, "grad_accumulation_steps": 1, "steps": 16, "learning_rate": 0.0005, "rank": 8,
    "optimizer": "AdamW", "loss_function": "MSE", "seed": 0, "training_dtype": "bf16", "lora_dtype": "bf16",
    "algorithm": "LoRA", "gradient_checkpointing": True, "existing_lora": "[None]",
}


def sd3_model(unet_name: str = "tiny_sd3.safetensors") -> dict:
    return {"model": {"class_type": "UNETLoader", "inputs": {"unet_name": unet_name, "weight_dtype": "default"}}}


def sd15_model(seed: int = 0, dtype: str = "fp32") -> dict:
    return {"model": {"class_type": "LoraTrainerTest_TinySD15Model", "inputs": {"seed": seed, "dtype": dtype}}}


def test_data(family: str = "sd3", count: int = 4, size: int = 8, seed: int = 0, captions: str = "one per image",
              corrupt: str = "no") -> dict:
    return {"data": {"class_type": "LoraTrainerTest_TinyTrainingData", "inputs": {
        "family": family, "count": count, "height": size, "width": size, "seed": seed, "captions": captions,
        "corrupt": corrupt}}}


def dataset_file(name: str) -> dict:
    return {"data": {"class_type": "LoraTrainer_LoadTrainingDataset", "inputs": {"dataset": name}}}


def train(model: dict, data: dict, *, save_prefix: str | None = "trained/test", loss_graph: str | None = None,
          latents_from: list | None = None, **settings: Any) -> dict:
    """model + data + Train LoRA (+ Save LoRA, + Loss Graph). ``latents_from`` overrides the latents link."""
    wf = {**model, **data}
    wf["train"] = {"class_type": TRAIN, "inputs": {
        "model": ["model", 0], "latents": latents_from or ["data", 0], "positive": ["data", 1],
        **TRAIN_DEFAULTS, **settings}}
    if save_prefix is not None:
        wf["save"] = {"class_type": "LoraTrainer_SaveLoRA",
                      "inputs": {"lora": ["train", 1], "prefix": save_prefix, "steps": ["train", 3]}}
    if loss_graph is not None:
        wf["graph"] = {"class_type": "LoraTrainer_LossGraph",
                       "inputs": {"loss": ["train", 2], "filename_prefix": loss_graph}}
    return wf


TRAINING_OPTIONS_DEFAULTS: dict[str, Any] = {
    "lr_schedule": "constant", "warmup_steps": 0, "min_lr_ratio": 0.0, "cycles": 1, "max_grad_norm": 0.0,
    "timestep_sampling": "uniform", "logit_mean": 0.0, "logit_std": 1.0, "shift": 0.0, "resolution_shift": False,
    "min_snr_gamma": 0.0, "noise_offset": 0.0, "ema_decay": 0.0, "dora": False, "rs_lora": False,
    "validate_every_n_steps": 0,
    "save_every_n_steps": 0, "keep_last": 0, "save_prefix": "trained/my_lora", "resume_from": "[None]",
}


def with_options(wf: dict, **fields: Any) -> dict:
    """``wf`` with a Training Options node (its defaults, overridden by ``fields``) feeding the training node."""
    wf = {**wf, "options": {"class_type": "LoraTrainer_TrainingOptions",
                            "inputs": {**TRAINING_OPTIONS_DEFAULTS, **fields}}}
    wf["train"] = {**wf["train"], "inputs": {**wf["train"]["inputs"], "options": ["options", 0]}}
    return wf


TRAINING_SAMPLES_DEFAULTS: dict[str, Any] = {
    "width": 64, "height": 64, "length": 1, "sampler_name": "euler", "scheduler": "simple", "steps": 4, "cfg": 2.0,
    "seed": 0, "every_n_steps": 2, "sample_at_start": True, "filename_prefix": "samples/test",
}


def with_samples(wf: dict, prompts: list[dict] | None = None, vae: str = "taesd16.safetensors",
                 **fields: Any) -> dict:
    """``wf`` (with Training Options) with a Training Samples node feeding them: the prompts are CONDITIONING links
    (default: two one-caption test data sets), the negative is the first one zeroed, the VAE ``vae`` from
    models/vae; and a Sample Grid node on the training's loss."""
    wf = dict(wf)
    if prompts is None:
        for i, seed in enumerate((101, 102)):
            wf.update({f"prompt{i}": test_data("sd3", count=1, seed=seed)["data"]})
        prompts = [["prompt0", 1], ["prompt1", 1]]
    wf["prompts"] = {"class_type": "LoraTrainerTest_ConditioningList", "inputs": {
        f"c{i}": link for i, link in enumerate(prompts)}}
    wf["negative"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": prompts[0]}}
    wf["sample_vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": vae}}
    wf["samples"] = {"class_type": "LoraTrainer_TrainingSamples", "inputs": {
        **TRAINING_SAMPLES_DEFAULTS, "positive": ["prompts", 0], "negative": ["negative", 0],
        "vae": ["sample_vae", 0], **fields}}
    wf["options"] = {**wf["options"], "inputs": {**wf["options"]["inputs"], "samples": ["samples", 0]}}
    wf["grid"] = {"class_type": "LoraTrainer_SampleGrid", "inputs": {"loss": ["train", 2]}}
    return wf


# What the family matrix's checkpointing-off run adds to the defaults: every Training Options feature that works on any
# model family (min-SNR-γ and flow shifts depend on the prediction type and are tested per type instead).
MATRIX_OPTIONS: dict[str, Any] = {
    "lr_schedule": "cosine", "warmup_steps": 1, "max_grad_norm": 1.0, "timestep_sampling": "logit_normal",
    "noise_offset": 0.05, "ema_decay": 0.5, "dora": True, "rs_lora": True, "save_every_n_steps": 1,
}


def family_matrix(unet_name: str, family: str, steps: int = 2, training_dtype: str = "bf16",
                  options: dict[str, Any] | None = None, save_format: str = "kohya") -> dict:
    """A generated model through "Load Diffusion Model", trained with checkpointing on at the node's defaults (but
    ``training_dtype``) and with checkpointing off plus ``options`` (default MATRIX_OPTIONS: an intermediate save and
    training state after step 1); each LoRA applied by ComfyUI's own LoraModelLoader and its outputs compared with the
    base model's."""
    wf = {"model": {"class_type": "UNETLoader", "inputs": {"unet_name": unet_name, "weight_dtype": "default"}},
          "data": {"class_type": "LoraTrainerTest_FamilyData", "inputs": {"family": family, "count": 2, "seed": 0}}}
    for checkpointing in (True, False):
        tag = "ckpt" if checkpointing else "plain"
        wf[f"train_{tag}"] = {"class_type": TRAIN, "inputs": {
            "model": ["model", 0], "latents": ["data", 0], "positive": ["data", 1],
            **TRAIN_DEFAULTS, "steps": steps, "gradient_checkpointing": checkpointing,
            "training_dtype": training_dtype}}
        wf[f"lora_{tag}"] = {"class_type": "LoraModelLoader", "inputs": {
            "model": ["model", 0], "lora": [f"train_{tag}", 1], "strength_model": 1.0}}
        wf[f"cmp_{tag}"] = {"class_type": "LoraTrainerTest_CompareModels", "inputs": {
            "model_a": ["model", 0], "model_b": [f"lora_{tag}", 0], "latents": ["data", 0], "positive": ["data", 1],
            "nonce": 0, "points": 1}}  # one noise level: for the big fixed-width models each forward counts
    wf["options"] = {"class_type": "LoraTrainer_TrainingOptions", "inputs": {
        **TRAINING_OPTIONS_DEFAULTS, **(MATRIX_OPTIONS if options is None else options),
        "save_prefix": f"matrix/{family}"}}
    wf["train_plain"]["inputs"]["options"] = ["options", 0]
    # the plain LoRA and the one with every option (DoRA's dora_scale, rsLoRA's alpha) saved in ``save_format``
    # (kohya where the family has a kohya trainer) and reloaded: cmp_saved_<tag>
    for tag in ("ckpt", "plain"):
        wf.update(saved_and_reloaded(f"train_{tag}", save_format, f"matrix/{family}_{tag}_{save_format}",
                                     f"saved_{tag}"))
    return wf


def saved_and_reloaded(train_node: str, fmt: str, prefix: str, tag: str) -> dict:
    """Save LoRA in ``fmt`` from ``train_node``, the file loaded back by ComfyUI's own LoraLoaderModelOnly, and its
    output compared with the training node's own model_with_lora (``cmp_<tag>``: same model → rel_diff ≈ 0)."""
    return {
        f"save_{tag}": {"class_type": "LoraTrainer_SaveLoRA", "inputs": {
            "lora": [train_node, 1], "prefix": prefix, "format": fmt}},
        f"reload_{tag}": {"class_type": "LoraTrainerTest_LoadLoraByName", "inputs": {
            "model": ["model", 0], "lora_name": [f"save_{tag}", 0], "strength": 1.0}},
        f"cmp_{tag}": {"class_type": "LoraTrainerTest_CompareModels", "inputs": {
            "model_a": [train_node, 0], "model_b": [f"reload_{tag}", 0], "latents": ["data", 0],
            "positive": ["data", 1], "nonce": 0, "points": 1}},
    }


def demo(dataset: str = "demo.safetensors", steps: int = 40) -> dict:
    """The demo: the tiny SD3 model and the demo data set, trained, saved, plotted."""
    return train(sd3_model(), dataset_file(dataset), save_prefix="demo/demo_lora", loss_graph="demo/loss_graph",
                 steps=steps, batch_size=2, learning_rate=0.001, training_dtype="fp32", lora_dtype="fp32",
                 gradient_checkpointing=False)


def folder_dataset(folder: str, vae: list, clip: list, video: bool = False) -> dict:
    """ComfyUI's own data-set nodes: the images (or videos) of an input subfolder and their caption .txt files,
    encoded into one LATENT and one CONDITIONING per file (lists). Its "data" node plugs into ``train`` like a data
    source. Videos (ComfyUI 0.33+) are split into frames, which a video VAE encodes into one 5-D latent per video."""
    if video:
        nodes = {"videos": {"class_type": "LoadVideoTextDataSetFromFolder", "inputs": {"folder": folder}},
                 "images": {"class_type": "GetVideoComponents", "inputs": {"video": ["videos", 0]}}}
        texts = ["videos", 1]
    else:
        nodes = {"images": {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": folder}}}
        texts = ["images", 1]
    nodes["data"] = {"class_type": "MakeTrainingDataset", "inputs": {
        "images": ["images", 0], "texts": texts, "vae": vae, "clip": clip}}
    return nodes


def edit_pairs(folder: str, vae: list, clip: list) -> dict:
    """Load Edit Pairs: the target images of an input subfolder with their reference images and edit instructions,
    encoded into one LATENT and one CONDITIONING (carrying the item's references) per target, and the instructions.
    Its "data" node plugs into ``train`` like a data source."""
    return {"data": {"class_type": "LoraTrainer_LoadEditPairs", "inputs": {"folder": folder, "vae": vae, "clip": clip}}}


def flux_loaders(unet_name: str) -> dict:
    """Flux's usual loaders: the diffusion model in fp8 (to fit training on a 24 GB GPU), CLIP-L + T5-XXL, its VAE."""
    return {
        "model": {"class_type": "UNETLoader", "inputs": {"unet_name": unet_name, "weight_dtype": "fp8_e4m3fn"}},
        "clip": {"class_type": "DualCLIPLoader", "inputs": {
            "clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors", "type": "flux"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
    }


def real_world() -> dict:
    """A Flux dev LoRA from a folder of images with captions: Flux's loaders → ComfyUI's data-set nodes → train →
    save LoRA → loss graph."""
    return train(flux_loaders("flux1-dev.safetensors"), folder_dataset("my_dataset", vae=["vae", 0], clip=["clip", 0]),
                 save_prefix="flux/my_lora", loss_graph="loss_graph", steps=500, learning_rate=0.0001, rank=16)


def edit_flux_kontext() -> dict:
    """A Flux Kontext edit LoRA from a folder of (target, reference, instruction) items: Flux's loaders with Kontext's
    model → Load Edit Pairs → train → save LoRA (with the instructions' tag counts) → loss graph."""
    wf = train(flux_loaders("flux1-kontext-dev.safetensors"), edit_pairs("my_edit_pairs", vae=["vae", 0],
                                                                          clip=["clip", 0]),
               save_prefix="flux_kontext/my_edit_lora", loss_graph="loss_graph", steps=500, learning_rate=0.0001,
               rank=16)
    wf["save"]["inputs"]["captions"] = ["data", 2]
    return wf


def samples_flux() -> dict:
    """The real-world Flux dev graph with sample images while training: Training Options with a Training Samples node
    (one prompt through Flux's text encoders and FluxGuidance, an empty negative, Flux's VAE, every 100 steps and at
    step 0) and a Sample Grid of the run."""
    wf = with_options(real_world())
    wf["sample_prompt"] = {"class_type": "CLIPTextEncode", "inputs": {
        "text": "a photo of my subject in a park, golden hour", "clip": ["clip", 0]}}
    wf["sample_guidance"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["sample_prompt", 0],
                                                                       "guidance": 3.5}}
    wf["sample_negative"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["sample_prompt", 0]}}
    wf["samples"] = {"class_type": "LoraTrainer_TrainingSamples", "inputs": {
        **TRAINING_SAMPLES_DEFAULTS, "width": 1024, "height": 1024, "steps": 20, "cfg": 1.0, "every_n_steps": 100,
        "filename_prefix": "flux/my_lora", "positive": ["sample_guidance", 0], "negative": ["sample_negative", 0],
        "vae": ["vae", 0], "prompt_labels": "a photo of my subject in a park, golden hour"}}
    wf["options"]["inputs"]["samples"] = ["samples", 0]
    wf["grid"] = {"class_type": "LoraTrainer_SampleGrid", "inputs": {"loss": ["train", 2]}}
    return wf


ACE15_TEXT_DEFAULTS: dict[str, Any] = {  # TextEncodeAceStepAudio1.5's settings other than the texts (ComfyUI 0.33)
    "seed": 0, "bpm": 120, "timesignature": "4", "language": "en", "keyscale": "C major", "cfg_scale": 2.0,
    "temperature": 0.85, "top_p": 0.9, "top_k": 0, "min_p": 0.0,
    # the language model's audio codes describe audio it generates itself; training learns from the clips
    "generate_audio_codes": False,
}


def audio_clips(folder: str, vae: list, seconds: float) -> dict:
    """Load Audio Clips → ComfyUI's VAE Encode Audio: one LATENT per clip ("data", like a data source), the
    captions and lyrics on "clips" (outputs 1 and 2)."""
    return {"clips": {"class_type": "LoraTrainer_LoadAudioClips", "inputs": {"folder": folder, "seconds": seconds}},
            "data": {"class_type": "VAEEncodeAudio", "inputs": {"audio": ["clips", 0], "vae": vae}}}


def audio_ace_step15() -> dict:
    """An ACE-Step 1.5 LoRA from a folder of audio clips with captions (tags) and lyrics: ACE-Step 1.5's loaders →
    Load Audio Clips (30 s each) → VAE Encode Audio, and TextEncodeAceStepAudio1.5 for each clip's caption and lyrics
    → train → save LoRA (with the captions' tag counts) → loss graph. ComfyUI 0.33+ (ACE-Step 1.5)."""
    seconds = 30.0
    loaders = {
        "model": {"class_type": "UNETLoader", "inputs": {"unet_name": "acestep_v1.5_turbo.safetensors",
                                                         "weight_dtype": "default"}},
        "clip": {"class_type": "DualCLIPLoader", "inputs": {
            "clip_name1": "qwen_0.6b_ace15.safetensors", "clip_name2": "qwen_1.7b_ace15.safetensors", "type": "ace"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "ace_1.5_vae.safetensors"}},
    }
    data = {**audio_clips("my_audio_clips", ["vae", 0], seconds),
            "text": {"class_type": "TextEncodeAceStepAudio1.5", "inputs": {
                "clip": ["clip", 0], "tags": ["clips", 1], "lyrics": ["clips", 2], "duration": seconds,
                **ACE15_TEXT_DEFAULTS}}}
    wf = train(loaders, data, save_prefix="ace_step15/my_audio_lora", loss_graph="loss_graph", steps=500,
               learning_rate=0.0001, rank=16)
    wf["train"]["inputs"]["positive"] = ["text", 0]
    wf["save"]["inputs"]["captions"] = ["clips", 1]
    return wf


def video_clips(folder: str, vae: list, clip: list, max_frames: int = 81) -> dict:
    """Load Video Clips (video files or frame folders with captions, on every ComfyUI version) → ComfyUI's
    MakeTrainingDataset, which encodes each clip with a video VAE into one 5-D latent. Its "data" node plugs into
    ``train`` like a data source; "clips" gives the captions."""
    return {"clips": {"class_type": "LoraTrainer_LoadVideoClips", "inputs": {"folder": folder, "max_frames": max_frames}},
            "data": {"class_type": "MakeTrainingDataset", "inputs": {
                "images": ["clips", 0], "texts": ["clips", 1], "vae": vae, "clip": clip}}}


def wan_video() -> dict:
    """A Wan 2.1 text-to-video (1.3 B) LoRA from a folder of captioned clips: Wan's loaders (ComfyUI's repackaged
    files) → Load Video Clips → MakeTrainingDataset → train → save LoRA (with the captions' tag counts) → loss
    graph."""
    loaders = {
        "model": {"class_type": "UNETLoader", "inputs": {"unet_name": "wan2.1_t2v_1.3B_fp16.safetensors",
                                                         "weight_dtype": "default"}},
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
                                                        "type": "wan"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "wan_2.1_vae.safetensors"}},
    }
    wf = train(loaders, video_clips("my_video_clips", vae=["vae", 0], clip=["clip", 0]),
               save_prefix="wan/my_video_lora", loss_graph="loss_graph", steps=500, learning_rate=0.0001, rank=16)
    wf["save"]["inputs"]["captions"] = ["clips", 1]
    return wf


TEMPLATES = {"lora_trainer_demo_tiny_model": demo, "lora_trainer_real_world": real_world,
             "lora_trainer_edit_flux_kontext": edit_flux_kontext, "lora_trainer_audio_ace_step15": audio_ace_step15,
             "lora_trainer_video_wan21": wan_video, "lora_trainer_samples_flux": samples_flux}
