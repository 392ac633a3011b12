"""Runtime: a real node end to end, latency, activation; vs raw redis-py, Dramatiq, Celery.

The actor is an event-sourced counter: each `Add` command becomes one `Added` event. Every
message goes send (XADD) -> read (XREADGROUP) -> handled -> committed (one EVALSHA of
`commit.lua`: event, handled message, dedupe id, XACK) in both the node and its raw baseline.

The raw baseline (`RawNode`) is the node's Redis work written by hand with no framework: one
reader taking every partition's new messages in one XREADGROUP of up to `read_count` each
(once a turn is free) into a queue per actor, a fixed set of handler tasks (the node's
`plain_handling`) taking actors with messages waiting from one ready queue, whatever their
partitions (serial within an actor, concurrent across actors), as the node does, activation by
one EVALSHA of the node's activation script (`activate.lua`: the snapshot, or the first events
of an actor without one) for the actors taken together on their first message (none once most
actors activated lately were new: those are taken as new, unread, as the node does), then per
message one msgspec decode of the envelope, one msgspec encode of the event record and one
EVALSHA of the same commit script with the same keys and arguments (epoch checks included)
for the actors taken together. Its client is plain redis-py, which packs commands in Python;
repertory's client packs them with hiredis (`repertory.streams.client`).

With 100,000 actors every message activates an actor; the row "activated beforehand" has each
actor handle one message off the clock first, which tells the cost of activating an actor from
the cost of having many. The row "flatness" runs the node alone at each of those actor counts,
the counts taking turns within each round: the machine's speed drifts from one minute to the
next, so rows run one after another compare each with its raw baseline but not with each
other.

The task queues are compared twice: end to end (sent while handled, the senders in this
process) and as a backlog drained (every message sent before the runtime or the worker starts;
the clock runs from that start to the last message handled), the way ARCHITECTURE.md quotes
the peers.

Each round of a node or raw variant works in an application namespace of its own (fresh keys,
fresh consumer groups), starts its runtime before the clock (the drained rows: with it) and
stops it after, and empties the database once its checks are done, so that 100,000-actor rounds
do not pile up in memory.
"""

import argparse
import asyncio
import collections
import importlib.util
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Annotated, Any, Protocol
from urllib.parse import urlsplit

import anyio
import msgspec
import redis.asyncio
from rich.console import Console

from benchmarks.harness import (
    DEFAULT_ROUNDS,
    Benchmark,
    Environment,
    RoundRunner,
    Sample,
    Suite,
    SuiteFactory,
    Variant,
    empty,
    render_markdown,
    run_suites,
    sequential,
)
from repertory.actors.model import Actor, Context, applier, command
from repertory.runtime import eventloop
from repertory.runtime.node import _GUESS_AFTER, Node, NodeConfig
from repertory.runtime.system import ActorSystem, rebuild
from repertory.runtime.worker import Worker, WorkerConfig
from repertory.schemas import schema
from repertory.streams.batching import MAX_BATCH
from repertory.streams.client import ClientConfig, RedisClient, create_client
from repertory.streams.eventstore import ACTIVATION_PAGE, EventStore
from repertory.streams.inbox import MESSAGE_FIELD
from repertory.streams.keys import Address, KeyLayout
from repertory.streams.partition import (
    CommitStatus,
    GroupCommitResult,
    Partition,
    PartitionCommits,
    SeenWindow,
)
from repertory.streams.scripts import ACTIVATE, ADD_MESSAGES, COMMIT
from repertory.streams.taskqueue import TaskQueue

KIND = "counter"
PARTITIONS = 16
ADD_TYPE = "bench.runtime.add"
ADDED_TYPE = "bench.runtime.added"
COUNT_TYPE = "bench.runtime.count"
RAW_TARGET = 0.4
QUEUE_TARGET = 10.0
FLAT_TARGET = 0.9
"""The least rate with many actors, as a share of the rate with one (the issue's "within 10 %
from 1 to 100,000 actors")."""
SENDERS = 16
"""Concurrent senders in the throughput rounds (async tasks; threads for Dramatiq and Celery)."""
QUEUE_SENDER_THREADS = 4
QUEUE_WORKER_THREADS = 8
EVENT_CHECK_ACTORS = 1000
"""Up to this many actors, a round also checks every actor's event count (off the clock)."""
ACTIVATION_SNAPSHOT_LAG = 99
"""Events written after the snapshot: the most a `snapshot_every = 100` actor ever replays."""
READ_BATCH = 1000
POLL_S = 0.005
"""How often a round's end is checked for once everything is sent: negligible next to rounds
of seconds, and cheap (one pipelined round trip)."""

NODE_CONFIG = NodeConfig()
# A quick run stops a node every round; short blocking reads make those stops (off the clock)
# fast. Under load a read returns at once either way.
QUICK_NODE_CONFIG = NodeConfig(block_ms=100)
SEEN = SeenWindow()
COMMIT_BATCH: int = getattr(NODE_CONFIG, "commit_batch", 1)
"""Messages of one actor committed per script call, as many as the node commits at most."""
COMMIT_ACTORS: int = getattr(NODE_CONFIG, "commit_actors", 1)
"""Actors committed per script call, as many as the node commits at most."""

# The raw baseline calls the node's commit script itself (repertory/streams/scripts/commit.lua)
# by its SHA1 with the arguments the node passes. Per message: XADD event(s), XADD handled
# message, ZADD seen; per call: epoch check, dedupe checks, version check, XACK + XDEL of the
# batch's inbox entries, and each partition's seen-set pruned once a second.


@schema(ADD_TYPE)
class Add(msgspec.Struct, frozen=True, gc=False):
    amount: int


@schema(ADDED_TYPE)
class Added(msgspec.Struct, frozen=True, gc=False):
    amount: int


@schema(COUNT_TYPE)
class Count(msgspec.Struct, frozen=True, gc=False):
    count: int = 0
    total: int = 0


class Counter(Actor[Count]):
    kind = KIND
    initial = Count()

    @command
    def add(self, state: Count, cmd: Add, ctx: Context) -> Added:
        return Added(cmd.amount)

    @applier
    def added(self, state: Count, event: Added) -> Count:
        return Count(state.count + 1, state.total + event.amount)


# The wire shapes of the envelope and the event record, written by hand with typed payloads
# (as bench_eventstore does): one msgspec pass each way.


class RawEnvelope(msgspec.Struct, kw_only=True, omit_defaults=True, frozen=True, gc=False):
    id: str
    type: str
    schema_version: Annotated[int, msgspec.Meta(ge=1)]
    target: str
    payload: Add
    created_at: Annotated[int, msgspec.Meta(ge=0)]
    idempotency_key: str | None = None
    content_type: str = "application/msgpack"


def raw_envelope(address: Address, amount: int, key: str | None) -> RawEnvelope:
    return RawEnvelope(
        id=str(uuid.uuid4()),
        type=ADD_TYPE,
        schema_version=1,
        target=str(address),
        payload=Add(amount),
        created_at=_now_ms(),
        idempotency_key=key,
    )


