"""Messages to the frontend over ComfyUI's websocket (custom events), when a server is running."""
from __future__ import annotations

from typing import Any

EVENT_PREFIX = "lora_trainer."


def send(event: str, data: dict[str, Any]) -> None:
    try:
        from server import PromptServer
    except ImportError:  # plain unit tests: no server
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is not None:
        instance.send_sync(EVENT_PREFIX + event, data, instance.client_id)
