"""Structured logs: one JSON object per line, with the node and a short session tag."""

from __future__ import annotations

import hashlib
import logging
import sys
import time

import orjson

_FIELDS = ("node", "sid", "epoch", "incarnation", "reason", "pid", "method", "status", "task", "url", "detail",
           "seconds", "count")


def sid_tag(sid: str) -> str:
    """A short, stable, non-reversible tag for logging a session id."""
    return hashlib.sha256(sid.encode()).hexdigest()[:12]


class JsonFormatter(logging.Formatter):
    def __init__(self, component: str) -> None:
        super().__init__()
        self._component = component

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "component": self._component,
            "event": record.getMessage(),
        }
        for field in _FIELDS:
            value = record.__dict__.get(field)
            if value is not None:
                out[field] = value
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return orjson.dumps(out).decode()


def configure(component: str, level: str = "info") -> None:
    """Send every `tether.*` log line to stderr as JSON."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(component))
    root = logging.getLogger("tether")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    logging.Formatter.converter = time.gmtime
