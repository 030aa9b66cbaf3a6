"""The Train LoRA node: the documented 16 inputs and 4 outputs (see CONTRACT.md), trained by lora/ and training/."""
from __future__ import annotations

import datetime
import logging
import time

import torch

import comfy.model_management
import comfy.utils

from ..lora.adapter_set import AdapterSet, LoraFileError
from ..lora.algorithms import ALGORITHMS
from ..lora.file_format import MODEL_PREFIX, LoraWeights, build_metadata, save_new
from ..lora.injection import attached
from ..training import loop
from ..training.checkpointing import checkpointed
from ..training.data import DataError
from ..training.distributed import Ranks
from ..training.objectives import LOSSES
from ..training.optimizers import OPTIMIZERS
from ..training.train_state import StateError
from ..training.validation import Validation
from . import comfy_bridge, events, inputs, lora_files, process_group, run_saves, save_metadata, training_samples
from .training_options import OPTIONS_TYPE, RunOptions

log = logging.getLogger("lora_trainer")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SEED_MAX = 0xFFFFFFFFFFFFFFFF


class TrainingDiverged(RuntimeError):
    """The loss or its gradients stayed non-finite for several steps in a row: the run stopped."""


class TrainLoRA:
    DESCRIPTION = ("Trains a LoRA (or LoHa, LoKr, OFT) on a diffusion model from latents and their captions, with "
                   "the model's own objective, and returns the model with the LoRA applied, the LoRA, the loss "
                   "history and the total step count.")
    CATEGORY = "LoRA Trainer"
    FUNCTION = "train"
    INPUT_IS_LIST = True
    RETURN_TYPES = ("MODEL", "LORA_MODEL", "LOSS_MAP", "INT")
    RETURN_NAMES = ("model_with_lora", "lora", "loss", "steps")
    OUTPUT_TOOLTIPS = (
        "The input model with the trained LoRA applied (the input model itself is never changed).",
        "The trained weights: a state dict ComfyUI's own LoRA nodes accept; connect it to Save LoRA.",
        "The loss of every optimizer step ({'loss': [...]}); connect it to a loss graph.",
        "Total training steps, including those of a continued existing LoRA.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to train the LoRA on."}),
                "latents": ("LATENT", {"tooltip": "The training images as latents: one batch, or a list of batches "
                                                  "(different resolutions are trained in same-size groups)."}),
                "positive": ("CONDITIONING", {"tooltip": "The captions: one per image, or one for all images."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 10000,
                                       "tooltip": "Images per micro-batch (each with its own caption)."}),
                "grad_accumulation_steps": ("INT", {"default": 1, "min": 1, "max": 1024,
                                                    "tooltip": "Micro-batches per optimizer step."}),
                "steps": ("INT", {"default": 16, "min": 1, "max": 100000, "tooltip": "Optimizer steps to train."}),
                "learning_rate": ("FLOAT", {"default": 0.0005, "min": 0.0000001, "max": 1.0, "step": 0.0000001,
                                            "round": 0.0000001, "tooltip": "Learning rate of the optimizer."}),
                "rank": ("INT", {"default": 8, "min": 1, "max": 128,
                                 "tooltip": "Rank of the adapter layers (block size for OFT)."}),
                "optimizer": (list(OPTIMIZERS), {"default": "AdamW", "tooltip": "The optimizer."}),
                "loss_function": (list(LOSSES), {"default": "MSE",
                                                 "tooltip": "Loss, taken on the model's native prediction."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX,
                                 "tooltip": "Seeds adapter initialisation, data order, timesteps and noise."}),
                "training_dtype": (list(DTYPES), {"default": "bf16",
                                                  "tooltip": "Compute dtype while training (autocast for fp32 "
                                                             "models, per-layer weight casting for fp16/bf16 ones)."}),
                "lora_dtype": (list(DTYPES), {"default": "bf16",
                                              "tooltip": "Dtype of the returned and saved LoRA weights "
                                                         "(training keeps fp32 master weights)."}),
                "algorithm": (list(ALGORITHMS), {"default": "LoRA", "tooltip": "The adapter algorithm."}),
                "gradient_checkpointing": ("BOOLEAN", {"default": True,
                                                       "tooltip": "Recompute block activations in the backward pass: "
                                                                  "less memory, more compute."}),
                "existing_lora": (lora_files.lora_choices(), {"default": lora_files.NONE,
                                                               "tooltip": "A LoRA from the loras folder to continue "
                                                                          "training; [None] starts a new one."}),
            },
            "optional": {
                "alpha": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1024.0, "step": 0.01,
                                    "tooltip": "Adapter alpha (scale alpha/rank). 0 = default: alpha = rank for "
                                               "LoRA/LoHa/LoKr, no norm constraint for OFT."}),
                "module_filter": ("STRING", {"default": "", "tooltip": "Comma-separated name fragments: only "
                                                                       "layers whose name contains one are adapted "
                                                                       "(empty = every linear and conv layer)."}),
                "train_biases_and_norms": ("BOOLEAN", {"default": False,
                                                       "tooltip": "Also train bias and norm-weight offsets."}),
                "options": (OPTIONS_TYPE, {"tooltip": "From a Training Options node: schedule, clipping, "
                                                      "intermediate saves, resume."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def train(self, model, latents, positive, **kw):
        opts = {k: inputs.one(v, k) for k, v in kw.items()}
        model = inputs.one(model, "model")
        node_id = opts.pop("unique_id", None)
        try:
            return self._train(model, latents, positive, node_id, **opts)
        except (DataError, LoraFileError) as e:
            raise ValueError(str(e)) from None

    def _train(self, model, latents, positive, node_id, *, batch_size, grad_accumulation_steps, steps, learning_rate,
               rank, optimizer, loss_function, seed, training_dtype, lora_dtype, algorithm, gradient_checkpointing,
               existing_lora, alpha=0.0, module_filter="", train_biases_and_norms=False, options=None):
        run = RunOptions.of(options)
        started_at = time.time()
        comfy_bridge.check_trainable(model)
        samples = inputs.latent_samples(latents, comfy_bridge.latent_dims(model))
        captions = inputs.captions_for(positive, len(samples))
        inputs.check_pairing(latents, positive)
        validation_samples = validation_captions = None
        if run.validation is not None and run.validate_every_n_steps:
            with inputs.as_validation_data():
                validation_samples = inputs.latent_samples(run.validation[0], comfy_bridge.latent_dims(model))
                validation_captions = inputs.captions_for(run.validation[1], len(validation_samples))
        existing = None
        if existing_lora and existing_lora != lora_files.NONE:
            existing = lora_files.read_lora(existing_lora)
        recorded = {"batch_size": batch_size, "grad_accumulation_steps": grad_accumulation_steps, "steps": steps,
                    "learning_rate": learning_rate, "rank": rank, "optimizer": optimizer,
                    "loss_function": loss_function, "seed": seed, "training_dtype": training_dtype,
                    "lora_dtype": lora_dtype, "algorithm": algorithm, "gradient_checkpointing": gradient_checkpointing,
                    "existing_lora": existing_lora, "alpha": alpha, "module_filter": module_filter,
                    "train_biases_and_norms": train_biases_and_norms, "images": len(samples), **run.identity()}
        # What a resumed run must share with its original (steps may grow; dtypes of the output may change).
        identity = {k: v for k, v in recorded.items() if k not in ("steps", "lora_dtype", "gradient_checkpointing")}
        identity["base_model"] = comfy_bridge.base_model_name(model)
        if run.save_every_n_steps or run.resume_from:  # hashing every latent is only worth it for a saved state
            identity["data"] = run_saves.data_fingerprint(samples, len(captions))
        resumed = run_saves.load_resume(run.resume_from, identity, steps) if run.resume_from else run_saves.Resumed()
        resume, validated = resumed.state, resumed.validated
        autocast, manual_cast = comfy_bridge.training_precision(model, DTYPES[training_dtype])
        settings = loop.Settings(steps=steps, batch_size=batch_size, grad_accumulation_steps=grad_accumulation_steps,
                                 learning_rate=learning_rate, optimizer=optimizer, loss_function=loss_function,
                                 compute_dtype=autocast, lr_schedule=run.lr_schedule, max_grad_norm=run.max_grad_norm,
                                 timesteps=run.timesteps, ema_decay=run.ema_decay)
        device = comfy.model_management.get_torch_device()
        generator = torch.Generator().manual_seed(seed)
        pbar = comfy.utils.ProgressBar(steps * grad_accumulation_steps)
        if resume is not None:
            pbar.update_absolute(resume.step * grad_accumulation_steps)

        validation = None

        def on_step(report: loop.StepReport) -> None:
            events.send("progress", {"node": node_id, **vars(report)})
            if validation is not None and report.step % run.validate_every_n_steps == 0:
                loss = validation.loss(lambda *a: loop.sample_loss(a[0], schedule, *a[1:], loss_function, autocast),
                                       validation_denoise)
                validated.append([report.step, loss])
                events.send("validation", {"node": node_id, "step": report.step, "loss": loss})

        with torch.inference_mode(False), comfy_bridge.trainable_model(model, manual_cast) as clone:
            root = clone.model.diffusion_model
            x0 = comfy_bridge.ModelSpaceLatents(clone, samples)
            groups = x0.groups()
            if existing is not None:
                try:
                    adapters = AdapterSet.from_modules(root, comfy_bridge.modules_of_file(clone, existing[0]))
                    comfy_bridge.check_comfy_reads(clone, existing[0])
                except LoraFileError as e:
                    raise ValueError(f"existing_lora: '{existing_lora}' does not fit this "
                                     f"{comfy_bridge.base_model_name(model)} model: {e}") from None
                previous = lora_files.previous_steps(existing_lora, existing[1])
                if adapters.algorithm.name != algorithm:
                    log.warning("existing_lora '%s' is %s; continuing it as %s (the algorithm input is ignored)",
                                existing_lora, adapters.algorithm.name, adapters.algorithm.name)
            else:
                adapters = AdapterSet.create(root, algorithm, rank, alpha, generator, module_filter,
                                             train_biases_and_norms, dora=run.dora, rs_lora=run.rs_lora)
                previous = 0
            if resumed.previous_steps is not None:
                previous = resumed.previous_steps
            adapters.to(device)

            naming = None

            def lora_at(total: int) -> LoraWeights:
                """The LoRA as it is now, with the metadata of a run that has ``total`` steps in all."""
                nonlocal naming
                first = next(iter(adapters.adapters.values()), None)
                shape = dict(steps=total, algorithm=adapters.algorithm.name, rank=getattr(first, "rank", rank),
                             alpha=float(first.alpha) if first is not None else alpha,
                             base_model=comfy_bridge.base_model_name(model))
                metadata = build_metadata(**shape, settings=recorded, date=datetime.datetime.now(
                    datetime.timezone.utc).isoformat(timespec="seconds"))
                record = save_metadata.training_record(
                    recorded, **shape, latent_shapes=[tuple(x.shape) for x in samples],
                    pixels_per_latent=comfy_bridge.pixels_per_latent(model), started_at=started_at,
                    previous_steps=previous)
                tensors = adapters.file_state(MODEL_PREFIX, DTYPES[lora_dtype])
                naming = naming or comfy_bridge.model_naming(model, tensors)  # the adapted layers never change
                return LoraWeights(tensors, metadata, naming=naming, record=record)

            saves = run_saves.IntermediateSaves(run, lora_at, previous, identity, node_id, validated, resumed.saves)
            conditioning = comfy_bridge.SampleConditioning(clone, captions, x0.shapes, device, seed, x0.layouts)
            conditioning.check(clone, x0)
            schedule = comfy_bridge.ComfySchedule(clone.model.model_sampling, device)
            for group in groups:  # options the model cannot use are refused before any step, naming the option
                run.timesteps.check(schedule, (1, *group.shape))
            if validation_samples is not None:
                with inputs.as_validation_data():
                    validation_x0 = comfy_bridge.ModelSpaceLatents(clone, validation_samples)
                    validation_conditioning = comfy_bridge.SampleConditioning(
                        clone, validation_captions, validation_x0.shapes, device, seed, validation_x0.layouts)
                    validation_conditioning.check(clone, validation_x0)
                validation = Validation(validation_x0.groups(), schedule, seed + 1, device=device)
                validation_denoise = comfy_bridge.denoiser(clone, validation_conditioning)
            sampler = training_samples.renderer_for(run.samples, clone, node_id, pbar, device)
            # ComfyUI raises InterruptProcessingException on cancel from its ops and its progress bar: the loop
            # treats it as a cancel, so the finished steps are kept.
            callbacks = loop.Callbacks(
                cancelled=comfy.model_management.processing_interrupted, micro_step=lambda: pbar.update(1),
                step=on_step, cancel_exceptions=(comfy.model_management.InterruptProcessingException,),
                checkpoint_every=run.save_every_n_steps, checkpoint=saves,
                **training_samples.loop_hooks(sampler))
            with attached(root, adapters), checkpointed(root, gradient_checkpointing):
                try:
                    result = loop.train(adapters.trainable(), groups, comfy_bridge.denoiser(clone, conditioning),
                                        schedule, settings, generator, callbacks, resume, Ranks.current())
                except StateError as e:
                    raise ValueError(f"resume_from: '{run.resume_from}' does not fit this run: {e}") from None
                sampled = sampler.finish() if sampler else None  # the grid, also of a cancelled run

        total = previous + result.steps_done
        lora = lora_at(total)
        if result.cancelled:
            self._keep_cancelled(lora, total, node_id, result.steps_done)
        if result.diverged:
            self._stop_diverged(lora, total, node_id, result, learning_rate)
        loss_map = {"loss": result.losses, "skipped": result.skipped, "learning_rate": result.learning_rates,
                    "grad_norm": result.grad_norms, "saves": saves.steps,
                    "validation": {"step": [s for s, _ in validated], "loss": [v for _, v in validated]},
                    "training_s": result.training_s, "sampling_s": result.sampling_s, "samples": sampled}
        return {"ui": {"lora_trainer_loss": result.losses, "lora_trainer_skipped": result.skipped,
                       "lora_trainer_saves": saves.steps, "lora_trainer_lr": result.learning_rates,
                       "lora_trainer_grad_norm": result.grad_norms, "lora_trainer_validation": validated,
                       **training_samples.ui_output(sampled, result.sampling_s)},
                "result": (comfy_bridge.with_lora(model, lora), lora, loss_map, total)}

    @staticmethod
    def _keep(lora: LoraWeights, total: int, folder: str, steps_done: int) -> str | None:
        """Saves what a stopped run trained (the LoRA of its last finished step) into loras/<folder>/; returns the
        file's name in that folder, or None when this run finished no step (there is nothing new to keep)."""
        if steps_done == 0 or not process_group.writes_files():
            return None
        return save_new(lora_files.main_lora_dir() / folder, f"{folder}_step{total}", dict(lora), lora.metadata).name

    def _keep_cancelled(self, lora: LoraWeights, total: int, node_id, steps_done: int) -> None:
        """A cancel keeps what was trained, then the prompt stops the way ComfyUI stops on cancel. Every rank of a
        data-parallel run reports where it stopped (the same step on all); only rank 0 can tell what was saved."""
        name = self._keep(lora, total, "cancelled", steps_done)
        writes = process_group.writes_files()
        if not writes:
            kept = "rank 0 writes the files"
        elif name:
            kept = f"the LoRA so far is saved as loras/cancelled/{name}"
        else:
            kept = "no step of this run finished, nothing saved"
        # INFO: a cancel is what the user asked for; ComfyUI's console shows INFO, the headless runner its own report.
        log.info("training cancelled after step %d; %s", total, kept)
        events.send("cancelled", {"node": node_id, "step": total, "file": name, "writes": writes}, every_rank=True)
        comfy.model_management.interrupt_current_processing(False)
        raise comfy.model_management.InterruptProcessingException()

    def _stop_diverged(self, lora: LoraWeights, total: int, node_id, result: loop.Result, learning_rate: float) -> None:
        """Diverged: the last finite LoRA is kept as a cancel keeps it, and the prompt fails with what to change."""
        name = self._keep(lora, total, "diverged", result.steps_done)
        skipped = result.skipped
        events.send("diverged", {"node": node_id, "step": skipped[-1], "file": name})
        if not process_group.writes_files():  # this rank wrote nothing; whether rank 0 kept a file is its to say
            kept = "Rank 0 writes the files."
        elif name:
            kept = f"The LoRA of the last finite step ({total} steps in all) is kept as loras/diverged/{name}."
        else:
            kept = "No step finished, so no LoRA was kept."
        raise TrainingDiverged(
            f"learning_rate: the training diverged: the loss or its gradients were NaN or infinite in "
            f"{loop.MAX_NON_FINITE_IN_A_ROW} steps in a row (steps {skipped[-loop.MAX_NON_FINITE_IN_A_ROW]}-"
            f"{skipped[-1]}), so it stopped. Lower learning_rate (it is {learning_rate:g}) and train again. {kept}")
