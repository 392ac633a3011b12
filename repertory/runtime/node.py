"""The node: owns partitions through leases, reads their inboxes, runs actors, commits.

Per owned (kind, partition) a session runs a reader (XREADGROUP) that fills a bounded mailbox
per active actor, a fixed set of handler tasks (and one standing in for each that waits out a
retry's backoff) that take actors with messages waiting (one task per actor at a time: serial
within an actor, concurrent across actors), a timer task, an outbox relay, a lease renewer and
the passivation of idle actors. Each handled message ends in exactly one atomic commit script
(events, handled message, outgoing messages, timers, dedupe id, XACK), or in the dead-letter
stream after `max_deliveries` failed attempts.
"""

import collections
import gc
import logging
import math
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from repertory.actors.model import (
    Actor,
    AskRejected,
    Context,
    Outgoing,
    Rejected,
    actor_of_reply_to,
    reply_to_actor,
)
from repertory.runtime.clock import Clock, RealClock
from repertory.runtime.system import (
    REPLY_TTL_MS,
    ActorSystem,
    ActorView,
    AskReply,
    UnknownKindError,
    rebuild,
    rebuild_many,
)
from repertory.schemas import Envelope
from repertory.schemas.errors import DecodeError, RepertoryError
from repertory.streams.inbox import InboxEntry
from repertory.streams.keys import Address, KeyLayoutError
from repertory.streams.membership import Membership
from repertory.streams.partition import (
    ActorCommits,
    Commit,
    CommitResult,
    CommitStatus,
    Partition,
    SeenWindow,
)

logger = logging.getLogger("repertory.node")

# Infrastructure failures are not the message's fault: they are retried without counting as
# a delivery attempt, so a Redis restart never dead-letters anything.
INFRASTRUCTURE_ERRORS = (RedisConnectionError, RedisTimeoutError)

FaultHook = Callable[[str, Address | None], Awaitable[None]]
"""Called at `before-handle`, `after-handle`, `before-commit` and `after-commit`; a test's
hook may raise to simulate a crash at that point."""


def default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True, kw_only=True)
class NodeConfig:
    node_id: str = field(default_factory=default_node_id)
    read_count: int = 100
    block_ms: int | None = 1000
    """How long a read blocks waiting for messages; None polls instead (every `poll_s`), for
    servers or proxies without blocking reads."""
    poll_s: float = 0.02
    mailbox_size: int = 256
    max_in_flight: int = 1000
    """Messages read from one partition and not yet handled; the reader waits beyond it."""
    max_handling: int = 32
    """Actors handling a message at the same time, over all partitions (keep it below the
    client's `max_connections`)."""
    plain_handling: int = 2
    """Actors of kinds whose command handlers are plain functions (not `async def`) handling
    at the same time, over all partitions. Such handlers wait on nothing but the node's own
    round trips: two keep the process busy (one handles while the other commits), and the
    actors that become ready meanwhile gather into group commits (see `commit_actors`)
    instead of each taking a round trip of its own. Kinds with `async def` handlers share
    `max_handling`."""
    commit_batch: int = 64
    """Messages of one actor waiting in its mailbox are handled in turn and committed together,
    up to this many per script call."""
    commit_actors: int = 32
    """Actors left waiting while every handler task was busy are taken together by the next
    free one, up to this many, and what they handle is committed in one script call: under
    load, fewer round trips per message; when idle, each actor gets a task at once."""
    lease_ttl_ms: int = 3000
    retry_base_s: float = 0.05
    retry_cap_s: float = 2.0
    max_deliveries: int = 5
    seen: SeenWindow = field(default_factory=SeenWindow)
    shutdown_timeout_s: float = 10.0
    max_timer_wait_s: float = 1.0
    relay_poll_s: float = 1.0
    partitions: frozenset[int] | None = None


class PartitionLost(RepertoryError):
    """Another node took the partition over (this node's epoch is stale): stop serving it."""


class _Retry(Exception):
    """Handle the message again at once, without counting an attempt (version conflict)."""


