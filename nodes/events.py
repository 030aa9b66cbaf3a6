"""Messages to the frontend over ComfyUI's websocket (custom events), when a server is running."""
from __future__ import annotations

import functools
import sys
from typing import Any

from ..training.distributed import Ranks

EVENT_PREFIX = "lora_trainer."


@functools.cache
def _prompt_server_class():
    """ComfyUI's PromptServer when this process runs the server (it is then already imported), else None."""
    module = sys.modules.get("server")
    return getattr(module, "PromptServer", None)


def send(event: str, data: dict[str, Any], every_rank: bool = False) -> None:
    """``every_rank``: also from a rank other than 0, for what each rank must tell about itself (where it stopped);
    otherwise, in a data-parallel run, rank 0 reports for all."""
    if not every_rank and not Ranks.current().main:
        return
    cls = _prompt_server_class()
    instance = getattr(cls, "instance", None) if cls is not None else None
    if instance is not None:
        instance.send_sync(EVENT_PREFIX + event, data, instance.client_id)
