"""The node: owns partitions through leases, reads their inboxes, runs actors, commits.

The node holds partitions through leases (`PartitionSession`, one per owned (kind,
partition): the lease, the partition's timers and outbox relay, its actors' mailboxes and
views). Reading and handling are shared by every partition of a kind the node holds
(`KindRunner`): one read brings the new messages of all of them (on a Cluster, whose
partitions live in slots of their own, each partition is read apart), a bounded mailbox per
active actor takes its messages in order, and a fixed set of handler tasks take the actors
with messages waiting, one task per actor at a time: serial within an actor, concurrent across
actors. The actors a task takes together are activated in one round trip and committed in one
script call, whatever partitions they belong to (one per partition on a Cluster); an actor
whose message did not go through gets a task of its own, which retries it with backoff while
the handler tasks go on. Each handled message ends in exactly one atomic commit (events,
handled message, outgoing messages, timers, dedupe id, XACK), or in the dead-letter stream
after `max_deliveries` failed attempts.

A node spreads its work over partitions the way its peers would: with one node holding 16
partitions, a message costs what it costs with one partition (one read and one commit per
batch), not a read and a commit per partition in the batch.
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
from repertory.streams.client import is_cluster
from repertory.streams.inbox import InboxEntry, read_inboxes
from repertory.streams.keys import Address, KeyLayoutError
from repertory.streams.membership import Membership
from repertory.streams.partition import (
    ActorCommits,
    Commit,
    CommitResult,
    CommitStatus,
    Partition,
    PartitionCommits,
    SeenWindow,
)

logger = logging.getLogger("repertory.node")

_GUESS_AFTER = 64
"""Activations a kind's runner counts before the share of new ones among them may make it
guess that actors are new (see `NodeConfig.new_actor_share`)."""

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
    block_ms: int | None = 100
    """How long a read blocks waiting for messages; None polls instead (every `poll_s`), for
    servers or proxies without blocking reads. One read takes every partition of a kind the
    node holds, so a partition taken over while that read blocks is first read when it
    returns: within `block_ms` (an idle node reads a kind ten times a second)."""
    poll_s: float = 0.02
    mailbox_size: int = 256
    max_in_flight: int = 1000
    """Messages read from one partition and not yet handled; the reader waits beyond it."""
    max_handling: int = 32
    """Actors handling a message at the same time, over all partitions (keep it below the
    client's `max_connections`)."""
    plain_handling: int = 2
    """Handler tasks of a kind whose command handlers are plain functions (not `async def`),
    over all its partitions. Such handlers wait on nothing but the node's own round trips: two
    keep the process busy (one handles while the other commits), and the actors that become
    ready meanwhile gather into group commits (see `commit_actors`) instead of each taking a
    round trip of its own. Kinds with `async def` handlers share `max_handling`."""
    commit_batch: int = 64
    """Messages of one actor waiting in its mailbox are handled in turn and committed together,
    up to this many per script call."""
    commit_actors: int = 32
    """Actors left waiting while every handler task was busy are taken together by the next
    free one, up to this many, whatever partitions they belong to, and what they handle is
    committed in one script call: under load, fewer round trips per message; when idle, each
    actor gets a task at once."""
    new_actor_share: float = 0.875
    """While at least this share of the actors of a kind the node activated lately were found
    new, an actor of it activated is handled on its initial state without reading it first
    (one round trip fewer each). The commit's version check finds a wrong guess: that actor's
    messages are then handled again on what is read. Only kinds with plain-function handlers
    guess: an `async def` handler may call out, and must not on a state its actor never had.
    0 always guesses; above 1, never."""
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
    session: "PartitionSession"
    """The partition the actor belongs to, as this node holds it."""
    view: ActorView | None = None
    waiting: collections.deque[_Delivery] = field(default_factory=collections.deque)
    held: bool = False
    """Queued for a handler task, or held by one."""
    room: anyio.Event | None = None
    """Set when a message leaves a full mailbox: the reader waits for it."""
    address: Address | None = None
    """The actor, parsed from `key` (its messages' target) and checked once."""
    guessed: bool = False
    """Its view is a guess (a new actor), not read: the commit's version check confirms it,
    or the view is dropped (see `KindRunner._activate`)."""
    careful: bool = False
    """A message of it did not go through with the actors handled with it: it goes the
    careful way, in a task of its own (see `KindRunner._care`)."""


class _IdleActor(msgspec.Struct, frozen=True, gc=False):
    """An actor with no message waiting: its view, and when it last handled one. Not tracked
    by the garbage collector (nor is its view), so that a node keeps hundreds of thousands of
    idle actors without every full collection walking them: with 100,000 actors as mailboxes (a
    record and a deque each), full collections paused the node for 120-220 ms. It keeps no
    `Address` (its next mailbox makes one from its key): a named tuple is tracked for as long as
    it lives (the collector lets go only of plain tuples), and with 100,000 idle actors a full
    collection took 52-62 ms, against 0.2-0.4 ms without."""

    view: ActorView
    last_used_ms: int


class _Handled(msgspec.Struct, frozen=True, gc=False):
    """A message handled and ready to commit: the actor's view after it, what to commit, and
    the answer for an external `ask` (its reply stream and reply), sent after the commit."""

    address: Address
    view: ActorView
    commit: Commit
    reply: tuple[str, AskReply] | None


class _Part(msgspec.Struct, frozen=True, gc=False, eq=False):
    """An actor's part in a group commit: its place in the group, and what it handled."""

    index: int
    mailbox: _Mailbox
    handled: list[_Handled]


async def _take_turn(turns: anyio.CapacityLimiter) -> None:
    """Take one of `turns` for the current task, at once when one is free: anyio's `acquire`
    then still goes once round the event loop, and at low load the other tasks' work there
    was a sixth of a message's latency (150 µs of 900)."""
    try:
        turns.acquire_nowait()
    except anyio.WouldBlock:
        await turns.acquire()


def _backoff(config: NodeConfig, attempt: int) -> float:
    return float(min(config.retry_cap_s, config.retry_base_s * 2 ** (attempt - 1)))


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
        self.runners: dict[str, KindRunner] = {}
        """Per kind, what reads and handles the messages of its partitions (made by `run`)."""
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

            self.runners = {kind: KindRunner(self, kind) for kind in self.system.actors}
            for runner in self.runners.values():
                outer.start_soon(runner.run)
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
            runner = self.runners[kind]
            session = PartitionSession(runner, partition, epoch, held_until_ms=held_until_ms)
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


class KindRunner:
    """Reads and handles the messages of one actor kind for every partition of it the node
    holds (its member sessions).

    One read takes the new messages of every member whose lease surely holds; on a Cluster,
    where no command reaches two partitions' slots, each member has a reader of its own. The
    handler tasks take the actors with messages waiting, whatever their partitions, and commit
    what the actors they took together handled in one script call (one per partition on a
    Cluster). A member lost meanwhile (fenced) is dropped: its messages in hand are left
    pending, for the partition's next owner."""

    def __init__(self, node: Node, kind: str) -> None:
        self.node = node
        self.kind = kind
        self.system = node.system
        self.config = node.config
        self.actor: Actor[Any] = node.system.actors[kind]
        self.handling = node.handling if self.actor.handlers_await else node.plain_handling
        """What the handler tasks (one per token) take while they handle."""
        self.members: dict[int, PartitionSession] = {}
        """The sessions read, by partition number (a session joins once it has resumed)."""
        self._changed = anyio.Event()
        """Set when members join or leave or a member's lease is renewed: the reader looks
        again at what it may read."""
        self._reading: set[PartitionSession] = set()
        """The members the read in flight takes entries for."""
        self._read_done = anyio.Event()
        self._ready, self._ready_receive = anyio.create_memory_object_stream[list[_Mailbox]](
            math.inf
        )
        self._newly_ready: list[_Mailbox] = []
        """Actors given their first waiting message by the read in progress, not yet handed
        out (see `_hand_out`)."""
        self._idle_handlers = 0
        self._tasks: TaskGroup
        """The readers, the handler tasks, and the tasks of actors on the careful path."""
        self._one_read = not is_cluster(node.system.client)
        """Whether one read and one commit reach every member's keys (not on a Cluster)."""
        self._activated = 0
        self._found_new = 0
        """Of the actors activated lately, how many, and how many were new (see
        `NodeConfig.new_actor_share`)."""

    async def run(self) -> None:
        """Until cancelled (the node cancels it once every session is done)."""
        async with anyio.create_task_group() as tasks:
            self._tasks = tasks
            with self._ready_receive:
                for _ in range(round(self.handling.total_tokens)):
                    tasks.start_soon(self._handle_mailboxes, self._ready_receive.clone())
                if self._one_read:
                    tasks.start_soon(self._read, None)
                await anyio.sleep_forever()

    def join(self, session: "PartitionSession") -> None:
        """Read `session`'s partition from now on."""
        self.members[session.partition.number] = session
        if not self._one_read:
            self._tasks.start_soon(self._read, session)
        self.poke()

    def drop(self, session: "PartitionSession") -> None:
        """Read `session`'s partition no more (a read in flight may still bring entries)."""
        if self.members.get(session.partition.number) is session:
            del self.members[session.partition.number]
            self.poke()

    async def leave(self, session: "PartitionSession") -> None:
        """Read `session`'s partition no more, and return once no read in flight takes entries
        for it: every entry read for it is in its mailboxes (or left pending, if it stops)."""
        self.drop(session)
        while session in self._reading:
            await self._read_done.wait()

    def poke(self) -> None:
        """Wake the reader to look again at what it may read."""
        self._changed.set()
        self._changed = anyio.Event()

    # Reading and routing.

    async def _read(self, own: "PartitionSession | None") -> None:
        """Read the members' inboxes (`own`'s alone, on a Cluster, as long as it is a member)
        and route what each read brings to their mailboxes, once a turn is free."""
        node, config = self.node, self.config
        client, group = self.system.client, self.system.keys.group(self.kind)
        failures = 0
        while own is None or self.members.get(own.partition.number) is own:
            changed = self._changed
            sessions = self._readable(own)
            if not sessions:
                await changed.wait()
                continue
            await self._turn_free()
            sessions = self._readable(own)  # as they are now, after the wait for a turn
            if not sessions:
                continue
            self._reading.update(sessions)
            try:
                replies = await read_inboxes(
                    client,
                    group,
                    node.node_id,
                    [session.partition.inbox.stream for session in sessions],
                    count=config.read_count,
                    block_ms=config.block_ms,
                )
                failures = 0
                for session, entries in zip(sessions, replies, strict=True):
                    if entries:
                        await session._dispatch(entries)
                self._hand_out()
            except INFRASTRUCTURE_ERRORS as error:
                failures += 1
                logger.warning("reading %s failed (%s); retrying", self.kind, error)
                replies = []
            finally:
                self._reading.difference_update(sessions)
                self._read_done.set()
                self._read_done = anyio.Event()
            if failures:
                await anyio.sleep(_backoff(config, failures))
            elif not any(replies) and config.block_ms is None:
                await anyio.sleep(config.poll_s)

    def _readable(self, own: "PartitionSession | None") -> "list[PartitionSession]":
        """The members to read now: those whose lease surely holds for one more read."""
        candidates = list(self.members.values()) if own is None else [own]
        now_ms = self.node.clock.now_ms()
        return [session for session in candidates if session.lease_holds(now_ms)]

    async def _turn_free(self) -> None:
        """Wait until a turn is free: reading then, under load, brings what arrived while every
        turn was taken in one read instead of a read each (idle, a turn is free at once)."""
        async with self.handling:
            pass

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
                # The handler tasks are gone: the node is being torn down (cancelled) and the
                # reader with it; the entries stay pending for the partitions' next owners.
                return

    # Handling.

    async def _handle_mailboxes(self, ready: MemoryObjectReceiveStream[list[_Mailbox]]) -> None:
        """One of the handler tasks: takes the next actors handed out (and those queued behind
        them, up to `commit_actors`), handles up to `commit_batch` messages of each, commits
        them together, and puts back in line those for which more wait. An actor with a
        message that did not go through gets a task of its own for the careful path (`_care`):
        its retries and their backoffs hold up no other actor."""
        with ready:
            while True:
                self._idle_handlers += 1
                try:
                    group = await ready.receive()
                except anyio.EndOfStream:
                    return
                finally:
                    self._idle_handlers -= 1
                await _take_turn(self.handling)
                try:
                    # The actors handed out while this task waited for its turn join it.
                    while len(group) < self.config.commit_actors:
                        try:
                            group += ready.receive_nowait()
                        except (anyio.WouldBlock, anyio.EndOfStream):
                            break
                    batches = [mailbox.session._take(mailbox) for mailbox in group]
                    try:
                        await self._process_group(group, batches)
                    finally:
                        for mailbox, batch in zip(group, batches, strict=True):
                            mailbox.session._settled(len(batch))
                finally:
                    self.handling.release()
                now_ms = self.node.clock.now_ms()
                for mailbox in group:
                    if mailbox.careful:
                        self._tasks.start_soon(self._care, mailbox)
                    else:
                        mailbox.session._release(mailbox, now_ms)

    async def _process_group(self, group: list[_Mailbox], batches: list[list[_Delivery]]) -> None:
        """Handle each actor's batch up to its first failure and commit what went through in
        one script call. What was not committed goes back to the front of its actor's mailbox
        (out of its batch), and the actor is marked for the careful path; a view guessed (see
        `_activate`) and not confirmed by a commit is dropped, for that path to read."""
        await self._activate(group, batches)
        handled_all = [
            []
            if mailbox.session.lost
            else await mailbox.session._handle_until_failure(mailbox, batch)
            for mailbox, batch in zip(group, batches, strict=True)
        ]
        committed = await self._commit_group(group, handled_all)
        for mailbox, batch, handled, ok in zip(group, batches, handled_all, committed, strict=True):
            if mailbox.guessed:
                # A guess not confirmed by a commit is dropped: the careful path reads.
                mailbox.guessed = False
                if not ok:
                    mailbox.view = None
            kept = len(handled) if ok else 0
            if kept < len(batch):
                mailbox.waiting.extendleft(reversed(batch[kept:]))
                del batch[kept:]
                mailbox.careful = True

    async def _care(self, mailbox: _Mailbox) -> None:
        """The careful path of an actor whose messages did not all go through with the others:
        one message at a time where needed, retried with backoff (without a turn while it
        waits), then dead-lettered, as `PartitionSession._process_actor` does. A partition lost
        meanwhile leaves its messages pending."""
        session = mailbox.session
        finished = False
        async with self.handling:
            batch = session._take(mailbox)
            try:
                if session.lost is None:
                    finished = await session._process_actor(mailbox, batch)
            except PartitionLost as lost:
                session.lose(lost)
            finally:
                session._settled(len(batch))
        if not finished:
            # Stopping, and a message was left pending: the ones after it wait for the next
            # owner too, so that they stay behind it.
            session._settled(len(mailbox.waiting))
            mailbox.waiting.clear()
        mailbox.careful = False
        session._release(mailbox, self.node.clock.now_ms())

    async def _activate(self, group: list[_Mailbox], batches: list[list[_Delivery]]) -> None:
        """Give the actors in `group` that have no view one: their initial state, unread,
        while most actors activated lately were new (see `NodeConfig.new_actor_share`); else
        what one round trip for all those that are new or have a short log reads, instead of
        one each. An actor left without a view (it cannot be rebuilt, or Redis failed) is
        rebuilt on its own when handled, where failures are retried and reported."""
        inactive: list[tuple[_Mailbox, Address]] = []
        for mailbox, batch in zip(group, batches, strict=True):
            envelope = batch[0].envelope if batch else None
            if mailbox.view is None and envelope is not None and not mailbox.session.lost:
                try:
                    inactive.append((mailbox, mailbox.session._address_of(mailbox, envelope)))
                except (KeyLayoutError, UnknownKindError):
                    continue
        if not inactive:
            return
        if self._guess_new():
            new = ActorView(0, self.actor.initial)
            for mailbox, _ in inactive:
                mailbox.view = new
                mailbox.guessed = True
            return
        if len(inactive) < 2:
            return  # no round trip to save
        try:
            views = await rebuild_many(
                self.system.store, self.actor, [address for _, address in inactive]
            )
        except Exception as error:
            logger.debug("activating %d actors at once failed: %r", len(inactive), error)
            return
        found_new = 0
        for (mailbox, _), view in zip(inactive, views, strict=True):
            if isinstance(view, ActorView):
                mailbox.view = view
                found_new += view.version == 0
        self._count_activations(len(inactive), found_new)

    def _count_activations(self, activated: int, found_new: int) -> None:
        self._activated += activated
        self._found_new += found_new
        if self._activated >= 16 * _GUESS_AFTER:  # the recent ones count
            self._activated //= 2
            self._found_new //= 2

    def _guess_new(self) -> bool:
        """Whether actors activated now are guessed new, not read (plain-function kinds only)."""
        share = self.config.new_actor_share
        return not self.actor.handlers_await and (
            self._found_new >= share * max(self._activated, _GUESS_AFTER)
        )

    async def _commit_group(
        self, group: list[_Mailbox], handled_all: list[list[_Handled]]
    ) -> list[bool]:
        """Commit what several actors handled, in one script call (one per partition on a
        Cluster). Per actor: whether what it handled was committed. An actor with a version
        conflict or a message handled before is left out (for the careful path) and the others
        committed again; so is every actor of a partition lost meanwhile. Redis unavailable:
        nothing is committed, and the views are forgotten."""
        committed = [False] * len(group)
        parts = [
            _Part(index, mailbox, handled)
            for index, (mailbox, handled) in enumerate(zip(group, handled_all, strict=True))
            if handled and not mailbox.session.lost
        ]
        if self._one_read:
            units = [parts] if parts else []
        else:
            by_session: dict[PartitionSession, list[_Part]] = {}
            for part in parts:
                by_session.setdefault(part.mailbox.session, []).append(part)
            units = list(by_session.values())
        for unit in units:
            while unit:
                left_out = await self._commit_unit(unit)
                if left_out is None:  # Redis unavailable: the careful path retries
                    for part in unit:
                        part.mailbox.view = None
                    break
                if not left_out:
                    confirmed = sum(part.mailbox.guessed for part in unit)
                    self._count_activations(confirmed, confirmed)
                    for part in unit:
                        committed[part.index] = True
                        session = part.mailbox.session
                        if session._committed(part.mailbox, part.handled):
                            await session._follow_up(part.handled)
                    break
                unit = [part for part in unit if part not in left_out]
        return committed

    async def _commit_unit(self, unit: list["_Part"]) -> list["_Part"] | None:
        """Commit `unit` in one script call. Returns None if Redis failed, no part if it was
        committed, else the parts to leave out before trying again (nothing was written): those
        with a version conflict (a guess that they were new among them: each is counted when
        read again), the one with a message handled before, or every part of a partition found
        lost."""
        faults = self.node.faults
        sessions: dict[PartitionSession, list[ActorCommits]] = {}
        for part in unit:
            view = part.mailbox.view
            assert view is not None
            address = part.handled[0].address
            if faults is not None:
                await faults("before-commit", address)
            commits = [item.commit for item in part.handled]
            actors = sessions.setdefault(part.mailbox.session, [])
            actors.append(ActorCommits(address, view.version, commits))
        calls = [PartitionCommits(s.partition, s.epoch, actors) for s, actors in sessions.items()]
        try:
            result = await calls[0].partition.commit_partitions(
                calls, now_ms=self.node.clock.now_ms(), seen=self.config.seen, checked=True
            )
        except INFRASTRUCTURE_ERRORS:
            return None
        if faults is not None:
            for part in unit:
                await faults("after-commit", part.handled[0].address)
        if result.status is CommitStatus.COMMITTED:
            return []
        if result.status is CommitStatus.FENCED:
            assert result.partition is not None
            lost = list(sessions)[result.partition]
            lost.lose(PartitionLost(f"{lost.partition} moved to another node"))
            return [part for part in unit if part.mailbox.session is lost]
        # The call's actors, in the order of `calls`: where the script's positions point.
        ordered = [part for session in sessions for part in unit if part.mailbox.session is session]
        if result.status is CommitStatus.CONFLICT:
            conflicting = [ordered[actor] for actor, _ in result.conflicts]
            for part in conflicting:
                part.mailbox.view = None
            return conflicting
        assert result.actor is not None
        return [ordered[result.actor]]


class PartitionSession:
    """One owned (kind, partition) for as long as the lease holds: the lease, the partition's
    timers and outbox relay, and its actors (mailboxes and views). Its kind's runner reads and
    handles its messages."""

    def __init__(
        self, runner: KindRunner, partition: Partition, epoch: int, *, held_until_ms: int
    ) -> None:
        self.runner = runner
        self.node = runner.node
        self.partition = partition
        self.epoch = epoch
        self.held_until_ms = held_until_ms
        """Until when the lease surely holds, by the node's clock: it was taken or renewed by
        a call made `lease_ttl_ms` before."""
        self.system = runner.system
        self.config = runner.config
        self.actor = runner.actor
        self._target_prefix = f"{partition.kind}/"
        """How the targets of this partition's actors begin (the kind is checked already)."""
        self._phase = partition.number / partition.keys.partitions_of(partition.kind)
        """Where in their period this partition's lease renewals and polls fall: the first
        of each comes early by up to half a period, so a node's partitions spread them out
        instead of doing them all at once (a burst of round trips that every message in
        flight then waits behind)."""
        self.mailboxes: dict[str, _Mailbox] = {}
        """The actors with messages waiting or in hand (an actor is here or in `idle`)."""
        self.idle: dict[str, _IdleActor] = {}
        """The actors with none, and their views: least recently used first."""
        self._drained = anyio.Event()
        self._timers_changed = anyio.Event()
        self._outbox_changed = anyio.Event()
        self.stopping = False
        self.lost: PartitionLost | None = None
        """Why the partition was lost, once it was: nothing more is committed for it."""
        self._stop_requested = anyio.Event()
        self._in_flight = 0
        """Messages handed to mailboxes and not settled yet (see `max_in_flight`)."""
        self._in_flight_fell: anyio.Event | None = None
        """Set when messages settle while the reader waits for `_in_flight` to fall."""

    def lease_holds(self, now_ms: int) -> bool:
        """Whether the lease surely holds for one more read (a blocking read's wait included),
        unless the session is stopping. A node that stood still past its lease (a pause, a
        stalled event loop) must not take new entries into its pending list once it wakes:
        the node that took the partition over claimed the pending entries when it started,
        not later ones; they would stay there, unhandled. The renewal that finds the lease
        lost ends the session."""
        margin_ms = min(self.config.block_ms or 0, self.config.lease_ttl_ms // 3)
        return not self.stopping and now_ms + margin_ms < self.held_until_ms

    def stop(self) -> None:
        """Hand the partition over: stop reading, finish the messages in hand, release."""
        self.stopping = True
        self._stop_requested.set()
        self._timers_changed.set()
        self._outbox_changed.set()

    def lose(self, reason: PartitionLost) -> None:
        """The partition moved to another node: stop reading it and committing for it at once;
        its messages in hand are left pending for the new owner."""
        if self.lost is not None:
            return
        self.lost = reason
        self.stop()
        self.runner.drop(self)
        # The reader may wait for room here: it leaves its entries pending instead.
        if self._in_flight_fell is not None:
            self._in_flight_fell.set()
        for mailbox in self.mailboxes.values():
            if mailbox.room is not None:
                mailbox.room.set()

    async def sleep_unless_stopping(self, seconds: float) -> None:
        with anyio.move_on_after(seconds):
            await self._stop_requested.wait()

    async def run(self) -> None:
        """Serve the partition until stopped (then hand it over: release the lease once its
        messages in hand are done) or lost (raise PartitionLost)."""
        handed_over = False
        try:
            async with anyio.create_task_group() as services:
                services.start_soon(self._renew_lease)
                services.start_soon(self._fire_timers)
                services.start_soon(self._relay_outbox)
                services.start_soon(self._passivate)
                await self._resume()
                self.runner.join(self)
                await self._stop_requested.wait()
                await self.runner.leave(self)
                if self.lost is not None:
                    raise self.lost
                await self._wait_drained()
                handed_over = True
                services.cancel_scope.cancel()
        finally:
            if not handed_over:
                self.lose(self.lost or PartitionLost(f"{self.partition} is no longer served"))
                # The partition's next session on this node claims what is pending when it
                # starts: what a read in flight delivers for this one (left pending) must be
                # there by then, or it would stay pending, unhandled.
                with anyio.CancelScope(shield=True):
                    await self.runner.leave(self)
        await self.partition.release(self.node.node_id)

    # Routing.

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
                self.runner._hand_out()
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
                self.runner._hand_out()  # what it waits for may be waiting for those
                while self._in_flight >= max_in_flight and self.lost is None:
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
                if idle is None:
                    mailbox = self.mailboxes[key] = _Mailbox(key, self)
                else:  # its target was checked before it had a view (see `_address_of`)
                    address = Address(self.partition.kind, key[len(self._target_prefix) :])
                    mailbox = self.mailboxes[key] = _Mailbox(key, self, idle.view, address=address)
            while len(mailbox.waiting) >= mailbox_size and self.lost is None:
                self.runner._hand_out()
                # While the reader waits here the mailbox stays (see `_release`).
                mailbox.room = anyio.Event()
                await mailbox.room.wait()
                mailbox.room = None
            if len(mailbox.waiting) >= mailbox_size:
                self._settled(1)
                continue  # lost while the reader waited: left pending
            count = 1 if deliveries is None else deliveries.get(entry.id, 1)
            mailbox.waiting.append(_Delivery(entry.id, data, count, envelope, error))
            if not mailbox.held:
                mailbox.held = True
                self.runner._newly_ready.append(mailbox)

    def _take(self, mailbox: _Mailbox) -> list[_Delivery]:
        """The next messages of `mailbox` to handle, up to `commit_batch`."""
        waiting = mailbox.waiting
        if len(waiting) <= self.config.commit_batch:
            batch = list(waiting)
            waiting.clear()
        else:
            batch = [waiting.popleft() for _ in range(self.config.commit_batch)]
        if mailbox.room is not None:
            mailbox.room.set()
        return batch

    def _release(self, mailbox: _Mailbox, now_ms: int) -> None:
        """A handler task is done with `mailbox`: back in line if messages wait, else idle
        (last used at `now_ms`)."""
        if mailbox.waiting:
            self.runner._ready.send_nowait([mailbox])
            return
        mailbox.held = False
        if mailbox.room is not None:
            return  # the reader waits to add to it (see `_dispatch`): it stays
        del self.mailboxes[mailbox.key]
        # An actor whose view could not be kept (undecodable messages, failures) is not kept.
        if mailbox.view is not None:
            # Most recently used last.
            self.idle[mailbox.key] = _IdleActor(mailbox.view, now_ms)

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

    # Handling, one actor at a time (the careful path).

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
                await self._wait_without_turn(_backoff(self.config, failures))
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
                await self._wait_without_turn(_backoff(self.config, attempts))
                attempts += 1
                await self.partition.inbox.set_deliveries(
                    self.node.node_id, delivery.entry_id, attempts
                )
                if self.stopping:
                    return False

    async def _wait_without_turn(self, seconds: float) -> None:
        """Wait before a retry without holding a turn: other actors handle meanwhile."""
        handling = self.runner.handling
        handling.release()
        try:
            await self.sleep_unless_stopping(seconds)
        finally:
            # Taken back even when cancelled: the turn is given back on the way out.
            with anyio.CancelScope(shield=True):
                await handling.acquire()

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
            self.runner._count_activations(1, mailbox.view.version == 0)
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

    def _early(self, period_s: float) -> float:
        """The first wait of a service repeating every `period_s`: early by the partition's
        phase (see `_phase`), never late."""
        return period_s * (1 - self._phase / 2)

    async def _renew_lease(self) -> None:
        node, ttl_ms = self.node, self.config.lease_ttl_ms
        clock = node.clock
        # Never late: a lease is renewed at least every third of its time to live.
        wait_s = self._early(ttl_ms / 3000)
        while True:
            await clock.sleep(wait_s)
            wait_s = ttl_ms / 3000
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
            self.runner.poke()

    async def _fire_timers(self) -> None:
        client = self.system.client
        failures = 0
        next_wait_s = self._early(self.config.max_timer_wait_s)
        while not self.stopping:
            # A fresh event before looking: a timer committed from now on wakes the wait.
            self._timers_changed = anyio.Event()
            wait_s, next_wait_s = next_wait_s, self.config.max_timer_wait_s
            try:
                now = self.node.clock.now_ms()
                if await self.partition.fire_timers(now):
                    continue
                head = await client.zrange(self.partition.timers_key, 0, 0, withscores=True)
                failures = 0
            except INFRASTRUCTURE_ERRORS:
                failures += 1
                wait_s = _backoff(self.config, failures)
                head = []
            if head:
                wait_s = min(wait_s, max(0.0, (head[0][1] - now) / 1000))
            with anyio.move_on_after(wait_s):
                await self._timers_changed.wait()

    async def _relay_outbox(self) -> None:
        failures = 0
        next_wait_s = self._early(self.config.relay_poll_s)
        while not self.stopping:
            self._outbox_changed = anyio.Event()
            wait_s, next_wait_s = next_wait_s, self.config.relay_poll_s
            try:
                if await self.partition.relay(self.node.node_id):
                    continue
                failures = 0
            except INFRASTRUCTURE_ERRORS:
                failures += 1
                wait_s = _backoff(self.config, failures)
            with anyio.move_on_after(wait_s):
                await self._outbox_changed.wait()
