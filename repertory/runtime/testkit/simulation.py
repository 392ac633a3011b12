"""A deterministic simulated system: one actor kind on real nodes, fakeredis (or a real server),
a simulated clock, faults injected at chosen points, and a model checked after every step.

A run is a schedule of steps (`Send`, `Crash`, `Restart`, `ExpireLeases`, ...). Everything a
run would draw at random (message ids, idempotency keys, node ids) comes from its seed, and
time from `SimulatedClock`, so a seed and a schedule replay the same run; `random_schedule`
makes the schedule from the seed too (the seeded scheduler behind `simulate`). Leases and
memberships expire on the simulated clock as well: a lease lapses when the simulation lets
time pass (`pass_time`), never while a test waits.

After each step `check` recovers the system (restarts the node if it died), waits until it has
caught up, and verifies, per actor: every acknowledged send was handled, none twice in effect,
in send order (the actor's handled-message stream), and the state rebuilt from the log equals
the model's (and the events, when the model gives them); and, over every commit so far, that
each was made by the node holding the partition's current epoch (G4, see `Ledger`).

Managing nodes (`start_node`, `stop_node`, `kill`, `pause`, `resume`, `pass_time`) also
serves tests of many nodes at once.
"""

import collections
import itertools
import logging
import math
import random
import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from functools import partial
from types import TracebackType
from typing import Any, Self

import anyio
import anyio.lowlevel
import fakeredis
import msgspec
from anyio.abc import TaskGroup, TaskStatus

from repertory.actors.model import Actor, Rejected
from repertory.runtime.node import Node, NodeConfig
from repertory.runtime.system import ActorSystem
from repertory.runtime.testkit.strategies import sample_message
from repertory.streams.client import RedisClient, create_client
from repertory.streams.deadletters import DeadLetters
from repertory.streams.keys import Address
from repertory.streams.membership import Membership
from repertory.streams.partition import (
    CommitStatus,
    GroupCommitResult,
    Partition,
    PartitionCommits,
    SeenWindow,
)

EPOCH_MS = 1_577_836_800_000
"""2020-01-01T00:00:00Z, where simulated time starts: far from the wall clock, so code that
reads the wall clock where it should read `ctx.now_ms` or its events shows up at once."""

LOGGER = logging.getLogger("repertory")

CRASH_POINTS = ("before-handle", "after-handle", "before-commit", "after-commit")

Model = Callable[[Any, Any], Any]
"""`(state, message) -> state` or `-> (state, events)`; raising `Rejected` means the actor
refuses the message (state unchanged, no events)."""


class SimulatedClock:
    """The Clock protocol on simulated time: it moves only when `advance` is called. Leases
    and memberships expire by it too (`lease_now_ms`), not by the server's clock."""

    def __init__(self, start_ms: int = EPOCH_MS) -> None:
        self._now = start_ms
        self._sleepers: list[tuple[int, anyio.Event]] = []
        self.waking = 0
        """Sleepers `advance` woke that have not gone on yet."""

    def now_ms(self) -> int:
        return self._now

    def lease_now_ms(self) -> int:
        return self._now

    def advance(self, ms: int) -> None:
        """Move time forward by `ms` and wake the sleepers that are due (call in the loop)."""
        if ms < 0:
            raise ValueError(f"time does not go back: advance({ms})")
        self._now += ms
        due = [sleeper for sleeper in self._sleepers if sleeper[0] <= self._now]
        self._sleepers = [sleeper for sleeper in self._sleepers if sleeper[0] > self._now]
        self.waking += len(due)
        for _, event in due:
            event.set()

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await anyio.lowlevel.checkpoint()
            return
        sleeper = (self._now + math.ceil(seconds * 1000), anyio.Event())
        self._sleepers.append(sleeper)
        try:
            await sleeper[1].wait()
        finally:
            # A cancelled sleep (a stop, a killed node) leaves no sleeper behind.
            if sleeper in self._sleepers:
                self._sleepers.remove(sleeper)
            else:
                self.waking -= 1


class PausableClock:
    """One node's view of a shared `SimulatedClock` that can stand still, as a stopped process
    (SIGSTOP, a long GC pause) does: while paused, its sleeps do not end, so it renews no lease
    and sends no heartbeat, while time goes on for everyone else."""

    def __init__(self, clock: SimulatedClock) -> None:
        self.clock = clock
        self._running = anyio.Event()
        self._running.set()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def pause(self) -> None:
        if not self.paused:
            self._running = anyio.Event()

    def resume(self) -> None:
        self._running.set()

    async def wait_running(self) -> None:
        await self._running.wait()

    def now_ms(self) -> int:
        return self.clock.now_ms()

    def lease_now_ms(self) -> int:
        return self.clock.lease_now_ms()

    async def sleep(self, seconds: float) -> None:
        await self.clock.sleep(seconds)
        if self.paused:  # a running node goes on at once: `SimulatedClock.waking` counts it
            await self._running.wait()