class RawEventRecord(msgspec.Struct, kw_only=True, omit_defaults=True, frozen=True, gc=False):
    type: str
    schema_version: Annotated[int, msgspec.Meta(ge=1)]
    payload: Added
    recorded_at: Annotated[int, msgspec.Meta(ge=0)]
    causation_id: str | None = None
    correlation_id: str | None = None
    content_type: str = "application/msgpack"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


Delivery = tuple[bytes, bytes, RawEnvelope]
"""An inbox entry's id, its data as read, and its decoded envelope."""
Send = Callable[[Address, int, str | None], Awaitable[object]]
"""Sends `Add(amount)` to an actor, with an idempotency key or none."""
OnCommit = Callable[[str], None]
"""Told the dedupe id (the idempotency key, else the message id) of each committed message,
as soon as the script call that committed it returns."""


def _alive() -> None:
    """A runtime that recovers from its own errors (the node) has nothing to report."""


@dataclass(frozen=True, slots=True)
class Driver:
    """A running runtime: how to send to it, and `check()`, which raises the error that
    stopped it, so that a round fails at once instead of waiting out its deadline."""

    send: Send
    started: float
    """`time.perf_counter()` just before the runtime began to read."""
    check: Callable[[], None] = _alive


Backlog = Callable[[Send], Awaitable[None]]
"""Sends what a runtime finds waiting when it starts (off the clock)."""


class Runtime(Protocol):
    """Runs a node (or its raw equivalent) on an application namespace until the context
    exits, once `backlog`, if any, is sent."""

    def __call__(
        self, app: str, on_commit: OnCommit | None, backlog: Backlog | None = None
    ) -> AbstractAsyncContextManager[Driver]: ...


async def _until(
    condition: Callable[[], Awaitable[bool]], *, timeout: float, what: str, every: float = POLL_S
) -> None:
    """Wait for `condition` with a deadline: a stuck round fails instead of hanging."""
    with anyio.move_on_after(timeout):
        # The condition is held in Redis or by worker threads: there is no event to wait on.
        while not await condition():  # noqa: ASYNC110
            await anyio.sleep(every)
        return
    raise RuntimeError(f"{what}: not reached within {timeout:.0f} s")


def _check(what: str, actual: int, expected: int) -> None:
    # A round that silently did less work than it claims would flatter itself.
    if actual != expected:
        raise RuntimeError(f"{what}: {actual}, expected {expected}")


@dataclass(frozen=True, slots=True)
class Rig:
    """What every round shares: the clients, and the server's unix socket."""

    env: Environment
    client: RedisClient
    """repertory's own client (create_client), used by the node and ActorSystem."""
    admin: "redis.asyncio.Redis"
    """A plain client for the raw baseline, the round checks and the end-of-round polls."""
    commit_sha: str
    """The raw baseline's commit script, loaded."""

    @property
    def node_config(self) -> NodeConfig:
        return QUICK_NODE_CONFIG if self.env.quick else NODE_CONFIG

    async def committed(self, layout: KeyLayout) -> int:
        """Messages committed in `layout`'s namespace: each commit adds its dedupe id to its
        partition's seen-set, and no id repeats within a round."""
        pipeline = self.admin.pipeline(transaction=False)
        for number in range(PARTITIONS):
            pipeline.zcard(layout.seen(KIND, number))
        return sum(int(count) for count in await pipeline.execute())

    async def lengths(self, keys: Sequence[str]) -> int:
        total = 0
        for start in range(0, len(keys), 10_000):
            pipeline = self.admin.pipeline(transaction=False)
            for key in keys[start : start + 10_000]:
                pipeline.xlen(key)
            total += sum(int(length) for length in await pipeline.execute())
        return total

    async def check_round(
        self, layout: KeyLayout, addresses: Sequence[Address], messages: int
    ) -> None:
        """Off the clock: every message committed once, nothing left or dead-lettered."""
        _check(f"committed in {layout.app}", await self.committed(layout), messages)
        inboxes = [layout.inbox(KIND, number) for number in range(PARTITIONS)]
        _check(f"inbox entries left in {layout.app}", await self.lengths(inboxes), 0)
        dead = [layout.dead_letters(KIND, number) for number in range(PARTITIONS)]
        _check(f"dead letters in {layout.app}", await self.lengths(dead), 0)
        if len(addresses) <= EVENT_CHECK_ACTORS:
            events = [layout.events(address) for address in addresses]
            _check(f"events in {layout.app}", await self.lengths(events), messages)

    async def wait_committed(self, layout: KeyLayout, messages: int, driver: Driver) -> None:
        async def done() -> bool:
            driver.check()
            return await self.committed(layout) >= messages

        await _until(done, timeout=60 + messages / 200, what=f"{messages:,} commits")


# The node.


class ObservedPartition(Partition):
    """A partition that reports each message it committed as soon as the script returns: the
    latency rounds' "committed" instant, taken where the node's own commit call returns (every
    commit goes through `commit_partitions`)."""

    def __init__(self, on_commit: OnCommit, *args: Any) -> None:
        super().__init__(*args)
        self.on_commit = on_commit

    async def commit_partitions(
        self, parts: Sequence[PartitionCommits], **options: Any
    ) -> GroupCommitResult:
        result = await super().commit_partitions(parts, **options)
        if result.status is CommitStatus.COMMITTED:
            for part in parts:
                for actor in part.actors:
                    for commit in actor.commits:
                        self.on_commit(commit.dedupe_id)
        return result


class ObservedSystem(ActorSystem):
    def __init__(self, on_commit: OnCommit, *, app: str, client: RedisClient) -> None:
        super().__init__(Counter(), app=app, partitions=PARTITIONS, client=client)
        self.on_commit = on_commit

    def partition(self, kind: str, number: int) -> Partition:
        return ObservedPartition(self.on_commit, self.client, self.keys, kind, number)


@asynccontextmanager
async def repertory_runtime(
    rig: Rig, app: str, on_commit: OnCommit | None, backlog: Backlog | None = None
) -> AsyncIterator[Driver]:
    """A real `Node` with default settings serving a `Counter` system; sends go through
    `ActorSystem.send`."""
    system: ActorSystem
    if on_commit is None:
        system = ActorSystem(Counter(), app=app, partitions=PARTITIONS, client=rig.client)
    else:
        system = ObservedSystem(on_commit, app=app, client=rig.client)
    node = Node(system, rig.node_config)

    async def send(address: Address, amount: int, key: str | None) -> None:
        await system.send(address, Add(amount), idempotency_key=key)

    if backlog is not None:
        await backlog(send)
    async with anyio.create_task_group() as group:
        started = time.perf_counter()
        await group.start(node.run)

        async def serving() -> bool:
            return len(node.sessions) == PARTITIONS

        await _until(serving, timeout=30, what="the node holding every partition")
        try:
            yield Driver(send, started)
        finally:
            node.stop()
            await node.stopped.wait()


