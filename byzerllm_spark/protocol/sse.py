"""Server-sent events as both ends of ``POST {endpoint}/{model}/stream`` and ``/v1`` streams use them.

Each event is one ``data: <json>\\n\\n`` frame. The model route sends ``{"text": piece}`` items, then
one ``{"metadata": {...}}`` item (usage, finish reason), or ``{"error": message}`` if the model fails
midway. The OpenAI route sends OpenAI's chunk objects and ends with ``data: [DONE]``; its Responses API
(``/v1/responses``) sends named events (``event: response.output_text.delta``...) and no ``[DONE]``.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Iterator

MEDIA_TYPE = "text/event-stream"
DONE = "[DONE]"


def event(item: Any) -> str:
    """One frame: ``data: <json>`` and a blank line; a str item (``[DONE]``) is sent as it is."""
    payload = item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)
    return f"data: {payload}\n\n"


def parse(lines: Iterable[str]) -> Iterator[Any]:
    """The decoded items of an event stream's lines (comments, blank lines and ``[DONE]`` skipped)."""
    for line in lines:
        if not line or not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == DONE:
            return
        yield json.loads(payload)


def named_event(name: str, item: Any) -> str:
    """One frame with an event name (``event: <name>`` then ``data: <json>``), as OpenAI's Responses API
    streams its typed events."""
    return f"event: {name}\ndata: {json.dumps(item, ensure_ascii=False)}\n\n"