class HandlerError(RepertoryError):
    """A command handler or event applier raised: the message's fault, so it counts as a failed
    delivery attempt whatever it raised (even a Redis error from the handler's own calls)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.error = error


@dataclass(slots=True)
class _Delivery:
    entry_id: bytes
    data: bytes
    deliveries: int
    envelope: Envelope | None
    error: DecodeError | None


@dataclass(slots=True, eq=False)
class _Mailbox:
    """An actor with messages waiting or in hand: those messages and its view once loaded. A
    handler task holds it while it handles; no other task touches it then, so an actor
    handles its messages one after another. Once none wait, it becomes an `_IdleActor`."""

    key: str
    view: ActorView | None = None
    waiting: collections.deque[_Delivery] = field(default_factory=collections.deque)
    held: bool = False
    """Queued for a handler task, or held by one."""
    room: anyio.Event | None = None
    """Set when a message leaves a full mailbox: the reader waits for it."""
    address: Address | None = None
    """The actor, parsed from `key` (its messages' target) and checked once."""


class _IdleActor(msgspec.Struct, frozen=True, gc=False):
    """An actor with no message waiting: its view, and when it last handled one. Not tracked
    by the garbage collector (nor is its view), so that a node keeps hundreds of thousands of
    idle actors without every full collection walking them: with 100,000 actors as mailboxes
    (a record and a deque each), full collections paused the node for 120-220 ms."""

    view: ActorView
    last_used_ms: int


class _Handled(msgspec.Struct, frozen=True, gc=False):
    """A message handled and ready to commit: the actor's view after it, what to commit, and
    the answer for an external `ask` (its reply stream and reply), sent after the commit."""

    address: Address
    view: ActorView
    commit: Commit
    reply: tuple[str, AskReply] | None


class Node:
    """Runs the actors of an `ActorSystem` until `stop()` (or cancellation)."""

    def __init__(
        self,
        system: ActorSystem,
        config: NodeConfig | None = None,
        *,
        clock: Clock | None = None,
        faults: FaultHook | None = None,
    ) -> None:
        self.system = system
        self.config = config or NodeConfig()
        self.clock = clock or RealClock()
        self.faults = faults
        self.stopping = False
        self._stop_requested = anyio.Event()
        self.stopped = anyio.Event()
        self.sessions: dict[tuple[str, int], PartitionSession] = {}
        self.membership = Membership(system.client, system.keys)
        # Bounds the actors handling at once, across partitions, below the client's connection
        # pool: lease renewals and heartbeats must never wait behind a crowd of activations.
        self.handling = anyio.CapacityLimiter(self.config.max_handling)
        self.plain_handling = anyio.CapacityLimiter(
            min(self.config.max_handling, self.config.plain_handling)
        )
        self.members: list[str] = []
        self.share = 0

    @property
    def node_id(self) -> str:
        return self.config.node_id

    def stop(self) -> None:
        """Graceful stop: stop reading, finish the messages in hand, release the leases."""
        self._stop_requested.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._run(task_status)
        finally:
            self.stopped.set()

    async def _run(self, task_status: TaskStatus[None]) -> None:
        all_done = anyio.Event()
        await self._heartbeat_once()
        if gc.get_freeze_count() == 0:
            # What exists once the first node of the process is set up (modules, the system,
            # its client) lives as long as the process: frozen, it is left out of full
            # collections, whose pauses would otherwise show in the latency of every message in
            # flight. Once only, after a collection: what is frozen is never collected, so a
            # process that starts nodes again and again (tests) must not freeze their garbage.
            gc.collect()
            gc.freeze()
        async with anyio.create_task_group() as outer:

            async def serve_partitions() -> None:
                async with anyio.create_task_group() as group:
                    for kind, number in self._partitions:
                        group.start_soon(self._keep_partition, kind, number)
                all_done.set()

            outer.start_soon(self._heartbeat)
            outer.start_soon(serve_partitions)
            task_status.started()
            await self._stop_requested.wait()
            self.stopping = True
            for session in list(self.sessions.values()):
                session.stop()
            with anyio.move_on_after(self.config.shutdown_timeout_s):
                await all_done.wait()
            outer.cancel_scope.cancel()
        with anyio.CancelScope(shield=True), anyio.move_on_after(1):
            await self.membership.leave(self.node_id, now_ms=self.clock.lease_now_ms())

    @property
    def _partitions(self) -> list[tuple[str, int]]:
        """Every (kind, partition) this node may serve, in a stable order."""
        return [
            (kind, number)
            for kind in self.system.actors
            for number in range(self.system.keys.partitions_of(kind))
            if self.config.partitions is None or number in self.config.partitions
        ]

    async def _heartbeat_once(self) -> None:
        members = await self.membership.heartbeat(
            self.node_id, self.config.lease_ttl_ms, now_ms=self.clock.lease_now_ms()
        )
        self.members = members
        # Partitions are spread evenly: the members, in order, take the remainder one each.
        base, remainder = divmod(len(self._partitions), max(1, len(members)))
        rank = members.index(self.node_id) if self.node_id in members else len(members)
        self.share = base + (1 if rank < remainder else 0)

    async def _heartbeat(self) -> None:
        while True:
            await self.clock.sleep(self.config.lease_ttl_ms / 3000)
            try:
                await self._heartbeat_once()
            except INFRASTRUCTURE_ERRORS as error:
                logger.warning("heartbeat failed (%s); retrying", error)
                continue
            owned = sorted(self.sessions)
            # Hand over what is beyond the share, so that joining nodes get theirs.
            for key in owned[self.share :]:
                self.sessions[key].stop()

    async def _keep_partition(self, kind: str, number: int) -> None:
        partition = self.system.partition(kind, number)
        await partition.ensure_groups()
        seen_free = 0
        while not self.stopping:
            epoch = None
            # Beyond its share a node takes only a partition it has seen free twice in a row:
            # one whose owner died (before the members know it), not one handed to a joiner.
            now_ms, asked_at = self.clock.lease_now_ms(), self.clock.now_ms()
            if len(self.sessions) < self.share or seen_free >= 2:
                epoch = await partition.acquire(
                    self.node_id, self.config.lease_ttl_ms, now_ms=now_ms
                )
            else:
                seen_free = seen_free + 1 if await partition.owner(now_ms) is None else 0
            if epoch is None:
                await self.sleep_unless_stopping(self.config.lease_ttl_ms / 16000)
                continue
            seen_free = 0
            held_until_ms = asked_at + self.config.lease_ttl_ms
            session = PartitionSession(self, partition, epoch, held_until_ms=held_until_ms)
            self.sessions[(kind, number)] = session
            try:
                await session.run()
            except* PartitionLost:
                logger.warning("lost %s (epoch %d)", partition, epoch)
            finally:
                self.sessions.pop((kind, number), None)

    async def sleep_unless_stopping(self, seconds: float) -> None:
        """Sleep on the node's clock (simulated in tests); a stop request wakes it."""
        async with anyio.create_task_group() as group:

            async def wake_on_stop() -> None:
                await self._stop_requested.wait()
                group.cancel_scope.cancel()

            group.start_soon(wake_on_stop)
            await self.clock.sleep(seconds)
            group.cancel_scope.cancel()


class PartitionSession:
    """One owned (kind, partition) for as long as the lease holds."""

    def __init__(self, node: Node, partition: Partition, epoch: int, *, held_until_ms: int) -> None:
        self.node = node
        self.partition = partition
        self.epoch = epoch
        self.held_until_ms = held_until_ms
        """Until when the lease surely holds, by the node's clock: it was taken or renewed by
        a call made `lease_ttl_ms` before."""
        self._renewed = anyio.Event()
        self.system = node.system
        self.config = node.config
        self.actor: Actor[Any] = node.system.actors[partition.kind]
        self._target_prefix = f"{partition.kind}/"
        """How the targets of this partition's actors begin (the kind is checked already)."""
        self.handling = node.handling if self.actor.handlers_await else node.plain_handling
        """What this partition's handler tasks (one per token) take while they handle."""
        self.mailboxes: dict[str, _Mailbox] = {}
        """The actors with messages waiting or in hand (an actor is here or in `idle`)."""
        self.idle: dict[str, _IdleActor] = {}
        """The actors with none, and their views: least recently used first."""
        self._ready, self._ready_receive = anyio.create_memory_object_stream[list[_Mailbox]](
            math.inf
        )
        self._newly_ready: list[_Mailbox] = []
        """Actors given their first waiting message by the read in progress, not yet handed
        out (see `_hand_out`)."""
        self._idle_handlers = 0
        self._handlers: TaskGroup
        """The handler tasks, and those standing in for ones waiting out a backoff."""
        self._backing_off = 0
        self._standing_in = 0
        self._drained = anyio.Event()
        self._timers_changed = anyio.Event()
        self._outbox_changed = anyio.Event()
        self.stopping = False
        self._stop_requested = anyio.Event()
        self._in_flight = 0
        """Messages handed to mailboxes and not settled yet (see `max_in_flight`)."""
        self._in_flight_fell: anyio.Event | None = None
        """Set when messages settle while the reader waits for `_in_flight` to fall."""

    def stop(self) -> None:
        """Hand the partition over: stop reading, finish the messages in hand, release."""
        self.stopping = True
        self._stop_requested.set()
        self._timers_changed.set()
        self._outbox_changed.set()

    async def sleep_unless_stopping(self, seconds: float) -> None:
        with anyio.move_on_after(seconds):
            await self._stop_requested.wait()

    async def run(self) -> None:
        async with anyio.create_task_group() as services:
            services.start_soon(self._renew_lease)
            services.start_soon(self._fire_timers)
            services.start_soon(self._relay_outbox)
            services.start_soon(self._passivate)
            async with anyio.create_task_group() as handlers:
                self._handlers = handlers
                with self._ready_receive:
                    for _ in range(round(self.handling.total_tokens)):
                        handlers.start_soon(self._handle_mailboxes, self._ready_receive.clone())
                    await self._read()
                await self._wait_drained()
                # Only now: on a failure or a cancellation the handler tasks are cancelled
                # instead, and one finishing a message must still find the line open.
                self._ready.close()
            services.cancel_scope.cancel()
        await self.partition.release(self.node.node_id)

    # Reading and routing.

    async def _read(self) -> None:
        await self._resume()
        inbox = self.partition.inbox
        failures = 0
        while not self.stopping:
            await self._hold_lease()
            if not await self._turn_free():
                break
            try:
                entries = await inbox.read(
                    self.node.node_id,
                    count=self.config.read_count,
                    block_ms=self.config.block_ms,
                )
                failures = 0
            except INFRASTRUCTURE_ERRORS as error:
                failures += 1
                logger.warning("reading %s failed (%s); retrying", self.partition, error)
                await self.sleep_unless_stopping(self._backoff(failures))
                continue
            await self._dispatch(entries)
            self._hand_out()
            if not entries and self.config.block_ms is None:
                await self.sleep_unless_stopping(self.config.poll_s)

    async def _turn_free(self) -> bool:
        """Wait until a turn is free; False if the session began stopping meanwhile. Reading
        then, under load, brings what arrived while every turn was taken in one read instead
        of a read each (idle, a turn is free at once)."""
        async with self.handling:
            pass
        return not self.stopping

    async def _resume(self) -> None:
        """Everything pending in this partition's group is ours now that we hold the lease:
        the previous owner's unfinished messages (and our own, after a restart) go first, in
        stream order, with their delivery counts."""
        inbox = self.partition.inbox
        start: bytes | str = b"0-0"
        while True:
            claimed = await inbox.autoclaim(self.node.node_id, 0, start=start, count=500)
            if claimed.entries:
                counts = {
                    row.id: row.deliveries
                    for row in await inbox.pending_entries(
                        count=len(claimed.entries),
                        consumer=self.node.node_id,
                        start=claimed.entries[0].id,
                    )
                }
                await self._dispatch(claimed.entries, counts)
                self._hand_out()
            start = claimed.next_start
            if start in (b"0-0", "0-0"):
                return

    async def _dispatch(
        self, entries: list[InboxEntry], deliveries: dict[bytes, int] | None = None
    ) -> None:
        """Put each entry in its actor's mailbox, in order; `deliveries` are the entries'
        delivery counts when not 1 (claimed entries)."""
        max_in_flight, mailbox_size = self.config.max_in_flight, self.config.mailbox_size
        decode = self.system.codec.decode_envelope
        for entry in entries:
            # Back-pressure: the reader waits while this many messages are in the mailboxes.
            if self._in_flight >= max_in_flight:
                self._hand_out()  # what it waits for may be waiting for those
                while self._in_flight >= max_in_flight:
                    self._in_flight_fell = anyio.Event()
                    await self._in_flight_fell.wait()
                self._in_flight_fell = None
            self._in_flight += 1
            if self.stopping:
                self._settled(1)
                continue  # left pending for the partition's next owner
            data = entry.data or b""
            envelope: Envelope | None = None
            error: DecodeError | None = None
            if entry.data is None:
                error = DecodeError("inbox entry has no message field", reason="malformed")
            else:
                try:
                    envelope = decode(entry.data)
                except DecodeError as undecodable:
                    error = undecodable
            # Undecodable entries have no actor: each gets a mailbox of its own.
            key = envelope.target if envelope is not None else f"!{entry.id.decode()}"
            mailbox = self.mailboxes.get(key)
            if mailbox is None:
                idle = self.idle.pop(key, None)
                mailbox = self.mailboxes[key] = _Mailbox(key, None if idle is None else idle.view)
            while len(mailbox.waiting) >= mailbox_size:
                self._hand_out()
                # While the reader waits here the mailbox stays (see `_release`).
                mailbox.room = anyio.Event()
                await mailbox.room.wait()
                mailbox.room = None
            count = 1 if deliveries is None else deliveries.get(entry.id, 1)
            mailbox.waiting.append(_Delivery(entry.id, data, count, envelope, error))
            if not mailbox.held:
                mailbox.held = True
                self._newly_ready.append(mailbox)

    def _hand_out(self) -> None:
        """Queue the actors the read gave messages to for the handler tasks, shared out among
        the idle ones: several actors per task (committed together) only when there are more
        actors than idle tasks."""
        ready = self._newly_ready
        if not ready:
            return
        self._newly_ready = []
        size = min(self.config.commit_actors, -(-len(ready) // max(1, self._idle_handlers)))
        for start in range(0, len(ready), size):
            try:
                self._ready.send_nowait(ready[start : start + size])
            except anyio.BrokenResourceError:
                # The handler tasks are gone: the session is being torn down (cancelled) and
                # the reader with it; the entries stay pending for the partition's next owner.
                return

    async def _handle_mailboxes(
        self, ready: MemoryObjectReceiveStream[list[_Mailbox]], *, standing_in: bool = False
    ) -> None:
        """One of the partition's handler tasks: takes the next actors handed out (and those
        queued behind them, up to `commit_actors`), handles up to `commit_batch` messages of
        each, and puts back in line those for which more wait. One `standing_in` for a task
        waiting out a backoff ends once fewer tasks wait than stand in."""
        with ready:
            while not standing_in or self._standing_in <= self._backing_off:
                self._idle_handlers += 1
                try:
                    group = await ready.receive()
                except anyio.EndOfStream:
                    return
                finally:
                    self._idle_handlers -= 1
                async with self.handling:
                    # The actors handed out while this task waited for its turn join it.
                    while len(group) < self.config.commit_actors:
                        try:
                            group += ready.receive_nowait()
                        except (anyio.WouldBlock, anyio.EndOfStream):
                            break
                    batches = [self._take(mailbox) for mailbox in group]
                    done: list[bool] = []
                    try:
                        done = await self._process_group(group, batches)
                    finally:
                        self._settled(sum(len(batch) for batch in batches))
                now_ms = self.node.clock.now_ms()
                for mailbox, finished in zip(group, done, strict=True):
                    if not finished:
                        # Stopping, and a message was left pending: the ones after it wait for
                        # the next owner too, so that they stay behind it.
                        self._settled(len(mailbox.waiting))
                        mailbox.waiting.clear()
                    self._release(mailbox, now_ms)

    def _take(self, mailbox: _Mailbox) -> list[_Delivery]:
        """The next messages of `mailbox` to handle, up to `commit_batch`."""
        waiting = mailbox.waiting
        batch = [waiting.popleft() for _ in range(min(len(waiting), self.config.commit_batch))]
        if mailbox.room is not None:
            mailbox.room.set()
        return batch

    def _release(self, mailbox: _Mailbox, now_ms: int) -> None:
        """A handler task is done with `mailbox`: back in line if messages wait, else idle
        (last used at `now_ms`)."""
        if mailbox.waiting:
            self._ready.send_nowait([mailbox])
            return
        mailbox.held = False
        if mailbox.room is not None:
            return  # the reader waits to add to it (see `_dispatch`): it stays
        del self.mailboxes[mailbox.key]
        # An actor whose view could not be kept (undecodable messages, failures) is not kept.
        if mailbox.view is not None:
            self.idle[mailbox.key] = _IdleActor(mailbox.view, now_ms)  # most recently used last

    def _settled(self, count: int) -> None:
        """`count` messages left the mailboxes: handled, dead-lettered, or left pending."""
        self._in_flight -= count
        if self._in_flight_fell is not None:
            self._in_flight_fell.set()
        if not self._in_flight:
            self._drained.set()

    async def _wait_drained(self) -> None:
        """Until every message handed to a mailbox has left it."""
        while self._in_flight:
            self._drained = anyio.Event()
            await self._drained.wait()

    async def _passivate(self) -> None:
        """Actors idle for `idle_after_s` are forgotten (their views are rebuilt on demand)."""
        idle_s = self.actor.idle_after_s
        while True:
            await self.node.clock.sleep(idle_s / 4)
            oldest = self.node.clock.now_ms() - round(idle_s * 1000)
            forgotten: list[str] = []
            for key, actor in self.idle.items():
                if actor.last_used_ms > oldest:
                    break  # least recently used first: the rest are more recent
                forgotten.append(key)
            for key in forgotten:
                del self.idle[key]

    # Handling.

    async def _process_group(
        self, group: list[_Mailbox], batches: list[list[_Delivery]]
    ) -> list[bool]:
        """Handle each actor's batch; commit them all in one script call when every one goes
        through, else each actor's the careful way (`_process_actor`). Per actor: True when
        all its messages were committed or dead-lettered (see `_process`)."""
        await self._activate(group, batches)
        if len(group) == 1:
            return [await self._process_actor(group[0], batches[0])]
        handled_all = [
            await self._handle_until_failure(mailbox, batch)
            for mailbox, batch in zip(group, batches, strict=True)
        ]
        committed = await self._commit_group(group, handled_all)
        done: list[bool] = []
        for mailbox, batch, handled in zip(group, batches, handled_all, strict=True):
            rest = batch[len(handled) :] if committed else batch
            done.append(await self._process_actor(mailbox, rest) if rest else True)
        return done

    async def _activate(self, group: list[_Mailbox], batches: list[list[_Delivery]]) -> None:
        """Rebuild the views of the actors in `group` that have none in one round trip for all
        those that are new or have a short log, instead of one each. An actor left without a
        view (it cannot be rebuilt, or Redis failed) is rebuilt on its own when handled, where
        failures are retried and reported."""
        inactive: list[tuple[_Mailbox, Address]] = []
        for mailbox, batch in zip(group, batches, strict=True):
            envelope = batch[0].envelope if batch else None
            if mailbox.view is None and envelope is not None:
                try:
                    inactive.append((mailbox, self._address_of(mailbox, envelope)))
                except (KeyLayoutError, UnknownKindError):
                    continue
        if len(inactive) < 2:
            return  # no round trip to save
        try:
            views = await rebuild_many(
                self.system.store, self.actor, [address for _, address in inactive]
            )
        except Exception as error:
            logger.debug("activating %d actors at once failed: %r", len(inactive), error)
            return
        for (mailbox, _), view in zip(inactive, views, strict=True):
            if isinstance(view, ActorView):
                mailbox.view = view

    async def _process_actor(self, mailbox: _Mailbox, batch: list[_Delivery]) -> bool:
        if len(batch) == 1:
            return await self._process(mailbox, batch[0])
        return await self._process_batch(mailbox, batch)

    async def _process(self, mailbox: _Mailbox, delivery: _Delivery) -> bool:
        """Handle `delivery` until committed or dead-lettered (True), or until stopping leaves
        it pending (False)."""
        attempts = delivery.deliveries
        max_deliveries = self.actor.max_deliveries or self.config.max_deliveries
        failures = 0
        # A message in hand is handled even when stopping; only retries stop: a message that
        # failed is left pending (its attempts counted) for the partition's next owner.
        while True:
            try:
                await self._handle_once(mailbox, delivery)
                return True
            except _Retry:
                continue
            except INFRASTRUCTURE_ERRORS as error:
                mailbox.view = None
                if self.stopping:
                    return False
                failures += 1
                logger.warning("redis unavailable (%s); retrying", error)
                # No task stands in: the partition's other actors would meet Redis down too.
                await self._wait_without_turn(self._backoff(failures), stand_in=False)
            except PartitionLost:
                raise
            except Exception as error:
                mailbox.view = None
                if attempts >= max_deliveries:
                    await self._dead_letter(delivery, error, attempts)
                    return True
                logger.info(
                    "attempt %d of %s failed: %r", attempts, delivery.entry_id.decode(), error
                )
                await self._wait_without_turn(self._backoff(attempts), stand_in=True)
                attempts += 1
                await self.partition.inbox.set_deliveries(
                    self.node.node_id, delivery.entry_id, attempts
                )
                if self.stopping:
                    return False

    async def _wait_without_turn(self, seconds: float, *, stand_in: bool) -> None:
        """Wait before a retry without holding a turn: other actors handle meanwhile. With
        `stand_in`, without holding up the partition's handler task either: another task
        stands in for this one while it waits."""
        self.handling.release()
        try:
            if stand_in:
                self._backing_off += 1
                self._stand_in_if_needed()
            await self.sleep_unless_stopping(seconds)
        finally:
            if stand_in:
                self._backing_off -= 1
            # Taken back even when cancelled: the turn is given back on the way out.
            with anyio.CancelScope(shield=True):
                await self.handling.acquire()

    def _stand_in_if_needed(self) -> None:
        if self._standing_in >= self._backing_off or self.stopping:
            return
        try:
            ready = self._ready_receive.clone()
        except anyio.ClosedResourceError:
            return  # the reader is gone (it failed): the session is ending
        self._standing_in += 1
        self._handlers.start_soon(self._stand_in, ready)

    async def _stand_in(self, ready: MemoryObjectReceiveStream[list[_Mailbox]]) -> None:
        try:
            await self._handle_mailboxes(ready, standing_in=True)
        finally:
            self._standing_in -= 1

    def _backoff(self, attempt: int) -> float:
        return float(min(self.config.retry_cap_s, self.config.retry_base_s * 2 ** (attempt - 1)))

    async def _handle_once(self, mailbox: _Mailbox, delivery: _Delivery) -> None:
        """Handle and commit one message (the careful path, with retries around it)."""
        handled = await self._handle_next(mailbox, [], delivery)
        result = await self._commit(mailbox, [handled])
        if result.status is CommitStatus.CONFLICT:
            raise _Retry

    async def _process_batch(self, mailbox: _Mailbox, batch: list[_Delivery]) -> bool:
        """Handle messages of one actor one after another and commit them in one script call.

        A message that fails to handle or was handled before takes the careful path on its
        own, after the messages before it are committed; the rest go on batching. A version
        conflict (another writer) sends the whole batch the careful way. False when stopping
        left a message pending (see `_process`)."""
        while batch:
            handled = await self._handle_until_failure(mailbox, batch)
            done = 0
            if handled:
                result = await self._commit_or_none(mailbox, handled)
                if result is not None and result.status is CommitStatus.DUPLICATE:
                    done = result.duplicate or 0
                    if done:
                        result = await self._commit_or_none(mailbox, handled[:done])
                elif result is not None and result.status is CommitStatus.COMMITTED:
                    done = len(handled)
                if result is None or result.status is CommitStatus.CONFLICT:
                    for delivery in batch:
                        if not await self._process(mailbox, delivery):
                            return False
                    return True
            if done < len(batch):
                if not await self._process(mailbox, batch[done]):
                    return False
                done += 1
            batch = batch[done:]
        return True

    async def _handle_until_failure(
        self, mailbox: _Mailbox, batch: list[_Delivery]
    ) -> list[_Handled]:
        """Handle `batch` in turn, each message on the view the ones before it left, up to
        the first that fails: that one (`batch[len(handled)]`) and those after it are left
        for the careful path."""
        handled: list[_Handled] = []
        try:
            for delivery in batch:
                handled.append(await self._handle_next(mailbox, handled, delivery))
        except PartitionLost:
            raise
        except Exception:
            pass
        return handled

    async def _handle_next(
        self, mailbox: _Mailbox, handled: list[_Handled], delivery: _Delivery
    ) -> _Handled:
        """Handle `delivery` on the view the messages handled before it in the batch left."""
        if delivery.envelope is None:
            raise delivery.error or DecodeError("no envelope", reason="malformed")
        address = self._address_of(mailbox, delivery.envelope)
        if mailbox.view is None:
            mailbox.view = await rebuild(self.system.store, self.actor, address)
        return await self._handle(address, handled[-1].view if handled else mailbox.view, delivery)

    def _address_of(self, mailbox: _Mailbox, envelope: Envelope) -> Address:
        """The actor of `mailbox`, whose messages' target `envelope` names: parsed and checked
        by the first message, so that a mailbox's other messages and its commits need not."""
        address = mailbox.address
        if address is None:
            target, prefix = envelope.target, self._target_prefix
            if target.startswith(prefix) and len(target) > len(prefix):
                address = Address(self.partition.kind, target[len(prefix) :])
            else:
                address = Address.parse(target)
            partition = self.partition
            if address.kind != partition.kind:
                raise UnknownKindError(f"{address} arrived in the inbox of {partition}")
            if self.system.keys.partition_of(address) != partition.number:
                raise KeyLayoutError(f"{address} arrived in the inbox of {partition}")
            mailbox.address = address
        return address

    async def _commit_or_none(
        self, mailbox: _Mailbox, handled: list[_Handled]
    ) -> CommitResult | None:
        """Commit, or None (and the view forgotten) if Redis failed: the careful path retries."""
        try:
            return await self._commit(mailbox, handled)
        except INFRASTRUCTURE_ERRORS:
            mailbox.view = None
            return None

    async def _handle(self, address: Address, view: ActorView, delivery: _Delivery) -> _Handled:
        """Run the handler of one message on `view` and prepare its commit; writes nothing."""
        envelope = delivery.envelope
        assert envelope is not None
        system, node = self.system, self.node
        codec = system.codec
        message = codec.message_of(envelope)
        state, version = view.state, view.version
        now = node.clock.now_ms()
        dedupe_id = envelope.idempotency_key or envelope.id
        correlation_id = envelope.correlation_id or envelope.id
        ctx = Context(
            address,
            version,
            envelope.id,
            now,
            correlation_id=correlation_id,
            causation_id=envelope.causation_id,
        )

        faults = node.faults
        if faults is not None:
            await faults("before-handle", address)
        rejected: Rejected | None = None
        try:
            events = await self.actor.handle(state, message, ctx)
        except Rejected as refusal:
            rejected, events = refusal, []
            ctx.outgoing.clear()
        except Exception as error:
            raise HandlerError(error) from error
        if faults is not None:
            await faults("after-handle", address)
        try:
            new_state = self.actor.fold(state, events)
        except Exception as error:
            raise HandlerError(error) from error
        asker = actor_of_reply_to(envelope.reply_to)
        if asker is not None:
            # An actor's ask: the reply is one more outgoing message, committed with the rest.
            if rejected is not None:
                answer = AskRejected(envelope.id, rejected.reason, rejected.code)
                ctx.outgoing.append(Outgoing(asker, answer))
            elif ctx.reply_value is not None:
                ctx.outgoing.append(Outgoing(asker, ctx.reply_value))

        encode = codec.encode
        events_encoded = [
            encode(
                codec.event(
                    event,
                    causation_id=envelope.id,
                    correlation_id=correlation_id,
                    traceparent=envelope.traceparent,
                    recorded_at=now,
                )
            )
            for event in events
        ]
        local: list[bytes] = []
        timers: list[tuple[int, bytes]] = []
        remote: list[tuple[int, str, bytes]] = []
        keys = system.keys
        for index, outgoing in enumerate(ctx.outgoing):
            # Derived from the handled message's id: a re-handled message re-sends the same
            # ids, which the receivers' dedupe drops.
            derived = f"{envelope.id}/{index}"
            encoded = encode(
                codec.envelope(
                    str(outgoing.target),
                    outgoing.message,
                    sender=str(address),
                    message_id=derived,
                    idempotency_key=derived,
                    correlation_id=correlation_id,
                    causation_id=envelope.id,
                    traceparent=envelope.traceparent,
                    reply_to=None
                    if outgoing.reply_to is None
                    else reply_to_actor(outgoing.reply_to),
                    created_at=now,
                )
            )
            due = now + outgoing.delay_ms if outgoing.delay_ms else 0
            target_partition = keys.partition_of(outgoing.target)
            same = (
                outgoing.target.kind == self.partition.kind
                and target_partition == self.partition.number
            )
            if same and due:
                timers.append((due, encoded))
            elif same:
                local.append(encoded)
            elif due:
                remote.append((due, keys.timers(outgoing.target.kind, target_partition), encoded))
            else:
                remote.append((0, keys.inbox(outgoing.target.kind, target_partition), encoded))

        reply: tuple[str, AskReply] | None = None
        if envelope.reply_to and asker is None:
            reply = (
                envelope.reply_to,
                AskReply(
                    message_id=envelope.id,
                    version=version + len(events),
                    events=events_encoded,
                    reply=None if ctx.reply_value is None else encode(codec.event(ctx.reply_value)),
                    rejected=None if rejected is None else rejected.reason,
                    code=None if rejected is None else rejected.code,
                ),
            )
        commit = Commit(
            dedupe_id=dedupe_id,
            handled=delivery.data,
            handled_at=now,
            events=events_encoded,
            local=local,
            timers=timers,
            remote=remote,
            inbox_entry=delivery.entry_id,
            rejected="" if rejected is None else rejected.reason,
        )
        return _Handled(address, ActorView(version + len(events), new_state), commit, reply)

    async def _commit(self, mailbox: _Mailbox, handled: list[_Handled]) -> CommitResult:
        """Commit handled messages of one actor; on success, the replies and snapshot follow."""
        assert mailbox.view is not None
        address = handled[0].address
        faults = self.node.faults
        if faults is not None:
            await faults("before-commit", address)
        result = await self.partition.commit(
            address,
            mailbox.view.version,
            [item.commit for item in handled],
            epoch=self.epoch,
            now_ms=self.node.clock.now_ms(),
            seen=self.config.seen,
        )
        if faults is not None:
            await faults("after-commit", address)
        if result.status is CommitStatus.FENCED:
            raise PartitionLost(f"{self.partition} moved to another node")
        if result.status is CommitStatus.CONFLICT:
            mailbox.view = None
        if result.status is CommitStatus.COMMITTED and self._committed(mailbox, handled):
            await self._follow_up(handled)
        return result

    async def _commit_group(self, group: list[_Mailbox], handled_all: list[list[_Handled]]) -> bool:
        """Commit what several actors handled in one script call; False when nothing was
        written (a conflict, a message handled before, Redis unavailable)."""
        parts = [
            (mailbox, handled)
            for mailbox, handled in zip(group, handled_all, strict=True)
            if handled
        ]
        if not parts:
            return True
        faults = self.node.faults
        actors: list[ActorCommits] = []
        for mailbox, handled in parts:
            assert mailbox.view is not None
            address = handled[0].address
            if faults is not None:
                await faults("before-commit", address)
            commits = [item.commit for item in handled]
            actors.append(ActorCommits(address, mailbox.view.version, commits))
        try:
            result = await self.partition.commit_many(
                actors, epoch=self.epoch, now_ms=self.node.clock.now_ms(), seen=self.config.seen
            )
        except INFRASTRUCTURE_ERRORS:
            for mailbox, _ in parts:
                mailbox.view = None
            return False
        if faults is not None:
            for _, handled in parts:
                await faults("after-commit", handled[0].address)
        if result.status is CommitStatus.FENCED:
            raise PartitionLost(f"{self.partition} moved to another node")
        if result.status is CommitStatus.CONFLICT:
            assert result.actor is not None
            parts[result.actor][0].view = None
        if result.status is not CommitStatus.COMMITTED:
            return False
        for mailbox, handled in parts:
            if self._committed(mailbox, handled):
                await self._follow_up(handled)
        return True

    def _committed(self, mailbox: _Mailbox, handled: list[_Handled]) -> bool:
        """After a commit: the actor's new view, the services woken. True when a snapshot is
        due or an external ask waits for its answer (`_follow_up` writes them)."""
        mailbox.view = handled[-1].view
        follow_up = self._snapshot_due(handled)
        for item in handled:
            commit = item.commit
            if commit.timers:
                self._timers_changed.set()
            if commit.remote:
                self._outbox_changed.set()
            if item.reply is not None:
                follow_up = True
        return follow_up

    def _snapshot_due(self, handled: list[_Handled]) -> bool:
        """Whether the committed messages `handled` took the actor past a multiple of
        `snapshot_every`."""
        every = self.actor.snapshot_every
        first, after = handled[0], handled[-1].view
        before = first.view.version - len(first.commit.events)
        return bool(every) and after.version // every > before // every

    async def _follow_up(self, handled: list[_Handled]) -> None:
        """After a commit: the snapshot when one is due, the answers to external asks."""
        if self._snapshot_due(handled):
            after = handled[-1].view
            await self._snapshot(handled[0].address, after.state, after.version)
        for item in handled:
            if item.reply is not None:
                await self._reply(*item.reply)

    async def _snapshot(self, address: Address, state: msgspec.Struct, version: int) -> None:
        # Snapshots only speed activation up (G5): failing to write one loses nothing.
        try:
            await self.system.store.save_snapshot(address, state, version)
        except Exception:
            logger.exception("snapshot of %s at v%d failed", address, version)

    async def _reply(self, reply_to: str, reply: AskReply) -> None:
        client = self.system.client
        await client.xadd(reply_to, {b"m": msgspec.msgpack.encode(reply)})
        await client.pexpire(reply_to, REPLY_TTL_MS)

    async def _dead_letter(self, delivery: _Delivery, error: Exception, attempts: int) -> None:
        if isinstance(error, DecodeError):
            reason = error.reason
        elif isinstance(error, HandlerError):
            reason = "handler-error"
        else:
            reason = "invalid-message"
        detail = (
            str(error) if isinstance(error, HandlerError) else f"{type(error).__name__}: {error}"
        )
        partition = self.partition
        dead_id = await partition.dead_letters.move_from_inbox(
            partition.inbox.stream,
            partition.group,
            delivery.entry_id,
            delivery.data,
            reason=reason,
            detail=detail,
            attempts=attempts,
            epoch_key=partition.epoch_key,
            epoch=self.epoch,
        )
        if dead_id is None:
            raise PartitionLost(f"{partition} moved to another node")
        logger.error(
            "dead-lettered %s after %d attempts: %s", delivery.entry_id.decode(), attempts, detail
        )

    # Services.

    async def _renew_lease(self) -> None:
        node, ttl_ms = self.node, self.config.lease_ttl_ms
        clock = node.clock
        while True:
            await clock.sleep(ttl_ms / 3000)
            asked_at = clock.now_ms()
            try:
                epoch = await self.partition.acquire(
                    node.node_id, ttl_ms, now_ms=clock.lease_now_ms()
                )
            except INFRASTRUCTURE_ERRORS:
                if clock.now_ms() > self.held_until_ms:
                    raise PartitionLost(f"could not renew {self.partition}") from None
                continue
            if epoch != self.epoch:
                raise PartitionLost(f"{self.partition} lease lost (epoch {epoch})")
            self.held_until_ms = asked_at + ttl_ms
            self._renewed.set()
            self._renewed = anyio.Event()

    async def _hold_lease(self) -> None:
        """Wait until the lease surely holds for one more read (a blocking read's wait
        included). A node that stood still past its lease (a pause, a stalled event loop) must
        not take new entries into its pending list once it wakes: the node that took the
        partition over claimed the pending entries when it started, not later ones; they would
        stay there, unhandled. The renewal that finds the lease lost ends the session."""
        clock = self.node.clock
        margin_ms = min(self.config.block_ms or 0, self.config.lease_ttl_ms // 3)
        while True:
            renewed = self._renewed
            if clock.now_ms() + margin_ms < self.held_until_ms:
                return
            await renewed.wait()

    async def _fire_timers(self) -> None:
        client = self.system.client
        failures = 0
        while not self.stopping:
            # A fresh event before looking: a timer committed from now on wakes the wait.
            self._timers_changed = anyio.Event()
            wait_s = self.config.max_timer_wait_s
            try:
                now = self.node.clock.now_ms()
                if await self.partition.fire_timers(now):
                    continue
                head = await client.zrange(self.partition.timers_key, 0, 0, withscores=True)
                failures = 0
            except INFRASTRUCTURE_ERRORS:
                failures += 1
                wait_s = self._backoff(failures)
                head = []
            if head:
                wait_s = min(wait_s, max(0.0, (head[0][1] - now) / 1000))
            with anyio.move_on_after(wait_s):
                await self._timers_changed.wait()

    async def _relay_outbox(self) -> None:
        failures = 0
        while not self.stopping:
            self._outbox_changed = anyio.Event()
            wait_s = self.config.relay_poll_s
            try:
                if await self.partition.relay(self.node.node_id):
                    continue
                failures = 0
            except INFRASTRUCTURE_ERRORS:
                failures += 1
                wait_s = self._backoff(failures)
            with anyio.move_on_after(wait_s):
                await self._outbox_changed.wait()
