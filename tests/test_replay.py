"""Replay (timeline, state at a version, diff, follow) and the determinism check (G7), through
the Python API on fakeredis and the real server, and through the command line."""

import json
from collections.abc import AsyncIterator

import anyio
import fakeredis
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from repertory.runtime.cli import app
from repertory.runtime.node import Node, NodeConfig
from repertory.runtime.replay import (
    FieldChange,
    ReplayError,
    TimelineEntry,
    check,
    check_actor,
    diff_states,
    follow,
    state_at,
    states_at,
    timeline,
)
from repertory.runtime.system import ActorSystem
from repertory.streams.client import RedisClient, create_client
from repertory.streams.keys import Address
from tests.replay_systems import (
    APP,
    Deposit,
    Deposited,
    Ledger,
    LedgerActor,
    LedgerWithFee,
    Stamp,
    Stamped,
    Withdraw,
    Withdrawn,
)

pytestmark = pytest.mark.anyio
runner = CliRunner()
FAST = NodeConfig(block_ms=50, retry_base_s=0.01, retry_cap_s=0.05, lease_ttl_ms=2000)
LEDGER = Address("ledger", "a")


async def record_history(system: ActorSystem) -> None:
    """v1 deposit 100, v2 deposit 20, refused withdraw 500 at v2, v3 withdraw 30, v4 deposit 5."""
    node = Node(system, FAST)
    async with anyio.create_task_group() as group:
        await group.start(node.run)
        await system.ask(LEDGER, Deposit(100))
        await system.ask(LEDGER, Deposit(20))
        with pytest.raises(Exception, match="less than 500"):
            await system.ask(LEDGER, Withdraw(500))
        await system.ask(LEDGER, Withdraw(30))
        await system.ask(LEDGER, Deposit(5))
        node.stop()


@pytest.fixture
async def recorded(redis: RedisClient) -> AsyncIterator[ActorSystem]:
    async with ActorSystem(LedgerActor(), app=APP, partitions=4, client=redis) as system:
        await record_history(system)
        yield system


def changed_code(recorded: ActorSystem) -> ActorSystem:
    """Today's (changed) code over the same store."""
    return ActorSystem(LedgerWithFee(), app=APP, partitions=4, client=recorded.client)


async def entries_of(system: ActorSystem, actor: Address) -> list[TimelineEntry]:
    return [entry async for entry in timeline(system, actor)]


async def test_the_timeline_pairs_each_event_with_its_message(recorded: ActorSystem) -> None:
    entries = await entries_of(recorded, LEDGER)
    assert [(entry.version, entry.event_type, entry.rejected) for entry in entries] == [
        (1, "test.replay.deposited", None),
        (2, "test.replay.deposited", None),
        (2, None, "balance 120 is less than 500"),
        (3, "test.replay.withdrawn", None),
        (4, "test.replay.deposited", None),
    ]
    causes = [entry.cause for entry in entries]
    assert all(cause is not None for cause in causes)
    assert [(c.type, c.payload) for c in causes if c is not None] == [
        ("test.replay.deposit", {"amount": 100}),
        ("test.replay.deposit", {"amount": 20}),
        ("test.replay.withdraw", {"amount": 500}),
        ("test.replay.withdraw", {"amount": 30}),
        ("test.replay.deposit", {"amount": 5}),
    ]
    assert entries[3].event == {"amount": 30}
    # A window of the timeline: the refusal at v2 happened before event 3.
    window = [entry async for entry in timeline(recorded, LEDGER, start=3, stop=3)]
    assert [(entry.version, entry.rejected is None) for entry in window] == [(2, False), (3, True)]


async def test_state_at_and_diff(recorded: ActorSystem) -> None:
    assert (await state_at(recorded, LEDGER, 0)).state == Ledger()
    assert (await state_at(recorded, LEDGER, 3)).state == Ledger(90, [100, 20, -30])
    views = await states_at(recorded, LEDGER, [1, 4])
    assert diff_states(views[1], views[4]) == [
        FieldChange(path="balance", change="changed", before=100, after=95),
        FieldChange(path="entries[1]", change="added", after=20),
        FieldChange(path="entries[2]", change="added", after=-30),
        FieldChange(path="entries[3]", change="added", after=5),
    ]
    with pytest.raises(ReplayError, match="no version 9"):
        await state_at(recorded, LEDGER, 9)
    bare = ActorSystem(app=APP, partitions=4, client=recorded.client)
    with pytest.raises(ReplayError, match="no actor code"):
        await state_at(bare, LEDGER, 1)


