"""ComfyUI as a library: every call the headless runner makes into ComfyUI lives here, so that a ComfyUI release that
changes one of them needs a change in this file only.

It does what ComfyUI's ``main.py`` does before it starts serving (arguments, model/input/output folders, prestartup
scripts, built-in, API and custom nodes), minus the HTTP server and the browser; prompts are validated with
``execution.validate_prompt`` and run by ``execution.PromptExecutor``, which talk to a ``stand_in.HeadlessServer``.

Version differences, each guarded where it is used (0.3.75 and 0.33.0 are tested; the branches for older releases
follow their signatures and are untested):
- ``nodes.init_extra_nodes`` and ``execution.validate_prompt`` are coroutines in 0.3.75 and 0.33 (older releases:
  plain functions); ``validate_prompt`` takes (prompt_id, prompt, partial_execution_list) there, (prompt) or
  (prompt_id, prompt) before; ``init_extra_nodes`` lacks ``init_api_nodes`` before the API nodes existed.
- ``execution.PromptExecutor`` takes ``cache_type``/``cache_args`` (``lru_size`` in older releases); 0.3.75 reads
  ``cache_args["ram"]``, 0.33 also ``cache_args["ram_inactive"]``.
- 0.33 applies registered node replacements (``PromptServer.node_replace_manager``) to a prompt before validating
  it, and custom nodes register replacements through that manager while they load; 0.3.75 has neither.
- 0.33 re-applies its cuDNN benchmark setting after custom nodes are imported (``set_cudnn_benchmark``).
- 0.33's ``main.py`` may switch to dynamic VRAM (comfy-aimdo); as a library ComfyUI keeps its classic model
  patcher, as with ``--disable-dynamic-vram``.
"""
from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)


class HostError(RuntimeError):
    """ComfyUI could not be found or set up (the CLI exits 2)."""


# -- finding and configuring ComfyUI ------------------------------------------------------------------------------------
def find_comfyui(explicit: str | None, pack_dir: Path) -> Path:
    """``explicit`` (``--comfyui``), else ``$COMFYUI_DIR``, else the ComfyUI whose ``custom_nodes/`` holds the pack."""
    def is_comfyui(path: Path) -> bool:
        return (path / "main.py").is_file() and (path / "comfy").is_dir() and (path / "execution.py").is_file()

    for source, value in (("--comfyui", explicit), ("COMFYUI_DIR", os.environ.get("COMFYUI_DIR"))):
        if value:  # named explicitly: never fall back to another tree silently
            path = Path(value).expanduser().absolute()
            if not is_comfyui(path):
                raise HostError(f"{source}: {path} is not a ComfyUI folder (no main.py, comfy/, execution.py)")
            return path
    # The pack's folder as given (a symlink in custom_nodes/ stays one) and as resolved (a symlinked ComfyUI).
    for candidate in dict.fromkeys((pack_dir.absolute().parent.parent, pack_dir.resolve().parent.parent)):
        if is_comfyui(candidate):
            return candidate
    raise HostError(f"no ComfyUI found: this pack ({pack_dir}) is not inside ComfyUI/custom_nodes/; "
                    "pass --comfyui DIR or set COMFYUI_DIR")


def executor_file(comfyui: Path) -> str:
    """The resolved path of ComfyUI's executor module (``execution.py``), whose log records name it."""
    return os.path.realpath(comfyui / "execution.py")


def configure(comfyui: Path, comfy_argv: list[str]) -> Any:
    """Imports ComfyUI's argument module with ``comfy_argv`` as its command line (main.py's way: ComfyUI's own parser
    and its post-processing), then sets up devices and folders as main.py does. Returns ComfyUI's ``args``."""
    root = str(comfyui)
    if root not in sys.path:
        sys.path.insert(0, root)
    if "comfy.cli_args" in sys.modules:
        raise HostError("ComfyUI's arguments were parsed already in this process; run the headless runner in a "
                        "fresh Python process")
    import comfy.options

    comfy.options.enable_args_parsing()
    saved_argv = sys.argv
    sys.argv = [os.path.join(root, "main.py"), *comfy_argv]
    try:
        import comfy.cli_args
    finally:
        sys.argv = saved_argv
    args = comfy.cli_args.args
    _set_up_environment(args)
    _set_up_folders(comfyui, args)
    _run_prestartup_scripts(args)
    return args


