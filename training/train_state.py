"""A resumable training state: everything a run needs to continue exactly where it was, as tensors plus JSON (it is
written as safetensors with a JSON manifest: loading it never unpickles anything).

Resuming restores the fp32 master weights, the optimizer's state, the generator (noise, sigmas and epoch orders all
come from it), the data order and its position, and the loss history, so that an interrupted-and-resumed run gives
the same weights as one that never stopped."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from .data import MicroBatches
from .ema import EMA
from .flat_params import FlatParams

FORMAT = "lora_trainer.train_state/1"


class StateError(ValueError):
    """A training state that cannot be resumed here (another file, other settings, another model)."""


@dataclass
class TrainState:
    step: int  # steps (applied or skipped) done in the run
    weights: list[torch.Tensor]  # the trainable weights, one flat fp32 buffer per (device, dtype), on the CPU
    optimizer: dict  # torch.optim state_dict()["state"]: {param index: {name: tensor or number}}
    generator: torch.Tensor  # torch.Generator.get_state()
    data: dict  # MicroBatches.state()
    losses: list[float] = field(default_factory=list)  # the run's history so far (see loop.Result)
    skipped: list[int] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    smoothed: float | None = None
    non_finite_in_a_row: int = 0
    ema: list[torch.Tensor] | None = None  # the moving average of the weights, when the run keeps one

    @classmethod
    def capture(cls, step: int, flat: FlatParams, opt: torch.optim.Optimizer, generator: torch.Generator,
                batches: MicroBatches, history, smoothed: float | None, non_finite_in_a_row: int,
                ema: EMA | None = None) -> "TrainState":
        """The state after ``step`` steps; ``history`` is the run's loop.Result so far."""
        optimizer = {i: {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in s.items()}
                     for i, s in opt.state_dict()["state"].items()}
        return cls(step, [t.detach().cpu().clone() for t in flat.tensors], optimizer, generator.get_state(),
                   batches.state(), list(history.losses), list(history.skipped), list(history.learning_rates),
                   list(history.grad_norms), smoothed, non_finite_in_a_row,
                   None if ema is None else [t.detach().cpu().clone() for t in ema.shadow])

    def restore(self, flat: FlatParams, opt: torch.optim.Optimizer, generator: torch.Generator,
                batches: MicroBatches, ema: EMA | None = None) -> None:
        shapes = [tuple(t.shape) for t in flat.tensors]
        if [tuple(w.shape) for w in self.weights] != shapes:
            raise StateError(f"it holds weights of sizes {[tuple(w.shape) for w in self.weights]}, this run trains "
                             f"{shapes}: it was saved for another model or adapter")
        with torch.no_grad():
            for target, saved in zip(flat.tensors, self.weights):
                target.copy_(saved)
        # load_state_dict moves each tensor to its parameter's device (and "step" where fused Adam keeps it). The
        # current param groups stay (the learning rate is set every step by the schedule); only the state loads.
        # Clones: the optimizer updates its state in place, and tensors read under ComfyUI's inference mode can't be.
        state = {int(i): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in entries.items()}
                 for i, entries in self.optimizer.items()}
        opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
        generator.set_state(self.generator)
        batches.restore(self.data)
        if (ema is None) != (self.ema is None):
            raise StateError("it was saved by a run " + ("without" if self.ema is None else "with") + " an EMA of the "
                             "weights, this run " + ("keeps one" if ema is not None else "keeps none"))
        if ema is not None:
            with torch.no_grad():
                for average, saved in zip(ema.shadow, self.ema):
                    average.copy_(saved)


def pack(state: TrainState, info: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a state; ``info`` (JSON) is what the caller needs to check a resume."""
    tensors = {f"weights.{i}": w.contiguous() for i, w in enumerate(state.weights)}
    tensors["generator"] = state.generator.contiguous()
    tensors.update({f"ema.{i}": t.contiguous() for i, t in enumerate(state.ema or [])})
    scalars: dict[str, dict] = {}
    for i, entries in state.optimizer.items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{i}.{name}"] = value.contiguous()
            else:
                scalars.setdefault(str(i), {})[name] = value
    manifest = {"format": FORMAT, "step": state.step, "weights": len(state.weights), "optimizer_scalars": scalars,
                "optimizer_params": sorted(int(i) for i in state.optimizer), "data": state.data,
                "losses": state.losses, "skipped": state.skipped, "learning_rates": state.learning_rates,
                "grad_norms": state.grad_norms, "smoothed": state.smoothed,
                "non_finite_in_a_row": state.non_finite_in_a_row, "info": info}
    return tensors, {"manifest": json.dumps(manifest)}


def unpack(tensors: dict[str, torch.Tensor], metadata: dict[str, str], name: str) -> tuple[TrainState, dict]:
    try:
        manifest = json.loads(metadata["manifest"])
        if manifest["format"] != FORMAT:
            raise ValueError(f"format {manifest['format']!r}, expected {FORMAT!r}")
        optimizer: dict[int, dict] = {i: {} for i in manifest["optimizer_params"]}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, i, entry = key.split(".", 2)
                optimizer[int(i)][entry] = value
        for i, entries in manifest["optimizer_scalars"].items():
            optimizer[int(i)].update(entries)
        state = TrainState(int(manifest["step"]), [tensors[f"weights.{i}"] for i in range(manifest["weights"])],
                           optimizer, tensors["generator"], manifest["data"], [float(v) for v in manifest["losses"]],
                           [int(v) for v in manifest["skipped"]], [float(v) for v in manifest["learning_rates"]],
                           [float(v) for v in manifest["grad_norms"]], manifest["smoothed"],
                           int(manifest["non_finite_in_a_row"]),
                           [tensors[f"ema.{i}"] for i in range(manifest["weights"])] if "ema.0" in tensors else None)
        return state, manifest["info"]
    except (KeyError, ValueError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
        raise StateError(f"'{name}' is not a training state file of this pack ({e!r})") from None