class SimulatedCrash(BaseException):
    """Raised by the fault hook: the node dies at that point, as a killed process would. A
    BaseException, so no handler-failure path mistakes it for a failing handler."""


# The steps of a schedule. Their reprs are Python: a printed schedule can be pasted to replay.


@dataclass(frozen=True)
class Send:
    """Send `message` to actor `actor`."""

    actor: str
    message: msgspec.Struct


@dataclass(frozen=True)
class DuplicateSend:
    """Send `message` `copies` times with one idempotency key (a client retrying)."""

    actor: str
    message: msgspec.Struct
    copies: int = 2


@dataclass(frozen=True)
class Crash:
    """Send `message`; the node dies at `point` while handling it, and is restarted."""

    actor: str
    message: msgspec.Struct
    point: str = "before-commit"


@dataclass(frozen=True)
class KillDuringBurst:
    """Send a burst of messages, then kill the node after `turns` scheduler turns, wherever
    it is (any await point: reading, handling, committing, snapshotting)."""

    sends: tuple[tuple[str, msgspec.Struct], ...]
    turns: int = 0


@dataclass(frozen=True)
class Restart:
    """Stop the node gracefully (it finishes the messages in hand); a new one starts."""


@dataclass(frozen=True)
class ExpireLeases:
    """The node dies holding its leases; they expire; a node with another id takes over."""


@dataclass(frozen=True)
class Redeliver:
    """The transport delivers the last message `actor` handled once more (same message id),
    within the dedupe window (`NodeConfig.seen`); later than that it sends nothing."""

    actor: str


@dataclass(frozen=True)
class DeleteSnapshots:
    """Every snapshot is deleted: state must still rebuild from the events (G5)."""


@dataclass(frozen=True)
class AdvanceClock:
    """Simulated time moves `ms` forward (timers come due, handlers see a later `now_ms`)."""

    ms: int


@dataclass(frozen=True)
class Pause:
    """The node stalls just before committing `message` (a GC pause, SIGSTOP); its lease
    expires and another node takes over and handles the message; then the stalled node wakes
    and tries its commit, which fencing must reject (G4)."""

    actor: str
    message: msgspec.Struct


@dataclass(frozen=True)
class InjectGarbage:
    """Undecodable bytes land in `actor`'s inbox: dead-lettered, the node keeps serving (G8)."""

    actor: str
    data: bytes


Step = (
    Send
    | DuplicateSend
    | Crash
    | KillDuringBurst
    | Restart
    | ExpireLeases
    | Redeliver
    | DeleteSnapshots
    | AdvanceClock
    | Pause
    | InjectGarbage
)


@dataclass
class Stats:
    """Totals over the process, reported at the end of a pytest session (soak figures)."""

    simulations: int = 0
    steps: int = 0
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    violations: int = 0

    def summary(self) -> str:
        by_kind = ", ".join(f"{kind} {count}" for kind, count in sorted(self.faults.items()))
        return (
            f"{self.simulations} simulations, {self.steps} steps, "
            f"{sum(self.faults.values())} faults injected ({by_kind or 'none'}), "
            f"{self.violations} guarantee violations"
        )


STATS = Stats()


def format_schedule(schedule: Sequence[Step]) -> str:
    return "\n".join(f"  {number}. {step!r}" for number, step in enumerate(schedule, 1))


class GuaranteeViolation(AssertionError):
    """A guarantee or the model did not hold; carries the seed and the schedule that broke it."""

    def __init__(self, detail: str, *, seed: int, schedule: Sequence[Step], replay: str) -> None:
        self.detail = detail
        self.seed = seed
        self.schedule = list(schedule)
        if not self.schedule:  # driven by a state machine's own rules, which it prints
            super().__init__(f"{detail}\nseed {seed}")
            return
        super().__init__(
            f"{detail}\n"
            f"seed {seed}, schedule of {len(self.schedule)} steps:\n"
            f"{format_schedule(self.schedule)}\n"
            f"replay: {replay}(seed={seed}, schedule={self.schedule!r})"
        )


# The single-writer ledger (G4).


@dataclass(frozen=True)
class Committed:
    """A commit the script accepted, with the epoch the committing node held."""

    node_id: str
    partition: tuple[str, int]
    epoch: int
    address: Address
    version: int
    """The actor's version after the commit."""
    started: int
    """When the commit call started, in the ledger's order (`Ledger.tick`)."""


def _name(partition: tuple[str, int]) -> str:
    return f"{partition[0]}:{partition[1]}"