# The same work by hand.


class RawSends:
    """Concurrent sends as `ActorSystem.send` makes them (`StreamAppender`), by hand, with no
    cancellation to handle: a send while another's round trip is out waits, and the first
    waiting sends them all in one EVALSHA of the same script (`add_messages.lua`) when it
    returns; a send alone is one XADD."""

    LEAD = b""

    def __init__(self, client: "redis.asyncio.Redis") -> None:
        self.client = client
        self.waiting: collections.deque[tuple[str, bytes, asyncio.Future[bytes]]] = (
            collections.deque()
        )
        self.sending = False
        self.crowded = False

    async def add(self, inbox: str, data: bytes) -> bytes:
        answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.waiting.append((inbox, data, answer))
        if self.sending:
            if await answer != self.LEAD:
                return answer.result()
        else:
            self.sending = True
            if self.crowded:
                await asyncio.sleep(0)  # the senders ready to run join
        waiting = self.waiting
        batch = [waiting.popleft() for _ in range(min(MAX_BATCH, len(waiting)))]
        self.crowded = len(batch) > 1
        ids: list[bytes]
        if len(batch) == 1:
            ids = [await self.client.xadd(inbox, {MESSAGE_FIELD: data})]
        else:
            keys = [key for key, _, _ in batch]
            ids = await self.client.evalsha(
                ADD_MESSAGES.sha, len(keys), *keys, *[message for _, message, _ in batch]
            )
        if waiting:
            waiting[0][2].set_result(self.LEAD)
        else:
            self.sending = False
        for (_, _, other), other_id in zip(batch[1:], ids[1:], strict=True):
            other.set_result(other_id)
        return ids[0]


@dataclass(slots=True, eq=False)
class RawActor:
    """An actor of the raw runtime: the messages waiting for it and its state once loaded."""

    address: Address
    partition: int
    keys: list[str]
    """Its event stream and its handled-message stream."""
    waiting: collections.deque[Delivery] = field(default_factory=collections.deque)
    loaded: bool = False
    held: bool = False
    """Queued for a handler task, or held by one."""
    state: Count = field(default_factory=Count)
    version: int = 0


class RawNode:
    """The node's Redis work with no framework; see the module's docstring."""

    def __init__(
        self,
        client: "redis.asyncio.Redis",
        layout: KeyLayout,
        commit_sha: str,
        on_commit: OnCommit | None,
        config: NodeConfig,
    ) -> None:
        self.client = client
        self.config = config
        self.layout = layout
        self.commit_sha = commit_sha
        self.on_commit = on_commit
        self.group = layout.group(KIND)
        self.consumer = f"raw-{uuid.uuid4().hex[:6]}"
        self.epoch = "1"
        self.actors: dict[str, RawActor] = {}
        self.stopping = False
        self.ready: asyncio.Queue[RawActor | None] = asyncio.Queue()
        # As the node runs the counters' plain handlers: this many at once over all partitions.
        self.handler_tasks = min(config.max_handling, config.plain_handling)
        self.handling = asyncio.Semaphore(self.handler_tasks)
        self.inboxes = [layout.inbox(KIND, number) for number in range(PARTITIONS)]
        self.partition_keys = [
            [
                layout.inbox(KIND, number),
                layout.seen(KIND, number),
                layout.epoch(KIND, number),
                layout.outbox(KIND, number),
                layout.timers(KIND, number),
            ]
            for number in range(PARTITIONS)
        ]
        self.trimmed_at: list[int | None] = [None] * PARTITIONS
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder(RawEnvelope).decode
        self._decode_event = msgspec.msgpack.Decoder(RawEventRecord).decode
        self.sends = RawSends(client)
        self.activated = 0
        self.found_new = 0
        """As the node counts them, to guess as it does that actors are new."""

    async def prepare(self) -> None:
        """What the node does before reading: the consumer groups, and an epoch (the lease)."""
        for number in range(PARTITIONS):
            inbox = self.layout.inbox(KIND, number)
            await self.client.xgroup_create(inbox, self.group, id="0", mkstream=True)
            await self.client.set(self.layout.epoch(KIND, number), self.epoch)

    async def send(self, address: Address, amount: int, key: str | None) -> None:
        envelope = raw_envelope(address, amount, key)
        await self.sends.add(self.layout.inbox_of(address), self._encode(envelope))

    def _actor(self, target: str) -> RawActor:
        layout = self.layout
        address = Address.parse(target)
        keys = [layout.events(address), layout.handled(address)]
        return RawActor(address, layout.partition_of(address), keys)

    async def read(self) -> None:
        """As the node reads: every partition's inbox in one XREADGROUP, once a turn is free,
        the reply taken as the server sends it."""
        streams = self.inboxes
        while not self.stopping:
            async with self.handling:
                pass
            reply = await self.client.execute_command(
                b"XREADGROUP", b"GROUP", self.group, self.consumer,
                b"COUNT", self.config.read_count, b"BLOCK", self.config.block_ms,
                b"STREAMS", *streams, *[b">"] * len(streams),
            )  # fmt: skip
            # A map of stream -> entries over RESP3 (redis-py 8's default), else pairs.
            for _stream, entries in reply.items() if isinstance(reply, dict) else reply or []:
                for entry_id, fields in entries:
                    data = fields[1]  # fields == [b"m", envelope]
                    envelope = self._decode(data)
                    actor = self.actors.get(envelope.target)
                    if actor is None:
                        actor = self.actors[envelope.target] = self._actor(envelope.target)
                    actor.waiting.append((entry_id, data, envelope))
                    if not actor.held:
                        actor.held = True
                        self.ready.put_nowait(actor)

    async def activate(self, actors: list[RawActor]) -> None:
        """As the node does it: one call of the node's activation script for the actors taken
        together, whatever their partitions, which returns each one's snapshot or, as here
        (the counters take none), its first events (a new actor of these rounds has at most a
        few)."""
        keys: list[str] = []
        for actor in actors:
            keys.extend((self.layout.snapshots_of(actor.address), actor.keys[0]))
        ids = [actor.address.id for actor in actors]
        activations = await self.client.evalsha(
            ACTIVATE.sha, len(keys), *keys, ACTIVATION_PAGE, *ids
        )
        found_new = 0
        for actor, (_snapshot, entries) in zip(actors, activations, strict=True):
            for _entry_id, fields in entries:
                event = self._decode_event(fields[1]).payload  # fields == [b"e", record]
                actor.state = Count(actor.state.count + 1, actor.state.total + event.amount)
                actor.version += 1
            actor.loaded = True
            found_new += actor.version == 0
        self.count_activations(len(actors), found_new)

    def trim_due(self, number: int, now_ms: int) -> int:
        """As a node's partition does: whether this commit prunes partition `number`'s
        seen-set, once per `SeenWindow.trim_every_ms`."""
        last = self.trimmed_at[number]
        if last is not None and 0 <= now_ms - last < SEEN.trim_every_ms:
            return 0
        self.trimmed_at[number] = now_ms
        return 1

    def guess_new(self, actors: list[RawActor]) -> bool:
        """As the node does: once most actors activated lately were new, the next ones are
        taken as new, unread (the commit's version check would catch a wrong guess)."""
        if self.found_new < NODE_CONFIG.new_actor_share * max(self.activated, _GUESS_AFTER):
            return False
        for actor in actors:
            actor.loaded = True
        return True

    def count_activations(self, activated: int, found_new: int) -> None:
        self.activated += activated
        self.found_new += found_new
        if self.activated >= 16 * _GUESS_AFTER:
            self.activated //= 2
            self.found_new //= 2

    async def handle(self) -> None:
        """A handler task: takes the next actor with messages waiting, with the ones queued
        behind it (up to the node's `commit_actors`), whatever their partitions, and commits
        what waits for them (up to `commit_batch` each) in one script call, as the node does."""
        client, encode, sha, ready = self.client, self._encode, self.commit_sha, self.ready
        while (first := await ready.get()) is not None:
            group = [first]
            async with self.handling:
                while len(group) < COMMIT_ACTORS and not ready.empty():
                    actor = ready.get_nowait()
                    if actor is None:  # stopping: left for this task's next take
                        ready.put_nowait(None)
                        break
                    group.append(actor)
                inactive = [actor for actor in group if not actor.loaded]
                guessed = len(inactive) if inactive and self.guess_new(inactive) else 0
                if inactive and not guessed:
                    await self.activate(inactive)
                now = _now_ms()
                by_partition: dict[int, list[RawActor]] = {}
                for actor in group:
                    by_partition.setdefault(actor.partition, []).append(actor)
                ordered = [actor for actors in by_partition.values() for actor in actors]
                keys: list[str] = []
                args: list[object] = [
                    self.group,
                    now,
                    SEEN.window_ms,
                    SEEN.limit,
                    len(by_partition),
                ]
                dedupe_ids = []
                states = []
                for number, actors in by_partition.items():
                    keys.extend(self.partition_keys[number])
                    args.extend((self.epoch, self.trim_due(number, now), len(actors)))
                    for actor in actors:
                        waiting = actor.waiting
                        batch = [waiting.popleft() for _ in range(min(len(waiting), COMMIT_BATCH))]
                        keys.extend(actor.keys)
                        args.extend((actor.version, len(batch)))
                        state = actor.state
                        for entry_id, data, envelope in batch:
                            event = Added(envelope.payload.amount)
                            record = RawEventRecord(
                                type=ADDED_TYPE,
                                schema_version=1,
                                payload=event,
                                recorded_at=now,
                                causation_id=envelope.id,
                                correlation_id=envelope.id,
                            )
                            dedupe_id = envelope.idempotency_key or envelope.id
                            dedupe_ids.append(dedupe_id)
                            args.extend(
                                (entry_id, dedupe_id, data, "", now, 1, encode(record), 0, 0, 0)
                            )
                            state = Count(state.count + 1, state.total + event.amount)
                        states.append(state)
                status, *versions = await client.evalsha(sha, len(keys), *keys, *args)
            if status != 1:
                raise RuntimeError(f"raw commit: status {status}")
            self.count_activations(guessed, guessed)
            for actor, state, version in zip(ordered, states, versions, strict=True):
                actor.state, actor.version = state, int(version)
                if actor.waiting:
                    ready.put_nowait(actor)
                else:
                    actor.held = False
            if self.on_commit is not None:
                for dedupe_id in dedupe_ids:
                    self.on_commit(dedupe_id)

    async def run(self) -> None:
        """Until `stopping`: the reader finishes its blocking read, then each handler task
        takes a None and returns, so that no command is cancelled midway (cancelling tasks
        that share pooled connections could leave the round waiting for good)."""
        async with asyncio.TaskGroup() as tasks:
            for _ in range(self.handler_tasks):
                tasks.create_task(self.handle())
            await self.read()
            for _ in range(self.handler_tasks):
                self.ready.put_nowait(None)


