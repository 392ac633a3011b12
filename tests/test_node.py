"""One node running real actors: handling, replies, order, dedupe, timers, relay, snapshots,
poison messages, graceful stop. On fakeredis and on the real embedded server."""

import gc
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import anyio
import msgspec
import pytest

from repertory.actors.model import Actor, Context, Rejected, applier, command
from repertory.runtime import node as node_module
from repertory.runtime.node import Node, NodeConfig, PartitionLost, _take_turn
from repertory.runtime.system import ActorSystem, rebuild, rebuild_many
from repertory.runtime.testkit import SimulatedClock
from repertory.schemas import schema
from repertory.streams.client import RedisClient, is_cluster
from repertory.streams.eventstore import EventStore
from repertory.streams.inbox import InboxEntry, read_inboxes
from repertory.streams.keys import Address
from repertory.streams.partition import (
    ActorCommits,
    CommitStatus,
    GroupCommitResult,
    Partition,
    PartitionCommits,
)
from tests.support import eventually

pytestmark = pytest.mark.anyio


@schema("test.node.deposit")
class Deposit(msgspec.Struct, frozen=True):
    amount: int


@schema("test.node.transfer")
class Transfer(msgspec.Struct, frozen=True):
    to: str
    amount: int


@schema("test.node.remind")
class Remind(msgspec.Struct, frozen=True):
    after_s: float
    amount: int


@schema("test.node.explode")
class Explode(msgspec.Struct, frozen=True):
    pass


@schema("test.node.deposited")
class Deposited(msgspec.Struct, frozen=True):
    amount: int


@schema("test.node.balance")
class Balance(msgspec.Struct, frozen=True):
    total: int = 0
    deposits: list[int] = []


class Account(Actor[Balance]):
    kind = "account"
    initial = Balance()
    snapshot_every = 3

    @command
    def deposit(self, state: Balance, cmd: Deposit, ctx: Context) -> Deposited:
        if cmd.amount <= 0:
            raise Rejected("amount must be positive", code="invalid-amount")
        return Deposited(cmd.amount)

    @command
    def transfer(self, state: Balance, cmd: Transfer, ctx: Context) -> Deposited:
        ctx.send(Address("account", cmd.to), Deposit(cmd.amount))
        return Deposited(-cmd.amount)

    @command
    def remind(self, state: Balance, cmd: Remind, ctx: Context) -> None:
        ctx.schedule(cmd.after_s, Deposit(cmd.amount))

    @command
    def explode(self, state: Balance, cmd: Explode, ctx: Context) -> None:
        raise RuntimeError("this handler always fails")

    @applier
    def deposited(self, state: Balance, event: Deposited) -> Balance:
        return Balance(state.total + event.amount, [*state.deposits, event.amount])


FAST = NodeConfig(block_ms=50, retry_base_s=0.01, retry_cap_s=0.05, lease_ttl_ms=2000)


@pytest.fixture
async def system(redis: RedisClient) -> AsyncIterator[ActorSystem]:
    async with ActorSystem(Account(), partitions=4, client=redis) as connected:
        yield connected


@pytest.fixture
async def node(system: ActorSystem) -> AsyncIterator[Node]:
    running = Node(system, FAST)
    async with anyio.create_task_group() as group:
        await group.start(running.run)
        yield running
        running.stop()


def record_commits(
    monkeypatch: pytest.MonkeyPatch, record: Callable[[Sequence[ActorCommits]], object]
) -> None:
    """Tell `record` the actors of every script call that committed, over all its partitions
    (`Partition.commit_partitions`, which every commit goes through)."""
    commit_partitions = Partition.commit_partitions

    async def recorded(
        self: Partition, parts: Sequence[PartitionCommits], **options: Any
    ) -> GroupCommitResult:
        result = await commit_partitions(self, parts, **options)
        if result.status is CommitStatus.COMMITTED:
            record([actor for part in parts for actor in part.actors])
        return result

    monkeypatch.setattr(Partition, "commit_partitions", recorded)


async def total_is(system: ActorSystem, actor: str, total: int) -> bool:
    return bool((await system.state_of(actor)).state.total == total)