class Ledger:
    """Every lease epoch a node held and every commit it made, checked for G4 as they are
    recorded: an epoch belongs to one node; a node commits only with an epoch it took, never
    with an epoch older than one another node had taken before the commit call started (a
    deposed node); an actor's commits, in version order, never go back to an older epoch."""

    def __init__(self) -> None:
        self._order = itertools.count()
        self.holders: dict[tuple[str, int], dict[int, tuple[str, int]]] = collections.defaultdict(
            dict
        )
        """Partition -> epoch -> (node id, when it was first seen holding that epoch)."""
        self.commits: list[Committed] = []
        self.problems: list[str] = []

    def tick(self) -> int:
        return next(self._order)

    def took(self, node_id: str, partition: tuple[str, int], epoch: int) -> None:
        holder, _ = self.holders[partition].setdefault(epoch, (node_id, self.tick()))
        if holder != node_id:
            self.problems.append(
                f"{_name(partition)}: epoch {epoch} held by {holder} and by {node_id}"
            )

    def committed(self, record: Committed) -> None:
        self.commits.append(record)
        holders = self.holders[record.partition]
        holder = holders.get(record.epoch)
        what = (
            f"{record.node_id} committed {record.address} v{record.version} "
            f"in {_name(record.partition)} with epoch {record.epoch}"
        )
        if holder is None or holder[0] != record.node_id:
            self.problems.append(f"{what}, held by {holder[0] if holder else 'nobody'}")
        for epoch, (node_id, taken) in holders.items():
            if epoch > record.epoch and taken < record.started:
                self.problems.append(f"{what} after {node_id} took epoch {epoch}")

    def violation(self) -> str | None:
        """The first breach of G4 seen, if any."""
        if self.problems:
            return self.problems[0]
        by_actor: dict[Address, list[Committed]] = collections.defaultdict(list)
        for record in self.commits:
            by_actor[record.address].append(record)
        for records in by_actor.values():
            records.sort(key=lambda record: (record.version, record.started))
            for before, after in itertools.pairwise(records):
                if after.epoch < before.epoch:
                    return (
                        f"{after.address}: v{after.version} committed by {after.node_id} "
                        f"with epoch {after.epoch} after v{before.version} committed by "
                        f"{before.node_id} with epoch {before.epoch}"
                    )
        return None


class _RecordingPartition(Partition):
    """A partition as one node uses it: the epochs it takes and its commits go to the ledger."""

    def __init__(self, view: "_NodeSystem", kind: str, number: int) -> None:
        super().__init__(view.client, view.keys, kind, number)
        self.view = view

    async def acquire(self, node_id: str, ttl_ms: int, *, now_ms: int | None = None) -> int | None:
        view, key = self.view, (self.kind, self.number)
        view.lease_calls += 1
        try:
            epoch = await super().acquire(node_id, ttl_ms, now_ms=now_ms)
        finally:
            view.lease_calls -= 1
        if epoch is None or now_ms is None:
            view.lease_expiry.pop(key, None)
        else:
            view.lease_expiry[key] = now_ms + ttl_ms
            view.ledger.took(node_id, key, epoch)
        return epoch

    async def commit_partitions(
        self,
        parts: Sequence[PartitionCommits],
        *,
        now_ms: int,
        seen: SeenWindow,
        checked: bool = False,
    ) -> GroupCommitResult:
        # Every commit goes through here, of one actor or of several partitions' actors.
        ledger = self.view.ledger
        started = ledger.tick()
        result = await super().commit_partitions(parts, now_ms=now_ms, seen=seen, checked=checked)
        if result.status is CommitStatus.COMMITTED:
            actors = [(part, actor) for part in parts for actor in part.actors]
            for (part, actor), version in zip(actors, result.versions, strict=True):
                ledger.committed(
                    Committed(
                        self.view.node_id,
                        (part.partition.kind, part.partition.number),
                        -1 if part.epoch is None else part.epoch,
                        actor.address,
                        version,
                        started,
                    )
                )
        return result


class _NodeSystem(ActorSystem):
    """The actor system as one simulated node sees it (same client and keys), recording."""

    def __init__(self, system: ActorSystem, node_id: str, ledger: Ledger) -> None:
        super().__init__(*system.actors.values(), codec=system.codec, client=system.client)
        self.keys = system.keys
        self.node_id = node_id
        self.ledger = ledger
        self.lease_calls = 0
        """Lease and membership calls of the node under way: time stands still during one, so
        the node sleeps from the time it called at, as it does in real time."""
        self.lease_expiry: dict[tuple[str, int], int] = {}
        """When each lease the node holds lapses unless renewed (simulated ms)."""
        self.member_expiry: int | None = None

    def partition(self, kind: str, number: int) -> Partition:
        return _RecordingPartition(self, kind, number)


class _CountedMembership(Membership):
    def __init__(self, view: _NodeSystem) -> None:
        super().__init__(view.client, view.keys)
        self.view = view

    async def heartbeat(self, node_id: str, ttl_ms: int, *, now_ms: int | None = None) -> list[str]:
        view = self.view
        view.lease_calls += 1
        try:
            members = await super().heartbeat(node_id, ttl_ms, now_ms=now_ms)
        finally:
            view.lease_calls -= 1
        view.member_expiry = None if now_ms is None else now_ms + ttl_ms
        return members


@dataclass
class _Expected:
    ids: list[str] = field(default_factory=list)
    state: Any = None
    events: list[msgspec.Struct] | None = field(default_factory=list)