def _raise_if_failed(task: "asyncio.Task[None]") -> None:
    if task.done() and not task.cancelled() and task.exception() is not None:
        raise RuntimeError("the raw runtime stopped") from task.exception()


@asynccontextmanager
async def raw_runtime(
    rig: Rig, app: str, on_commit: OnCommit | None, backlog: Backlog | None = None
) -> AsyncIterator[Driver]:
    layout = KeyLayout(app, partitions=PARTITIONS)
    raw = RawNode(rig.admin, layout, rig.commit_sha, on_commit, rig.node_config)
    await raw.prepare()
    if backlog is not None:
        await backlog(raw.send)
    started = time.perf_counter()
    running = asyncio.create_task(raw.run())
    try:
        yield Driver(raw.send, started, partial(_raise_if_failed, running))
    finally:
        raw.stopping = True
        await running


# Rounds.


def _addresses(actors: int) -> list[Address]:
    return [Address(KIND, f"c{index}") for index in range(actors)]


def _addresses_in(partitions: Sequence[int], each: int) -> list[Address]:
    """`each` actors of every one of `partitions`: the first ids that fall in it."""
    layout = KeyLayout("any", partitions=PARTITIONS)  # where an id falls is the app's choice
    found: dict[int, list[Address]] = {number: [] for number in partitions}
    index = 0
    while any(len(addresses) < each for addresses in found.values()):
        address = Address(KIND, f"c{index}")
        addresses = found.get(layout.partition_of(address))
        if addresses is not None and len(addresses) < each:
            addresses.append(address)
        index += 1
    # Round-robin over the partitions, as the senders go over the actors.
    return [found[number][turn] for turn in range(each) for number in partitions]


async def _send_round_robin(send: Send, addresses: Sequence[Address], messages: int) -> None:
    """`messages` sent round-robin to `addresses` by `SENDERS` concurrent senders."""

    async def sender(first: int) -> None:
        for index in range(first, messages, SENDERS):
            await send(addresses[index % len(addresses)], 1, None)

    async with anyio.create_task_group() as group:
        for first in range(SENDERS):
            group.start_soon(sender, first)


async def throughput_round(
    rig: Rig,
    runtime: Runtime,
    app: str,
    actors: int | Sequence[Address],
    messages: int,
    *,
    activated: bool = False,
) -> Sample:
    """`messages` sent round-robin to `actors` actors (or to those addresses) by `SENDERS`
    concurrent senders while the runtime handles them; the clock stops when the last one is
    committed. With `activated`, every actor first handles one message off the clock, so none
    is activated on it."""
    layout = KeyLayout(app, partitions=PARTITIONS)
    addresses = _addresses(actors) if isinstance(actors, int) else actors
    warm_up = len(addresses) if activated else 0
    clock = time.perf_counter
    async with runtime(app, None) as driver:
        if warm_up:
            await _send_round_robin(driver.send, addresses, warm_up)
            await rig.wait_committed(layout, warm_up, driver)
        start = clock()
        await _send_round_robin(driver.send, addresses, messages)
        await rig.wait_committed(layout, warm_up + messages, driver)
        seconds = clock() - start
    await rig.check_round(layout, addresses, warm_up + messages)
    await empty(rig.admin)
    return Sample(messages, seconds)


