"""The Redis store: membership and fenced ownership shared by many gateways and nodes.

Key layout. Hash tags keep the keys one script touches in one slot, so the layout suits Redis
Cluster; the client here connects to one Redis (a primary, or a proxy in front of a cluster):

    {tether}:members      ZSET    node_id -> lease deadline, ms on the Redis clock
    {tether}:nodes        HASH    node_id -> NodeRecord as JSON
    {tether}:generation   STRING  membership generation; INCR'd on every change
    {tether}:lapsed       ZSET    incarnations whose lease lapsed or that left -> when (kept an hour)
    {tether}:gone         SET     NodeRecord JSONs of incarnations that lapsed or left whose records
                                  the janitor has still to remove (it survives a janitor that dies)
    {tether}:instance     STRING  "ID:BORN_MS", set when this data set was born; a new ID means Redis
                                  lost its data (a restart without persistence): gateways then wait a
                                  TTL for nodes to re-register and re-assert before calling sessions gone
    tether:{KEY}:owner    HASH    node, incarnation, epoch, principal (no TTL: removed by release or the janitor)
    tether:{KEY}:epoch    STRING  only ever INCR'd, never given a TTL; removed with the owner on release,
                                  except for named sessions (key-affinity), whose epochs outlive them
    tether:{NODE}:owned   SET     keys granted to a node: the janitor's index
    tether:{p:PRINCIPAL}:keys SET keys granted under a principal's session quota; a member whose owner
                                  record is gone (released, or swept by the janitor) is dropped when the
                                  quota is next counted. The count reads owner keys of other slots: with
                                  a quota, use one Redis, not a Cluster
    channel tether:membership     the new generation, published on every change

Every write that decides ownership or membership is a Lua script that compares
the owner's node, incarnation and epoch, so a node that lost its lease (paused,
partitioned) can neither renew it, nor release what another node now owns.
Lease deadlines are taken on the Redis clock (TIME) inside the scripts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable
from typing import TypeVar

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from actors.ids import is_named
from actors.store.base import Membership, NodeRecord, OwnershipRecord, Quota, quota_exceeded
from tether.errors import LeaseLost, OwnershipConflict, StoreError
from tether.tasks import TaskSet

log = logging.getLogger("tether.store")

MEMBERS = "{tether}:members"
NODES = "{tether}:nodes"
GENERATION = "{tether}:generation"
LAPSED = "{tether}:lapsed"
INSTANCE = "{tether}:instance"
GONE = "{tether}:gone"
JANITOR_BUDGET = 0.5  # seconds of janitor work per membership read; the rest waits in {tether}:gone
CHANNEL = "tether:membership"

_NOW_MS = "local t = redis.call('TIME'); local now = t[1] * 1000 + math.floor(t[2] / 1000)\n"

# KEYS[1] members, KEYS[2] nodes, KEYS[3] generation, KEYS[4] lapsed, KEYS[5] gone
# ARGV[1] node_id, ARGV[2] NodeRecord JSON, ARGV[3] ttl in ms, ARGV[4] channel
# Adds or renews a node's lease. Refuses (TETHER_ID_IN_USE) while another live incarnation holds
# the id, and (TETHER_LEASE_LOST) a renewal by an incarnation whose lease already lapsed, swept or
# not: that node must fence itself and come back as a new incarnation. Returns {generation, known}:
# known is 1 when this renewed an existing registration, 0 when it created one (a new node, or
# a Redis that lost its data: the node then re-asserts what it owns).
HEARTBEAT = _NOW_MS + """
local record = cjson.decode(ARGV[2])
if record['incarnation'] ~= '' and redis.call('ZSCORE', KEYS[4], record['incarnation']) then
  return redis.error_reply('TETHER_LEASE_LOST')
end
local deadline = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]))
local prev = redis.call('HGET', KEYS[2], ARGV[1])
local changed = true
if prev then
  local p = cjson.decode(prev)
  if deadline and deadline > now then
    if p['incarnation'] ~= record['incarnation'] then return redis.error_reply('TETHER_ID_IN_USE') end
    changed = p['accepting'] ~= record['accepting'] or p['url'] ~= record['url']
  elseif p['incarnation'] == record['incarnation'] then
    return redis.error_reply('TETHER_LEASE_LOST')
  else
    -- a lapsed incarnation nobody swept yet: retire it, and leave its records to the janitor
    redis.call('ZADD', KEYS[4], now, p['incarnation'])
    redis.call('SADD', KEYS[5], prev)
  end
end
local known = 0
if prev and deadline and deadline > now then known = 1 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
if changed then
  local g = redis.call('INCR', KEYS[3])
  redis.call('PUBLISH', ARGV[4], g)
  return {g, known}
