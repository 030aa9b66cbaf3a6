"""Intermediate saves of a run (a LoRA in the loras folder plus its resumable training state in
output/training_states, the newest K kept) and resuming a run from such a state."""
from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..lora.file_format import LoraWeights, save_new
from ..training import train_state
from ..training.train_state import StateError, TrainState
from ..training.mapped_safetensors import release
from ..training.streams import Streams, parts
from . import events, lora_files, process_group
from .companions import confined
from .safe_files import inside, read_safetensors
from .training_options import RunOptions, states_dir

log = logging.getLogger("lora_trainer")


def data_fingerprint(samples: list[torch.Tensor | Streams], captions: int) -> str:
    """A digest of the training latents (values and shapes; each stream's of a latent of several) and the caption
    count: a resume must see the same data."""
    digest = hashlib.sha256(f"{captions} captions".encode())
    for sample in samples:
        for tensor in parts(sample):
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
            release(tensor)
    return digest.hexdigest()[:16]


# What IntermediateSaves names its files: a name a state lists that is not one of these is never ours to remove.
SAVE_NAME = re.compile(r".+_\d+_steps_\d{5}\.safetensors")


@dataclass(frozen=True)
class Save:
    """One intermediate save of a run: the run's step, its LoRA (relative to the main loras folder) and its training
    state (relative to output/training_states). The names are None on a process that writes no files."""

    step: int
    lora_file: str | None = None
    state_file: str | None = None

    def remove(self) -> None:
        for root, name in ((lora_files.main_lora_dir(), self.lora_file), (states_dir(), self.state_file)):
            if name is not None:
                (root / name).unlink(missing_ok=True)


def _ours_on_disk(root: Path, name: object) -> str | None:
    """``name`` when it is a file IntermediateSaves could have written inside ``root`` and it is there, else None.
    (A state file is input: what it lists must never make a resumed run remove a file that is not a save.)"""
    if not isinstance(name, str) or not SAVE_NAME.fullmatch(name.rsplit("/", 1)[-1]):
        return None
    try:
        inside(root, name, "resume_from")
    except ValueError:
        return None
    return name


def saves_on_disk(listed: list, resumed: Save) -> list[Save]:
    """The saves of a run resumed from the save ``resumed``: those its state lists (the saves before it) whose LoRA is
    still on disk, oldest first, then ``resumed`` itself. Saves of other attempts of the same run (made after
    ``resumed`` before a resume from it) are not in the list: this run's history continues from ``resumed``."""
    saves = []
    for entry in [*listed, asdict(resumed)]:
        if not isinstance(entry, dict) or not isinstance(entry.get("step"), int):
            continue
        lora = _ours_on_disk(lora_files.main_lora_dir(), entry.get("lora_file"))
        if lora is not None:
            saves.append(Save(entry["step"], lora, _ours_on_disk(states_dir(), entry.get("state_file"))))
    return saves


@dataclass
class Resumed:
    """The state ``resume_from`` names and what the resumed run continues of its run; ``Resumed()`` is a new run."""

    state: TrainState | None = None
    previous_steps: int | None = None  # the steps before that run (of a continued existing LoRA)
    validated: list[list] = field(default_factory=list)  # its [step, validation loss] pairs so far
    saves: list[Save] = field(default_factory=list)  # its intermediate saves still on disk, the resumed one last


class IntermediateSaves:
    """Called with the run's state every ``save_every_n_steps``: writes the LoRA of that step under ``save_prefix``
    (the name Save LoRA would give it) and the state beside it in output/training_states, then removes this run's
    oldest pairs beyond ``keep_last``. A resumed run's saves include those made before the resume (``earlier``): they
    count towards ``keep_last`` and are reported with the new ones."""

    def __init__(self, options: RunOptions, lora_at: Callable[[int], LoraWeights], previous_steps: int,
                 identity: dict, node_id, validated: list[list], earlier: list[Save] = ()):
        if options.save_every_n_steps:  # the prefix matters (and is checked) only when there are saves
            root = lora_files.main_lora_dir()
            self.lora_dir, self.stem = confined(root, options.save_prefix, "save_prefix")
            self.state_dir = states_dir() / self.lora_dir.relative_to(root.resolve())
        self.keep_last, self.lora_at, self.previous = options.keep_last, lora_at, previous_steps
        self.identity, self.node_id = identity, node_id
        self.validated = validated  # the run's [step, validation loss] pairs so far: a resume continues the series
        self.kept: list[Save] = list(earlier)  # the run's saves still on disk, oldest first

    @property
    def steps(self) -> list[int]:
        """The run's step numbers of its saves still on disk (those before a resume too): what the node reports."""
        return [save.step for save in self.kept]

    def __call__(self, state: TrainState) -> None:
        writes = process_group.writes_files()
        self.kept.append(self._write(state) if writes else Save(state.step))
        while self.keep_last and len(self.kept) > self.keep_last:
            old = self.kept.pop(0)
            if writes:
                old.remove()

    def _write(self, state: TrainState) -> Save:
        total = self.previous + len(state.losses)
        lora = self.lora_at(total)
        name = f"{self.stem}_{total}_steps"
        lora_path = save_new(self.lora_dir, name, dict(lora), lora.metadata)
        shown = lora_path.relative_to(lora_files.main_lora_dir().resolve()).as_posix()
        # the saves before this one: a run resumed from this state continues with them (see saves_on_disk)
        tensors, metadata = train_state.pack(state, {"identity": self.identity, "previous_steps": self.previous,
                                                     "lora_file": shown, "validation": self.validated,
                                                     "saves": [asdict(save) for save in self.kept]})
        state_path = save_new(self.state_dir, name, tensors, metadata, "training state")
        log.info("step %d: saved %s and its training state %s", state.step, shown, state_path.name)
        events.send("saved", {"node": self.node_id, "step": state.step, "file": shown})
        return Save(state.step, shown, state_path.relative_to(states_dir()).as_posix())


def load_resume(name: str, identity: dict, steps: int) -> Resumed:
    """The state ``resume_from`` names, checked against this run, with what the resumed run continues of its run."""
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
    listed = info.get("saves", [])  # states of older versions list none
    return Resumed(state, int(info.get("previous_steps", 0)), [list(v) for v in info.get("validation", [])],
                   saves_on_disk(listed if isinstance(listed, list) else [],
                                 Save(state.step, info.get("lora_file"), name)))