async def drain_round(rig: Rig, runtime: Runtime, app: str, actors: int, messages: int) -> Sample:
    """`messages` sent round-robin to `actors` actors before the runtime starts (off the
    clock); the clock runs from the runtime's start until the last one is committed."""
    layout = KeyLayout(app, partitions=PARTITIONS)
    addresses = _addresses(actors)

    async def backlog(send: Send) -> None:
        await _send_round_robin(send, addresses, messages)

    async with runtime(app, None, backlog) as driver:
        await rig.wait_committed(layout, messages, driver)
        seconds = time.perf_counter() - driver.started
    await rig.check_round(layout, addresses, messages)
    await empty(rig.admin)
    return Sample(messages, seconds)


async def latency_round(
    rig: Rig, runtime: Runtime, app: str, rate: int, messages: int, actors: int
) -> Sample:
    """`messages` sent at `rate` per second on an open-loop schedule (a late send does not
    delay the next ones), each to the next of `actors` actors, all activated by one message
    each beforehand; a message's latency runs from just before its XADD to the return of the
    script call that commits it. Messages carry an idempotency key (their dedupe id), so that
    each commit can be matched to its send."""
    layout = KeyLayout(app, partitions=PARTITIONS)
    addresses = _addresses(actors)
    clock = time.perf_counter
    sent: dict[str, float] = {}
    latencies: list[float] = []

    def committed(key: str) -> None:
        # An activation's commit can be reported after the clock started: it is not counted.
        if not key.startswith("a"):
            latencies.append(clock() - sent.pop(key))

    async def one(index: int, send: Send) -> None:
        key = f"m{index}"
        sent[key] = clock()
        await send(addresses[index % actors], 1, key)

    async with runtime(app, committed) as driver:
        send = driver.send

        async def activate(first: int) -> None:
            for index in range(first, actors, SENDERS):
                await send(addresses[index], 1, f"a{index}")

        async with anyio.create_task_group() as group:
            for first in range(SENDERS):
                group.start_soon(activate, first)
        await rig.wait_committed(layout, actors, driver)

        start = clock()
        async with anyio.create_task_group() as group:
            for index in range(messages):
                delay = start + index / rate - clock()
                if delay > 0:
                    await anyio.sleep(delay)
                group.start_soon(one, index, send)
        await rig.wait_committed(layout, actors + messages, driver)
        seconds = clock() - start
    _check(f"latencies measured in {app}", len(latencies), messages)
    await rig.check_round(layout, addresses, actors + messages)
    await empty(rig.admin)
    return Sample(messages, seconds, latencies)


# Benchmarks.


def _runtimes(rig: Rig) -> tuple[Runtime, Runtime]:
    return partial(repertory_runtime, rig), partial(raw_runtime, rig)


def _throughput(
    rig: Rig, actors: int, messages: int, tag: str, *, activated: bool = False
) -> Benchmark:
    node, raw = _runtimes(rig)

    async def repertory_round(round_index: int) -> Sample:
        app = f"t{tag}n{round_index}"
        return await throughput_round(rig, node, app, actors, messages, activated=activated)

    async def raw_round(round_index: int) -> Sample:
        app = f"t{tag}r{round_index}"
        return await throughput_round(rig, raw, app, actors, messages, activated=activated)

    return Benchmark(
        name=f"end to end, {actors:,} actor{'s' if actors > 1 else ''}"
        + (", activated beforehand" if activated else ""),
        description=(
            f"{messages:,} messages sent by {SENDERS} concurrent senders to {actors:,} counter "
            "actors, each handled and committed with its event; until the last commit"
            + ("; every actor handled one message before the clock" if activated else "")
        ),
        unit="msgs",
        variants=[
            Variant("raw redis-py", raw_round, baseline=True),
            Variant("repertory node", repertory_round, target=RAW_TARGET),
        ],
    )


def _node_alone(
    rig: Rig, tag: str, actors: int | Sequence[Address], count: int, *, activated: bool = False
) -> RoundRunner:
    """Rounds of `throughput_round` with the node alone, each in a namespace of its own."""
    node, _ = _runtimes(rig)

    async def node_round(round_index: int) -> Sample:
        app = f"{tag}n{round_index}"
        return await throughput_round(rig, node, app, actors, count, activated=activated)

    return node_round


def _flatness(rig: Rig, few: int, many: int, messages: int) -> Benchmark:
    def at(actors: int, count: int, tag: str, *, activated: bool = False) -> RoundRunner:
        return _node_alone(rig, f"f{tag}", actors, count, activated=activated)

    return Benchmark(
        name="flatness, the node from 1 to 100,000 actors",
        description=(
            f"the rows end to end with the node alone, taking turns within each round: "
            f"{messages:,} messages to 1 and to {few:,} actors, {many:,} to {many:,} actors "
            "(new, then activated beforehand); each rate against the rate with one actor in "
            "the same round"
        ),
        unit="msgs",
        variants=[
            Variant("repertory node, 1 actor", at(1, messages, "1"), baseline=True),
            Variant(f"{few:,} actors", at(few, messages, "k"), target=FLAT_TARGET),
            Variant(f"{many:,} actors", at(many, many, "m"), target=FLAT_TARGET),
            Variant(
                f"{many:,} actors, activated beforehand",
                at(many, many, "w", activated=True),
                target=FLAT_TARGET,
            ),
        ],
    )


def _spread(rig: Rig, few: int, messages: int) -> Benchmark:
    """Where the flatness gap comes from: more actors, and more partitions in each commit."""

    def at(addresses: list[Address], tag: str) -> RoundRunner:
        return _node_alone(rig, f"s{tag}", addresses, messages)

    every = range(PARTITIONS)
    return Benchmark(
        name="flatness, actors against partitions",
        description=(
            f"{messages:,} messages with the node alone, taking turns within each round: more "
            "actors in one partition, against as many spread over the partitions (the commits "
            "then reach several partitions each); each rate against the rate with one actor"
        ),
        unit="msgs",
        variants=[
            Variant("repertory node, 1 actor", at(_addresses_in([0], 1), "1"), baseline=True),
            Variant(
                f"{PARTITIONS} actors of one partition", at(_addresses_in([0], PARTITIONS), "p")
            ),
            Variant(f"{PARTITIONS} actors, one per partition", at(_addresses_in(every, 1), "e")),
            Variant(f"{few:,} actors of one partition", at(_addresses_in([0], few), "k")),
            Variant(f"{few:,} actors over the partitions", at(_addresses(few), "s")),
        ],
    )