end
return {tonumber(redis.call('GET', KEYS[3]) or '0'), known}
"""

# KEYS[1] members, KEYS[2] nodes, KEYS[3] generation, KEYS[4] lapsed, KEYS[5] instance, KEYS[6] gone
# ARGV[1] channel, ARGV[2] a fresh random id, used if this data set has none yet
# Sweeps nodes whose lease lapsed (bumping the generation, remembering their incarnation as lapsed,
# queueing their records for the janitor), then returns {generation, live NodeRecord JSONs,
# NodeRecord JSONs the janitor still has to clean after, instance id, age of the data set in ms}.
MEMBERSHIP = _NOW_MS + """
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, id in ipairs(expired) do
  local rec = redis.call('HGET', KEYS[2], id)
  if rec then
    redis.call('ZADD', KEYS[4], now, cjson.decode(rec)['incarnation'])
    redis.call('SADD', KEYS[6], rec)
  end
  redis.call('HDEL', KEYS[2], id)
end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - 3600000)
if #expired > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  local g = redis.call('INCR', KEYS[3])
  redis.call('PUBLISH', ARGV[1], g)
end
local instance = redis.call('GET', KEYS[5])
if not instance then
  instance = ARGV[2] .. ':' .. now
  redis.call('SET', KEYS[5], instance)
end
local id, born = string.match(instance, '^(.*):(%d+)$')
return {tonumber(redis.call('GET', KEYS[3]) or '0'), redis.call('HVALS', KEYS[2]), redis.call('SMEMBERS', KEYS[6]),
        id, now - tonumber(born)}
"""

# KEYS[1] members, KEYS[2] nodes, KEYS[3] generation, KEYS[4] lapsed, KEYS[5] gone
# ARGV[1] node_id, ARGV[2] incarnation, ARGV[3] channel
# Removes a node at once, if it is still this incarnation (which never comes back), and queues its
# records for the janitor. Returns 1 if it was.
LEAVE = _NOW_MS + """
local prev = redis.call('HGET', KEYS[2], ARGV[1])
if prev and cjson.decode(prev)['incarnation'] == ARGV[2] then
  if ARGV[2] ~= '' then redis.call('ZADD', KEYS[4], now, ARGV[2]) end
  redis.call('SADD', KEYS[5], prev)
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('PUBLISH', ARGV[3], redis.call('INCR', KEYS[3]))
  return 1
end
return 0
"""

# KEYS[1] owner, KEYS[2] epoch, KEYS[3] the principal's quota set (only with a quota, so that a grant
# without one touches a single hash slot)
# ARGV[1] node, ARGV[2] incarnation, ARGV[3] node and ARGV[4] incarnation of a dead owner it may replace,
# ARGV[5] the key, ARGV[6] the principal's limit (0: no quota), ARGV[7] the principal ('' for none)
# Grants the key with the next epoch unless someone else holds it (TETHER_OWNED) or the principal holds
# its limit of live keys (TETHER_QUOTA). Returns the epoch.
GRANT = """
local cur = redis.call('HMGET', KEYS[1], 'node', 'incarnation')
if cur[1] and not (cur[1] == ARGV[3] and cur[2] == ARGV[4]) then
  return redis.error_reply('TETHER_OWNED')
end
local limit = tonumber(ARGV[6])
if limit > 0 then
  local live = 0
  for _, k in ipairs(redis.call('SMEMBERS', KEYS[3])) do
    if k ~= ARGV[5] and redis.call('HGET', 'tether:{' .. k .. '}:owner', 'principal') == ARGV[7] then
      live = live + 1
    else
      redis.call('SREM', KEYS[3], k)
    end
  end
  if live >= limit then return redis.error_reply('TETHER_QUOTA') end
  redis.call('SADD', KEYS[3], ARGV[5])
end
local epoch = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], 'node', ARGV[1], 'incarnation', ARGV[2], 'epoch', epoch, 'principal', ARGV[7])
return epoch
"""

# KEYS[1] owner, KEYS[2] epoch; ARGV[1] node, ARGV[2] incarnation, ARGV[3] epoch ('' = any epoch),
# ARGV[4] '1' to keep the epoch key (a named session may be activated again: its epochs keep growing)
# Deletes the record if this owner still holds it (at this epoch). Returns 1 if it did.
RELEASE = """
local cur = redis.call('HMGET', KEYS[1], 'node', 'incarnation', 'epoch')
if cur[1] == ARGV[1] and cur[2] == ARGV[2] and (ARGV[3] == '' or cur[3] == ARGV[3]) then
  redis.call('DEL', KEYS[1])
  if ARGV[4] ~= '1' then redis.call('DEL', KEYS[2]) end
  return 1