@dataclass(eq=False, repr=False)
class RunningNode:
    """A node of the simulation, on its own pausable view of the simulated clock."""

    node: Node
    view: _NodeSystem
    clock: PausableClock
    scope: anyio.CancelScope
    dead: anyio.Event
    crash_at: tuple[str, Address] | None = None
    crashed: bool = False
    pause_at: tuple[str, Address] | None = None
    """The node pauses when it reaches this fault point for this actor (and sets `reached`)."""
    reached: anyio.Event | None = None

    def __repr__(self) -> str:
        return f"RunningNode({self.node_id!r})"

    @property
    def node_id(self) -> str:
        return self.node.node_id

    @property
    def paused(self) -> bool:
        return self.clock.paused

    @property
    def live(self) -> bool:
        """Running and not paused: it renews its leases and heartbeats as time passes."""
        return not self.dead.is_set() and not self.paused


async def wait_for(
    condition: Callable[[], Awaitable[bool]], *, timeout: float, every: float = 0.005
) -> bool:
    """Poll `condition` until it holds (True) or `timeout` seconds pass (False)."""
    with anyio.move_on_after(timeout):
        # Polling: the conditions are held in Redis, with no in-process event to wait on.
        while not await condition():  # noqa: ASYNC110
            await anyio.sleep(every)
        return True
    return False