async def test_unchanged_code_reproduces_every_recorded_event(recorded: ActorSystem) -> None:
    result = await check_actor(recorded, LEDGER)
    assert result.divergence is None
    assert (result.messages, result.events) == (5, 4)
    assert [r.address async for r in check(recorded)] == ["ledger/a"]


async def test_a_changed_handler_diverges_at_the_right_version(recorded: ActorSystem) -> None:
    result = await check_actor(changed_code(recorded), LEDGER)
    divergence = result.divergence
    assert divergence is not None
    assert result.messages == 3  # the two deposits and the refusal still reproduce
    assert divergence.kind == "event-field"
    assert (divergence.version, divergence.event_version) == (2, 3)
    assert divergence.message_type == "test.replay.withdraw"
    assert divergence.recorded_type == divergence.produced_type == "test.replay.withdrawn"
    assert divergence.fields == [FieldChange(path="amount", change="changed", before=30, after=31)]


async def test_events_todays_code_cannot_read_are_reported(recorded: ActorSystem) -> None:
    codec = recorded.codec
    record = codec.event(Withdrawn(1))
    unknown = msgspec.structs.replace(record, type="test.replay.gone")
    await recorded.store.append_encoded(LEDGER, [codec.encode(unknown)], expected_version=4)
    divergence = (await check_actor(recorded, LEDGER)).divergence
    assert divergence is not None
    assert (divergence.kind, divergence.event_version) == ("undecodable-event", 5)
    assert "test.replay.gone" in divergence.detail


async def test_handlers_see_the_recorded_clock_and_message_id(redis: RedisClient) -> None:
    """A history written as the commit script writes it: the handled entry's time is what the
    handler saw, so the replay must give the handler that time, not today's."""
    async with ActorSystem(LedgerActor(), app=APP, partitions=4, client=redis) as system:
        codec = system.codec
        envelope = codec.envelope(str(LEDGER), Stamp(), message_id="m-1")
        await system.store.append(LEDGER, [Stamped(1_700_000_000_123, "m-1")], 0)
        fields = {"m": codec.encode(envelope), "from": 0, "to": 1, "rejected": ""}
        handled = system.keys.handled(LEDGER)
        await redis.xadd(handled, {**fields, "at": 1_700_000_000_123})
        assert (await check_actor(system, LEDGER)).divergence is None

        await redis.delete(handled)
        await redis.xadd(handled, {**fields, "at": 1_700_000_000_124})
        divergence = (await check_actor(system, LEDGER)).divergence
        assert divergence is not None
        assert divergence.fields == [
            FieldChange(
                path="at_ms", change="changed", before=1_700_000_000_123, after=1_700_000_000_124
            )
        ]


async def test_follow_shows_new_events_as_they_commit(redis: RedisClient) -> None:
    async with ActorSystem(LedgerActor(), app=APP, partitions=4, client=redis) as system:
        await system.store.append(LEDGER, [Deposited(1)], expected_version=0)
        seen: list[int] = []
        with anyio.fail_after(10):
            async for entry in follow(system, LEDGER):
                seen.append(entry.version)
                if entry.version < 3:
                    await system.store.append(LEDGER, [Deposited(2)], expected_version=len(seen))
                else:
                    break
        assert seen == [1, 2, 3]


history = st.lists(
    st.tuples(
        st.lists(
            st.one_of(
                st.builds(Deposited, st.integers(-1000, 1000)),
                st.builds(Withdrawn, st.integers(0, 1000)),
            ),
            min_size=1,
            max_size=4,
        ),
        st.booleans(),
    ),
    max_size=12,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=history)
async def test_replay_at_a_version_equals_state_of_at_that_version(
    batches: list[tuple[list[msgspec.Struct], bool]],
) -> None:
    """Appended in random batches, with snapshots saved at random points: the state that
    `state_of` gives after each batch is what `state_at` folds for that version later."""
    client: RedisClient = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    async with ActorSystem(LedgerActor(), app=APP, partitions=4, client=client) as system:
        seen = {0: (await system.state_of(LEDGER)).state}
        version = 0
        for events, snapshot in batches:
            version = await system.store.append(LEDGER, events, expected_version=version)
            view = await system.state_of(LEDGER)
            if snapshot:
                await system.store.save_snapshot(LEDGER, view.state, view.version)
            seen[version] = view.state
        replayed = await states_at(system, LEDGER, seen)
        assert {v: view.state for v, view in replayed.items()} == seen
    await client.aclose()