async def test_sent_messages_are_handled_and_committed(system: ActorSystem, node: Node) -> None:
    await system.send("account/a", Deposit(5))
    await system.send("account/a", Deposit(7))
    await eventually(lambda: total_is(system, "account/a", 12))
    view = await system.state_of("account/a")
    assert view.version == 2
    assert view.state.deposits == [5, 7]


async def test_ask_returns_the_events_and_rejections_raise(system: ActorSystem, node: Node) -> None:
    answer = await system.ask("account/b", Deposit(3))
    assert answer.events == [Deposited(3)]
    assert answer.version == 1
    with pytest.raises(Rejected) as refusal:
        await system.ask("account/b", Deposit(-1))
    assert refusal.value.code == "invalid-amount"
    assert (await system.state_of("account/b")).version == 1


async def test_messages_from_one_sender_are_handled_in_order(
    system: ActorSystem, node: Node
) -> None:
    for amount in range(1, 101):
        await system.send("account/ordered", Deposit(amount))
    await eventually(lambda: total_is(system, "account/ordered", 5050))
    assert (await system.state_of("account/ordered")).state.deposits == list(range(1, 101))


async def test_a_duplicate_send_has_no_second_effect(system: ActorSystem, node: Node) -> None:
    for _ in range(3):
        await system.send("account/d", Deposit(10), idempotency_key="pay-42")
    await system.send("account/d", Deposit(1))
    await eventually(lambda: total_is(system, "account/d", 11))
    assert (await system.state_of("account/d")).state.deposits == [10, 1]


