"""Configuration: one TOML file, then `TETHER_*` environment variables, then flags.

Every setting is declared once in `SETTINGS`; the same name is the TOML key, the
flag (`--idle-timeout`) and the variable (`TETHER_IDLE_TIMEOUT`). Values are
checked where they are read, and a bad one raises `ConfigError` naming the key,
the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tether.errors import ConfigError

Kind = type[int] | type[float] | type[str] | type[bool] | type[list[str]]


@dataclass(frozen=True)
class Setting:
    name: str
    kind: Kind
    help: str
    commands: frozenset[str]
    minimum: float | None = None
    choices: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "TETHER_" + self.name.upper()


UP, GW, NODE = "up", "gateway", "node"
AUTH_METHODS = ("token", "jwt")
ALL = frozenset({UP, GW, NODE})
EDGE = frozenset({UP, GW})
ACTOR = frozenset({UP, NODE})


def _s(name: str, kind: Kind, help: str, commands: frozenset[str], **kw: Any) -> Setting:
    return Setting(name, kind, help, commands, **kw)


SETTINGS: tuple[Setting, ...] = (
    _s("host", str, "address to listen on (the gateway, or the node for `tether node`)", ALL),
    _s("port", int, "port to listen on; 0 picks a free one", ALL, minimum=0),
    _s("nodes", int, "actor node processes that `tether up` starts", frozenset({UP}), minimum=1),
    _s("upstream_command", str, "stdio MCP server to start per session (default: the bundled demo)", ACTOR),
    _s("upstream_url", str, "URL of a stateful MCP server (Streamable HTTP or HTTP+SSE) that every session "
       "opens its own session on, in place of upstream_command; empty: use the command", ACTOR),
    _s("upstream_transport", str, "how to speak to upstream_url: streamable_http, sse (2024-11-05), or auto "
       "(sse when the path ends in /sse)", ACTOR, choices=("auto", "streamable_http", "sse")),
    _s("idle_timeout", float, "seconds without client activity before a session is ended", ACTOR,
       minimum=0.05),
    _s("scan_interval", float, "how late, at most, a node ends a session after its idle timeout (the step of "
       "its idle checks)", ACTOR, minimum=0.01),
    _s("keepalive_interval", float, "seconds between keep-alive comments on an idle SSE stream", ALL,
       minimum=0.01),
    _s("upstream_start_timeout", float, "seconds an upstream may take to start and answer initialize",
       ACTOR, minimum=0.1),
    _s("upstream_request_timeout", float, "seconds an upstream may take to answer one request", ACTOR,
       minimum=0.1),
    _s("kill_grace", float, "seconds between SIGTERM and SIGKILL when ending an upstream", ACTOR,
       minimum=0.0),
    _s("max_sessions", int, "sessions one node holds before it declines new ones", ACTOR, minimum=1),
    _s("max_starting", int, "most upstream processes a node starts at once (from spawn to the initialize "
       "answer); it starts one at a time, more while starts keep the pace of the quickest recent one and "
       "others wait, fewer when they slow down; more new sessions wait for a turn, up to "
       "upstream_start_timeout, then the node declines them", ACTOR, minimum=1),
    _s("max_sessions_per_principal", int, "live sessions one principal (or, without auth, one client "
       "address) may hold across all nodes (else 429); 0: no limit", ACTOR, minimum=0),
    _s("upstream_max_memory", int, "address-space limit of each upstream process, in bytes; 0: none", ACTOR,
       minimum=0),
    _s("upstream_max_cpu", int, "CPU seconds each upstream process may use before it is killed; 0: none",
       ACTOR, minimum=0),
    _s("upstream_max_files", int, "open files each upstream process may hold; 0: inherit the node's limit",
       ACTOR, minimum=0),
    _s("upstream_workdir", str, "directory under which each upstream process gets its own working "
       "directory, removed when its session ends (default: the system temp directory)", ACTOR),
    _s("upstream_env", list, "variables an upstream process gets beyond the built-in allowlist: NAME "
       "(passed through from the node) or NAME=VALUE", ACTOR),
    _s("mailbox_depth", int, "client messages queued per session before 503", ACTOR, minimum=1),
    _s("event_log_size", int, "server messages kept per session (all its streams together) for replay "
       "with Last-Event-ID; an older cursor gets 410", ACTOR, minimum=1),
    _s("stream_retry", float, "reconnect delay suggested to clients in the SSE retry field, in seconds", ACTOR,
       minimum=0.0),
    _s("max_message_bytes", int, "largest JSON-RPC message an upstream may send, in bytes", ACTOR,
       minimum=1024),
    _s("max_body_bytes", int, "largest request body the gateway accepts, in bytes (else 413)", EDGE,
       minimum=64),
    _s("max_header_bytes", int, "longest request line or header line the gateway reads, in bytes (else 400); "
       "at most 128 headers", EDGE, minimum=256),
    _s("max_json_depth", int, "deepest nesting of arrays and objects a client message may have (else 400)",
       ALL, minimum=4),
    _s("client_header_timeout", float, "seconds a client may take to send a request's line and headers; "
       "also how long an idle keep-alive connection stays open", EDGE, minimum=0.1),
    _s("client_body_timeout", float, "seconds a client may take to send a request body (else 408)", EDGE,
       minimum=0.1),
    _s("client_write_timeout", float, "seconds a stream may wait for a client that does not read before "
       "the gateway closes it (what it missed waits in the event log)", EDGE, minimum=0.1),
    _s("stream_buffer_bytes", int, "bytes of a stream the gateway holds for a client that reads slower "
       "than its events come, before it closes the stream (what it missed waits in the event log)", EDGE,
       minimum=4096),
    _s("link_connections", int, "link connections (TCP) a gateway keeps to each node; every client request "
       "and stream shares them", EDGE, minimum=1),
    _s("auth", list, "how clients prove who they are: token (bearer tokens or API keys from "
       "auth_tokens_file), jwt (JWTs checked against jwt_jwks), or both; empty: no authentication", EDGE),
    _s("auth_tokens_file", str, "file of 'PRINCIPAL sha256:HEX' lines, the SHA-256 of each token "
       "(`tether token NAME` makes one)", EDGE),
    _s("jwt_jwks", str, "JWKS that signs accepted JWTs: a file path or an https:// URL (re-read every "
       "5 minutes, and when a token names an unknown key)", EDGE),
    _s("jwt_issuer", str, "iss every accepted JWT must carry (required with auth=jwt); also announced in "
       "/.well-known/oauth-protected-resource", EDGE),
    _s("jwt_audience", str, "aud every accepted JWT must carry (required with auth=jwt): this gateway's "
       "resource identifier", EDGE),
    _s("jwt_algorithms", list, "signature algorithms accepted on JWTs", EDGE),
    _s("jwt_principal_claim", str, "JWT claim that names the principal", EDGE),
    _s("rate_limit", float, "requests per second one principal may make through one gateway (token bucket, "
       "else 429); 0: no limit", EDGE, minimum=0.0),
    _s("rate_burst", int, "requests one principal may make at once before rate_limit applies", EDGE,
       minimum=1),
    _s("session_id_key", str, "secret that HMAC-tags minted session ids, so that forged ids are refused "
       "without a store lookup; every gateway needs the same one; empty: untagged ids", EDGE),
    _s("allowed_origins", list, "Origin values allowed to call the gateway (else 403); '*' allows any",
       EDGE),
    _s("response_mode", str, "answer POSTs as 'sse' or 'json' when the client accepts both; 'auto': JSON when "
       "the answer is ready with nothing before it, an SSE stream when the server sends anything first or "
       "is still working at the first keep-alive", EDGE, choices=("auto", "sse", "json")),
    _s("affinity_key", str, "key-affinity mode: name sessions by header:NAME, cookie:NAME, query:NAME or "
       "json:/POINTER; requests with the same name share one session; empty: off", EDGE),
    _s("route_cache_size", int, "session routes a gateway caches", EDGE, minimum=1),
    _s("membership_refresh", float, "seconds between a gateway's reads of ring membership", EDGE,
       minimum=0.01),
    _s("heartbeat_ttl", float, "seconds a node's membership lives without a heartbeat", ALL,
       minimum=0.3),
    _s("redis", str, "Redis URL for the distributed form (redis://HOST:PORT/DB); empty: the memory store",
       ALL),
    _s("drain_timeout", float, "seconds a draining node keeps serving its sessions before it ends them",
       ACTOR, minimum=0.0),
    _s("exit_when_drained", bool, "exit as soon as a drain (SIGTERM or POST /admin/drain) is done; false: "
       "stay up, not ready, until SIGTERM, so a preStop hook that drains the node ends before the process",
       frozenset({NODE})),
    _s("store", str, "where membership and ownership live: 'memory' (embedded, in the gateway) "
       "or the gateway's store URL for a separate node", ALL),
    _s("advertise", str, "URL gateways use to reach this node (default http://HOST:PORT)",
       frozenset({NODE})),
    _s("node_id", str, "stable identity of this node on the ring (default: node-HOST-PORT)",
       frozenset({NODE})),
    _s("internal_secret", str, "shared secret on every gateway-to-node and node-to-store call", ALL),
    _s("log_level", str, "debug, info, warning or error", ALL,
       choices=("debug", "info", "warning", "error")),
)
BY_NAME: Mapping[str, Setting] = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class Config:
    """Validated settings of one Tether process. Times are seconds, sizes bytes."""

    host: str = "127.0.0.1"
    port: int = 8080
    nodes: int = 2
    upstream_command: str = ""
    upstream_url: str = ""
    upstream_transport: str = "auto"
    idle_timeout: float = 600.0
    scan_interval: float = 5.0
    keepalive_interval: float = 15.0
    upstream_start_timeout: float = 30.0
    upstream_request_timeout: float = 300.0
    kill_grace: float = 3.0
    max_sessions: int = 1000
    max_sessions_per_principal: int = 0
    max_starting: int = 8
    upstream_max_memory: int = 0
    upstream_max_cpu: int = 0
    upstream_max_files: int = 0
    upstream_workdir: str = ""
    upstream_env: tuple[str, ...] = ()
    mailbox_depth: int = 64
    event_log_size: int = 1000
    stream_retry: float = 1.0
    max_message_bytes: int = 16 * 1024 * 1024
    max_body_bytes: int = 4 * 1024 * 1024
    max_header_bytes: int = 8190
    max_json_depth: int = 64
    client_header_timeout: float = 30.0
    client_body_timeout: float = 30.0
    client_write_timeout: float = 30.0
    stream_buffer_bytes: int = 1024 * 1024
    link_connections: int = 2
    auth: tuple[str, ...] = ()
    auth_tokens_file: str = ""
    jwt_jwks: str = ""
    jwt_issuer: str = ""
    jwt_audience: str = ""
    jwt_algorithms: tuple[str, ...] = ("RS256", "ES256", "PS256", "EdDSA")
    jwt_principal_claim: str = "sub"
    rate_limit: float = 0.0
    rate_burst: int = 50
    session_id_key: str = ""
    allowed_origins: tuple[str, ...] = field(
        default=("http://localhost", "http://127.0.0.1", "http://[::1]",
                 "https://localhost", "https://127.0.0.1", "https://[::1]"))
    response_mode: str = "auto"
    affinity_key: str = ""
    route_cache_size: int = 100_000
    membership_refresh: float = 0.5
    heartbeat_ttl: float = 10.0
    redis: str = ""
    drain_timeout: float = 300.0
    exit_when_drained: bool = True
    store: str = "memory"
    advertise: str = ""
    node_id: str = ""
    internal_secret: str = ""
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.affinity_key:
            from gateway.rules import AffinitySource  # the one parser of the spec

            try:
                AffinitySource.parse(self.affinity_key)
            except ValueError as exc:
                raise ConfigError(f"Cannot use affinity_key: {exc}") from exc
        if self.upstream_url and not self.upstream_url.startswith(("http://", "https://")):
            raise ConfigError(f"Cannot use upstream_url: got {self.upstream_url!r}, expected an http:// or "
                              "https:// URL")
        if unknown := set(self.auth) - set(AUTH_METHODS):
            raise ConfigError(f"Cannot use auth: got {', '.join(sorted(unknown))!r}, expected token, jwt or both")
        if "token" in self.auth and not self.auth_tokens_file:
            raise ConfigError("Cannot use auth=token without auth_tokens_file: it names who may call")
        if "jwt" in self.auth and not (self.jwt_jwks and self.jwt_issuer and self.jwt_audience):
            raise ConfigError("Cannot use auth=jwt without jwt_jwks, jwt_issuer and jwt_audience: the signing "
                              "keys, and the issuer and audience a token must name (a token for another "
                              "service must not work here)")
        if weak := [a for a in self.jwt_algorithms if a.lower() == "none" or a.upper().startswith("HS")]:
            raise ConfigError(f"Cannot use jwt_algorithms {', '.join(weak)}: only public-key signatures "
                              "are accepted")
        for entry in self.upstream_env:
            if not entry.partition("=")[0].isidentifier():
                raise ConfigError(f"Cannot use upstream_env entry {entry!r}: expected NAME or NAME=VALUE")
        try:
            shlex.split(self.upstream_command)
        except ValueError as exc:
            raise ConfigError(f"Cannot use upstream_command: got {self.upstream_command!r}, "
                              f"expected a shell-quoted command line ({exc})") from exc

    def upstream_command_argv(self) -> list[str]:
        return shlex.split(self.upstream_command)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


def parse_value(setting: Setting, raw: object, source: str) -> object:
    """Turn a raw TOML, environment or flag value into the setting's type, or raise ConfigError."""
    where = f"{setting.name} (from {source})"
    try:
        value = _COERCE[setting.kind](raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"Cannot read {where}: got {raw!r}, expected {_EXPECTED[setting.kind]}") from exc
    if setting.minimum is not None and isinstance(value, int | float) and value < setting.minimum:
        raise ConfigError(f"Cannot use {where}: got {raw!r}, expected a value >= {setting.minimum:g}")
    if setting.choices and value not in setting.choices:
        raise ConfigError(f"Cannot use {where}: got {raw!r}, expected one of {', '.join(setting.choices)}")
    if isinstance(value, list):
        return tuple(value)
    return value