def _set_up_environment(args: Any) -> None:
    """What main.py does before torch is imported: device selection, the CUDA allocator; then the CPU where the
    machine has no accelerator (ComfyUI would otherwise pick CUDA and fail)."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # main.py sets these for custom nodes
    os.environ.setdefault("DO_NOT_TRACK", "1")
    if getattr(args, "cuda_device", None) not in (None, "all"):
        os.environ["CUDA_VISIBLE_DEVICES"] = str(args.cuda_device)
        os.environ["HIP_VISIBLE_DEVICES"] = str(args.cuda_device)
    if getattr(args, "deterministic", False):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        import cuda_malloc  # noqa: F401  (chooses cudaMallocAsync through the environment, before torch starts CUDA)
    except ImportError:
        pass
    if not args.cpu and not _has_accelerator():
        log.info("no GPU found: running on the CPU")
        args.cpu = True


def _has_accelerator() -> bool:
    import torch

    if torch.cuda.is_available():
        return True
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available())


def _set_up_folders(comfyui: Path, args: Any) -> None:
    """main.py's apply_custom_paths() and temp folder: extra_model_paths.yaml files, --output/--input/--user/
    --temp-directory (``--base-directory`` is read by folder_paths itself when it is imported)."""
    import folder_paths
    # Imported first, as main.py does: ComfyUI's nodes.py later puts comfy/ at the head of sys.path, after which
    # ``import utils`` would find comfy/utils.py instead of this package (and server.py needs utils.install_util).
    from utils.extra_config import load_extra_path_config

    configs = [comfyui / "extra_model_paths.yaml"] if (comfyui / "extra_model_paths.yaml").is_file() else []
    for group in getattr(args, "extra_model_paths_config", None) or []:
        configs.extend(Path(p) for p in group)
    for config in configs:
        load_extra_path_config(str(config))
    if args.output_directory:
        folder_paths.set_output_directory(os.path.abspath(args.output_directory))
    # main.py: models saved by nodes (CheckpointSave, …) into the output folder can be loaded again.
    for kind in ("checkpoints", "clip", "vae", "diffusion_models", "loras"):
        folder_paths.add_model_folder_path(kind, os.path.join(folder_paths.get_output_directory(), kind))
    if args.input_directory:
        folder_paths.set_input_directory(os.path.abspath(args.input_directory))
    if args.user_directory:
        folder_paths.set_user_directory(os.path.abspath(args.user_directory))
    if args.temp_directory:
        folder_paths.set_temp_directory(os.path.join(os.path.abspath(args.temp_directory), "temp"))
    # main.py empties the temp folder at start and exit; a runner sharing the folder with a live server must not.


def _run_prestartup_scripts(args: Any) -> None:
    """Each custom node folder's ``prestartup_script.py``, before any node is imported, as main.py runs them."""
    import importlib.util

    import folder_paths

    whitelist = set(getattr(args, "whitelist_custom_nodes", None) or [])
    if args.disable_all_custom_nodes and not whitelist:
        return
    for nodes_dir in folder_paths.get_folder_paths("custom_nodes"):
        if not os.path.isdir(nodes_dir):
            continue
        for name in sorted(os.listdir(nodes_dir)):
            script = os.path.join(nodes_dir, name, "prestartup_script.py")
            if name.endswith(".disabled") or not os.path.isfile(script):
                continue
            if args.disable_all_custom_nodes and name not in whitelist:
                continue
            try:
                spec = importlib.util.spec_from_file_location(os.path.splitext(script)[0], script)
                spec.loader.exec_module(importlib.util.module_from_spec(spec))
            except Exception as e:  # noqa: BLE001 - main.py logs a failing script and starts anyway
                log.error("prestartup script %s failed: %s", script, e)


