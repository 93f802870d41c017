"""An actor node: a ring member that hosts many `SessionActor`s.

It creates actors when a gateway places a new session here, serves their
requests and streams over the internal link, heartbeats its membership, and
reaps idle sessions. `actors.server.serve_node` runs one until its context ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable

from actors.events import StreamLog
from actors.http_client import HttpClient
from actors.ids import is_named
from actors.lease import NodeLease
from actors.mcp import Message
from actors.metrics import NodeMetrics
from actors.session import JSON, ActorLimits, SessionActor
from actors.starts import StartGate
from actors.store.base import NodeRecord, OwnershipRecord, Quota, Store
from actors.upstream import ProcessLimits, StdioUpstream, Upstream, scrubbed_env
from actors.upstream_http import SseUpstream, StreamableHttpUpstream, transport_for
from actors.wheel import Wheel
from tether.config import Config
from tether.errors import (
    LeaseLost,
    Overloaded,
    SessionNotFound,
    StoreError,
    UpstreamError,
    UpstreamTimeout,
)
from tether.logs import sid_tag
from tether.tasks import TaskSet

log = logging.getLogger("tether.node")


class Declined(Overloaded):
    """This node takes no new sessions now; the gateway tries the next one on the ring."""


class Node:
    """The sessions one node owns, and the loops that keep them honest."""

    def __init__(self, config: Config, store: Store, node_id: str, argv: list[str],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.store = store
        self.node_id = node_id
        self.url = ""
        self.argv = argv
        self.clock = clock
        self.actors: dict[str, SessionActor] = {}
        self.metrics = NodeMetrics(node_id)
        self.draining = False
        self.limits = ActorLimits(config.idle_timeout, config.mailbox_depth, config.event_log_size,
                                  config.kill_grace, config.upstream_request_timeout, config.upstream_start_timeout)
        self.process_limits = ProcessLimits(config.upstream_max_memory, config.upstream_max_cpu,
                                            config.upstream_max_files)
        self.process_limits.check()
        self._http: HttpClient | None = None  # shared by every session's HTTP upstream
        self._tasks = TaskSet(f"node-{node_id}")  # session ends
        self._loops = TaskSet(f"node-{node_id}-loops")  # the heartbeat
        # Idle expiry: each session is looked at when its lease may have run out, within scan_interval.
        self._idle = Wheel(config.scan_interval, self._check_idle, clock)
        self._ending: dict[SessionActor, asyncio.Task[None]] = {}  # by actor: a name may live again
        self.incarnation = secrets.token_hex(8)  # replaced whenever the node fences itself
        self.lease = NodeLease(config.heartbeat_ttl)
        self._watchdog: asyncio.TimerHandle | None = None
        self._fencing = False
        self._joined = False  # this incarnation's registration was accepted at least once
        self._to_reassert: set[str] = set()  # sessions whose records a store reset lost
        self._emptied = asyncio.Event()  # set whenever the last session ends
        self.drained = asyncio.Event()
        self._starting = 0  # creates in flight, counted against max_sessions
        self._creating: dict[str, asyncio.Future[None]] = {}  # named sessions being created now
        self._idle_creates = asyncio.Event()
        # Upstream processes starting at once (spawn to initialize answer): a burst of new sessions
        # must not take the CPU from the node's own lease renewal, or the node ends all it holds.
        self._starts = StartGate(config.max_starting)
        self._idle_creates.set()

    def __repr__(self) -> str:
        return f"Node({self.node_id!r}, url={self.url!r}, sessions={len(self.actors)}, draining={self.draining})"

    def record(self) -> NodeRecord:
        return NodeRecord(self.node_id, self.url, accepting=not self.draining, sessions=len(self.actors),
                          incarnation=self.incarnation)

    def ready(self) -> bool:
        return self.lease.held(self.clock()) and not self.draining

    def check_lease(self) -> None:
        """Rule 1: serve nothing unless the lease is provably held. Raises `Overloaded` (503)."""
        if not self.lease.held(self.clock()):
            raise Overloaded(f"Service Unavailable: node {self.node_id} cannot prove it holds its lease",
                             retry_after=1.0)

    def live(self, sid: str, principal: str) -> SessionActor:
        """The actor of a live session here that `principal` created. Raises `SessionNotFound` (also for
        another principal's session, so that ids cannot be probed), or `Overloaded` without a lease."""
        if not self.clock() < self.lease.deadline:  # held: `check_lease`'s test, in place on every request
            self.check_lease()
        actor = self.actors.get(sid)
        if actor is None or actor.ended is not None or actor.principal != principal:
            raise SessionNotFound("Session not found")
        return actor

    # -- lifecycle of sessions ----------------------------------------------------

    async def create(self, sid: str, initialize: Message | None, *, principal: str = "",
                     quota: str = "") -> tuple[SessionActor | None, Message | None]:
        """Start a session for `principal`: grant ownership (counted against the `quota` key's
        sessions), start the upstream, forward `initialize` if given.

        Returns the actor (None if the upstream refused to initialize) and the
        upstream's answer (None without `initialize`: a WebSocket or HTTP+SSE
        client sends it later, on its channel). Raises `Declined` when full,
        `QuotaExceeded` when the principal holds all the sessions it may,
        `UpstreamError` or `UpstreamTimeout` when the upstream cannot start.
        """
        if is_named(sid):
            while (pending := self._creating.get(sid)) is not None:
                await asyncio.shield(pending)  # one activation at a time; the rest wait, then join it
            if initialize is not None and (attached := self._attach(sid, initialize, principal)) is not None:
                return attached
        if not self.lease.held(self.clock()):  # decline, so the gateway tries the next node
            self.metrics.sessions_declined.inc()
            raise Declined(f"Node {self.node_id} cannot prove it holds its lease")
        if self.draining or len(self.actors) + self._starting >= self.config.max_sessions:
            self.metrics.sessions_declined.inc()
            raise Declined(f"Node {self.node_id} is full ({len(self.actors)} sessions) or draining")
        # From here to the first await nothing yields: the slot and the name are taken atomically.
        self._starting += 1  # hold the slot across the awaits below, so parallel creates cannot overfill
        creating = asyncio.get_running_loop().create_future()
        self._creating[sid] = creating
        try:
            return await self._create(sid, initialize, principal, quota)
        finally:
            self._starting -= 1
            if not self._starting:
                self._idle_creates.set()
                if not self.actors:
                    self._emptied.set()  # a failed create must not keep a drain waiting
            if self._creating.get(sid) is creating:
                del self._creating[sid]
            creating.set_result(None)

    def _attach(self, sid: str, initialize: Message, principal: str) -> tuple[SessionActor, Message] | None:
        """A named session already live here: answer this initialize as the upstream answered the first."""
        actor = self.actors.get(sid)
        if actor is None or actor.ended is not None or actor.initialize_answer is None:
            return None
        if actor.principal != principal:  # names are per principal, so only a forged id gets here
            raise SessionNotFound("Session not found")
        self.check_lease()
        actor.lease.touch(self.clock())
        self.metrics.sessions_attached.inc()
        return actor, {**actor.initialize_answer, "id": initialize.get("id")}

    async def _start_upstream(self, sid: str) -> Upstream:
        config = self.config
        if config.upstream_url:
            if self._http is None:
                self._http = HttpClient()
            kind = SseUpstream if transport_for(config.upstream_url, config.upstream_transport) == "sse" \
                else StreamableHttpUpstream
            return kind(self._http, config.upstream_url, max_message_bytes=config.max_message_bytes,
                        request_timeout=config.upstream_request_timeout)
        env = scrubbed_env({"TETHER_NODE_ID": self.node_id, "TETHER_SESSION_TAG": sid_tag(sid)},
                           allow=config.upstream_env)
        return await StdioUpstream.start(self.argv, env=env, max_message_bytes=config.max_message_bytes,
                                         limits=self.process_limits, workdir_in=config.upstream_workdir,
                                         name=sid_tag(sid))

    async def _create(self, sid: str, initialize: Message | None, principal: str,
                      quota: str) -> tuple[SessionActor | None, Message | None]:
        self._idle_creates.clear()
        limit = self.config.max_sessions_per_principal
        record = await self.store.grant(sid, self.node_id, self.incarnation,
                                        quota=Quota(quota, limit) if limit and quota else None)
        if self.config.upstream_url:  # nothing to spawn: the upstream server is already running
            return await self._start(sid, record, initialize, principal)
        try:
            async with asyncio.timeout(self.config.upstream_start_timeout):
                await self._starts.acquire()
        except TimeoutError:
            await self.store.release(record)
            self.metrics.sessions_declined.inc()
            raise Declined(f"Node {self.node_id} is busy starting {self._starts.starting} upstreams") from None
        started = self.clock()
        took: float | None = None  # how long a start that answered initialize took: what the gate learns from
        try:
            actor, answer = await self._start(sid, record, initialize, principal)
            if actor is not None and answer is not None:
                took = self.clock() - started
            return actor, answer
        except UpstreamTimeout:  # the slowest start of all: it teaches the gate too
            took = self.clock() - started
            raise
        finally:
            self._starts.release(took)

    async def _start(self, sid: str, record: OwnershipRecord, initialize: Message | None,
                     principal: str) -> tuple[SessionActor | None, Message | None]:
        started = self.clock()
        try:
            upstream = await self._start_upstream(sid)
        except UpstreamError:
            await self.store.release(record)
            raise
        actor = SessionActor(sid, record, upstream, self.limits, on_exit=self._on_actor_exit,
                             on_dropped=self.metrics.events_dropped.inc, clock=self.clock)
        actor.principal = principal
        self.actors[sid] = actor
        self._idle.add(actor, actor.lease.last_activity + actor.lease.idle_timeout)
        self.metrics.sessions_active.inc()
        actor.start()
        log.info("session.started", extra={"node": self.node_id, "sid": actor.tag, "pid": upstream.pid,
                                           "epoch": record.epoch, "incarnation": record.incarnation,
                                           "detail": upstream.describe()})
        if initialize is None:
            self.metrics.sessions_started.inc()
            return actor, None
        stream = actor.submit([initialize], JSON)
        assert stream is not None
        actor.untimed(initialize["id"])  # the start's own timeout bounds it, below
        try:
            async with asyncio.timeout(self.config.upstream_start_timeout):
                answer = await _answer(actor, stream)
        except TimeoutError:
            await self.end(sid, "start_failed")
            raise UpstreamTimeout(f"Upstream did not answer initialize within "
                                  f"{self.config.upstream_start_timeout:g}s") from None
        if answer is None or actor.ended is not None:  # the server died before it answered
            await self.end(sid, "start_failed")
            raise UpstreamError(f"Upstream ({upstream.describe()}) ended before answering initialize; "
                                "the node log says why")
        if "error" in answer:  # the server answered, and refused
            await self.end(sid, "start_failed")
            return None, answer
        if is_named(sid):  # only a named session is joined by other clients, who get the same answer
            actor.initialize_answer = answer
        self.metrics.upstream_start_seconds.observe(self.clock() - started)
        self.metrics.sessions_started.inc()
        return actor, answer

    async def end(self, sid: str, reason: str) -> None:
        """End a session for `reason` and wait until it is gone. Safe to call twice."""
        actor = self.actors.get(sid)
        if actor is None:
            return
        await asyncio.shield(self._begin_end(actor, reason))

    def _begin_end(self, actor: SessionActor, reason: str) -> asyncio.Task[None]:
        """Mark the session ended now (its next request is 404) and start tearing it down once."""
        task = self._ending.get(actor)
        if task is None:
            actor.ended = actor.ended or reason
            task = self._tasks.spawn(self._end(actor, actor.ended), f"end-{actor.tag}")
            self._ending[actor] = task
        return task

    async def _end(self, actor: SessionActor, reason: str) -> None:
        try:
            await actor.end(reason)
        finally:
            self._idle.discard(actor)
            if self.actors.get(actor.sid) is actor:  # a named session may already live again
                del self.actors[actor.sid]
            self._ending.pop(actor, None)
            if not self.actors:
                self._emptied.set()
            self.metrics.sessions_active.dec()
            self.metrics.sessions_ended[reason].inc()
            try:
                await self.store.release(actor.record)
            except StoreError as exc:
                log.warning("store.release_failed", extra={"sid": actor.tag, "detail": exc.message})

    def _on_actor_exit(self, actor: SessionActor, reason: str) -> None:
        self._begin_end(actor, reason)

    async def end_all(self, reason: str) -> None:
        await asyncio.gather(*(self.end(sid, reason) for sid in list(self.actors)))

    # -- loops ---------------------------------------------------------------------

    async def heartbeat_loop(self) -> None:
        while not self._loops.closing:
            await self.renew()
            await asyncio.sleep(self.config.heartbeat_ttl / 3)

    async def renew(self) -> None:
        """Renew the membership lease once; fence the node if it is lost."""
        ttl = self.config.heartbeat_ttl
        if self.lease.deadline and not self.lease.held(self.clock()):
            await self.fence("the lease lapsed before it could be renewed")
        sent = self.clock()  # the lease counts from before the renewal was sent
        if self._loops.closing or self._fencing:
            return  # never renew while leaving or fencing
        record = self.record()
        try:
            async with asyncio.timeout(ttl / 2):  # a slow answer still counts while the lease lasts
                known = await self.store.heartbeat(record, ttl)
        except LeaseLost as lost:
            await self.fence(lost.message)
            return
        except (StoreError, TimeoutError) as exc:
            self.metrics.lease_renewals.labels(self.node_id, "failed").inc()
            log.warning("heartbeat.failed", extra={"node": self.node_id,
                                                   "detail": getattr(exc, "message", repr(exc))})
            return
        if self._fencing or record.incarnation != self.incarnation:
            return  # an answer that arrived after the node fenced itself proves nothing now
        self.lease.renewed(sent)
        self._arm_watchdog()
        self.metrics.lease_renewals.labels(self.node_id, "ok").inc()
        if self._joined and not known:  # the store forgot us while our lease held: it lost its data
            log.warning("store.forgot_us", extra={"node": self.node_id, "count": len(self.actors)})
            self._to_reassert.update(self.actors)
        self._joined = True
        if self._to_reassert:
            await self.reassert_pending(deadline=sent + ttl / 3)

    async def reassert_pending(self, deadline: float) -> None:
        """Put live sessions' records back in a store that lost them, until `deadline`; what is left
        is retried after the next renewal. A session someone else owns now is ended."""
        for sid in list(self._to_reassert):
            actor = self.actors.get(sid)
            if actor is None or actor.ended is not None:
                self._to_reassert.discard(sid)
                continue
            if self.clock() >= deadline:
                return
            try:
                async with asyncio.timeout(max(0.0, deadline - self.clock())):
                    held = await self.store.reassert(actor.record)
            except (StoreError, TimeoutError):
                return  # retried after the next renewal
            self._to_reassert.discard(sid)
            if not held:
                self._begin_end(actor, "owner_lost")
                log.error("session.owned_elsewhere", extra={"sid": actor.tag, "node": self.node_id})

    def _arm_watchdog(self) -> None:
        """Fence at the lease deadline unless a renewal moves it first: no serving on a lapsed lease."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        delay = max(0.0, self.lease.deadline - self.clock())
        self._watchdog = asyncio.get_running_loop().call_later(delay, self._on_watchdog)

    def _on_watchdog(self) -> None:
        if not self.lease.held(self.clock()):
            self._tasks.spawn(self.fence("no renewal reached the store before the lease deadline"), "fence")

    async def fence(self, reason: str) -> None:
        """Stop serving: end every session (owner_lost), then rejoin later as a new incarnation."""
        if self._fencing:
            return
        self._fencing = True
        try:
            self.lease.lose()
            self.metrics.lease_losses.inc()
            log.error("lease.lost", extra={"node": self.node_id, "detail": reason, "count": len(self.actors)})
            await self.end_all("owner_lost")
            self.incarnation = secrets.token_hex(8)  # the lapsed incarnation never comes back
            self._joined = False
        finally:
            self._fencing = False

    def _check_idle(self, actor: SessionActor, now: float) -> float | None:
        """End `actor` if it is idle at `now` (none that a client is waiting on); else when to look again.
        A session in use is looked at again an idle timeout later: its lease moves on when it is left."""
        lease = actor.lease
        if actor.ended is not None or self.actors.get(actor.sid) is not actor:
            return None
        if actor.busy:
            return now + lease.idle_timeout
        if lease.expired(now):
            self._begin_end(actor, "idle")  # marked before any request can slip in
            return None
        return lease.last_activity + lease.idle_timeout

    def start_loops(self) -> None:
        self._loops.spawn(self.heartbeat_loop(), "heartbeat")

    async def drain(self, timeout: float) -> None:
        """Leave the ring for new sessions and serve the current ones until they end or `timeout`
        passes; then end the rest (their next request is 404). Sets `drained` when done."""
        if self.draining:
            await self.drained.wait()
            return
        self.draining = True
        self.metrics.draining.set(1)
        log.info("node.draining", extra={"node": self.node_id, "count": len(self.actors), "seconds": timeout})
        with contextlib.suppress(StoreError, TimeoutError):  # tell the gateways now, not at the next beat
            async with asyncio.timeout(self.config.heartbeat_ttl / 3):
                await self.store.heartbeat(self.record(), self.config.heartbeat_ttl)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self.actors or self._starting:
                    self._emptied.clear()
                    await self._emptied.wait()
        await self.end_all("drained")
        log.info("node.drained", extra={"node": self.node_id})
        self.drained.set()

    async def shutdown(self) -> None:
        """Stop taking sessions, let creates in flight finish, stop serving and end every session,
        then leave the ring. Serving stops before the store forgets us, never after (rule 1)."""
        self.draining = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        await self._loops.close()  # no heartbeat may re-add us after we leave
        self._idle.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.upstream_start_timeout):
                await self._idle_creates.wait()
        self.lease.lose()  # from here every request is refused
        await self.end_all("drained")
        with contextlib.suppress(StoreError):
            await self.store.leave(self.node_id, self.incarnation)
        await self._tasks.close()
        if self._http is not None:
            await self._http.close()


async def _answer(actor: SessionActor, stream: StreamLog) -> Message | None:
    """The response on a JSON stream (None if the session ended first)."""
    try:
        async for item in actor.read(stream, 0):
            if item is not None and "method" not in item[1]:
                return item[1]
        return None
    finally:
        actor.forget(stream)
