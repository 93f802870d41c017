"""The embedded store over the internal link.

With the memory store, membership and ownership live in the gateway process;
node processes reach them here: `StoreLink` is a `Store` that calls
`store_routes`, which serve a `MemoryStore` (or any `Store`) behind the secret.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from actors.http import internal_refusal
from actors.http_client import HttpClient, HttpClientError
from actors.internal import SECRET_HEADER, STORE_PATH
from actors.store.base import QUOTA_RETRY, Membership, NodeRecord, OwnershipRecord, Quota, Store
from tether.errors import LeaseLost, OwnershipConflict, QuotaExceeded, StoreError

Op = Callable[[Store, dict[str, Any]], Awaitable[Any]]


async def _heartbeat(store: Store, body: dict[str, Any]) -> bool:
    return await store.heartbeat(NodeRecord.from_dict(body["node"]), float(body["ttl"]))


async def _leave(store: Store, body: dict[str, Any]) -> None:
    await store.leave(str(body["node_id"]), str(body.get("incarnation", "")))


async def _membership(store: Store, body: dict[str, Any]) -> dict[str, Any]:
    m = await store.membership()
    return {"generation": m.generation, "nodes": [n.to_dict() for n in m.nodes], "store_id": m.store_id,
            "store_age": m.store_age if math.isfinite(m.store_age) else None}  # JSON has no infinity


async def _grant(store: Store, body: dict[str, Any]) -> dict[str, Any]:
    quota = Quota(str(body["quota"]["principal"]), int(body["quota"]["limit"])) if body.get("quota") else None
    record = await store.grant(str(body["key"]), str(body["node_id"]), str(body.get("incarnation", "")), quota)
    return record.to_dict()


async def _lookup(store: Store, body: dict[str, Any]) -> dict[str, Any] | None:
    record = await store.lookup(str(body["key"]))
    return record.to_dict() if record else None


async def _release(store: Store, body: dict[str, Any]) -> bool:
    return await store.release(OwnershipRecord.from_dict(body["record"]))


async def _reassert(store: Store, body: dict[str, Any]) -> bool:
    return await store.reassert(OwnershipRecord.from_dict(body["record"]))


OPS: dict[str, Op] = {
    "heartbeat": _heartbeat, "leave": _leave, "membership": _membership,
    "grant": _grant, "lookup": _lookup, "release": _release, "reassert": _reassert,
}


def store_routes(store: Store, secret: str) -> list[web.RouteDef]:
    """aiohttp routes that serve `store` to nodes at `/_tether/store/{op}`."""

    async def handle(request: web.Request) -> web.Response:
        if refused := internal_refusal(request, secret, (STORE_PATH,)):
            return refused
        op = OPS.get(request.match_info["op"])
        if op is None:
            return web.json_response({"error": f"no store operation {request.match_info['op']!r}"},
                                     status=404)
        try:
            body = orjson.loads(await request.read())
            result = await op(store, body)
        except OwnershipConflict as exc:
            return web.json_response({"error": exc.message, "kind": "conflict"}, status=409)
        except LeaseLost as exc:
            return web.json_response({"error": exc.message, "kind": "lease_lost"}, status=409)
        except QuotaExceeded as exc:
            return web.json_response({"error": exc.message}, status=429)
        except (KeyError, TypeError, ValueError, orjson.JSONDecodeError) as exc:
            return web.json_response({"error": f"bad store request: {exc!r}"}, status=400)
        return web.Response(body=orjson.dumps({"result": result}), content_type="application/json")

    return [web.post(STORE_PATH + "/{op}", handle)]


STORE_CONNECTIONS = 100  # a node's connections for session grants and releases
# Calls that keep the node's lease: they get their own connections, so that a burst of session
# grants queued for the main pool can never make a node miss its renewal.
LEASE_OPS = frozenset({"heartbeat", "membership", "leave"})


class StoreLink:
    """A `Store` served by another process over the authenticated internal link.

    `timeout` bounds each call once it is on a connection: waiting for a free
    connection is not a failure. Under a burst of new sessions the grants
    queue here (the gateway bounds the whole create); lease calls never do.
    """

    def __init__(self, base_url: str, secret: str, timeout: float = 5.0) -> None:
        self._base = base_url.rstrip("/")
        self._headers = {SECRET_HEADER: secret, "Content-Type": "application/json"}
        self._timeout = timeout
        # By kind of call (lease or not): a client, and the calls it may have on connections at once.
        self._clients = {lease: HttpClient(connect_timeout=timeout) for lease in (False, True)}
        self._slots = {False: asyncio.Semaphore(STORE_CONNECTIONS), True: asyncio.Semaphore(2)}

    def __repr__(self) -> str:
        return f"StoreLink({self._base!r})"

    async def _call(self, op: str, body: dict[str, Any]) -> Any:
        lease = op in LEASE_OPS
        try:
            async with self._slots[lease]:
                async with await self._clients[lease].request(
                        "POST", f"{self._base}/{op}", body=orjson.dumps(body), headers=self._headers,
                        read_timeout=self._timeout) as resp:
                    payload = orjson.loads(await resp.read())
        except (HttpClientError, TimeoutError, orjson.JSONDecodeError) as exc:
            raise StoreError(f"Cannot reach the store at {self._base}: {exc!r}") from exc
        if resp.status == 409:
            error = LeaseLost if payload.get("kind") == "lease_lost" else OwnershipConflict
            raise error(payload.get("error", "conflict"))
        if resp.status == 429:
            raise QuotaExceeded(payload.get("error", "quota"), retry_after=QUOTA_RETRY, status=429)
        if resp.status != 200:
            raise StoreError(f"Cannot {op} at the store {self._base}: {resp.status} {payload.get('error')}")
        return payload["result"]

    async def heartbeat(self, node: NodeRecord, ttl: float) -> bool:
        return bool(await self._call("heartbeat", {"node": node.to_dict(), "ttl": ttl}))

    async def leave(self, node_id: str, incarnation: str = "") -> None:
        await self._call("leave", {"node_id": node_id, "incarnation": incarnation})

    async def membership(self) -> Membership:
        data = await self._call("membership", {})
        return Membership(int(data["generation"]), tuple(NodeRecord.from_dict(n) for n in data["nodes"]),
                          str(data.get("store_id", "")),
                          float("inf") if data.get("store_age") is None else float(data["store_age"]))

    async def grant(self, key: str, node_id: str, incarnation: str = "",
                    quota: Quota | None = None) -> OwnershipRecord:
        body = {"key": key, "node_id": node_id, "incarnation": incarnation,
                "quota": {"principal": quota.principal, "limit": quota.limit} if quota else None}
        return OwnershipRecord.from_dict(await self._call("grant", body))

    async def wait_for_change(self, timeout: float) -> None:
        await asyncio.sleep(timeout)  # nodes only read membership to renew it; polling is enough

    async def lookup(self, key: str) -> OwnershipRecord | None:
        data = await self._call("lookup", {"key": key})
        return OwnershipRecord.from_dict(data) if data else None

    async def release(self, record: OwnershipRecord) -> bool:
        return bool(await self._call("release", {"record": record.to_dict()}))

    async def reassert(self, record: OwnershipRecord) -> bool:
        return bool(await self._call("reassert", {"record": record.to_dict()}))

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