# -- nodes ----------------------------------------------------------------------------------------------------------
_loop: asyncio.AbstractEventLoop | None = None


def load_nodes(stand_in: Any, args: Any) -> None:
    """Installs ``stand_in`` as ``server.PromptServer.instance`` (before any node is imported, as the server exists
    before main.py loads nodes: packs reach for it at import time and while running, e.g. the pack's events.send),
    then loads ComfyUI's built-in extra nodes, API nodes and every custom node folder with ComfyUI's own loader, so
    each pack is imported under its folder name exactly as the server imports it."""
    global _loop
    import execution  # noqa: F401  (main.py's import order: execution, server, nodes)
    import nodes

    # ComfyUI's own nodes import the server module (aiohttp) anyway; only its PromptServer is never constructed.
    server = importlib.import_module("server")
    server.PromptServer.instance = stand_in
    try:  # 0.33+: custom nodes register node replacements while loading; the server applies them to each prompt
        from app.node_replace_manager import NodeReplaceManager

        stand_in.node_replace_manager = NodeReplaceManager()
    except ImportError:
        pass

    _loop = asyncio.new_event_loop()  # main.py's loop: nodes are loaded in it and some keep a reference
    asyncio.set_event_loop(_loop)
    stand_in.loop = _loop
    try:
        import hook_breaker_ac10a0  # restores torch functions a custom node may have replaced while importing
    except ImportError:
        hook_breaker_ac10a0 = None
    kwargs = {"init_custom_nodes": not args.disable_all_custom_nodes or bool(args.whitelist_custom_nodes)}
    if "init_api_nodes" in inspect.signature(nodes.init_extra_nodes).parameters:
        kwargs["init_api_nodes"] = not getattr(args, "disable_api_nodes", False)
    if hook_breaker_ac10a0 is not None:
        hook_breaker_ac10a0.save_functions()
    _await(nodes.init_extra_nodes(**kwargs))
    if hook_breaker_ac10a0 is not None:
        hook_breaker_ac10a0.restore_functions()
    import comfy.model_management

    if hasattr(comfy.model_management, "set_cudnn_benchmark"):  # 0.33: re-applied after custom nodes imported
        comfy.model_management.set_cudnn_benchmark()


def _await(result: Any) -> Any:
    """The value of a call that is a coroutine in newer ComfyUI releases and returns at once in older ones."""
    return _loop.run_until_complete(result) if inspect.isawaitable(result) else result


def declared_inputs(class_type: str) -> set[str] | None:
    """The input names a node class declares (required and optional), None for an unknown class."""
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS.get(class_type)
    if cls is None:
        return None
    try:
        spec = cls.INPUT_TYPES()
    except Exception:  # noqa: BLE001 - validation reports a broken class properly
        return None
    return {name for group in ("required", "optional") for name in (spec.get(group) or {})}


def comfyui_version() -> str:
    try:
        import comfyui_version

        return str(comfyui_version.__version__)
    except (ImportError, AttributeError):
        return "unknown"


# -- validating and running a prompt -------------------------------------------------------------------------------
@dataclass
class Validation:
    ok: bool
    error: dict[str, Any] | None  # ComfyUI's {type, message, details, extra_info}
    outputs: list[str]  # the output nodes to execute
    node_errors: dict[str, Any]  # node id -> {errors: [...], class_type, dependent_outputs}
    prompt: dict[str, Any]  # the prompt as validated (on-prompt handlers and node replacements may rewrite it)