def _to_bool(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def _to_int(raw: object) -> int:
    if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
        raise ValueError(raw)
    return int(str(raw).strip()) if isinstance(raw, str) else int(raw)  # type: ignore[call-overload]


def _to_float(raw: object) -> float:
    if isinstance(raw, bool):
        raise ValueError(raw)
    value = float(str(raw).strip()) if isinstance(raw, str) else float(raw)  # type: ignore[arg-type]
    if not math.isfinite(value):
        raise ValueError(raw)
    return value


def _to_str(raw: object) -> str:
    if not isinstance(raw, str):
        raise TypeError(raw)
    return raw


def _to_list(raw: object) -> list[str]:
    if isinstance(raw, str):
        return [part.strip() for part in raw.split(",") if part.strip()]
    if isinstance(raw, list | tuple) and all(isinstance(item, str) for item in raw):
        return list(raw)
    raise TypeError(raw)


_COERCE: Mapping[Kind, Callable[[object], object]] = {
    int: _to_int, float: _to_float, str: _to_str, bool: _to_bool, list: _to_list,
}
_EXPECTED: Mapping[Kind, str] = {
    int: "a whole number", float: "a number of seconds", str: "a string", bool: "true or false",
    list: "a list of strings (comma-separated in flags and variables)",
}


def read_toml(path: Path) -> dict[str, object]:
    """Read a TOML config file; keys may sit at the top level or under [tether]."""
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"Cannot read config file {str(path)!r}: it does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"Cannot read config file {str(path)!r}: {exc}") from exc
    section = data.get("tether", data)
    if not isinstance(section, dict):
        raise ConfigError(f"Cannot read config file {str(path)!r}: [tether] must be a table")
    return section


def load(
    command: str,
    *,
    toml: Mapping[str, object] | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, object] | None = None,
    toml_source: str = "config file",
) -> Config:
    """Merge defaults, TOML, environment and flags (later wins) for one command."""
    values: dict[str, object] = {}
    for key, raw in (toml or {}).items():
        setting = BY_NAME.get(key)
        if setting is None:
            raise ConfigError(
                f"Cannot read {key} (from {toml_source}): no such setting; known: {', '.join(BY_NAME)}")
        values[key] = parse_value(setting, raw, toml_source)
    for setting in SETTINGS:
        if env and setting.env in env:
            values[setting.name] = parse_value(setting, env[setting.env], setting.env)
        if flags and flags.get(setting.name) is not None:
            values[setting.name] = parse_value(setting, flags[setting.name], setting.flag)
    if "port" not in values and command == NODE:
        values["port"] = 0
    return Config(**values)  # type: ignore[arg-type]
