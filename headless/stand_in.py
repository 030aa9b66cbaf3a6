"""The object ComfyUI's executor and nodes talk to instead of its PromptServer: it keeps what they set and hands every
message to a listener (the terminal report) instead of a websocket. No ComfyUI imports."""
from __future__ import annotations

import logging
import traceback
from typing import Any, Callable

Listener = Callable[[str, Any], None]  # (event, data)

log = logging.getLogger(__name__)


class HeadlessServer:
    """What ``execution.PromptExecutor``, ``comfy_execution.progress.WebUIProgressHandler`` and custom nodes use of
    ``server.PromptServer.instance``: ``client_id``, ``last_node_id``, ``last_prompt_id``, ``sockets_metadata``,
    ``send_sync``, ``send_progress_text``, ``queue_updated``, and at import time ``routes`` and on-prompt handlers."""

    def __init__(self, listener: Listener, client_id: str = "headless"):
        self.listener = listener
        # The executor sets client_id from extra_data["client_id"]; messages go out only while it is set.
        self.client_id: str | None = client_id
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.sockets_metadata: dict[str, dict] = {}  # no client ever announces feature flags (e.g. previews)
        self.supports: list[str] = []
        self.on_prompt_handlers: list[Callable[[dict], dict]] = []
        self.loop = None  # the event loop nodes were loaded in (set by comfy_host)
        self._routes = None

    # -- messages -----------------------------------------------------------------------------------------------------
    def send_sync(self, event: Any, data: Any, sid: str | None = None) -> None:
        """Called from the executing thread. A failing listener must not fail the prompt, so it is only logged."""
        try:
            self.listener(event if isinstance(event, str) else f"binary:{event}", data)
        except Exception:  # noqa: BLE001 - display code never stops a run
            log.warning("headless: the terminal report failed on %r:\n%s", event, traceback.format_exc())

    async def send(self, event: Any, data: Any, sid: str | None = None) -> None:
        self.send_sync(event, data, sid)

    async def send_json(self, event: Any, data: Any, sid: str | None = None) -> None:
        self.send_sync(event, data, sid)

    def send_progress_text(self, text: str | bytes, node_id: str, sid: str | None = None) -> None:
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8", "replace")
        self.send_sync("progress_text", {"node": node_id, "text": text}, sid)

    def queue_updated(self) -> None:
        """There is no queue to show."""

    # -- what custom nodes touch while they are imported -------------------------------------------------------------
    @property
    def routes(self):
        """A route table custom nodes may decorate their HTTP handlers with; nothing ever serves it."""
        if self._routes is None:
            from aiohttp import web  # ComfyUI's server module (imported by its own nodes) has loaded aiohttp already

            self._routes = web.RouteTableDef()
        return self._routes

    def add_on_prompt_handler(self, handler: Callable[[dict], dict]) -> None:
        self.on_prompt_handlers.append(handler)

    def trigger_on_prompt(self, json_data: dict) -> dict:
        """As the server does for a POST /prompt body: each handler may rewrite it; a failing one is logged."""
        for handler in self.on_prompt_handlers:
            try:
                json_data = handler(json_data)
            except Exception:  # noqa: BLE001 - the server's behaviour: log and go on
                log.warning("an on_prompt handler failed:\n%s", traceback.format_exc())
        return json_data