class Simulation:
    """Runs one actor kind on real nodes under a schedule of faults and checks it (see module).

    Use as an async context manager; the task that enters it hosts the nodes."""

    def __init__(
        self,
        actor: Actor[Any],
        model: Model | None = None,
        *,
        ids: Sequence[str] = ("a", "b", "c"),
        seed: int = 0,
        url: str | None = None,
        partitions: int = 2,
        node_config: NodeConfig | None = None,
        catch_up_s: float = 10.0,
        replay_hint: str = "repertory.runtime.testkit.replay",
        quiet: bool = True,
    ) -> None:
        self.actor = actor
        self.model = model
        self.ids = list(ids)
        self.seed = seed
        self.url = url
        self.partitions = partitions
        self.catch_up_s = catch_up_s
        self.replay_hint = replay_hint
        self.quiet = quiet
        self._log_level = logging.NOTSET
        # fakeredis's blocking reads do not survive cancellation (a killed node): poll there.
        self.node_config = node_config or NodeConfig(
            block_ms=None if url is None else 20,
            poll_s=0.005,
            retry_base_s=0.01,
            lease_ttl_ms=3000,
            # Simulated time moves by steps: look for due timers often.
            max_timer_wait_s=0.01,
            relay_poll_s=0.05,
            # Every other seed, activations guess that actors are new: the guesses found wrong
            # by the commit's version check are part of the schedule then.
            new_actor_share=0.0 if seed % 2 else NodeConfig.new_actor_share,
        )
        self.rng = random.Random(seed)
        self.clock = SimulatedClock()
        self.schedule: list[Step] = []
        self.faults: collections.Counter[str] = collections.Counter()
        self.expected = {
            actor_id: _Expected(state=actor.initial, events=[] if model else None)
            for actor_id in self.ids
        }
        self._ids = itertools.count(1)
        self._node_numbers = itertools.count()
        self._nodes: list[RunningNode] = []
        self.ledger = Ledger()
        self._stack = AsyncExitStack()
        self._group: TaskGroup | None = None
        self.client: RedisClient | None = None
        self.system: ActorSystem | None = None

    # Set-up.

    async def __aenter__(self) -> Self:
        STATS.simulations += 1
        if self.quiet:
            # Injected faults make nodes log lost partitions and dead letters by design: the
            # violation, not hundreds of expected warnings, is what a failure should show.
            self._log_level = LOGGER.level
            LOGGER.setLevel(logging.CRITICAL)
            self._stack.callback(LOGGER.setLevel, self._log_level)
        if self.url is None:
            client: RedisClient = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        else:
            client = create_client(self.url)
        self.client = client
        self._stack.push_async_callback(client.aclose)
        # A fresh namespace per simulation: runs on one real server never see each other.
        app = f"sim{uuid.uuid4().hex[:10]}"
        self.system = ActorSystem(self.actor, app=app, partitions=self.partitions, client=client)
        self._group = await self._stack.enter_async_context(anyio.create_task_group())
        await self.start_node()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # No await before the task group exits (it waits for the nodes): when a node failed,
        # this task is being cancelled, and an await here would skip the exit.
        for running in self._nodes:
            running.scope.cancel()
            running.clock.resume()
        await self._stack.__aexit__(exc_type, exc, tb)

    @property
    def _system(self) -> ActorSystem:
        assert self.system is not None, "use the simulation as `async with`"
        return self.system

    @property
    def _client(self) -> RedisClient:
        assert self.client is not None, "use the simulation as `async with`"
        return self.client

    def address(self, actor_id: str) -> Address:
        return Address(self.actor.kind, actor_id)

    # Nodes.

    async def start_node(self, node_id: str | None = None) -> RunningNode:
        """Start a node (`node-N` unless named) in the simulation's task group."""
        assert self._group is not None
        node_id = node_id or f"node-{next(self._node_numbers)}"
        scope, dead = anyio.CancelScope(), anyio.Event()
        config = replace(self.node_config, node_id=node_id)
        clock = PausableClock(self.clock)
        hook: list[RunningNode] = []

        async def fault(point: str, address: Address | None) -> None:
            await self._fault(hook[0], point, address)

        view = _NodeSystem(self._system, node_id, self.ledger)
        node = Node(view, config, clock=clock, faults=fault)
        node.membership = _CountedMembership(view)
        running = RunningNode(node, view, clock, scope, dead)
        hook.append(running)
        self._nodes.append(running)

        async def run(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
            # Any other failure propagates: it ends the simulation, and the run reports it.
            try:
                with scope:
                    try:
                        await node.run(task_status=task_status)
                    except* SimulatedCrash:
                        pass
            except Exception:
                # Unless the node was killed: what a killed process's tasks raise while they
                # are torn down is never seen.
                if not scope.cancel_called:
                    raise
            finally:
                dead.set()

        await self._group.start(run)
        return running

    async def _fault(self, running: RunningNode, point: str, address: Address | None) -> None:
        if running.crash_at == (point, address):
            running.crash_at, running.crashed = None, True
            raise SimulatedCrash(point)
        if running.pause_at == (point, address):
            running.pause_at = None
            self.pause(running)
            if running.reached is not None:
                running.reached.set()
        # A paused node handles and commits nothing until it resumes.
        await running.clock.wait_running()

    @property
    def nodes(self) -> list[RunningNode]:
        """The nodes started and not yet forgotten (dead ones included until then)."""
        return list(self._nodes)

    @property
    def main(self) -> RunningNode:
        """The node the simulation serves from (the latest started)."""
        return self._nodes[-1]

    async def ensure_running(self) -> RunningNode:
        """Restart the main node if it died, under its own id: as a restarted process that
        keeps its name, it renews its own leases and reclaims its own pending messages."""
        if self._nodes and not self.main.dead.is_set():
            return self.main
        node_id = self.main.node.node_id if self._nodes else None
        self._nodes = [running for running in self._nodes if not running.dead.is_set()]
        return await self.start_node(node_id)

    async def stop_node(self, running: RunningNode) -> None:
        """Stop the node gracefully: it finishes the messages in hand, releases its leases and
        leaves the members."""
        running.node.stop()
        await running.dead.wait()

    async def kill(self, running: RunningNode) -> None:
        """Cancel the node wherever it is: no graceful step runs, leases are not released."""
        running.scope.cancel()
        running.clock.resume()
        await running.dead.wait()

    def forget(self, running: RunningNode) -> None:
        """Drop a dead node from `nodes` (its id is not reused by `ensure_running`)."""
        self._nodes.remove(running)

    def pause(self, running: RunningNode) -> None:
        """The node stands still (see `PausableClock`), also at every fault point: it renews
        no lease, sends no heartbeat, handles and commits nothing; time goes on."""
        running.clock.pause()

    def resume(self, running: RunningNode) -> None:
        """The paused node goes on where it stood, late: fencing must refuse what it commits
        for the partitions other nodes took meanwhile."""
        running.clock.resume()

    async def pass_time(self, ms: int) -> None:
        """Simulated time moves `ms` forward, in steps of a sixth of the lease TTL at most,
        each once the live nodes did what came due (renewed their leases and heartbeats, as
        they would in real time); the leases and memberships of dead and paused nodes lapse.
        Raises GuaranteeViolation if a live node does not keep up (a renewal stuck)."""
        step = max(1, self.node_config.lease_ttl_ms // 6)
        while ms > 0:
            moved = min(step, ms)
            ms -= moved
            await self._keep_up(moved)
            self.clock.advance(moved)
        await self._keep_up(0)

    async def jump_time(self, ms: int) -> None:
        """Simulated time jumps `ms` at once, as if every node had stood still that long:
        their leases and memberships lapse and they take them anew. The jump falls between
        lease calls, as a stall does (a call under way would otherwise come back with a lease
        already past, and the node would wait for a renewal that time must bring)."""
        await self._keep_up(0)
        self.clock.advance(ms)
        await self._keep_up(0)

    async def _keep_up(self, ms: int) -> None:
        """Wait until every woken sleeper went on and time may move `ms` (see `_behind`)."""
        with anyio.move_on_after(self.catch_up_s) as waiting:
            turns = 0
            while self.clock.waking or self._behind(ms):
                # The nodes' next moves are a few scheduler turns away, on fakeredis.
                turns += 1
                await anyio.sleep(0 if turns < 100 else 0.001)
        if waiting.cancelled_caught:
            behind = "; ".join(self._behind(ms))
            raise self.violation(
                f"after {self.catch_up_s} s at {self.clock.now_ms()} ms: "
                f"{behind or f'{self.clock.waking} woken sleepers did not go on'}"
            )

    def _behind(self, ms: int) -> list[str]:
        """What keeps time from moving `ms` on (once every woken sleeper went on): a lease or
        membership call of a live node under way, or a heartbeat or lease of one that would
        lapse (its renewal is due: the node renews every third of a TTL, and time moves by a
        sixth at most)."""
        now = self.clock.now_ms()
        behind = []

        def lapses(expiry: int | None) -> bool:
            # Lapsed already (the node stood still): nothing left to keep; the node finds out
            # when its renewal comes due. None: a lease it lost (its session is ending).
            return expiry is not None and now < expiry <= now + ms

        for running in self._nodes:
            if not running.live:
                continue
            view = running.view
            if view.lease_calls:
                behind.append(f"{running.node_id} has a lease or membership call under way")
            if lapses(view.member_expiry):
                behind.append(f"{running.node_id} did not heartbeat ({view.member_expiry})")
            for key in list(running.node.sessions):
                expiry = view.lease_expiry.get(key)
                if lapses(expiry):
                    behind.append(f"{running.node_id} did not renew {_name(key)} ({expiry})")
        return behind

    # Sending, with the model following along.

    def _next_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}-{self.rng.getrandbits(32):08x}"

    async def _deliver(
        self, actor_id: str, message: msgspec.Struct, idempotency_key: str | None = None
    ) -> str:
        """What `ActorSystem.send` does, with ids and time from the simulation."""
        system = self._system
        address = self.address(actor_id)
        envelope = system.codec.envelope(
            str(address),
            message,
            idempotency_key=idempotency_key,
            message_id=self._next_id("msg"),
            created_at=self.clock.now_ms(),
        )
        await self._client.xadd(
            system.keys.inbox_of(address), {b"m": system.codec.encode(envelope)}
        )
        return envelope.idempotency_key or envelope.id

    def _expect(self, actor_id: str, dedupe_id: str, message: msgspec.Struct) -> None:
        expected = self.expected[actor_id]
        expected.ids.append(dedupe_id)
        if self.model is None:
            return
        try:
            outcome = self.model(expected.state, message)
        except Rejected:
            return
        if isinstance(outcome, tuple):
            expected.state, events = outcome
            if expected.events is not None:
                expected.events.extend(events)
        else:
            expected.state = outcome
            expected.events = None  # the model does not say: only state is compared

    async def send(
        self,
        actor_id: str,
        message: msgspec.Struct,
        *,
        idempotency_key: str | None = None,
        copies: int = 1,
    ) -> str:
        """Send `message` (`copies` times, sharing one idempotency key when copies > 1) and
        record what the model expects of it; returns the dedupe id."""
        if copies > 1 and idempotency_key is None:
            idempotency_key = self._next_id("key")
        dedupe_id = ""
        for _ in range(copies):
            dedupe_id = await self._deliver(actor_id, message, idempotency_key)
        self._expect(actor_id, dedupe_id, message)
        return dedupe_id

    # Steps.

    async def apply(self, step: Step) -> None:
        """Run one step of a schedule (recorded, so a failure can print the schedule)."""
        self.schedule.append(step)
        STATS.steps += 1
        kind = type(step).__name__
        if not isinstance(step, Send):
            self.faults[kind] += 1
            STATS.faults[kind] += 1
        await self.ensure_running()
        system, client = self._system, self._client
        match step:
            case Send(actor_id, message):
                await self.send(actor_id, message)
            case DuplicateSend(actor_id, message, copies):
                await self.send(actor_id, message, copies=max(2, copies))
            case Crash(actor_id, message, point):
                running = self.main
                running.crash_at = (point, self.address(actor_id))
                dedupe_id = await self.send(actor_id, message)

                async def crashed_or_settled() -> bool:
                    return running.dead.is_set() or dedupe_id in await self.settled(actor_id)

                await wait_for(crashed_or_settled, timeout=self.catch_up_s)
                if running.crashed:
                    # The node is dying, maybe not dead yet even though its commit is
                    # visible: let it finish dying, so that the check restarts it.
                    await running.dead.wait()
                running.crash_at = None
            case KillDuringBurst(sends, turns):
                for actor_id, message in sends:
                    await self.send(actor_id, message)
                for _ in range(turns):
                    await anyio.lowlevel.checkpoint()
                await self.kill(self.main)
            case Restart():
                await self.stop_node(self.main)
            case ExpireLeases():
                gone = self.main
                await self.kill(gone)
                self.forget(gone)
                # Its leases and membership lapse; the node started next takes over at once.
                await self.pass_time(self.node_config.lease_ttl_ms)
            case Redeliver(actor_id):
                address = self.address(actor_id)
                handled = await client.xrevrange(system.keys.handled(address), count=1)
                # Dedupe remembers ids for a bounded window (SeenWindow, 24 h by default): a
                # copy arriving later is a new message by contract, so none is sent then.
                window_ms = self.node_config.seen.window_ms - 60_000
                if handled and self.clock.now_ms() - int(handled[0][1][b"at"]) < window_ms:
                    envelope = handled[0][1][b"m"]
                    await client.xadd(system.keys.inbox_of(address), {b"m": envelope})
            case DeleteSnapshots():
                for number in range(self.partitions):
                    await client.delete(system.keys.snapshots(self.actor.kind, number))
            case AdvanceClock(ms):
                await self.jump_time(ms)
            case Pause(actor_id, message):
                await self._pause(actor_id, message)
            case InjectGarbage(actor_id, data):
                await client.xadd(system.keys.inbox_of(self.address(actor_id)), {b"m": data})

    async def _pause(self, actor_id: str, message: msgspec.Struct) -> None:
        address = self.address(actor_id)
        keys = self._system.keys
        zombie = self.main
        zombie.reached = anyio.Event()
        zombie.pause_at = ("before-commit", address)
        dedupe_id = await self.send(actor_id, message)
        with anyio.move_on_after(self.catch_up_s):
            await zombie.reached.wait()
        zombie.pause_at = None
        if zombie.paused:
            # The stalled node's leases lapse as time goes on; a new node takes over.
            await self.start_node()
            await self._take_over()

            async def handled() -> bool:
                return dedupe_id in await self.settled(actor_id)

            await wait_for(handled, timeout=self.catch_up_s)
            self.resume(zombie)
            session = (self.actor.kind, keys.partition_of(address))

            async def deposed() -> bool:
                return zombie.dead.is_set() or session not in zombie.node.sessions

            await wait_for(deposed, timeout=self.catch_up_s)
        # The zombie dies at last; its membership lapses, and the new node takes back what it
        # handed over when the zombie rejoined.
        await self.kill(zombie)
        self.forget(zombie)
        await self._take_over()

    async def _take_over(self) -> None:
        """Time enough for the leases and memberships of dead and paused nodes to lapse and for
        a live node to take their partitions: a TTL, a heartbeat, and the polls of a node
        beyond its share (it takes a partition seen free twice)."""
        await self.pass_time(2 * self.node_config.lease_ttl_ms)

    # Checks.

    async def handled_ids(self, actor_id: str) -> list[str]:
        """The dedupe ids of the messages the actor handled, in commit order."""
        system = self._system
        entries = await self._client.xrange(system.keys.handled(self.address(actor_id)))
        ids = []
        for _, fields in entries:
            envelope = system.codec.decode_envelope(fields[b"m"])
            ids.append(envelope.idempotency_key or envelope.id)
        return ids

    async def dead_lettered(self, actor_id: str) -> dict[str, str]:
        """Dedupe id -> reason, for the actor's messages in its partition's dead letters."""
        system = self._system
        address = self.address(actor_id)
        stream = system.keys.dead_letters(self.actor.kind, system.keys.partition_of(address))
        reasons = {}
        for letter in await DeadLetters(self._client, stream).list(count=10_000):
            try:
                envelope = system.codec.decode_envelope(letter.data)
            except Exception:
                continue  # garbage: it belongs to no actor
            if envelope.target == str(address):
                reasons[envelope.idempotency_key or envelope.id] = (
                    f"{letter.reason}: {letter.detail}"
                )
        return reasons

    async def settled(self, actor_id: str) -> set[str]:
        """Dedupe ids the node is done with: handled or dead-lettered."""
        return {*await self.handled_ids(actor_id), *await self.dead_lettered(actor_id)}

    def violation(self, detail: str) -> GuaranteeViolation:
        STATS.violations += 1
        return GuaranteeViolation(
            detail, seed=self.seed, schedule=self.schedule, replay=self.replay_hint
        )

    async def settle(self) -> None:
        """Recover (restart the node if it died) and wait until every expected message is
        handled or dead-lettered, up to `catch_up_s`."""
        await self.ensure_running()
        for actor_id, expected in self.expected.items():
            wanted = set(expected.ids)

            async def caught_up(actor_id: str = actor_id, wanted: set[str] = wanted) -> bool:
                return wanted <= await self.settled(actor_id)

            await wait_for(caught_up, timeout=self.catch_up_s)

    def check_single_writer(self) -> None:
        """Verify G4 on every lease taken and commit made so far (see `Ledger`)."""
        problem = self.ledger.violation()
        if problem is not None:
            raise self.violation(f"single writer (G4): {problem}")

    async def check(self) -> None:
        """Settle, then verify G1-G5 and the model for every actor (see module)."""
        await self.settle()
        self.check_single_writer()
        for actor_id, expected in self.expected.items():
            address = self.address(actor_id)
            handled = await self.handled_ids(actor_id)
            if handled != expected.ids:
                counts = collections.Counter(handled)
                dead = await self.dead_lettered(actor_id)
                lost = [i for i in expected.ids if i not in counts]
                twice = sorted(i for i, n in counts.items() if n > 1)
                why = "; ".join(f"{i} dead-lettered ({dead[i]})" for i in lost if i in dead)
                raise self.violation(
                    f"{address}: handled {handled}, sent {expected.ids} "
                    f"(lost {lost}, handled twice {twice}{'; ' + why if why else ''})"
                )
            view = await self._system.state_of(address)
            if self.model is not None and view.state != expected.state:
                raise self.violation(f"{address}: state {view.state!r} != model {expected.state!r}")
            if self.model is not None and expected.events is not None:
                stored = [item.event async for item in self._system.store.read(address)]
                if stored != expected.events:
                    raise self.violation(
                        f"{address}: events {stored!r} != model {expected.events!r}"
                    )

    async def outcome(self) -> "Outcome":
        """What the run came to, read back from Redis: equal for two runs of one seed and
        schedule."""
        states, handled = {}, {}
        for actor_id in self.ids:
            view = await self._system.state_of(self.address(actor_id))
            states[actor_id] = f"v{view.version} {view.state!r}"
            handled[actor_id] = await self.handled_ids(actor_id)
        return Outcome(
            seed=self.seed,
            schedule=[repr(step) for step in self.schedule],
            states=states,
            handled=handled,
            clock_ms=self.clock.now_ms(),
            faults=dict(self.faults),
        )


class Outcome(msgspec.Struct, frozen=True):
    seed: int
    schedule: list[str]
    states: dict[str, str]
    """Each actor's version and state as rebuilt from its log, after the last check."""
    handled: dict[str, list[str]]
    """Each actor's handled message (dedupe) ids, in commit order."""
    clock_ms: int
    faults: dict[str, int]


# The seeded scheduler.

FAULT_WEIGHTS: dict[str, int] = {
    "Send": 6,
    "DuplicateSend": 1,
    "Crash": 2,
    "KillDuringBurst": 1,
    "Restart": 1,
    "ExpireLeases": 1,
    "Redeliver": 1,
    "DeleteSnapshots": 1,
    "AdvanceClock": 1,
    "Pause": 1,
}


def random_schedule(
    seed: int,
    actor: Actor[Any],
    *,
    steps: int = 20,
    ids: Sequence[str] = ("a", "b", "c"),
    messages: Callable[[random.Random], msgspec.Struct] | None = None,
    weights: dict[str, int] | None = None,
) -> list[Step]:
    """A schedule drawn from `seed` alone: the same seed, the same schedule."""
    rng = random.Random(seed)
    draw = messages or partial(sample_message, actor=actor)
    table = weights or FAULT_WEIGHTS
    kinds, kind_weights = list(table), list(table.values())

    def pick() -> str:
        return rng.choice(list(ids))

    schedule: list[Step] = []
    for _ in range(steps):
        kind = rng.choices(kinds, kind_weights)[0]
        if kind == "Send":
            schedule.append(Send(pick(), draw(rng)))
        elif kind == "DuplicateSend":
            schedule.append(DuplicateSend(pick(), draw(rng), rng.randint(2, 3)))
        elif kind == "Crash":
            schedule.append(Crash(pick(), draw(rng), rng.choice(CRASH_POINTS)))
        elif kind == "KillDuringBurst":
            burst = tuple((pick(), draw(rng)) for _ in range(rng.randint(1, 6)))
            schedule.append(KillDuringBurst(burst, rng.randint(0, 40)))
        elif kind == "Restart":
            schedule.append(Restart())
        elif kind == "ExpireLeases":
            schedule.append(ExpireLeases())
        elif kind == "Redeliver":
            schedule.append(Redeliver(pick()))
        elif kind == "DeleteSnapshots":
            schedule.append(DeleteSnapshots())
        elif kind == "AdvanceClock":
            schedule.append(AdvanceClock(rng.choice([1, 1000, 60_000, 3_600_000])))
        elif kind == "Pause":
            schedule.append(Pause(pick(), draw(rng)))
        else:
            raise ValueError(f"unknown step kind {kind!r}")
    return schedule


async def run_schedule(simulation: Simulation, schedule: Sequence[Step]) -> Outcome:
    """Apply each step and check after it; raises GuaranteeViolation at the first failure."""
    await simulation.check()
    for step in schedule:
        await simulation.apply(step)
        await simulation.check()
    return await simulation.outcome()


def simulate(
    actor: Actor[Any],
    model: Model | None = None,
    *,
    seed: int,
    steps: int = 20,
    schedule: Sequence[Step] | None = None,
    **options: Any,
) -> Outcome:
    """Run a seeded simulation to its end (blocking): the schedule is `random_schedule(seed)`
    unless given. The same seed gives the same schedule and the same outcome."""
    ids = options.get("ids", ("a", "b", "c"))
    steps_to_run = (
        schedule if schedule is not None else random_schedule(seed, actor, steps=steps, ids=ids)
    )

    async def main() -> Outcome:
        async with Simulation(actor, model, seed=seed, **options) as simulation:
            return await run_schedule(simulation, steps_to_run)

    return anyio.run(main)


def replay(
    actor: Actor[Any],
    model: Model | None = None,
    *,
    seed: int,
    schedule: Sequence[Step],
    **options: Any,
) -> Outcome:
    """Replay a printed failure: the same seed and schedule, checked after every step."""
    return simulate(actor, model, seed=seed, schedule=schedule, **options)
