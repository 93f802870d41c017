"""Who is calling: bearer tokens or API keys from a file, and JWTs checked against a JWKS.

`Authenticator.identify` turns a request's credentials into a `Principal`, or
raises `Unauthorized` with the `WWW-Authenticate` challenge RFC 6750 and the
MCP authorization spec prescribe. Tokens are kept only as SHA-256 hashes; the
file is re-read when it changes (a Kubernetes Secret that rotates). JWKS from
a URL is fetched at start, every `JWKS_REFRESH` seconds, and when a token
names a key it does not know (at most every `JWKS_MIN_REFETCH` seconds).

With authentication off, every caller is the anonymous principal, and quotas
count per client address instead.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import jwt
import orjson

from tether.config import Config
from tether.errors import ConfigError, Unauthorized

log = logging.getLogger("tether.gateway")

API_KEY_HEADER = "X-API-Key"
WELL_KNOWN = "/.well-known/oauth-protected-resource"
JWKS_REFRESH = 300.0
JWKS_MIN_REFETCH = 30.0
TOKENS_RECHECK = 5.0  # seconds between looks at the tokens file's modification time
JWT_LEEWAY = 30  # seconds of clock skew allowed on exp and nbf
PRINCIPALS_KEPT = 4096  # principals (by name or client address) kept made, each with its binding tag


def token_hash(token: str) -> str:
    """How a token is stored: 'sha256:' and the hex digest (tokens are random, so no salt is needed)."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def principal_tag(name: str) -> str:
    """A fixed-size, header-safe stand-in for a principal name on the internal link and in the store."""
    return hashlib.sha256(b"tether-principal:" + name.encode()).hexdigest()[:32]


class Principal(NamedTuple):
    """Who made a request, as far as sessions and quotas are concerned. Made once a name or client
    address (`anonymous`, `_named`) and shared by its requests: each request names its binding."""

    name: str  # as authenticated; "" when authentication is off
    quota_key: str  # whose quotas the request counts against: the name, or "addr:" and the client address
    binding: str  # what a session is bound to at creation: the tag of the name, "" for the anonymous principal

    @property
    def quota_tag(self) -> str:
        return principal_tag(self.quota_key)


@functools.lru_cache(maxsize=PRINCIPALS_KEPT)
def anonymous(remote: str | None) -> Principal:
    """The principal of a request when authentication is off: known by its client address."""
    return Principal("", f"addr:{remote or 'unknown'}", "")


