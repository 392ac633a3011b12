"""The node: owns partitions through leases, reads their inboxes, runs actors, commits.

Per owned (kind, partition) a session runs a reader (XREADGROUP), one mailbox task per
active actor (serial within an actor, concurrent across actors, bounded), a timer task, an
outbox relay and a lease renewer. Each handled message ends in exactly one atomic commit
script (events, handled message, outgoing messages, timers, dedupe id, XACK), or in the
dead-letter stream after `max_deliveries` failed attempts.
"""

import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
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
)
from repertory.schemas import Envelope
from repertory.schemas.errors import DecodeError, RepertoryError
from repertory.streams.inbox import InboxEntry
from repertory.streams.keys import Address
from repertory.streams.membership import Membership
from repertory.streams.partition import Commit, CommitResult, CommitStatus, Partition, SeenWindow

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
    commit_batch: int = 64
    """Messages of one actor waiting in its mailbox are handled in turn and committed together,
    up to this many per script call."""
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


@dataclass(slots=True)
class _Loaded:
    view: ActorView | None = None


@dataclass(frozen=True, slots=True)
class _Handled:
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
            await self.membership.leave(self.node_id)

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
        members = await self.membership.heartbeat(self.node_id, self.config.lease_ttl_ms)
        self.members = members
        # Partitions are spread evenly: the members, in order, take the remainder one each.
        base, remainder = divmod(len(self._partitions), max(1, len(members)))
        rank = members.index(self.node_id) if self.node_id in members else len(members)
        self.share = base + (1 if rank < remainder else 0)

    async def _heartbeat(self) -> None:
        while True:
            await anyio.sleep(self.config.lease_ttl_ms / 3000)
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
            if len(self.sessions) < self.share or seen_free >= 2:
                epoch = await partition.acquire(self.node_id, self.config.lease_ttl_ms)
            else:
                seen_free = seen_free + 1 if await partition.owner() is None else 0
            if epoch is None:
                await self.sleep_unless_stopping(self.config.lease_ttl_ms / 16000)
                continue
            seen_free = 0
            session = PartitionSession(self, partition, epoch)
            self.sessions[(kind, number)] = session
            try:
                await session.run()
            except* PartitionLost:
                logger.warning("lost %s (epoch %d)", partition, epoch)
            finally:
                self.sessions.pop((kind, number), None)

    async def sleep_unless_stopping(self, seconds: float) -> None:
        with anyio.move_on_after(seconds):
            await self._stop_requested.wait()

    async def fault(self, point: str, address: Address | None) -> None:
        if self.faults is not None:
            await self.faults(point, address)