end
return 0
"""

# KEYS[1] owner, KEYS[2] epoch; ARGV[1] node, ARGV[2] incarnation, ARGV[3] epoch, ARGV[4] principal
# Puts back a record Redis lost (a restart without persistence), keeping its epoch and never letting
# the epoch key go back. Returns 1 if the record is (now) this owner's, 0 if someone else holds it.
REASSERT = """
local cur = redis.call('HMGET', KEYS[1], 'node', 'incarnation')
if cur[1] then
  if cur[1] == ARGV[1] and cur[2] == ARGV[2] then return 1 end
  return 0
end
if tonumber(redis.call('GET', KEYS[2]) or '0') < tonumber(ARGV[3]) then redis.call('SET', KEYS[2], ARGV[3]) end
redis.call('HSET', KEYS[1], 'node', ARGV[1], 'incarnation', ARGV[2], 'epoch', ARGV[3], 'principal', ARGV[4])
return 1
"""

T = TypeVar("T")


def _keep(key: str) -> str:
    return "1" if is_named(key) else "0"


def owner_key(key: str) -> str:
    return f"tether:{{{key}}}:owner"


def epoch_key(key: str) -> str:
    return f"tether:{{{key}}}:epoch"


def owned_key(node_id: str) -> str:
    return f"tether:{{{node_id}}}:owned"


def quota_key(principal: str) -> str:
    return f"tether:{{p:{principal}}}:keys"


class RedisStore:
    """`Store` on Redis (or Redis Cluster): many gateways and nodes, one view."""

    def __init__(self, url: str, *, timeout: float = 2.0) -> None:
        self.url = url
        self._redis = aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                              decode_responses=True, health_check_interval=10)
        self._heartbeat = self._redis.register_script(HEARTBEAT)
        self._membership = self._redis.register_script(MEMBERSHIP)
        self._leave = self._redis.register_script(LEAVE)
        self._grant = self._redis.register_script(GRANT)
        self._release = self._redis.register_script(RELEASE)
        self._reassert = self._redis.register_script(REASSERT)
        self._tasks = TaskSet("redis-store")
        self._listener: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._members: dict[str, NodeRecord] = {}  # last membership seen, to judge owners in grant()

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r})"

    async def _call(self, what: str, op: Awaitable[T]) -> T:
        try:
            return await op
        except ResponseError as exc:
            text = str(exc)
            if "TETHER_OWNED" in text:
                raise OwnershipConflict(f"Cannot {what}: another live node owns it") from exc
            if "TETHER_LEASE_LOST" in text or "TETHER_ID_IN_USE" in text:
                raise LeaseLost(f"Cannot {what}: {text}") from exc
            raise StoreError(f"Cannot {what} in Redis: {exc}") from exc
        except (RedisError, OSError) as exc:
            raise StoreError(f"Cannot {what}: Redis at {self.url} is unreachable ({exc!r})") from exc

    async def heartbeat(self, node: NodeRecord, ttl: float) -> bool:
        args: list[str | int] = [node.node_id, orjson.dumps(node.to_dict()).decode(), int(ttl * 1000), CHANNEL]
        _, known = await self._call(f"renew the lease of {node.node_id}",
                                    self._heartbeat(keys=[MEMBERS, NODES, GENERATION, LAPSED, GONE], args=args))
        return bool(known)

    async def leave(self, node_id: str, incarnation: str = "") -> None:
        record = self._members.get(node_id)
        incarnation = incarnation or (record.incarnation if record else "")
        await self._call(f"remove {node_id}", self._leave(keys=[MEMBERS, NODES, GENERATION, LAPSED, GONE],
                                                           args=[node_id, incarnation, CHANNEL]))
        await self.membership()  # its records go now, not at some later read

    async def membership(self) -> Membership:
        generation, live, gone, instance, age_ms = await self._call("read membership", self._membership(
            keys=[MEMBERS, NODES, GENERATION, LAPSED, INSTANCE, GONE], args=[CHANNEL, secrets.token_hex(8)]))
        nodes = sorted((NodeRecord.from_dict(orjson.loads(raw)) for raw in live), key=lambda n: n.node_id)
        self._members = {n.node_id: n for n in nodes}
        if gone:
            with contextlib.suppress(TimeoutError, StoreError):  # what is left waits in {tether}:gone
                async with asyncio.timeout(JANITOR_BUDGET):
                    for raw in gone:
                        await self._clean_up_after(NodeRecord.from_dict(orjson.loads(raw)))
                        await self._call("finish a sweep", self._redis.srem(GONE, raw))
        return Membership(int(generation), tuple(nodes), str(instance), int(age_ms) / 1000)

    async def _clean_up_after(self, gone: NodeRecord) -> None:
        """The janitor: drop every record a lapsed or departed incarnation of a node still holds."""
        index = owned_key(gone.node_id)
        keys = await self._call(f"list what {gone.node_id} owned", self._redis.smembers(index))
        for key in map(str, keys):
            await self._call("release an orphaned record", self._release(
                keys=[owner_key(key), epoch_key(key)], args=[gone.node_id, gone.incarnation, "", _keep(key)]))
            if await self.lookup(key) is None:
                await self._call("unindex a record", self._redis.srem(index, key))
        log.info("store.swept", extra={"node": gone.node_id, "incarnation": gone.incarnation, "count": len(keys)})

    async def grant(self, key: str, node_id: str, incarnation: str = "",
                    quota: Quota | None = None) -> OwnershipRecord:
        current = await self.lookup(key)
        replace = ("", "")
        if current is not None:  # rare (named keys, or a dead owner's leftovers): read who lives now
            holder = (await self.membership()).by_id().get(current.node_id)
            if holder is not None and holder.incarnation == current.incarnation:
                raise OwnershipConflict(f"Cannot grant {key[:8]}... to {node_id}: {current.node_id} owns it")
            replace = (current.node_id, current.incarnation)  # a dead owner: fenced out by the new epoch
        await self._call("index a grant", self._redis.sadd(owned_key(node_id), key))
        principal, limit = (quota.principal, quota.limit) if quota else ("", 0)
        keys = [owner_key(key), epoch_key(key), *([quota_key(principal)] if quota else [])]
        try:
            epoch = await self._call(f"grant {key[:8]}...", self._grant(
                keys=keys, args=[node_id, incarnation, *replace, key, limit, principal]))
        except StoreError as exc:
            with contextlib.suppress(StoreError):  # a refused grant leaves no index entry behind
                await self._call("unindex a refused grant", self._redis.srem(owned_key(node_id), key))
            if quota is not None and "TETHER_QUOTA" in exc.message:
                raise quota_exceeded(quota) from exc
            raise
        return OwnershipRecord(key, node_id, int(epoch), incarnation, principal)

    async def reassert(self, record: OwnershipRecord) -> bool:
        held = await self._call(f"re-assert {record.key[:8]}...", self._reassert(
            keys=[owner_key(record.key), epoch_key(record.key)],
            args=[record.node_id, record.incarnation, record.epoch, record.principal]))
        if held:
            await self._call("index a re-assert", self._redis.sadd(owned_key(record.node_id), record.key))
            if record.principal:
                await self._call("recount a re-assert", self._redis.sadd(quota_key(record.principal), record.key))
        return bool(held)

    async def lookup(self, key: str) -> OwnershipRecord | None:
        node, incarnation, epoch, principal = await self._call("look up an owner", self._redis.hmget(
            owner_key(key), ["node", "incarnation", "epoch", "principal"]))
        if node is None or epoch is None:
            return None
        return OwnershipRecord(key, str(node), int(epoch), str(incarnation or ""), str(principal or ""))

    async def release(self, record: OwnershipRecord) -> bool:
        released = await self._call(f"release {record.key[:8]}...", self._release(
            keys=[owner_key(record.key), epoch_key(record.key)],
            args=[record.node_id, record.incarnation, str(record.epoch), _keep(record.key)]))
        await self._call("unindex a release", self._redis.srem(owned_key(record.node_id), record.key))
        if record.principal and released:
            await self._call("uncount a release", self._redis.srem(quota_key(record.principal), record.key))
        return bool(released)

    async def wait_for_change(self, timeout: float) -> None:
        """Return when membership may have changed (a published generation), or after `timeout`.

        A listener task reads the channel and only sets an Event, so this wait is
        plain asyncio and always cancellable (redis-py's get_message(timeout) can
        swallow a cancellation).
        """
        if self._listener is None or self._listener.done():
            self._listener = self._tasks.spawn(self._listen(), "membership-listener")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._changed.wait()
        self._changed.clear()

    async def _listen(self) -> None:
        while not self._tasks.closing:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANNEL)
                async for _ in pubsub.listen():
                    self._changed.set()
            except (RedisError, OSError):
                self._changed.set()  # the caller re-reads; the periodic re-read covers the gap
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(1.0)  # Redis is away: try again, without spinning

    async def close(self) -> None:
        await self._tasks.close(timeout=2.0)
        await self._redis.aclose()