def read_tokens(path: str) -> dict[str, str]:
    """The tokens file as {hash: principal}. Raises `ConfigError` naming the line that is wrong."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"Cannot read auth_tokens_file {path!r}: {exc.strerror or exc}") from exc
    tokens: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, digest = line.rpartition(" ")
        name = name.strip()
        hexpart = digest.removeprefix("sha256:")
        if not name or not digest.startswith("sha256:") or len(hexpart) != 64 or not _is_hex(hexpart):
            raise ConfigError(f"Cannot read auth_tokens_file {path!r} line {number}: expected "
                              "'PRINCIPAL sha256:<64 hex digits>' (tokens are stored hashed)")
        tokens["sha256:" + hexpart.lower()] = name
    return tokens


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)


class Authenticator:
    """One gateway's view of who may call it."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.methods = frozenset(config.auth)
        self._clock = clock
        self._tokens: dict[str, str] = {}
        self._tokens_mtime = 0.0
        self._tokens_checked = 0.0
        self._keys: jwt.PyJWKSet | None = None
        self._keys_fetched = -float("inf")
        self._fetch_lock = asyncio.Lock()
        self._http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Load the tokens and the signing keys now, so a bad file stops the gateway at start."""
        if "token" in self.methods:
            self._reload_tokens(force=True)
        if "jwt" in self.methods:
            await self._load_keys()
            if self._keys is None:
                raise ConfigError(f"Cannot load jwt_jwks {self.config.jwt_jwks!r}: no usable keys")

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    def challenge(self, base_url: str, error: str = "") -> str:
        parts = ['Bearer realm="tether"']
        if "jwt" in self.methods and self.config.jwt_issuer:
            parts.append(f'resource_metadata="{base_url}{WELL_KNOWN}"')
        if error:
            parts.append('error="invalid_token"')
            parts.append(f'error_description="{error}"')
        return ", ".join(parts)

    def identify_now(self, headers: Mapping[str, str], remote: str | None, base_url: str) -> Principal | None:
        """The principal a request speaks for, when finding it needs no wait; None for a JWT, which
        `verify` checks (its issuer's keys may need fetching). Raises `Unauthorized` (401 with a
        challenge)."""
        if not self.methods:
            return anonymous(remote)
        token = _token(headers)
        if not token:
            raise Unauthorized("Unauthorized: send a bearer token (Authorization: Bearer ...)",
                               challenge=self.challenge(base_url))
        if "token" in self.methods:
            self._reload_tokens()
            if (name := self._tokens.get(token_hash(token))) is not None:
                return _named(f"token:{name}")
        if "jwt" in self.methods and token.count(".") == 2:
            return None
        raise Unauthorized("Unauthorized: the token is not valid",
                           challenge=self.challenge(base_url, "the token is not valid"))

    async def verify(self, headers: Mapping[str, str], base_url: str) -> Principal:
        """The principal of a request whose JWT `identify_now` left to verify. Raises `Unauthorized`."""
        return _named(f"jwt:{await self._verify_jwt(_token(headers) or '', base_url)}")

    # -- tokens ------------------------------------------------------------------

    def _reload_tokens(self, *, force: bool = False) -> None:
        now = self._clock()
        if not force and now - self._tokens_checked < TOKENS_RECHECK:
            return
        self._tokens_checked = now
        path = self.config.auth_tokens_file
        try:
            mtime = os.stat(path).st_mtime
        except OSError as exc:
            if force:
                raise ConfigError(f"Cannot read auth_tokens_file {path!r}: {exc.strerror or exc}") from exc
            log.warning("auth.tokens_unreadable", extra={"detail": f"{path}: {exc.strerror or exc}"})
            return  # keep the tokens we have
        if not force and mtime == self._tokens_mtime:
            return
        try:
            self._tokens = read_tokens(path)
        except ConfigError as exc:
            if force:
                raise
            log.error("auth.tokens_rejected", extra={"detail": exc.message})  # keep the tokens we have
            return
        self._tokens_mtime = mtime
        log.info("auth.tokens_loaded", extra={"count": len(self._tokens)})

    # -- JWT -----------------------------------------------------------------------

    async def _verify_jwt(self, token: str, base_url: str) -> str:
        def refuse(why: str) -> Unauthorized:
            return Unauthorized(f"Unauthorized: {why}", challenge=self.challenge(base_url, why))

        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise refuse("the token is not a valid JWT") from None
        await self._load_keys(older_than=JWKS_REFRESH)
        key = self._key_for(header.get("kid"))
        if key is None:
            await self._load_keys(older_than=JWKS_MIN_REFETCH)  # the issuer may have rotated its keys
            key = self._key_for(header.get("kid"))
        if key is None:
            raise refuse("the token is signed with an unknown key")
        config = self.config
        # The key decides the algorithm: a token may not pick one of another key type's.
        if key.algorithm_name not in config.jwt_algorithms or header.get("alg") != key.algorithm_name:
            raise refuse(f"the token's algorithm {str(header.get('alg'))[:20]!r} is not its key's")
        try:
            claims: dict[str, Any] = jwt.decode(
                token, key.key, algorithms=[key.algorithm_name], audience=config.jwt_audience or None,
                issuer=config.jwt_issuer or None, leeway=JWT_LEEWAY,
                options={"require": ["exp"], "verify_aud": bool(config.jwt_audience)})
        except (jwt.PyJWTError, TypeError, ValueError) as exc:
            raise refuse(f"the token was refused ({_plain(exc)})") from None
        name = claims.get(config.jwt_principal_claim)
        if not isinstance(name, str) or not name:
            raise refuse(f"the token has no {config.jwt_principal_claim!r} claim")
        return name

    def _key_for(self, kid: object) -> jwt.PyJWK | None:
        keys = list(self._keys) if self._keys is not None else []
        if kid is None:
            return keys[0] if len(keys) == 1 else None
        return next((k for k in keys if k.key_id == kid), None)

    async def _load_keys(self, older_than: float = 0.0) -> None:
        """Read the JWKS unless the keys are younger than `older_than` seconds; on failure keep the
        keys we have (an issuer's outage must not lock everyone out). One read at a time: requests
        that queue behind a read use what it found."""
        if self._clock() - self._keys_fetched < older_than:
            return
        async with self._fetch_lock:
            if self._clock() - self._keys_fetched < older_than:
                return
            source = self.config.jwt_jwks
            try:
                if source.startswith(("http://", "https://")):
                    if self._http is None:
                        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
                    async with self._http.get(source) as resp:
                        resp.raise_for_status()
                        data = orjson.loads(await resp.read())
                else:
                    data = orjson.loads(Path(source).read_bytes())
                self._keys = jwt.PyJWKSet.from_dict(data)
            except (OSError, aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError, jwt.PyJWTError) as exc:
                log.warning("auth.jwks_unavailable", extra={"url": source, "detail": _plain(exc)})
            finally:
                self._keys_fetched = self._clock()


@functools.lru_cache(maxsize=PRINCIPALS_KEPT)
def _named(name: str) -> Principal:
    """A principal by name; names carry their method, so a JWT subject never equals a token's name."""
    return Principal(name, name, principal_tag(name))


def _token(headers: Mapping[str, str]) -> str | None:
    return _bearer(headers.get("Authorization")) or headers.get(API_KEY_HEADER)


def _bearer(value: str | None) -> str | None:
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def _plain(exc: BaseException) -> str:
    """An exception as a short, quote-free phrase for a challenge or a log line."""
    return (str(exc) or type(exc).__name__).replace('"', "'")[:200]