class PartitionSession:
    """One owned (kind, partition) for as long as the lease holds."""

    def __init__(self, node: Node, partition: Partition, epoch: int) -> None:
        self.node = node
        self.partition = partition
        self.epoch = epoch
        self.system = node.system
        self.config = node.config
        self.actor: Actor[Any] = node.system.actors[partition.kind]
        self.mailboxes: dict[str, MemoryObjectSendStream[_Delivery]] = {}
        self._timers_changed = anyio.Event()
        self._outbox_changed = anyio.Event()
        self.stopping = False
        self._stop_requested = anyio.Event()
        self._in_flight = anyio.Semaphore(self.config.max_in_flight)

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
            async with anyio.create_task_group() as actors:
                await self._read(actors)
            services.cancel_scope.cancel()
        await self.partition.release(self.node.node_id)

    # Reading and routing.

    async def _read(self, actors: TaskGroup) -> None:
        try:
            await self._resume(actors)
            inbox = self.partition.inbox
            failures = 0
            while not self.stopping:
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
                for entry in entries:
                    await self._dispatch(actors, entry, deliveries=1)
                if not entries and self.config.block_ms is None:
                    await self.sleep_unless_stopping(self.config.poll_s)
        finally:
            for mailbox in self.mailboxes.values():
                mailbox.close()

    async def _resume(self, actors: TaskGroup) -> None:
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
                for entry in claimed.entries:
                    await self._dispatch(actors, entry, deliveries=counts.get(entry.id, 1))
            start = claimed.next_start
            if start in (b"0-0", "0-0"):
                return

    async def _dispatch(self, actors: TaskGroup, entry: InboxEntry, *, deliveries: int) -> None:
        if self.stopping:
            return  # left pending for the partition's next owner
        data = entry.data or b""
        envelope: Envelope | None = None
        error: DecodeError | None = None
        if entry.data is None:
            error = DecodeError("inbox entry has no message field", reason="malformed")
        else:
            try:
                envelope = self.system.codec.decode_envelope(entry.data)
            except DecodeError as undecodable:
                error = undecodable
        # Undecodable entries have no actor: each gets a mailbox of its own.
        key = envelope.target if envelope is not None else f"!{entry.id.decode()}"
        mailbox = self.mailboxes.get(key)
        if mailbox is None:
            mailbox, receive = anyio.create_memory_object_stream[_Delivery](
                self.config.mailbox_size
            )
            self.mailboxes[key] = mailbox
            actors.start_soon(self._mailbox_loop, key, receive)
        # Back-pressure: the reader waits while this many messages are in the mailboxes.
        await self._in_flight.acquire()
        try:
            await mailbox.send(_Delivery(entry.id, data, deliveries, envelope, error))
        except anyio.BrokenResourceError:
            # The mailbox's task ended: on a graceful stop, or by an error that is tearing the
            # session down. The entry stays pending in the group for the partition's next owner.
            self._in_flight.release()

    async def _mailbox_loop(self, key: str, receive: MemoryObjectReceiveStream[_Delivery]) -> None:
        loaded = _Loaded()
        idle_s = self.actor.idle_after_s
        with receive:
            while True:
                delivery: _Delivery | None = None
                with anyio.move_on_after(idle_s):
                    try:
                        delivery = await receive.receive()
                    except anyio.EndOfStream:
                        return  # the reader stopped and what it handed over is done
                if delivery is None:
                    # Passivate; nothing can be in flight towards an idle, empty mailbox.
                    if receive.statistics().current_buffer_used == 0:
                        del self.mailboxes[key]
                        return
                    continue
                batch = [delivery]
                while len(batch) < self.config.commit_batch:
                    try:
                        batch.append(receive.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                try:
                    async with self.node.handling:
                        if len(batch) == 1:
                            await self._process(loaded, delivery)
                        else:
                            await self._process_batch(loaded, batch)
                finally:
                    for _ in batch:
                        self._in_flight.release()

    # Handling.

    async def _process(self, loaded: _Loaded, delivery: _Delivery) -> None:
        attempts = delivery.deliveries
        max_deliveries = self.actor.max_deliveries or self.config.max_deliveries
        failures = 0
        # A message in hand is handled even when stopping; only retries stop: a message that
        # failed is left pending (its attempts counted) for the partition's next owner.
        while True:
            try:
                await self._handle_once(loaded, delivery)
                return
            except _Retry:
                continue
            except INFRASTRUCTURE_ERRORS as error:
                loaded.view = None
                if self.stopping:
                    return
                failures += 1
                logger.warning("redis unavailable (%s); retrying", error)
                await self.sleep_unless_stopping(self._backoff(failures))
            except PartitionLost:
                raise
            except Exception as error:
                loaded.view = None
                if attempts >= max_deliveries:
                    await self._dead_letter(delivery, error, attempts)
                    return
                logger.info(
                    "attempt %d of %s failed: %r", attempts, delivery.entry_id.decode(), error
                )
                await self.sleep_unless_stopping(self._backoff(attempts))
                attempts += 1
                await self.partition.inbox.set_deliveries(
                    self.node.node_id, delivery.entry_id, attempts
                )
                if self.stopping:
                    return

    def _backoff(self, attempt: int) -> float:
        return float(min(self.config.retry_cap_s, self.config.retry_base_s * 2 ** (attempt - 1)))

    async def _handle_once(self, loaded: _Loaded, delivery: _Delivery) -> None:
        """Handle and commit one message (the careful path, with retries around it)."""
        handled = await self._handle_next(loaded, [], delivery)
        result = await self._commit(loaded, [handled])
        if result.status is CommitStatus.CONFLICT:
            raise _Retry

    async def _process_batch(self, loaded: _Loaded, batch: list[_Delivery]) -> None:
        """Handle messages of one actor one after another and commit them in one script call.

        A message that fails to handle or was handled before takes the careful path on its
        own, after the messages before it are committed; the rest go on batching. A version
        conflict (another writer) sends the whole batch the careful way."""
        while batch:
            handled: list[_Handled] = []
            try:
                for delivery in batch:
                    handled.append(await self._handle_next(loaded, handled, delivery))
            except PartitionLost:
                raise
            except Exception:
                pass  # batch[len(handled)] takes the careful path below
            done = 0
            if handled:
                result = await self._commit_or_none(loaded, handled)
                if result is not None and result.status is CommitStatus.DUPLICATE:
                    done = result.duplicate or 0
                    if done:
                        result = await self._commit_or_none(loaded, handled[:done])
                elif result is not None and result.status is CommitStatus.COMMITTED:
                    done = len(handled)
                if result is None or result.status is CommitStatus.CONFLICT:
                    for delivery in batch:
                        await self._process(loaded, delivery)
                    return
            if done < len(batch):
                await self._process(loaded, batch[done])
                done += 1
            batch = batch[done:]

    async def _handle_next(
        self, loaded: _Loaded, handled: list[_Handled], delivery: _Delivery
    ) -> _Handled:
        """Handle `delivery` on the view the messages handled before it in the batch left."""
        if delivery.envelope is None:
            raise delivery.error or DecodeError("no envelope", reason="malformed")
        address = Address.parse(delivery.envelope.target)
        if loaded.view is None:
            loaded.view = await rebuild(self.system.store, self.actor, address)
        return await self._handle(address, handled[-1].view if handled else loaded.view, delivery)

    async def _commit_or_none(
        self, loaded: _Loaded, handled: list[_Handled]
    ) -> CommitResult | None:
        """Commit, or None (and the view forgotten) if Redis failed: the careful path retries."""
        try:
            return await self._commit(loaded, handled)
        except INFRASTRUCTURE_ERRORS:
            loaded.view = None
            return None

    async def _handle(self, address: Address, view: ActorView, delivery: _Delivery) -> _Handled:
        """Run the handler of one message on `view` and prepare its commit; writes nothing."""
        envelope = delivery.envelope
        assert envelope is not None
        system, node = self.system, self.node
        codec = system.codec
        if address.kind != self.partition.kind:
            raise UnknownKindError(f"{address} arrived in the inbox of {self.partition}")
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

        await node.fault("before-handle", address)
        rejected: Rejected | None = None
        try:
            events = await self.actor.handle(state, message, ctx)
        except Rejected as refusal:
            rejected, events = refusal, []
            ctx.outgoing.clear()
        except Exception as error:
            raise HandlerError(error) from error
        await node.fault("after-handle", address)
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

    async def _commit(self, loaded: _Loaded, handled: list[_Handled]) -> CommitResult:
        """Commit handled messages of one actor; on success, the replies and snapshot follow."""
        assert loaded.view is not None
        before = loaded.view.version
        address = handled[0].address
        await self.node.fault("before-commit", address)
        result = await self.partition.commit(
            address,
            before,
            [item.commit for item in handled],
            epoch=self.epoch,
            now_ms=self.node.clock.now_ms(),
            seen=self.config.seen,
        )
        await self.node.fault("after-commit", address)
        if result.status is CommitStatus.FENCED:
            raise PartitionLost(f"{self.partition} moved to another node")
        if result.status is CommitStatus.CONFLICT:
            loaded.view = None
        if result.status is not CommitStatus.COMMITTED:
            return result
        after = handled[-1].view
        loaded.view = after
        if any(item.commit.timers for item in handled):
            self._timers_changed.set()
        if any(item.commit.remote for item in handled):
            self._outbox_changed.set()
        every = self.actor.snapshot_every
        if every and after.version // every > before // every:
            await self._snapshot(address, after.state, after.version)
        for item in handled:
            if item.reply is not None:
                await self._reply(*item.reply)
        return result

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
        ttl_ms = self.config.lease_ttl_ms
        deadline = anyio.current_time() + ttl_ms / 1000
        while True:
            await anyio.sleep(ttl_ms / 3000)
            try:
                epoch = await self.partition.acquire(self.node.node_id, ttl_ms)
            except INFRASTRUCTURE_ERRORS:
                if anyio.current_time() > deadline:
                    raise PartitionLost(f"could not renew {self.partition}") from None
                continue
            if epoch != self.epoch:
                raise PartitionLost(f"{self.partition} lease lost (epoch {epoch})")
            deadline = anyio.current_time() + ttl_ms / 1000

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
