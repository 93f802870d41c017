"""Structured logs: one JSON object per line, with the node and a short session tag.

Logs never hold a credential or a whole session id: code logs `sid_tag(sid)`,
and the formatter also masks anything shaped like a bearer token, an API key
header or a JWT that a message or an exception text carries.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import sys
import time

import orjson

_FIELDS = ("node", "sid", "epoch", "incarnation", "reason", "pid", "method", "status", "task", "url", "detail",
           "seconds", "count")


# Bearer credentials, API-key headers, secret headers, and anything shaped like a JWT.
_SECRETS = re.compile(r"(?i)(bearer\s+|x-api-key['\"]?\s*[:=,]\s*['\"]?|x-tether-secret['\"]?\s*[:=,]\s*['\"]?)"
                      r"[^\s'\",;]+|\beyJ[\w-]+\.[\w-]+\.[\w-]*")


_USERINFO = re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://)[^/\s@]+@")  # redis://:password@host, https://user:pw@


def redact(text: str) -> str:
    """`text` with credentials masked."""
    text = _USERINFO.sub(r"\1[redacted]@", text)
    return _SECRETS.sub(lambda m: (m.group(1) or "") + "[redacted]", text)


@functools.lru_cache(maxsize=16384)  # a node names each exchange's task by it: a sha256 per request
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
            "event": redact(record.getMessage()),
        }
        for field in _FIELDS:
            value = record.__dict__.get(field)
            if value is not None:
                out[field] = redact(value) if isinstance(value, str) else value
        if record.exc_info:
            out["error"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(out).decode()


class NoClientErrors(logging.Filter):
    """Drop aiohttp's reports of malformed requests: a client's mistake (answered with 400) is not
    ours, and logging each with a traceback would let anyone fill the disk."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        return not (record.exc_info and isinstance(record.exc_info[1], HttpProcessingError))


def configure(component: str, level: str = "info") -> None:
    """Send every `tether.*` log line to stderr as JSON."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(component))
    root = logging.getLogger("tether")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    server = logging.getLogger("aiohttp.server")  # unhandled errors in handlers: ours, in JSON too
    server.handlers[:] = [handler]
    server.filters[:] = [NoClientErrors()]
    server.propagate = False
    logging.Formatter.converter = time.gmtime
