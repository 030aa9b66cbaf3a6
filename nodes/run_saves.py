"""Intermediate saves of a run (a LoRA in the loras folder plus its resumable training state in
output/training_states, the newest K kept) and resuming a run from such a state."""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from ..lora.file_format import LoraWeights, save_new
from ..training import train_state
from ..training.train_state import StateError, TrainState
from ..training.mapped_safetensors import release
from . import events, lora_files, process_group
from .companions import confined
from .safe_files import inside, read_safetensors
from .training_options import RunOptions, states_dir

log = logging.getLogger("lora_trainer")


def data_fingerprint(samples: list[torch.Tensor], captions: int) -> str:
    """A digest of the training latents (values and shapes) and the caption count: a resume must see the same data."""
    digest = hashlib.sha256(f"{captions} captions".encode())
    for sample in samples:
        digest.update(str(tuple(sample.shape)).encode())
        digest.update(sample.detach().float().contiguous().cpu().numpy().tobytes())
        release(sample)
    return digest.hexdigest()[:16]


class IntermediateSaves:
    """Called with the run's state every ``save_every_n_steps``: writes the LoRA of that step under ``save_prefix``
    (the name Save LoRA would give it) and the state beside it in output/training_states, then removes this run's
    oldest pairs beyond ``keep_last``."""

    def __init__(self, options: RunOptions, lora_at: Callable[[int], LoraWeights], previous_steps: int,
                 identity: dict, node_id, validated: list[list]):
        if options.save_every_n_steps:  # the prefix matters (and is checked) only when there are saves
            root = lora_files.main_lora_dir()
            self.lora_dir, self.stem = confined(root, options.save_prefix, "save_prefix")
            self.state_dir = states_dir() / self.lora_dir.relative_to(root.resolve())
        self.keep_last, self.lora_at, self.previous = options.keep_last, lora_at, previous_steps
        self.identity, self.node_id = identity, node_id
        self.validated = validated  # the run's [step, validation loss] pairs so far: a resume continues the series
        self.written: list[tuple[Path, Path]] = []
        self.steps: list[int] = []  # the run's step numbers at which a save was made

    def __call__(self, state: TrainState) -> None:
        self.steps.append(state.step)
        if not process_group.writes_files():
            return
        total = self.previous + len(state.losses)
        lora = self.lora_at(total)
        name = f"{self.stem}_{total}_steps"
        lora_path = save_new(self.lora_dir, name, dict(lora), lora.metadata)
        shown = lora_path.relative_to(lora_files.main_lora_dir().resolve()).as_posix()
        tensors, metadata = train_state.pack(state, {"identity": self.identity, "previous_steps": self.previous,
                                                     "lora_file": shown, "validation": self.validated})
        state_path = save_new(self.state_dir, name, tensors, metadata, "training state")
        self.written.append((lora_path, state_path))
        log.info("step %d: saved %s and its training state %s", state.step, shown, state_path.name)
        events.send("saved", {"node": self.node_id, "step": state.step, "file": shown})
        while self.keep_last and len(self.written) > self.keep_last:
            for old in self.written.pop(0):
                old.unlink(missing_ok=True)


def load_resume(name: str, identity: dict, steps: int) -> tuple[TrainState, int, list[list]]:
    """The state ``resume_from`` names, checked against this run; returns it, the steps before its run and its
    validation losses so far."""
    what = "resume_from"
    tensors, metadata = read_safetensors(inside(states_dir(), name, what), what, name)
    try:
        state, info = train_state.unpack(tensors, metadata, name)
    except StateError as e:
        raise ValueError(f"{what}: {e}") from None
    saved = info.get("identity", {})
    differences = [f"{key} {saved.get(key)!r} there, {identity.get(key)!r} here"
                   for key in sorted(set(saved) | set(identity)) if saved.get(key) != identity.get(key)]
    if differences:
        raise ValueError(f"{what}: '{name}' was saved by a run with other settings or data ("
                         + "; ".join(differences) + "): resume with the same ones, or start a new run")
    if steps < state.step:
        raise ValueError(f"steps: '{name}' is at step {state.step} of its run; steps must be at least that "
                         f"(it is {steps})")
    return state, int(info.get("previous_steps", 0)), [list(v) for v in info.get("validation", [])]
