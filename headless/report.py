"""What the headless runner prints: node starts, one line per optimizer step of the pack's training (a bar, the loss),
validation and save events, then the outputs (stdout) or the error (stderr): one line per error, naming the node and
the input, with the traceback only under ``-v``. No ComfyUI imports."""
from __future__ import annotations

import logging
import os
import threading
from typing import Any, TextIO

BAR_WIDTH = 20
DETAILS_LIMIT = 300  # characters of a validation error's details shown without -v


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
        self.stopped: dict[str, Any] | None = None  # the training's cancel event: the step this rank stopped after
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
        elif event == "lora_trainer.sample":
            self._line(f"  [{data.get('node')}] step {data.get('step')}: samples {', '.join(data.get('files', []))}")
        elif event == "lora_trainer.saved":
            self._line(f"  [{data.get('node')}] step {data.get('step')}: saved {data.get('file')}")
        elif event == "lora_trainer.cancelled":
            self.stopped = data
            if data.get("writes", True):  # a rank that writes no file has nothing to add to the progress
                self._line(f"  {self.name(data.get('node'))} cancelled after step {data.get('step')}: {kept(data)}")
        elif event == "lora_trainer.diverged":
            self._line(f"  {self.name(data.get('node'))} diverged at step {data.get('step')}")

    def _step(self, d: dict[str, Any]) -> None:
        step, steps = int(d.get("step", 0)), int(d.get("steps", 0))
        loss = "skipped (not finite)" if d.get("skipped") or d.get("loss") is None else f"loss {d['loss']:.6f}"
        smoothed = f"  smoothed {d['smoothed_loss']:.6f}" if d.get("smoothed_loss") is not None else ""
        rate = f"  lr {d['learning_rate']:.2e}" if d.get("learning_rate") is not None else ""
        eta = f"  eta {duration(d['eta_s'])}" if d.get("eta_s") is not None else ""
        sampling = f"  sampling {duration(d['sampling_s'])}" if d.get("sampling_s") else ""
        width = len(str(steps))
        self._line(f"  [{d.get('node')}] step {step:>{width}}/{steps} {bar(step, steps)} "
                   f"{loss}{smoothed}{rate}{eta}{sampling}")

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
        """ComfyUI refused the workflow: one line per error, naming the node and the input (nothing ran)."""
        if not node_errors:
            error = error or {}
            head = error.get("message") or "the workflow is invalid"
            details = error.get("details")
            self._line(f"error: ComfyUI rejected the workflow: {head}" + (f": {details}" if details else ""), self.err)
            return
        lines = []
        for node_id, entry in node_errors.items():
            label = f"[{node_id}] {entry.get('class_type') or self.prompt.get(node_id, {}).get('class_type', '')}"
            lines += [f"error: {label.strip()}: {input_error(e, None if self.verbose else DETAILS_LIMIT)}"
                      for e in entry.get("errors", [])]
        self._line("\n".join(lines), self.err)

    def failed(self, error: dict[str, Any]) -> None:
        """A node raised: one line with the node and its message (the pack's messages name the input and the fix)."""
        message = one_line(str(error.get("exception_message", "")))
        kind = error.get("exception_type", "")
        label = f"[{error.get('node_id')}] {error.get('node_type', '')}".strip()
        text = f"error: {label} failed: {kind.rsplit('.', 1)[-1]}: {message}" if kind else f"error: {label}: {message}"
        if self.verbose and error.get("traceback"):  # ComfyUI sends the frames (traceback.format_tb)
            text += "\nTraceback (most recent call last):\n" + "".join(error["traceback"]).rstrip()
        self._line(text, self.err)

    def crashed(self, text: str, trace: str | None = None) -> None:
        """The runner itself or ComfyUI's executor failed: the one line, and the traceback under -v."""
        if trace and self.verbose:
            text += "\n" + trace.rstrip()
        elif trace:
            text += " (-v shows the traceback)"
        self._line(f"error: {text}", self.err)

    def interrupting(self, how: str = "Ctrl-C") -> None:
        self._line(f"interrupting ({how} again to quit at once) ...", self.err)

    def interrupted(self, error: dict[str, Any] | None) -> None:
        """Where the run stopped, and, when the training stopped, after which step and what this rank knows of the
        file: only the rank that writes files says whether one was saved."""
        where = f" in [{error.get('node_id')}] {error.get('node_type', '')}".rstrip() if error else ""
        text = f"interrupted{where}"
        if self.stopped is not None:
            text += f": stopped after step {self.stopped.get('step')}; {kept(self.stopped)}"
        self._line(text, self.err)

    def succeeded(self, outputs: dict[str, dict[str, Any]], seconds: float) -> None:
        lines = [f"done in {seconds:.1f} s"]
        for node_id, ui in outputs.items():
            shown = "; ".join(f"{key}: {brief(value)}" for key, value in (ui or {}).items() if value not in ([], None))
            lines.append(f"  {self.name(node_id)}: {shown}")
        self._line("\n".join(lines))


def kept(cancelled: dict[str, Any]) -> str:
    """What a cancel kept, as far as this rank knows: a rank that writes no file cannot know whether rank 0 saved."""
    if not cancelled.get("writes", True):
        return "rank 0 writes the files"
    if cancelled.get("file"):
        return f"the LoRA so far is loras/cancelled/{cancelled['file']}"
    return "no step of this run finished, nothing saved"


def one_line(text: str) -> str:
    """A message on one line: its lines joined (ComfyUI appends tips to some messages after a blank line)."""
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def input_error(error: dict[str, Any], limit: int | None = None) -> str:
    """One of ComfyUI's validation errors ({message, details, extra_info: {input_name}}), input first:
    ``learning_rate: Value 5.0 bigger than max of 1.0``. ComfyUI's details often repeat the input's name, first; they
    are cut at ``limit`` characters (a missing file's details list every file of the folder)."""
    message, details = one_line(str(error.get("message") or "")), one_line(str(error.get("details") or ""))
    name = (error.get("extra_info") or {}).get("input_name")
    if name:
        for head in (f"{name}: ", f"{name}, ", name):
            if details.startswith(head):
                details = details[len(head):]
                break
    if limit is not None and len(details) > limit:
        details = details[:limit] + "... (-v shows all)"
    text = f"{name}: {message}" if name else message
    return text + (f": {details}" if details else "")


class QuietLog(logging.Filter):
    """What of the log reaches the terminal besides the report. ComfyUI's executor logs every error it also hands
    to the report (a node's exception with its traceback, a refused workflow line by line): those records are
    dropped, so each error is printed once, by the report. Without ``-v`` a bare traceback is dropped as well
    (ComfyUI logs one before the line that says which custom node failed to import, and that line stays)."""

    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose
        self.executor_file: str | None = None  # ComfyUI's execution.py, once the runner knows which ComfyUI it runs

    def filter(self, record: logging.LogRecord) -> bool:
        if (record.levelno >= logging.ERROR and self.executor_file
                and os.path.realpath(record.pathname) == self.executor_file):
            return False
        return self.verbose or not str(record.msg).lstrip().startswith("Traceback (most recent call last)")
