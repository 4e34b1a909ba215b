"""What a client does with messages: fold the events it receives into plain events and whole messages.

Shared by the property test (tests/test_messages.py) and the real-server tests, so they all judge a
reader by one rule: a reader's view is its plain events in order, and each message as one object.
"""

from __future__ import annotations

import json


class View:
    """A reader's view of a session: plain events (type, data) in order, and messages by id."""

    def __init__(self) -> None:
        self.plain: list[tuple[str, object]] = []
        self.messages: dict[str, dict] = {}
        self.cursor = "0"

    def take(self, event: str, data: object, cursor: str | None = None) -> None:
        if cursor is not None:
            self.cursor = cursor
        if not event.startswith("message.") or not isinstance(data, dict):
            self.plain.append((event, data))
            return
        mid = data["message"]
        if event in ("message.snapshot", "message.start"):  # a message is never given twice
            assert mid not in self.messages, f"{event} of {mid} again, at {cursor}"
        if event == "message.snapshot":
            self.messages[mid] = {k: data[k] for k in ("type", "metadata", "text", "status")}
            if "error" in data:
                self.messages[mid]["error"] = data["error"]
            return
        if event == "message.start":
            self.messages[mid] = {"type": data.get("type"), "metadata": data.get("metadata"), "text": "",
                                  "status": "open"}
            return
        m = self.messages[mid]
        if event == "message.append":
            m["text"] += data["text"]
        elif event == "message.reset":
            m["text"] = ""
        elif event in ("message.end", "message.replace"):
            if event == "message.replace":
                m["text"] = data["text"]
                if "metadata" in data:
                    m["metadata"] = data["metadata"]
            m["status"] = data.get("status", "finished")
            m.pop("error", None)
            if data.get("error") is not None:
                m["error"] = data["error"]

    def take_sse(self, sse) -> None:
        """One event read by httpx-sse (``ServerSentEvent``)."""
        self.take(sse.event, json.loads(sse.data), sse.id or None)

    def state(self) -> tuple:
        return self.plain, self.messages
