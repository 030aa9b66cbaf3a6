"""Starts a real ComfyUI with this pack installed and talks to it over its HTTP API.

Used by the tests (through ``tests/conftest.py``) and by the demo (``tools/demo.py``), so both drive ComfyUI the
same way a user's browser or script does.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
PACK_NAME = "lora_trainer"
CACHED_COMFYUI = REPO / ".cache" / "comfyui-0.3.75"


def comfyui_dir() -> Path:
    """The ComfyUI tree to run: ``$COMFYUI_DIR`` when set, else the pinned 0.3.75 tree ``tools/bootstrap.sh`` unpacked."""
    path = Path(os.environ.get("COMFYUI_DIR") or CACHED_COMFYUI)
    if not (path / "main.py").is_file():
        raise FileNotFoundError(f"no ComfyUI at {path} (run tools/bootstrap.sh, or set COMFYUI_DIR)")
    return path


def comfyui_version() -> str:
    """The version of the ComfyUI tree ``comfyui_dir()`` runs (from its ``comfyui_version.py``), e.g. ``0.3.75``."""
    text = (comfyui_dir() / "comfyui_version.py").read_text()
    match = re.search(r"__version__\s*=\s*[\"']([^\"']+)", text)
    return match.group(1) if match else "unknown"


def put_comfyui_on_path() -> Path:
    """Makes ``import comfy`` work in this process (for code that builds fixtures with ComfyUI's own classes)."""
    path = comfyui_dir()
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
        import torch
        import comfy.cli_args

        # ComfyUI parses no command line when imported as a library; pick the CPU where there is no GPU.
        comfy.cli_args.args.cpu = not torch.cuda.is_available()
    return path


def load_pack():
    """This pack imported in-process the way ComfyUI loads a custom node folder: a package named ``PACK_NAME``."""
    import importlib.util

    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    put_comfyui_on_path()
    spec = importlib.util.spec_from_file_location(PACK_NAME, str(REPO / "__init__.py"),
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)
    return module


def ctrl_c_reaches_child() -> None:
    """``preexec_fn`` for a subprocess a test stops with SIGINT: Ctrl-C acts on it even when the test run itself was
    started in the background, where the shell sets SIGINT to ignored and every child inherits that."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PromptError(RuntimeError):
    """ComfyUI refused a prompt (validation) or the prompt failed while running."""

    def __init__(self, message: str, payload: dict[str, Any]):
        super().__init__(message)
        self.payload = payload


class ComfyServer:
    """One ComfyUI process on 127.0.0.1 with its own base directory (models, input, output, custom_nodes)."""

    def __init__(self, base_dir: Path, extra_node_packs: tuple[Path, ...] = (), extra_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None):
        self.base_dir = Path(base_dir)
        self.extra_node_packs = extra_node_packs
        self.extra_args = extra_args
        self.env = dict(env or {})  # added to this process's environment for the server
        self.port = 0
        self.client_id = uuid.uuid4().hex
        self.process: subprocess.Popen | None = None
        self.log_path = self.base_dir / "comfyui.log"
        self._barrier = 0  # the value of free()'s barrier prompt (see free)
        self._messages: _Messages | None = None  # this client's websocket while the server runs

    # -- life cycle -------------------------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> "ComfyServer":
        nodes_dir = self.base_dir / "custom_nodes"
        nodes_dir.mkdir(parents=True, exist_ok=True)
        for pack in (REPO, *self.extra_node_packs):
            link = nodes_dir / (PACK_NAME if pack == REPO else pack.name)
            if not link.exists():
                link.symlink_to(pack, target_is_directory=True)
        for sub in ("models/diffusion_models", "models/loras", "input", "output"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        # COMFYUI_DEVICE=gpu runs the server on the GPU (the device checks); tests default to the CPU, with text
        # encoders in fp32: ComfyUI's fp16 default has no fast CPU kernels (CLIP-L: 3 s a caption instead of 0.3 s).
        device_args = [] if os.environ.get("COMFYUI_DEVICE") == "gpu" else ["--cpu", "--fp32-text-enc"]
        cmd = [
            sys.executable, "main.py", *device_args, "--listen", "127.0.0.1", "--port", str(self.port),
            "--base-directory", str(self.base_dir), "--disable-auto-launch", *self.extra_args,
        ]
        log = open(self.log_path, "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.process = subprocess.Popen(cmd, cwd=comfyui_dir(), stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log_text()[-4000:]}")
            try:
                self.get("/object_info/KSampler")
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.3)  # nothing to wait on before the server listens: poll its port
                continue
            self._messages = _Messages(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}")
            return self
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout}s:\n{self.log_text()[-4000:]}")

    def stop(self) -> None:
        if self._messages is not None:
            self._messages.close()
            self._messages = None
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- HTTP -------------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _request(self, method: str, path: str, body: Any = None, timeout: float = 60) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def get(self, path: str) -> Any:
        return self._request("GET", path)

    def post(self, path: str, body: Any = None) -> Any:
        return self._request("POST", path, body if body is not None else {})

    def object_info(self, node_id: str | None = None) -> dict:
        return self.get("/object_info" + (f"/{node_id}" if node_id else ""))

    def with_defaults(self, workflow: dict) -> dict:
        """The workflow with every widget input its nodes declare but it leaves out set to the declared default
        (inputs a newer ComfyUI added, e.g. 0.33's ``bypass`` on ``LoraModelLoader``)."""
        out = {}
        for node_id, node in workflow.items():
            declared = self.object_info(node["class_type"])[node["class_type"]]["input"]
            defaults = {name: spec[1]["default"] for group in ("required", "optional")
                        for name, spec in declared.get(group, {}).items()
                        if len(spec) > 1 and isinstance(spec[1], dict) and "default" in spec[1]}
            out[node_id] = {**node, "inputs": {**defaults, **node["inputs"]}}
        return out

    def free(self) -> None:
        """Clears ComfyUI's execution cache and unloads models, so the same prompt really runs again.

        ComfyUI's prompt worker applies /free's flags only between prompts: a prompt queued right after /free may run
        before they are applied (on a busy machine it often does), on the old cache. So a tiny barrier prompt follows:
        once it is done, the worker applies the flags before it takes the next prompt."""
        self.post("/free", {"unload_models": True, "free_memory": True})
        self._barrier += 1
        self.run({"value": {"class_type": "PrimitiveInt", "inputs": {"value": self._barrier}},
                  "show": {"class_type": "PreviewAny", "inputs": {"source": ["value", 0]}}})

    def interrupt(self) -> None:
        self.post("/interrupt")

    # -- prompts ----------------------------------------------------------------------------------------------
    def queue(self, workflow: dict) -> str:
        """Posts an API-format workflow; returns its prompt id or raises PromptError with ComfyUI's validation reply."""
        try:
            reply = self.post("/prompt", {"prompt": workflow, "client_id": self.client_id})
        except urllib.error.HTTPError as e:
            payload = json.loads(e.read() or b"{}")
            raise PromptError(f"ComfyUI rejected the prompt: {json.dumps(payload)[:2000]}", payload) from None
        if reply.get("node_errors"):  # ComfyUI runs the valid outputs and silently drops the others: we don't
            raise PromptError(f"ComfyUI rejected part of the prompt: {json.dumps(reply['node_errors'])[:2000]}", reply)
        return reply["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict:
        """Waits for a prompt to finish; returns its /history entry or raises PromptError with the execution error.

        Woken by the prompt's end message on this client's websocket (ComfyUI sends it after writing the history);
        /history is also read once a second, for prompts another client queued."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") == "error" or not status.get("completed"):
                    messages = [m for m in status.get("messages", []) if m[0] in ("execution_error", "execution_interrupted")]
                    raise PromptError(f"prompt {prompt_id} failed: {json.dumps(messages)[:3000]}", entry)
                return entry
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died:\n{self.log_text()[-4000:]}")
            if self._messages is not None and self._messages.is_open():
                self._messages.wait_end(prompt_id, min(1.0, deadline - time.monotonic()))
            else:
                time.sleep(0.1)  # no websocket (the server died or closed it): poll
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout}s")

    def run(self, workflow: dict, timeout: float = 600.0) -> dict:
        return self.wait(self.queue(workflow), timeout)

    def outputs(self, entry: dict, node: str) -> dict:
        """The UI output a node of a finished prompt reported (images, text, …)."""
        return entry.get("outputs", {}).get(node, {})

    def listen(self, on_message: Callable[[dict], None]) -> Callable[..., None]:
        """Streams this client's websocket messages (progress, custom events) to ``on_message``; returns a stopper.

        ``stop(prompt_id)`` first waits (up to 30 s) until that prompt's last message has been delivered, so nothing
        the prompt sent is missed; ``stop()`` stops at once."""
        if self._messages is None:
            raise RuntimeError("the server is not running")
        messages = self._messages
        messages.subscribe(on_message)

        def stop(prompt_id: str | None = None) -> None:
            if prompt_id is not None:
                messages.wait_end(prompt_id, 30.0)
            messages.unsubscribe(on_message)

        return stop


class _Messages:
    """This client's one websocket to ComfyUI, read by one thread and handed to every listener.

    One connection per client id: ComfyUI keeps a single socket per client id, so a second connection would take
    the first one's messages. It also records the prompts that ended (ComfyUI's ``executing`` message with no node,
    sent after the prompt's history is written), which ``ComfyServer.wait`` waits on instead of polling."""

    def __init__(self, url: str):
        import websocket  # websocket-client

        self._ws = websocket.create_connection(url, timeout=1)
        self._changed = threading.Condition()
        self._listeners: list[Callable[[dict], None]] = []
        self._ended: set[str] = set()
        self._open = True
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        import websocket

        while self._open:
            try:
                raw = self._ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except Exception:
                break
            if not isinstance(raw, str):  # a preview image: its event type (ComfyUI's BinaryEventTypes) and size
                raw = json.dumps({"type": "binary", "data": {"event": int.from_bytes(raw[:4], "big"),
                                                             "bytes": len(raw)}})
            if not raw:
                break  # the server closed the connection
            message = json.loads(raw)
            with self._changed:
                listeners = list(self._listeners)
            for listener in listeners:
                listener(message)
            data = message.get("data") or {}
            if message.get("type") == "executing" and data.get("node") is None and data.get("prompt_id"):
                with self._changed:
                    self._ended.add(data["prompt_id"])
                    self._changed.notify_all()
        with self._changed:
            self._open = False
            self._changed.notify_all()

    def subscribe(self, listener: Callable[[dict], None]) -> None:
        with self._changed:
            self._listeners.append(listener)

    def unsubscribe(self, listener: Callable[[dict], None]) -> None:
        with self._changed:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def is_open(self) -> bool:
        return self._open

    def wait_end(self, prompt_id: str, timeout: float) -> bool:
        """True once ``prompt_id`` has ended (every message it sent has reached the listeners); False after
        ``timeout`` seconds or when the connection is gone."""
        with self._changed:
            return self._changed.wait_for(lambda: prompt_id in self._ended or not self._open, max(timeout, 0.0)) \
                and prompt_id in self._ended

    def close(self) -> None:
        with self._changed:
            self._open = False
            self._changed.notify_all()
        self._ws.close()
        self._thread.join(3)