def validate(prompt: dict[str, Any], prompt_id: str, stand_in: Any) -> Validation:
    """What the server does with a POST /prompt body before queueing it: on-prompt handlers, node replacements (0.33),
    then ``execution.validate_prompt``."""
    import execution

    body = stand_in.trigger_on_prompt({"prompt": prompt, "client_id": stand_in.client_id})
    prompt = body.get("prompt", prompt)
    replacements = getattr(stand_in, "node_replace_manager", None)
    if replacements is not None:
        replacements.apply_replacements(prompt)
    params = list(inspect.signature(execution.validate_prompt).parameters)
    call = [prompt_id, prompt] if "prompt_id" in params else [prompt]
    if len(params) > len(call):  # partial_execution_list (0.3.75, 0.33): None runs every output, as a full queue does
        call.append(None)
    ok, error, outputs, node_errors = _await(execution.validate_prompt(*call))[:4]
    return Validation(bool(ok), error or None, list(outputs or []), dict(node_errors or {}), prompt)


def install_progress_hook(stand_in: Any, on_progress: Callable[[str | None, int, int], None]) -> None:
    """ComfyUI's progress-bar hook as main.py's hijack_progress installs it (the interrupt check, the per-node
    progress state), reporting to ``on_progress(node_id, value, total)`` instead of the websocket."""
    import comfy.model_management
    import comfy.utils

    try:  # 0.3.75, 0.33: the node that is running, also for nodes executed asynchronously
        from comfy_execution.utils import get_executing_context
    except ImportError:
        def get_executing_context() -> None:
            return None
    try:  # 0.3.75, 0.33: per-node progress, which the executor's progress handlers read
        from comfy_execution.progress import get_progress_state
    except ImportError:
        get_progress_state = None

    def hook(value: int, total: int, preview_image: Any = None, prompt_id: str | None = None,
             node_id: str | None = None) -> None:
        context = get_executing_context()
        if node_id is None:
            node_id = context.node_id if context is not None else stand_in.last_node_id
        # Cancel (Ctrl-C) takes effect here for nodes that only report progress, as it does in the server.
        comfy.model_management.throw_exception_if_processing_interrupted()
        if get_progress_state is not None and node_id is not None:
            get_progress_state().update_progress(node_id, value, total, preview_image)
        on_progress(node_id, value, total)

    comfy.utils.set_progress_bar_global_hook(hook)


@dataclass
class Outcome:
    success: bool
    interrupted: bool
    error: dict[str, Any] | None  # the executor's execution_error message (node_id, node_type, exception_message, …)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)  # node id -> its UI output
    seconds: float = 0.0


def execute(prompt: dict[str, Any], prompt_id: str, outputs: list[str], stand_in: Any) -> Outcome:
    """Runs a validated prompt with ComfyUI's PromptExecutor in this thread (main.py runs it in a worker thread too;
    it makes its own event loop)."""
    executor = _make_executor(stand_in)
    stand_in.last_prompt_id = prompt_id
    started = time.monotonic()
    executor.execute(prompt, prompt_id, {"client_id": stand_in.client_id}, outputs)
    messages = {event: data for event, data in executor.status_messages}
    error = messages.get("execution_error")
    interrupted = "execution_interrupted" in messages
    # The executor leaves ``success`` True when a node fails while being staged; its messages are authoritative.
    success = bool(executor.success) and error is None and not interrupted
    history = getattr(executor, "history_result", None) or {}
    return Outcome(success, interrupted, error or messages.get("execution_interrupted"),
                   dict(history.get("outputs") or {}), time.monotonic() - started)


def _make_executor(stand_in: Any) -> Any:
    import execution

    params = inspect.signature(execution.PromptExecutor.__init__).parameters
    if "cache_type" in params:
        # One prompt per process: the classic cache, with every cache_args key any version reads.
        return execution.PromptExecutor(stand_in, cache_type=execution.CacheType.CLASSIC,
                                        cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
    if "lru_size" in params:  # before CacheType
        return execution.PromptExecutor(stand_in, lru_size=None)
    return execution.PromptExecutor(stand_in)


def interrupt() -> None:
    """ComfyUI's cancel: the running node stops at its next check (the pack's training keeps its finished steps)."""
    import comfy.model_management

    comfy.model_management.interrupt_current_processing(True)