async def test_a_backlog_is_committed_in_batches_with_the_same_effects(
    system: ActorSystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Messages waiting for one actor are committed several per script call: duplicates inside
    one batch, a refusal and a failing handler in the middle change nothing of the outcome."""
    address = Address("account", "backlog")
    expected: list[int] = []
    for amount in range(1, 41):
        await system.send(address, Deposit(amount))
        expected.append(amount)
        if amount % 10 == 0:
            for _ in range(2):  # the same send again, within the same batch
                await system.send(address, Deposit(1000), idempotency_key=f"dup-{amount}")
            expected.append(1000)
        if amount == 20:
            await system.send(address, Deposit(-1))  # refused
            await system.send(address, Explode())  # retried, then dead-lettered
    batch_sizes: list[int] = []
    record_commits(monkeypatch, lambda actors: batch_sizes.extend(len(a.commits) for a in actors))
    handled = system.keys.handled(address)
    running = Node(system, FAST)
    async with anyio.create_task_group() as group:
        await group.start(running.run)

        async def all_handled() -> bool:
            # Every distinct message is recorded once; the duplicates and the poison are not.
            return int(await system.client.xlen(handled)) == len(expected) + 1

        await eventually(all_handled)
        running.stop()
    view = await system.state_of(address)
    assert view.state.deposits == expected
    assert view.version == len(expected)
    assert sum(batch_sizes) == len(expected) + 1
    assert max(batch_sizes) > 1
    # Each handled message records the time its handler saw, as its events do (replay).
    recorded = {
        stored.version: stored.record.recorded_at async for stored in system.store.read(address)
    }
    for _, fields in await system.client.xrange(handled):
        for version in range(int(fields[b"from"]) + 1, int(fields[b"to"]) + 1):
            assert recorded[version] == int(fields[b"at"])


async def test_actors_waiting_together_are_committed_in_one_script_call(
    system: ActorSystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Messages for many actors read at once are committed several actors per script call; a
    duplicate, a refusal and a failing handler among them change nothing of the outcome."""
    actors = [f"many-{index}" for index in range(60)]
    expected: dict[str, list[int]] = {}
    for round_ in range(1, 4):
        for index, actor in enumerate(actors):
            await system.send(f"account/{actor}", Deposit(round_))
            expected.setdefault(actor, []).append(round_)
            if index % 7 == 0:
                # The same send again (a duplicate among the actors committed together).
                await system.send(f"account/{actor}", Deposit(1000), idempotency_key=f"{actor}-dup")
                if round_ == 1:
                    expected[actor].append(1000)
            if index % 11 == 0 and round_ == 2:
                await system.send(f"account/{actor}", Deposit(-1))  # refused
                await system.send(f"account/{actor}", Explode())  # dead-lettered
    group_sizes: list[int] = []
    record_commits(monkeypatch, lambda actors: group_sizes.append(len(actors)))
    # The accounts' handlers are plain functions: two handle at once (`plain_handling`), and
    # the actors that wait behind them meanwhile are taken together.
    running = Node(system, FAST)
    async with anyio.create_task_group() as group:
        await group.start(running.run)

        async def all_handled() -> bool:
            for actor, deposits in expected.items():
                if (await system.state_of(f"account/{actor}")).state.deposits != deposits:
                    return False
            return True

        await eventually(all_handled)
        running.stop()
    assert max(group_sizes) > 1
    for index, actor in enumerate(actors):
        view = await system.state_of(f"account/{actor}")
        refused = 1 if index % 11 == 0 else 0
        # Each distinct message is recorded once with what it did; the poison is not.
        handled = await system.client.xlen(system.keys.handled(Address("account", actor)))
        assert handled == len(expected[actor]) + refused
        assert view.version == len(expected[actor])


async def test_actors_taken_together_are_activated_in_one_round_trip(
    system: ActorSystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backlog for actors with histories (events, and a snapshot for some): the actors a
    handler task takes together are rebuilt by one activation call, each to its own state."""
    actors = [f"back-{index}" for index in range(40)]
    # 2 to 4 deposits each (a snapshot after 3), then one more once the node is gone.
    histories = {actor: list(range(1, 3 + index % 3)) for index, actor in enumerate(actors)}
    backlog = {actor: [100] for actor in actors}
    sent = 0

    async def all_handled() -> bool:
        lengths = [
            int(await system.client.xlen(system.keys.handled(Address("account", actor))))
            for actor in actors
        ]
        return sum(lengths) == sent

    loaded: list[int] = []
    load_many = EventStore.load_many

    async def recorded(store: EventStore, addresses: Sequence[Address]) -> Any:
        loaded.append(len(addresses))
        return await load_many(store, addresses)

    for phase, deposits in enumerate((histories, backlog)):
        for actor, amounts in deposits.items():
            for amount in amounts:
                await system.send(f"account/{actor}", Deposit(amount))
                sent += 1
        loaded.clear()
        monkeypatch.setattr(EventStore, "load_many", recorded)
        running = Node(system, FAST)
        async with anyio.create_task_group() as group:
            await group.start(running.run)
            await eventually(all_handled)
            running.stop()
        monkeypatch.undo()
        if phase:
            assert sum(loaded) == len(actors)  # each actor once
            assert len(loaded) < len(actors) / 2
    for actor in actors:
        view = await system.state_of(f"account/{actor}")
        everything = histories[actor] + backlog[actor]
        assert (view.version, view.state.deposits) == (len(everything), everything)


async def test_a_node_reads_again_once_a_turn_is_free(
    system: ActorSystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While every turn is taken, what arrives stays in the inboxes and comes in one read once
    a turn is free, instead of a read per message, and one read takes every partition's (on a
    Cluster, a read per partition)."""
    entered, release = anyio.Event(), anyio.Event()

    async def hold_the_turn(point: str, address: Address | None) -> None:
        if point == "before-handle" and address == Address("account", "holder"):
            entered.set()
            await release.wait()

    reads: list[int] = []

    async def recorded(*args: Any, **options: Any) -> list[list[InboxEntry]]:
        replies = await read_inboxes(*args, **options)
        if any(replies):
            reads.append(sum(len(entries) for entries in replies))
        return replies

    monkeypatch.setattr(node_module, "read_inboxes", recorded)
    running = Node(system, replace(FAST, plain_handling=1), faults=hold_the_turn)
    async with anyio.create_task_group() as group:
        await group.start(running.run)
        await system.send("account/holder", Deposit(1))
        await entered.wait()
        reads.clear()
        actors = [f"queued-{index}" for index in range(100)]
        for actor in actors:
            await system.send(f"account/{actor}", Deposit(1))
        release.set()
        for actor in actors:
            await eventually(partial(total_is, system, f"account/{actor}", 1))
        running.stop()
    assert sum(reads) == len(actors)
    # A read blocked when the turn was taken brings one message more.
    reads_per_turn = system.keys.partitions_of("account") if is_cluster(system.client) else 1
    assert len(reads) <= 2 * reads_per_turn


@schema("test.node.wait")
class Wait(msgspec.Struct, frozen=True):
    pass


class Waiter(Actor[Balance]):
    """Its handler awaits: it holds its actor until as many actors as `expected` are inside
    the handler at once."""

    kind = "waiter"
    initial = Balance()
    expected = 0
    inside = 0
    most_inside = 0
    all_inside: anyio.Event

    @command
    async def wait(self, state: Balance, cmd: Wait, ctx: Context) -> Deposited:
        cls = type(self)
        cls.inside += 1
        cls.most_inside = max(cls.most_inside, cls.inside)
        if cls.inside >= cls.expected:
            cls.all_inside.set()
        with anyio.move_on_after(10):
            await cls.all_inside.wait()
        cls.inside -= 1
        return Deposited(1)

    @applier
    def deposited(self, state: Balance, event: Deposited) -> Balance:
        return Balance(state.total + event.amount)


async def test_async_handlers_of_different_actors_run_at_once_plain_ones_two_at_a_time(
    redis: RedisClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Actors of a kind with `async def` handlers handle concurrently, up to `max_handling`:
    twelve handlers that each wait for all twelve to be inside all finish. A kind with plain
    handlers takes its turns from `plain_handling` (2 at once, over all partitions)."""
    monkeypatch.setattr(Waiter, "expected", 12)
    monkeypatch.setattr(Waiter, "all_inside", anyio.Event(), raising=False)
    handling_plain: list[float] = []
    commit_partitions = Partition.commit_partitions

    async def counted(self: Partition, *args: Any, **options: Any) -> GroupCommitResult:
        if self.kind == "account":
            handling_plain.append(running.plain_handling.borrowed_tokens)
        return await commit_partitions(self, *args, **options)

    monkeypatch.setattr(Partition, "commit_partitions", counted)
    async with ActorSystem(Account(), Waiter(), partitions=4, client=redis) as system:
        for index in range(12):
            await system.send(f"waiter/w{index}", Wait())
            await system.send(f"account/a{index}", Deposit(1))
        running = Node(system, FAST)
        async with anyio.create_task_group() as group:
            await group.start(running.run)

            async def all_handled() -> bool:
                for index in range(12):
                    for actor in (f"waiter/w{index}", f"account/a{index}"):
                        if not await total_is(system, actor, 1):
                            return False
                return True

            await eventually(all_handled)
            running.stop()
    assert Waiter.most_inside == 12
    # Every account commit ran on a turn of the plain handlers' limiter.
    assert handling_plain
    assert 1 <= min(handling_plain) <= max(handling_plain) <= 2


class BriefAccount(Account):
    idle_after_s = 0.4


async def test_idle_actors_keep_their_views_out_of_the_collector_until_forgotten(
    redis: RedisClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An actor with no message waiting is kept as its view alone, which full collections do
    not walk (a node keeps hundreds of thousands); its next message is handled from that view
    without a rebuild; once idle for `idle_after_s`, it is forgotten. Simulated time: nothing
    is forgotten before the test moves the clock on."""
    actors = [f"account/idle-{index}" for index in range(3)]
    clock = SimulatedClock()
    async with ActorSystem(BriefAccount(), partitions=1, client=redis) as system:
        running = Node(system, FAST, clock=clock)
        async with anyio.create_task_group() as group:
            await group.start(running.run)

            async def serving() -> bool:
                return ("account", 0) in running.sessions

            await eventually(serving)
            session = running.sessions[("account", 0)]
            for actor in actors:
                await system.send(actor, Deposit(5))

            async def all_idle() -> bool:
                return not session.mailboxes and set(session.idle) == set(actors)

            await eventually(all_idle)
            for idle in session.idle.values():
                # Nor what it holds: a named tuple (an Address) would be tracked for good.
                assert not gc.is_tracked(idle)
                assert not any(gc.is_tracked(field) for field in msgspec.structs.astuple(idle))

            rebuilt: list[Address] = []

            async def recorded(store: EventStore, actor: Any, address: Address) -> Any:
                rebuilt.append(address)
                return await rebuild(store, actor, address)

            monkeypatch.setattr("repertory.runtime.node.rebuild", recorded)
            await system.send(actors[0], Deposit(7))
            await eventually(partial(total_is, system, actors[0], 12))
            assert rebuilt == []

            async def all_forgotten() -> bool:
                clock.advance(100)  # the sweep runs every idle_after_s / 4
                return not session.idle and not session.mailboxes

            await eventually(all_forgotten)
            await system.send(actors[1], Deposit(1))
            await eventually(partial(total_is, system, actors[1], 6))
            assert rebuilt == [Address.parse(actors[1])]
            running.stop()


async def test_nodes_started_again_and_again_freeze_nothing_more(system: ActorSystem) -> None:
    """The first node of a process freezes what exists then (short full collections); a node
    started after it must not freeze again, or the garbage of those before would never be
    collected (a process that starts nodes again and again, as tests do, would grow)."""
    frozen: list[int] = []
    for _ in range(3):
        running = Node(system, FAST)
        async with anyio.create_task_group() as group:
            await group.start(running.run)
            frozen.append(gc.get_freeze_count())
            running.stop()
        garbage: list[object] = []
        garbage.append(garbage)  # a reference cycle: only the collector frees it
        del garbage
    assert frozen[0] > 0
    # Frozen objects freed by their reference counts leave the frozen set: it only shrinks.
    assert max(frozen[1:]) <= frozen[0]


async def test_messages_to_other_partitions_arrive_once(system: ActorSystem, node: Node) -> None:
    targets = [f"t{i}" for i in range(12)]
    for target in targets:
        await system.send("account/source", Transfer(to=target, amount=2))
    for target in targets:
        await eventually(partial(total_is, system, f"account/{target}", 2))
    assert (await system.state_of("account/source")).state.total == -24
    outboxes = [system.keys.outbox("account", p) for p in range(4)]
    await eventually(lambda: _all_empty(system, outboxes))


async def _all_empty(system: ActorSystem, streams: list[str]) -> bool:
    return all([await system.client.xlen(stream) == 0 for stream in streams])


async def test_timers_fire_after_their_delay(system: ActorSystem, node: Node) -> None:
    await system.send("account/timer", Remind(after_s=0.2, amount=9))
    await eventually(lambda: total_is(system, "account/timer", 9))


async def test_timers_survive_a_restart(system: ActorSystem) -> None:
    first = Node(system, FAST)
    async with anyio.create_task_group() as group:
        await group.start(first.run)
        await system.ask("account/late", Remind(after_s=0.5, amount=4))
        first.stop()
    assert (await system.state_of("account/late")).state.total == 0
    second = Node(system, FAST)
    async with anyio.create_task_group() as group:
        await group.start(second.run)
        await eventually(lambda: total_is(system, "account/late", 4))
        second.stop()


async def test_snapshots_speed_up_but_do_not_change_state(system: ActorSystem, node: Node) -> None:
    for amount in range(1, 8):
        await system.ask("account/snap", Deposit(amount))
    snapshot = await system.store.load_snapshot(Address("account", "snap"))
    assert snapshot is not None
    assert snapshot.version == 6
    with_snapshot = await system.state_of("account/snap")
    await system.store.delete_snapshot(Address("account", "snap"))
    assert await system.state_of("account/snap") == with_snapshot
    assert with_snapshot.state.total == 28


async def test_poison_messages_are_dead_lettered_and_others_keep_going(
    system: ActorSystem, node: Node
) -> None:
    address = Address("account", "victim")
    inbox = system.keys.inbox_of(address)
    await system.client.xadd(inbox, {b"m": b"\xc1 not msgpack"})
    await system.client.xadd(inbox, {b"other": b"no message field"})
    await system.send(address, Explode())
    await system.send(address, Deposit(1))
    partition = system.partition("account", system.keys.partition_of(address))

    async def three_dead() -> bool:
        return await partition.dead_letters.count() == 3

    await eventually(lambda: total_is(system, "account/victim", 1))
    await eventually(three_dead)
    reasons = sorted(letter.reason for letter in await partition.dead_letters.list())
    assert reasons == ["handler-error", "malformed", "malformed"]
    explode = next(d for d in await partition.dead_letters.list() if d.reason == "handler-error")
    assert "always fails" in explode.detail
    assert explode.attempts == 5
    assert (await partition.inbox.pending()).count == 0


async def test_actors_waiting_out_a_retry_give_their_turn_back(system: ActorSystem) -> None:
    """Plain handlers take turns, two at a time over the node: an actor whose handler failed
    waits out its backoff without a turn, so the other actors go on meanwhile. One failing
    actor per partition: the partition's other handler task serves the rest."""
    failing: dict[int, Address] = {}
    index = 0
    while len(failing) < system.keys.partitions_of("account"):
        address = Address("account", f"failing-{index}")
        failing.setdefault(system.keys.partition_of(address), address)
        index += 1
    for address in failing.values():
        await system.send(address, Explode())
    # Backoffs of 2 s between the 5 attempts (`Account.max_deliveries`): far longer than
    # handling takes.
    config = replace(FAST, retry_base_s=2.0, retry_cap_s=2.0)
    running = Node(system, config)

    async def dead_letters() -> int:
        total = 0
        for number in range(system.keys.partitions_of("account")):
            total += await system.partition("account", number).dead_letters.count()
        return total

    async with anyio.create_task_group() as group:
        await group.start(running.run)
        for index in range(8):
            await system.send(f"account/healthy-{index}", Deposit(1))
        for index in range(8):
            await eventually(partial(total_is, system, f"account/healthy-{index}", 1))
        assert await dead_letters() == 0  # the failing ones are still waiting out their backoff

        async def all_dead() -> bool:
            return await dead_letters() == len(failing)

        await eventually(all_dead, timeout=20)
        running.stop()


async def test_a_partition_keeps_handling_while_its_actors_wait_out_retries(
    system: ActorSystem,
) -> None:
    """More failing actors in one partition than it has handler tasks: each one waiting out a
    backoff has a task standing in for it, so the partition's healthy actors are handled at
    once rather than after the backoffs (30 s here, beyond the test's deadline)."""
    kind = "account"

    def in_partition_0(prefix: str, count: int) -> list[str]:
        names = (f"{prefix}-{index}" for index in range(1000))
        return [name for name in names if system.keys.partition_of(Address(kind, name)) == 0][
            :count
        ]

    failing, healthy = in_partition_0("failing", 3), in_partition_0("healthy", 5)
    attempted: set[str] = set()

    async def record_attempts(point: str, address: Address | None) -> None:
        if point == "before-handle" and address is not None and address.id in failing:
            attempted.add(address.id)

    async def all_attempted() -> bool:
        return len(attempted) == len(failing)

    config = replace(FAST, retry_base_s=30.0, retry_cap_s=30.0)
    running = Node(system, config, faults=record_attempts)
    async with anyio.create_task_group() as group:
        await group.start(running.run)
        for actor in failing:
            await system.send(f"{kind}/{actor}", Explode())
        # Two handler tasks per partition: the third failing actor is handled by a task
        # standing in for one of the first two, which wait out their backoffs.
        await eventually(all_attempted)
        for actor in healthy:
            await system.send(f"{kind}/{actor}", Deposit(1))
        for actor in healthy:
            await eventually(partial(total_is, system, f"{kind}/{actor}", 1))
        running.stop()


async def test_a_handler_failing_as_its_partition_is_lost_leaves_the_node_running(
    system: ActorSystem,
) -> None:
    """A handler fails just as its partition is lost: no task stands in for it while it would
    wait out its backoff, it gives its turn back all the same, and its message is left
    pending; the node takes the partition up again and the message is handled."""
    target = Address("account", "late")
    key = ("account", system.keys.partition_of(target))
    lost: list[PartitionLost] = []

    async def fail_as_the_partition_is_lost(point: str, address: Address | None) -> None:
        if point == "before-handle" and address == target and not lost:
            lost.append(PartitionLost("lost while handling"))
            running.sessions[key].lose(lost[0])
            raise RuntimeError("failed as the partition was lost")

    running = Node(system, FAST, faults=fail_as_the_partition_is_lost)
    async with anyio.create_task_group() as group:
        await group.start(running.run)
        await system.send(target, Deposit(1))
        await eventually(partial(total_is, system, str(target), 1))
        running.stop()
    assert lost
    handled = await system.client.xlen(system.keys.handled(target))
    assert handled == 1


@pytest.mark.integration
async def test_a_read_in_flight_when_the_partition_is_lost_loses_nothing(
    real_redis: RedisClient,
) -> None:
    """The lease renewal finds the partition lost (here: the lease vanished, and the renewal
    took it again under a new epoch) while a read that takes it blocks, and the node takes it
    up again at once. What that read delivers afterwards goes to the lost session, which
    leaves it pending; the next session, which claims what is pending when it starts, must
    start only once that read is over, or the message would stay pending, unhandled."""
    target = Address("account", "in-flight")
    async with ActorSystem(Account(), partitions=1, client=real_redis) as system:
        running = Node(system, replace(FAST, block_ms=2000))
        async with anyio.create_task_group() as group:
            await group.start(running.run)
            runner = running.runners["account"]

            async def reading() -> bool:
                return bool(runner._reading)

            await eventually(reading)  # the reader blocks on the inbox
            lost = runner.members[0]
            await system.client.delete(system.partition("account", 0).lease_key)

            async def taken_up_again() -> bool:
                # Joined: it has claimed what was pending when it started.
                session = runner.members.get(0)
                return session is not None and session is not lost

            await eventually(taken_up_again)
            await system.send(target, Deposit(1))
            await eventually(partial(total_is, system, str(target), 1))
            running.stop()


async def test_unknown_message_types_are_dead_lettered(system: ActorSystem, node: Node) -> None:
    address = Address("account", "stranger")
    envelope = system.codec.envelope(str(address), Deposit(1))
    foreign = msgspec.structs.replace(envelope, type="nobody.knows.this")
    await system.client.xadd(system.keys.inbox_of(address), {b"m": system.codec.encode(foreign)})
    partition = system.partition("account", system.keys.partition_of(address))

    async def dead() -> bool:
        return await partition.dead_letters.count() == 1

    await eventually(dead)
    (letter,) = await partition.dead_letters.list()
    assert letter.reason == "unknown-type"


async def test_a_message_in_the_wrong_inbox_is_dead_lettered_not_committed(
    system: ActorSystem, node: Node
) -> None:
    """An entry whose target belongs to another partition, or to another kind, is refused:
    committing it would write the actor's events under a partition that does not own it."""
    home = Address("account", "home")
    number = system.keys.partition_of(home)
    stray = next(
        Address("account", f"stray-{i}")
        for i in range(1000)
        if system.keys.partition_of(Address("account", f"stray-{i}")) != number
    )
    inbox = system.keys.inbox_of(home)
    for target in (str(stray), "counter/elsewhere"):
        envelope = system.codec.envelope(target, Deposit(5))
        await system.client.xadd(inbox, {b"m": system.codec.encode(envelope)})
    await system.send(home, Deposit(1))
    partition = system.partition("account", number)

    async def both_dead() -> bool:
        return await partition.dead_letters.count() == 2

    await eventually(lambda: total_is(system, str(home), 1))
    await eventually(both_dead)
    details = sorted(letter.detail for letter in await partition.dead_letters.list())
    assert details == [
        f"KeyLayoutError: {stray} arrived in the inbox of {partition}",
        f"UnknownKindError: counter/elsewhere arrived in the inbox of {partition}",
    ]
    assert [item async for item in system.store.read(stray)] == []
    assert (await partition.inbox.pending()).count == 0


async def handle_all(system: ActorSystem, config: NodeConfig, totals: dict[str, int]) -> None:
    """Run a node until every actor in `totals` has its total, then stop it."""
    running = Node(system, config)

    async def all_handled() -> bool:
        views = [await system.state_of(actor) for actor in totals]
        return [view.state.total for view in views] == list(totals.values())

    async with anyio.create_task_group() as group:
        await group.start(running.run)
        await eventually(all_handled, timeout=30)
        running.stop()


def count_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The actors the node reads from the store to activate them, as they are read."""
    read: list[str] = []

    async def counted_many(
        store: EventStore, actor: Actor[Any], addresses: Sequence[Address]
    ) -> Any:
        read.extend(map(str, addresses))
        return await rebuild_many(store, actor, addresses)

    async def counted(store: EventStore, actor: Actor[Any], address: Address) -> Any:
        read.append(str(address))
        return await rebuild(store, actor, address)

    monkeypatch.setattr(node_module, "rebuild_many", counted_many)
    monkeypatch.setattr(node_module, "rebuild", counted)
    return read


async def test_once_most_actors_activated_are_new_the_node_reads_no_more_new_ones(
    system: ActorSystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    read = count_reads(monkeypatch)
    actors = {f"account/new-{i}": 1 for i in range(400)}
    for actor in actors:
        await system.send(actor, Deposit(1))
    await handle_all(system, FAST, actors)
    assert node_module._GUESS_AFTER * 7 // 8 <= len(read) < len(actors) // 2


async def test_new_actors_met_one_at_a_time_stop_being_read_too(
    system: ActorSystem, node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At low load every actor is activated alone; those activations count as well."""
    read = count_reads(monkeypatch)
    for i in range(100):
        await system.ask(f"account/alone-{i}", Deposit(1), timeout=10)
    assert node_module._GUESS_AFTER * 7 // 8 <= len(read) < 100


async def test_a_kind_whose_handlers_await_never_guesses_that_actors_are_new(
    redis: RedisClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An `async def` handler may call out: it runs only on a state its actor had."""
    monkeypatch.setattr(Waiter, "expected", 1)
    monkeypatch.setattr(Waiter, "all_inside", anyio.Event(), raising=False)
    read = count_reads(monkeypatch)
    waiters = {f"waiter/w{index}": 1 for index in range(20)}
    async with ActorSystem(Waiter(), partitions=4, client=redis) as system:
        for actor in waiters:
            await system.send(actor, Wait())
        await handle_all(system, replace(FAST, new_actor_share=0.0), waiters)
    assert sorted(read) == sorted(waiters)


async def test_actors_guessed_new_that_are_not_are_handled_on_what_is_read(
    system: ActorSystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    guessing = replace(FAST, new_actor_share=0.0)
    old = {f"account/old-{i}": 1 for i in range(40)}
    for actor in old:
        await system.send(actor, Deposit(1))
    await handle_all(system, guessing, old)

    conflicts: list[int] = []
    commit_partitions = Partition.commit_partitions

    async def recorded(self: Partition, *args: Any, **options: Any) -> GroupCommitResult:
        result = await commit_partitions(self, *args, **options)
        if result.status is CommitStatus.CONFLICT:
            conflicts.append(len(result.conflicts))
        return result

    monkeypatch.setattr(Partition, "commit_partitions", recorded)
    new = {f"account/new-{i}": 3 for i in range(40)}
    for old_actor, new_actor in zip(old, new, strict=True):
        await system.send(old_actor, Deposit(2))
        await system.send(new_actor, Deposit(3))
    await handle_all(system, guessing, {**dict.fromkeys(old, 3), **new})
    assert sum(conflicts) == len(old)  # each old actor's guess found wrong, once
    assert max(conflicts) > 1  # several at once, from one script call
    for actor in old:
        assert (await system.state_of(actor)).state.deposits == [1, 2]


async def test_graceful_stop_releases_leases(system: ActorSystem) -> None:
    running = Node(system, FAST)
    async with anyio.create_task_group() as group:
        await group.start(running.run)
        await system.ask("account/s", Deposit(1))
        running.stop()
        await running.stopped.wait()
    owners = [await system.partition("account", p).owner() for p in range(4)]
    assert owners == [None, None, None, None]


async def test_a_free_turn_is_taken_without_going_round_the_event_loop() -> None:
    """A handler task's turn, when one is free, is taken at once: the tasks waiting to run
    (the reader's next read, the senders) do not come first (anyio's `acquire` lets them)."""
    turns = anyio.CapacityLimiter(1)
    ran: list[str] = []

    async def other() -> None:
        ran.append("other")

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(other)
        await _take_turn(turns)
        assert ran == []
        # None free: it waits until one is given back.
        waiting = anyio.Event()

        async def second() -> None:
            waiting.set()
            await _take_turn(turns)
            ran.append("second")
            turns.release()

        tasks.start_soon(second)
        await waiting.wait()
        await anyio.lowlevel.checkpoint()
        assert ran == ["other"]
        turns.release()
    assert ran == ["other", "second"]