def _latency(rig: Rig, rate: int, messages: int, actors: int) -> Benchmark:
    node, raw = _runtimes(rig)

    async def repertory_round(round_index: int) -> Sample:
        app = f"l{rate}a{actors}n{round_index}"
        return await latency_round(rig, node, app, rate, messages, actors)

    async def raw_round(round_index: int) -> Sample:
        app = f"l{rate}a{actors}r{round_index}"
        return await latency_round(rig, raw, app, rate, messages, actors)

    return Benchmark(
        name=f"latency at {rate:,} msg/s, {actors:,} actor{'s' if actors > 1 else ''}",
        description=(f"{messages:,} messages offered at {rate:,}/s to {actors:,} active actors"),
        unit="msgs",
        latency_of="message, send to committed",
        variants=[
            Variant("raw redis-py", raw_round, baseline=True),
            Variant("repertory node", repertory_round),
        ],
    )


# Dramatiq and Celery: no-op tasks on the same server, workers as threads of this process.


class Tally:
    """Tasks done, counted from worker threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def add(self) -> None:
        with self._lock:
            self.value += 1

    def reset(self) -> None:
        with self._lock:
            self.value = 0


async def _threads(count: int, work: Callable[[int], None]) -> None:
    """Run `work(i)` for i in 0..count-1 on worker threads at once."""
    async with anyio.create_task_group() as group:
        for index in range(count):
            group.start_soon(anyio.to_thread.run_sync, work, index)


async def _drained(tally: Tally, messages: int) -> None:
    async def done() -> bool:
        return tally.value >= messages

    await _until(done, timeout=60 + messages / 100, what=f"{messages:,} tasks")


class DramatiqRig:
    def __init__(self, env: Environment) -> None:
        self.url = env.url
        self.tally = Tally()

    async def round(self, messages: int, *, backlog: bool = False) -> Sample:
        """`messages` no-op tasks enqueued by `QUEUE_SENDER_THREADS` threads while a worker
        takes them, or with `backlog` all of them before the worker starts (off the clock)."""
        import dramatiq
        from dramatiq.brokers.redis import RedisBroker

        # A broker per round: a worker registers itself on its broker for good, and a second
        # worker on the same broker would inherit the first one's hooks.
        broker = RedisBroker(url=self.url)
        tally = self.tally

        def noop() -> None:
            tally.add()

        send = dramatiq.actor(actor_name="bench_noop", broker=broker, max_retries=0)(noop).send
        tally.reset()

        def enqueue(first: int) -> None:
            for _ in range(first, messages, QUEUE_SENDER_THREADS):
                send()

        if backlog:
            await _threads(QUEUE_SENDER_THREADS, enqueue)
        clock = time.perf_counter
        start = clock()
        worker = dramatiq.Worker(broker, worker_threads=QUEUE_WORKER_THREADS)
        worker.start()
        try:
            if not backlog:
                await _threads(QUEUE_SENDER_THREADS, enqueue)
            await _drained(tally, messages)
            seconds = clock() - start
        finally:
            await anyio.to_thread.run_sync(worker.stop)
            broker.close()
        _check("dramatiq tasks done", tally.value, messages)
        return Sample(messages, seconds)

    def close(self) -> None:
        """Each round closes its own broker."""


def _celery_url(url: str) -> str:
    """kombu names a unix socket `redis+socket://PATH`."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"redis+socket://{parts.path}"
    return url


class CeleryRig:
    def __init__(self, env: Environment) -> None:
        from celery import Celery

        self.app = Celery("bench", broker=_celery_url(env.url), set_as_current=False)
        self.app.conf.update(
            task_ignore_result=True,
            broker_connection_retry_on_startup=True,
            worker_hijack_root_logger=False,
            worker_send_task_events=False,
        )
        self.tally = Tally()
        tally = self.tally

        def noop() -> None:
            tally.add()

        self.task = self.app.task(name="bench_noop", ignore_result=True, shared=False)(noop)

    async def round(self, messages: int, *, backlog: bool = False) -> Sample:
        """As `DramatiqRig.round`; with `backlog` the clock includes the worker's start."""
        from celery.contrib.testing.worker import start_worker

        self.tally.reset()
        send = self.task.delay

        def enqueue(first: int) -> None:
            for _ in range(first, messages, QUEUE_SENDER_THREADS):
                send()

        if backlog:
            await _threads(QUEUE_SENDER_THREADS, enqueue)
        clock = time.perf_counter
        start = clock()
        starter = start_worker(
            self.app,
            concurrency=QUEUE_WORKER_THREADS,
            pool="threads",
            perform_ping_check=False,
            loglevel="WARNING",
        )
        await anyio.to_thread.run_sync(starter.__enter__)
        try:
            if not backlog:
                start = clock()
                await _threads(QUEUE_SENDER_THREADS, enqueue)
            await _drained(self.tally, messages)
            seconds = clock() - start
        finally:
            await anyio.to_thread.run_sync(starter.__exit__, None, None, None)
        _check("celery tasks done", self.tally.value, messages)
        return Sample(messages, seconds)

    def close(self) -> None:
        self.app.close()


async def task_queue_round(
    rig: Rig, round_index: int, messages: int, *, backlog: bool = False
) -> Sample:
    """repertory's own task queue (R5): no-op tasks enqueued by QUEUE_SENDER_THREADS
    concurrent senders, taken by a worker of this process running QUEUE_WORKER_THREADS at once
    (as Dramatiq's worker runs that many threads), each task settled with a result; the clock
    runs from the first enqueue until the last result, or with `backlog` from the worker's
    start, every task enqueued before it."""
    queue = TaskQueue(rig.client, f"bench-{round_index}-{uuid.uuid4().hex[:6]}")
    await queue.ensure()

    async def noop(task: msgspec.Struct) -> None:
        return None

    async def enqueue(first: int) -> None:
        for _ in range(first, messages, QUEUE_SENDER_THREADS):
            await queue.enqueue(Add(1))

    async def all_settled() -> bool:
        return int(await rig.client.xlen(queue.results_key)) >= messages

    async def enqueue_all() -> None:
        async with anyio.create_task_group() as senders:
            for first in range(QUEUE_SENDER_THREADS):
                senders.start_soon(enqueue, first)

    if backlog:
        await enqueue_all()
    start = time.perf_counter()
    async with anyio.create_task_group() as group:
        config = WorkerConfig(worker_id="w", block_ms=50, concurrency=QUEUE_WORKER_THREADS)
        group.start_soon(Worker(queue, noop, config).run)
        if not backlog:
            await enqueue_all()
        await _until(all_settled, timeout=60 + messages / 100, what=f"{messages:,} tasks")
        seconds = time.perf_counter() - start
        group.cancel_scope.cancel()
    await rig.client.delete(queue.tasks_key, queue.results_key, queue.dead_key)
    return Sample(messages, seconds)