async def test_states_at_versions_across_read_batches(redis: RedisClient) -> None:
    """A log longer than one XRANGE batch (1,000), with versions wanted at the edges of
    batches and inside them."""
    amounts = [index % 7 + 1 for index in range(2500)]
    async with ActorSystem(LedgerActor(), app=APP, partitions=4, client=redis) as system:
        version = 0
        for start in range(0, len(amounts), 500):
            events = [Deposited(amount) for amount in amounts[start : start + 500]]
            version = await system.store.append(LEDGER, events, expected_version=version)
        wanted = [0, 1, 999, 1000, 1001, 1500, 2000, 2001, 2500]
        views = await states_at(system, LEDGER, wanted)
    assert {v: (view.version, view.state) for v, view in views.items()} == {
        v: (v, Ledger(sum(amounts[:v]), amounts[:v])) for v in wanted
    }


# The command line, on the real server (the CLI connects by URL).


async def record_at(url: str) -> None:
    """The history, written into a flushed real server (the CLI tests are synchronous: the
    command line runs its own event loop)."""
    client = create_client(url)
    try:
        await client.flushall()
        async with ActorSystem(LedgerActor(), app=APP, partitions=4, client=client) as system:
            await record_history(system)
    finally:
        await client.aclose()


def invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout + result.stderr


@pytest.mark.integration
def test_check_command_exit_codes(redis_url: str) -> None:
    anyio.run(record_at, redis_url)
    code, output = invoke("check", "tests.replay_systems:system", "--url", redis_url)
    assert code == 0, output
    assert "5 messages of 1 actor" in output

    code, output = invoke("check", "tests.replay_systems:changed", "--url", redis_url)
    assert code == 1
    assert "ledger/a diverges at version 2" in output
    assert "event 3 (test.replay.withdrawn) differs in amount" in output

    code, output = invoke(
        "check", "tests.replay_systems:changed", "--url", redis_url, "--actor", "a", "--json"
    )
    assert code == 1
    report = json.loads(output)
    assert report["ok"] is False
    [divergence] = report["divergences"]
    assert divergence["fields"] == [
        {"path": "amount", "change": "changed", "before": 30, "after": 31}
    ]

    code, output = invoke("check", "tests.replay_systems:nothing", "--url", redis_url)
    assert code == 1
    assert output.startswith("error:")
    assert "Traceback" not in output


@pytest.mark.integration
def test_replay_command(redis_url: str) -> None:
    anyio.run(record_at, redis_url)
    spec = "tests.replay_systems:system"
    code, output = invoke("replay", "ledger/a", spec, "--url", redis_url)
    assert code == 0, output
    assert "refused" in output
    assert "test.replay.withdrawn" in output

    # Without the code: the namespace alone, its partition count read from the keys.
    code, output = invoke("replay", "ledger/a", "--app", APP, "--url", redis_url, "--jsonl")
    assert code == 0, output
    lines = [json.loads(line) for line in output.splitlines()]
    assert [line["version"] for line in lines] == [1, 2, 2, 3, 4]

    code, output = invoke("replay", "ledger/a", spec, "--url", redis_url, "--at", "3", "--json")
    assert json.loads(output) == {
        "actor": "ledger/a",
        "version": 3,
        "state": {"balance": 90, "entries": [100, 20, -30]},
    }
    code, output = invoke("replay", "ledger/a", spec, "--url", redis_url, "--diff", "3", "4")
    assert code == 0, output
    assert "balance" in output
    assert "entries[3]" in output

    for args, message in [
        (["--app", APP, "--at", "1"], "give MODULE:SYSTEM"),
        ([spec, "--at", "7"], "no version 7"),
        ([spec, "--app", APP], "give the system"),
    ]:
        code, output = invoke("replay", "ledger/a", *args, "--url", redis_url)
        assert code != 0
        assert message in output
        assert "Traceback" not in output
    code, output = invoke("replay", "ledger/nobody", spec, "--url", redis_url)
    assert code == 1
    assert "no events" in output
