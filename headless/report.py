"""What the headless runner prints: node starts, one line per optimizer step of the pack's training (a bar, the loss),
validation and save events, then the outputs (stdout) or ComfyUI's error (stderr). No ComfyUI imports."""
from __future__ import annotations

import threading
from typing import Any, TextIO

BAR_WIDTH = 20


def bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    filled = 0 if total <= 0 else min(width, round(width * done / total))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def brief(value: Any, limit: int = 100) -> str:
    """One short line for a UI output value (ComfyUI sends lists): file names, counts of numbers, short text."""
    if isinstance(value, list):
        if value and all(isinstance(v, dict) and "filename" in v for v in value):
            return ", ".join("/".join(p for p in (v.get("type"), v.get("subfolder"), v["filename"]) if p)
                             for v in value)
        if value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return f"{len(value)} values, last {value[-1]:.6g}"
        if len(value) == 1:
            return brief(value[0], limit)
        if not value:
            return "-"
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Report:
    """Receives the executor's messages and progress from the prompt's thread and prints them. On a terminal the
    progress of any node is one line redrawn in place; elsewhere (logs, torchrun) only whole lines are printed."""

    def __init__(self, out: TextIO, err: TextIO, verbose: bool = False, tty: bool | None = None, label: str = ""):
        self.out, self.err, self.verbose = out, err, verbose
        self.label = label  # before every error line: which rank of a torchrun job says it
        self.tty = out.isatty() if tty is None else tty
        self.prompt: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._open_line = False  # a progress line without its newline is on screen

    def name(self, node_id: Any) -> str:
        node = self.prompt.get(str(node_id)) if node_id is not None else None
        return f"[{node_id}] {node['class_type']}" if node else f"[{node_id}]"

    def _line(self, text: str, stream: TextIO | None = None) -> None:
        with self._lock:
            if self._open_line:  # the redrawn progress line gives way; the next progress update draws it again
                self.out.write("\r\x1b[K")
                self._open_line = False
            stream = stream or self.out
            if stream is self.err and self.label:
                text = "\n".join(self.label + line for line in text.split("\n"))
            stream.write(text + "\n")
            stream.flush()

    # -- live ---------------------------------------------------------------------------------------------------------
    def on_message(self, event: str, data: Any) -> None:
        """A message the executor or a node sent to the (stand-in) server."""
        if not isinstance(data, dict):
            return
        if event == "executing" and data.get("node") is not None:
            self._line(f"> {self.name(data['node'])}")
        elif event == "lora_trainer.progress":
            self._step(data)
        elif event == "lora_trainer.validation":
            self._line(f"  [{data.get('node')}] step {data.get('step')}: validation loss "
                       f"{data.get('loss'):.6f}")
        elif event == "lora_trainer.saved":
            self._line(f"  [{data.get('node')}] step {data.get('step')}: saved {data.get('file')}")
        elif event == "lora_trainer.cancelled":
            kept = f"the LoRA so far is loras/cancelled/{data['file']}" if data.get("file") else "no step finished"
            self._line(f"  {self.name(data.get('node'))} cancelled after step {data.get('step')}: {kept}")
        elif event == "lora_trainer.diverged":
            self._line(f"  {self.name(data.get('node'))} diverged at step {data.get('step')}")

    def _step(self, d: dict[str, Any]) -> None:
        step, steps = int(d.get("step", 0)), int(d.get("steps", 0))
        loss = "skipped (not finite)" if d.get("skipped") or d.get("loss") is None else f"loss {d['loss']:.6f}"
        smoothed = f"  smoothed {d['smoothed_loss']:.6f}" if d.get("smoothed_loss") is not None else ""
        rate = f"  lr {d['learning_rate']:.2e}" if d.get("learning_rate") is not None else ""
        eta = f"  eta {duration(d['eta_s'])}" if d.get("eta_s") is not None else ""
        width = len(str(steps))
        self._line(f"  [{d.get('node')}] step {step:>{width}}/{steps} {bar(step, steps)} "
                   f"{loss}{smoothed}{rate}{eta}")

    def on_progress(self, node_id: Any, value: int, total: int) -> None:
        """ComfyUI's progress bar (any node). Redrawn in place on a terminal; the training's steps print anyway."""
        if not self.tty:
            return
        with self._lock:
            self.out.write(f"\r  {self.name(node_id)} {bar(value, total)} {value}/{total}\x1b[K")
            self.out.flush()
            self._open_line = True

    # -- endings ------------------------------------------------------------------------------------------------------
    def validation_failed(self, error: dict[str, Any] | None, node_errors: dict[str, Any]) -> None:
        error = error or {}
        head = error.get("message") or "the workflow is invalid"
        details = error.get("details")
        lines = [f"error: ComfyUI rejected the workflow: {head}" + (f": {details}" if details and not node_errors
                                                                    else "")]
        for node_id, entry in node_errors.items():
            label = f"[{node_id}] {entry.get('class_type') or self.prompt.get(node_id, {}).get('class_type', '')}"
            for e in entry.get("errors", []):
                lines.append(f"  {label.strip()}: {e.get('message')}" + (f": {e['details']}" if e.get("details")
                                                                          else ""))
        self._line("\n".join(lines), self.err)

    def failed(self, error: dict[str, Any]) -> None:
        message = str(error.get("exception_message", "")).strip()
        kind = error.get("exception_type", "")
        label = f"[{error.get('node_id')}] {error.get('node_type', '')}".strip()
        text = f"error: {label} failed: {kind.rsplit('.', 1)[-1]}: {message}" if kind else f"error: {label}: {message}"
        if self.verbose and error.get("traceback"):
            text += "\n" + "".join(error["traceback"]).rstrip()
        self._line(text, self.err)

    def crashed(self, text: str) -> None:
        self._line(f"error: {text}", self.err)

    def interrupting(self) -> None:
        self._line("interrupting (Ctrl-C again to quit at once) ...", self.err)

    def interrupted(self, error: dict[str, Any] | None) -> None:
        where = f" in [{error.get('node_id')}] {error.get('node_type', '')}".rstrip() if error else ""
        self._line(f"interrupted{where}", self.err)

    def succeeded(self, outputs: dict[str, dict[str, Any]], seconds: float) -> None:
        lines = [f"done in {seconds:.1f} s"]
        for node_id, ui in outputs.items():
            shown = "; ".join(f"{key}: {brief(value)}" for key, value in (ui or {}).items() if value not in ([], None))
            lines.append(f"  {self.name(node_id)}: {shown}")
        self._line("\n".join(lines))