def task_queues_installed() -> bool:
    """Whether the `bench` extra (Dramatiq, Celery) is installed; without it the comparison
    with task queues is left out of the suite."""
    return all(importlib.util.find_spec(name) is not None for name in ("dramatiq", "celery"))


def _sends(rig: Rig, actors: int, messages: int) -> Benchmark:
    """What sending costs with no node running: `SENDERS` concurrent senders, round-robin to
    `actors` actors (all 16 partitions' inboxes)."""
    layout = KeyLayout("snd", partitions=PARTITIONS)
    system = ActorSystem(Counter(), app=layout.app, partitions=PARTITIONS, client=rig.client)
    addresses = _addresses(actors)
    inboxes = [layout.inbox(KIND, number) for number in range(PARTITIONS)]
    encode = msgspec.msgpack.Encoder().encode

    async def one_xadd_each(address: Address, amount: int, key: str | None) -> None:
        data = encode(raw_envelope(address, amount, key))
        await rig.admin.xadd(layout.inbox_of(address), {MESSAGE_FIELD: data})

    sends = RawSends(rig.admin)

    async def batched_by_hand(address: Address, amount: int, key: str | None) -> None:
        await sends.add(layout.inbox_of(address), encode(raw_envelope(address, amount, key)))

    async def repertory_send(address: Address, amount: int, key: str | None) -> None:
        await system.send(address, Add(amount), idempotency_key=key)

    def round_of(send: Send) -> Callable[[int], Awaitable[Sample]]:
        async def one_round(round_index: int) -> Sample:
            clock = time.perf_counter
            start = clock()
            await _send_round_robin(send, addresses, messages)
            seconds = clock() - start
            _check("inbox entries", await rig.lengths(inboxes), messages)
            await empty(rig.admin)
            return Sample(messages, seconds)

        return one_round

    return Benchmark(
        name="sends",
        description=f"{messages:,} messages sent by {SENDERS} concurrent senders to {actors:,} "
        "actors, no node running",
        unit="msgs",
        variants=[
            Variant("raw redis-py, batched by hand", round_of(batched_by_hand), baseline=True),
            Variant("repertory ActorSystem.send", round_of(repertory_send)),
            Variant("raw redis-py, one XADD each", round_of(one_xadd_each)),
        ],
    )


def _task_queues(
    rig: Rig,
    dramatiq_rig: DramatiqRig,
    celery_rig: CeleryRig,
    messages: int,
    actors: int,
    *,
    backlog: bool,
) -> Benchmark:
    """Sent while handled (`backlog` False), or sent beforehand and drained: the figure the
    peers are quoted by (ARCHITECTURE.md, section 5)."""
    node, raw = _runtimes(rig)
    tag = "d" if backlog else "q"
    ways = drain_round if backlog else throughput_round

    async def repertory_round(round_index: int) -> Sample:
        return await ways(rig, node, f"{tag}n{round_index}", actors, messages)

    async def raw_round(round_index: int) -> Sample:
        return await ways(rig, raw, f"{tag}r{round_index}", actors, messages)

    async def dramatiq_round(round_index: int) -> Sample:
        return await dramatiq_rig.round(messages, backlog=backlog)

    async def celery_round(round_index: int) -> Sample:
        return await celery_rig.round(messages, backlog=backlog)

    async def queue_round(round_index: int) -> Sample:
        return await task_queue_round(rig, round_index, messages, backlog=backlog)

    variants = [
        Variant("Dramatiq no-op", dramatiq_round, baseline=True),
        Variant(f"repertory node, {actors:,} actors", repertory_round, target=QUEUE_TARGET),
        Variant("Celery no-op", celery_round),
        Variant("repertory task queue no-op", queue_round),
    ]
    if backlog:
        variants.append(Variant(f"raw redis-py, {actors:,} actors", raw_round))
    work = "a backlog of" if backlog else ""
    return Benchmark(
        name=f"{'backlog drained' if backlog else 'end to end'} vs task queues",
        description=(
            f"{work} {messages:,} messages: repertory to {actors:,} counter actors, each "
            "committed with its event; Dramatiq and Celery no-op tasks on their Redis brokers"
        ).strip(),
        unit="msgs",
        variants=variants,
    )


# Activation.


class RawActivation:
    """Rebuild by hand: one EVALSHA of the activation script (`activate.lua`: the snapshot, or
    without one the first events; for a new actor the fastest sequence measured: HGET then
    XRANGE takes two round trips, and the two pipelined cost the client more), then XRANGE of
    the events after the snapshot or after those first ones, one msgspec decode per event
    (payload typed), fold. The XRANGE replies are taken as the server sends them, as the event
    store takes them (see bench_eventstore.raw_replay)."""

    def __init__(self, client: "redis.asyncio.Redis", layout: KeyLayout) -> None:
        self.client = client
        self.layout = layout
        self._decode_event = msgspec.msgpack.Decoder(RawEventRecord).decode

    async def rebuild(self, address: Address) -> tuple[int, Count]:
        state, version = Count(), 0
        key = self.layout.events(address)
        ((data, entries),) = await self.client.evalsha(
            ACTIVATE.sha, 2, self.layout.snapshots_of(address), key, ACTIVATION_PAGE, address.id
        )
        asked = ACTIVATION_PAGE
        if data is not None:
            snapshot = msgspec.msgpack.decode(data, type=_RawSnapshot)
            state, version = snapshot.payload, snapshot.version
            lower = f"{version + 1}-0".encode()
            entries = await self.client.execute_command(
                b"XRANGE", key, lower, b"+", b"COUNT", READ_BATCH
            )
            asked = READ_BATCH
        decode = self._decode_event
        while True:
            count, total = state.count, state.total
            for _entry_id, fields in entries:
                total += decode(fields[1]).payload.amount  # fields == [b"e", record]
                count += 1
            state = Count(count, total)
            version += len(entries)
            if len(entries) < asked:
                return version, state
            entries = await self.client.execute_command(
                b"XRANGE", key, b"(" + entries[-1][0], b"+", b"COUNT", READ_BATCH
            )
            asked = READ_BATCH


class _RawSnapshot(msgspec.Struct, kw_only=True, frozen=True, gc=False):
    type: str
    schema_version: int
    version: int
    taken_at: int
    payload: Count
    content_type: str = "application/msgpack"


