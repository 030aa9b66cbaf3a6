"""Fault injection for tests/test_process_faults.py: a LoRA save held "in progress" for as long as a test needs to
interrupt or kill the server during it.

Only when the server's environment sets ``LORA_TRAINER_TEST_HOLD_SAVES=<folder>``: while ``<folder>/hold`` exists,
each save of the pack's atomic writer writes its temporary ``.tmp_*`` file, names that file in ``<folder>/in_save``
(what the test waits for), and waits until the test removes ``hold`` (at most ``MAX_HOLD_S``) before the writer
claims the final name. Without ``hold``, saves run as usual.
"""
from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path

FOLDER_ENV = "LORA_TRAINER_TEST_HOLD_SAVES"
MAX_HOLD_S = 60.0  # a test that forgets to release never hangs the server for good


def _pack_temp_prefix() -> str | None:
    """The prefix of the pack's temporary files, from the pack as ComfyUI loaded it (a path-derived module name)."""
    for name, module in list(sys.modules.items()):
        if name.endswith(".lora.file_format") and hasattr(module, "TEMP_PREFIX"):
            return module.TEMP_PREFIX
    return None


def install() -> None:
    folder = os.environ.get(FOLDER_ENV)
    if not folder:
        return
    import safetensors.torch

    hold, in_save = Path(folder) / "hold", Path(folder) / "in_save"
    original = safetensors.torch.save_file

    # The pack imports safetensors.torch inside its save function and looks save_file up at call time, so wrapping
    # the module attribute reaches it whatever order ComfyUI loads the two packs in.
    @functools.wraps(original)
    def save_file(tensors, filename, *args, **kwargs):
        result = original(tensors, filename, *args, **kwargs)
        prefix = _pack_temp_prefix()
        if hold.exists() and prefix and Path(filename).name.startswith(prefix):
            staged = in_save.with_name(in_save.name + ".writing")  # the test never reads a half-written name
            staged.write_text(str(filename))
            os.replace(staged, in_save)
            deadline = time.monotonic() + MAX_HOLD_S
            while hold.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        return result

    safetensors.torch.save_file = save_file
