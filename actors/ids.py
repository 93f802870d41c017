"""Session ids: minted from a CSPRNG, visible ASCII only, checked before any lookup."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

SID_BYTES = 24  # 192 random bits; the spec asks for at least 128
_SID_RE = re.compile(r"[A-Za-z0-9_-]{16,128}")
# What the MCP spec allows a session id to be (visible ASCII, 0x21-0x7E), for ids we did not mint.
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]{1,256}")


def mint_session_id() -> str:
    """A new session id: 192 bits from `secrets`, URL-safe base64 (32 characters)."""
    return secrets.token_urlsafe(SID_BYTES)


def is_valid_session_id(value: str) -> bool:
    """True if `value` has the shape of an id Tether mints (so it is worth a lookup)."""
    return _SID_RE.fullmatch(value) is not None


def is_visible_ascii(value: str) -> bool:
    return _VISIBLE_ASCII.fullmatch(value) is not None


NAMED_PREFIX = "n_"  # named session ids are 40 characters; minted ones 32, so the two never collide


def session_id_for_key(key: str, secret: str) -> str:
    """The session id of the named session `key` (key-affinity mode): stable, unguessable without
    the secret, and of the shape every other session id has."""
    digest = hmac.new(secret.encode(), b"tether-key:" + key.encode(), hashlib.sha256).digest()
    return NAMED_PREFIX + base64.urlsafe_b64encode(digest).decode()[:38]


def is_named(sid: str) -> bool:
    return len(sid) == 40 and sid.startswith(NAMED_PREFIX)