def _activation(rig: Rig, events: int, *, snapshot: bool) -> Benchmark:
    layout = KeyLayout("act", partitions=PARTITIONS)
    store = EventStore(rig.client, keys=layout, read_batch=READ_BATCH)
    raw = RawActivation(rig.admin, layout)
    counter = Counter()
    address = Address(KIND, "history")
    calls = rig.env.size(200, 20) if snapshot else rig.env.size(3, 2)
    expected = Count(events, events)

    async def write(version: int, upto: int) -> None:
        while version < upto:
            batch = [Added(1)] * min(READ_BATCH, upto - version)
            version = await store.append(address, batch, version)

    async def prepare() -> None:
        if snapshot:
            at = events - ACTIVATION_SNAPSHOT_LAG
            await write(0, at)
            # Every event adds 1, so the state at version v is Count(v, v).
            await store.save_snapshot(address, Count(at, at), at)
            await write(at, events)
        else:
            await write(0, events)

    async def repertory_round(round_index: int) -> Sample:
        async def call(index: int) -> None:
            view = await rebuild(store, counter, address)
            _check("version rebuilt", view.version, events)
            if view.state != expected:
                raise RuntimeError(f"rebuilt {view.state}, expected {expected}")

        return await sequential(calls, call)

    async def raw_round(round_index: int) -> Sample:
        async def call(index: int) -> None:
            version, state = await raw.rebuild(address)
            _check("version rebuilt by hand", version, events)
            if state != expected:
                raise RuntimeError(f"rebuilt {state} by hand, expected {expected}")

        return await sequential(calls, call)

    how = (
        f"from a snapshot at v{events - ACTIVATION_SNAPSHOT_LAG:,} + {ACTIVATION_SNAPSHOT_LAG} "
        "events"
        if snapshot
        else "without a snapshot"
    )
    return Benchmark(
        name=f"activation, {events:,} events, {'snapshot' if snapshot else 'no snapshot'}",
        description=f"an actor with {events:,} events rebuilt {how}",
        unit="activations",
        latency_of="activation",
        prepare=prepare,
        variants=[
            Variant("raw redis-py", raw_round, baseline=True),
            Variant("repertory rebuild", repertory_round),
        ],
    )


def _new_actor_activation(rig: Rig) -> Benchmark:
    """The common case of the 100,000-actor rounds: an actor with neither a snapshot nor
    events, activated by its first message."""
    layout = KeyLayout("act", partitions=PARTITIONS)
    store = EventStore(rig.client, keys=layout, read_batch=READ_BATCH)
    raw = RawActivation(rig.admin, layout)
    counter = Counter()
    calls = rig.env.size(5000, 50)
    addresses = [Address(KIND, f"new-{index}") for index in range(calls)]

    async def repertory_round(round_index: int) -> Sample:
        async def call(index: int) -> None:
            view = await rebuild(store, counter, addresses[index])
            if (view.version, view.state) != (0, Count()):
                raise RuntimeError(f"a new actor rebuilt as {view}")

        return await sequential(calls, call)

    async def raw_round(round_index: int) -> Sample:
        async def call(index: int) -> None:
            version, state = await raw.rebuild(addresses[index])
            if (version, state) != (0, Count()):
                raise RuntimeError(f"a new actor rebuilt by hand as v{version} {state}")

        return await sequential(calls, call)

    return Benchmark(
        name="activation, new actor",
        description=f"{calls:,} actors with neither a snapshot nor events activated one by one",
        unit="activations",
        latency_of="activation",
        variants=[
            Variant("raw redis-py", raw_round, baseline=True),
            Variant("repertory rebuild", repertory_round),
        ],
    )


@asynccontextmanager
async def suite(env: Environment) -> AsyncIterator[Sequence[Benchmark]]:
    client = create_client(env.url)
    # Plain redis-py, on a pool as large as repertory's client's (its default): thousands of
    # actors committing at once queue for connections, as long as it takes, instead of failing.
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        env.url, max_connections=ClientConfig(url=env.url).max_connections, timeout=None
    )
    admin = redis.asyncio.Redis.from_pool(pool)
    rig = Rig(env, client, admin, COMMIT.sha)
    queues: list[Benchmark] = []
    rigs: list[DramatiqRig | CeleryRig] = []
    try:
        if task_queues_installed():
            dramatiq_rig, celery_rig = DramatiqRig(env), CeleryRig(env)
            rigs += (dramatiq_rig, celery_rig)
            for messages, backlog in ((env.size(5_000, 200), False), (env.size(20_000, 200), True)):
                queues.append(
                    _task_queues(
                        rig, dramatiq_rig, celery_rig, messages, env.size(1000, 50), backlog=backlog
                    )
                )
        # The raw baseline calls its commit and activation scripts by their SHA1 only.
        await admin.script_load(COMMIT.source)
        await admin.script_load(ACTIVATE.source)
        await admin.script_load(ADD_MESSAGES.source)
        few = env.size(1000, 50)
        many = env.size(100_000, 200)
        latency_s = 0.1 if env.quick else 2.0
        yield [
            _throughput(rig, 1, env.size(10_000, 200), "1"),
            _throughput(rig, few, env.size(10_000, 200), "k"),
            _throughput(rig, many, many, "m"),
            _throughput(rig, many, many, "w", activated=True),
            _flatness(rig, few, many, env.size(20_000, 200)),
            _spread(rig, few, env.size(20_000, 200)),
            _sends(rig, few, env.size(20_000, 200)),
            *queues,
            *[
                _latency(rig, rate, round(rate * latency_s), actors)
                for rate, actors in ((1000, 1), (1000, few), (1500, few), (1000, many))
            ],
            _activation(rig, env.size(100_000, 2_500), snapshot=False),
            _activation(rig, env.size(100_000, 2_500), snapshot=True),
            _new_actor_activation(rig),
        ]
    finally:
        for queue_rig in rigs:
            queue_rig.close()
        await client.aclose()
        await admin.aclose()


ROW_GROUPS: dict[str, Callable[[str], bool]] = {
    "actors": lambda name: name.startswith("end to end,"),
    "flatness": lambda name: name.startswith("flatness"),
    "sends": lambda name: name == "sends",
    "queues": lambda name: name.endswith("vs task queues"),
    "latency": lambda name: name.startswith("latency"),
    "activation": lambda name: name.startswith("activation"),
}
"""The groups of rows `python -m benchmarks.bench_runtime GROUP` runs alone, by row name."""


def _rows_of(group: str) -> SuiteFactory:
    wanted = ROW_GROUPS[group]

    @asynccontextmanager
    async def rows(env: Environment) -> AsyncIterator[Sequence[Benchmark]]:
        async with suite(env) as benchmarks:
            yield [benchmark for benchmark in benchmarks if wanted(benchmark.name)]

    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_runtime",
        description="Some rows of the runtime suite alone: the sends and the activations take "
        "seconds, the task queues and the latencies a few minutes each, the whole suite about "
        "twelve: actors (end to end with 1, 1,000 and 100,000 actors), flatness (the node "
        "alone at those counts, taking turns, and more actors against more partitions), sends "
        "(no node running), "
        "queues (against Dramatiq and Celery), latency, activation.",
    )
    parser.add_argument("what", choices=list(ROW_GROUPS))
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="measured rounds")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    args = parser.parse_args(argv)
    only = Suite("runtime", args.what, _rows_of(args.what))
    report = eventloop.run(
        partial(
            run_suites, [only], rounds=args.rounds, quick=args.quick, console=Console(stderr=True)
        )
    )
    print(render_markdown(report), end="")


if __name__ == "__main__":
    main()
