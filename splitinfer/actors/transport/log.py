"""Structured logs: one JSON object per line on stderr (time, level, actor, kind, event, fields)."""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO


def read_log_events(path: Path) -> list[dict]:
    """The structured (JSON) lines of an actor's log; an absent log has none yet."""
    if not Path(path).exists():
        return []
    out = []
    for line in Path(path).read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


class Logger:
    def __init__(self, actor_id: str, kind: str, stream: TextIO | None = None):
        self.actor_id = actor_id
        self.kind = kind
        self.stream = stream or sys.stderr

    @classmethod
    def silent(cls, actor_id: str, kind: str) -> "Logger":
        """For a library caller (the SDK): it gets exceptions, not operator log lines."""
        return cls(actor_id, kind, _Discard())

    def __call__(self, event: str, level: str = "info", **fields: Any) -> None:
        rec = {"t": round(time.time(), 4), "level": level, "actor": self.actor_id, "kind": self.kind, "event": event}
        rec.update(fields)
        try:
            self.stream.write(json.dumps(rec, default=str) + "\n")
            self.stream.flush()
        except Exception:
            pass

    def error(self, event: str, **fields: Any) -> None:
        self(event, level="error", **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self(event, level="warning", **fields)


class _Discard(io.TextIOBase):
    def write(self, text: str) -> int:
        return len(text)


def first_line(exc: BaseException) -> str:
    """`Type: first line of the message`: an error as one log field or one line of an answer."""
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")
