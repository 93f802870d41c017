"""Session ids: minted from a CSPRNG, visible ASCII only, checked before any lookup.

With a `session_id_key`, every id the gateway hands out carries an HMAC tag of
its random part, so a forged or altered id is refused at the gateway without
a store lookup. Without one, ids are checked for shape only.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

SID_BYTES = 24  # 192 random bits; the spec asks for at least 128
TAG_BYTES = 16  # 128-bit HMAC-SHA256 tag: 22 characters of URL-safe base64
TAG_CHARS = 22
_SID_RE = re.compile(r"[A-Za-z0-9_-]{16,128}")
# What the MCP spec allows a session id to be (visible ASCII, 0x21-0x7E), for ids we did not mint.
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]{1,256}")
NAMED_PREFIX = "n_"  # named session ids are 40 characters (62 tagged); minted ones 32 (54 tagged)
_NAMED_LENGTHS = (40, 40 + TAG_CHARS)


def mint_session_id() -> str:
    """A new untagged session id: 192 bits from `secrets`, URL-safe base64 (32 characters)."""
    return secrets.token_urlsafe(SID_BYTES)


def is_valid_session_id(value: str) -> bool:
    """True if `value` has the shape of an id Tether mints (so it is worth a lookup)."""
    return _SID_RE.fullmatch(value) is not None


def is_visible_ascii(value: str) -> bool:
    return _VISIBLE_ASCII.fullmatch(value) is not None


def session_id_for_key(key: str, secret: str) -> str:
    """The session id of the named session `key` (key-affinity mode): stable, unguessable without
    the secret, and of the shape every other session id has."""
    digest = hmac.new(secret.encode(), b"tether-key:" + key.encode(), hashlib.sha256).digest()
    return NAMED_PREFIX + base64.urlsafe_b64encode(digest).decode()[:38]


def is_named(sid: str) -> bool:
    return len(sid) in _NAMED_LENGTHS and sid.startswith(NAMED_PREFIX)


class SessionIds:
    """Mints and checks one gateway's session ids; with a key, ids are HMAC-tagged."""

    def __init__(self, key: str, name_secret: str) -> None:
        self._key = key.encode()
        self._name_secret = name_secret

    def _tag(self, core: str) -> str:
        digest = hmac.new(self._key, b"tether-sid:" + core.encode(), hashlib.sha256).digest()[:TAG_BYTES]
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def _sealed(self, core: str) -> str:
        return core + self._tag(core) if self._key else core

    def mint(self) -> str:
        return self._sealed(mint_session_id())

    def for_name(self, name: str, principal: str = "") -> str:
        """A named session's id; principals never share a name's session (no cross-tenant oracle)."""
        return self._sealed(session_id_for_key(f"{principal}\x00{name}" if principal else name,
                                               self._name_secret))

    def genuine(self, sid: str) -> bool:
        """True if `sid` may be one of ours: the right shape and, with a key, the right tag."""
        if _SID_RE.fullmatch(sid) is None:  # is_valid_session_id, on every request: one call fewer
            return False
        if not self._key:
            return True
        core, tag = sid[:-TAG_CHARS], sid[-TAG_CHARS:]
        return len(core) >= 16 and hmac.compare_digest(tag, self._tag(core))
