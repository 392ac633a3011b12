"""inspect, dead letters (list, show, requeue, drop), init and migrate, plus `replay --at TIME`
and `check --since`: through the Python API on fakeredis and the real server, and through the
command line on the real server."""

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec
import pytest
from typer.testing import CliRunner

from repertory.runtime import admin
from repertory.runtime.admin import (
    AdminError,
    DeadLetterRef,
    all_scripts,
    dead_letter,
    dead_letters,
    drop,
    init,
    inspect,
    migrate,
    requeue,
)
from repertory.runtime.archive import verify
from repertory.runtime.cli import app
from repertory.runtime.node import Node, NodeConfig
from repertory.runtime.replay import (
    ReplayError,
    check_actor,
    handled_messages,
    parse_moment,
    state_at_time,
)
from repertory.runtime.system import ActorSystem
from repertory.schemas import Codec
from repertory.streams import scripts
from repertory.streams.client import RedisClient, create_client
from repertory.streams.deadletters import DeadLetters
from repertory.streams.keys import Address
from tests import admin_systems
from tests.admin_systems import (
    APP,
    MIGRATE_APP,
    NEW,
    OLD,
    Added,
    AddedV1,
    Charge,
    OldTally,
    Tally,
    TallyActor,
    TallyV1,
    WalletActor,
)
from tests.replay_systems import APP as LEDGER_APP
from tests.replay_systems import Deposited, LedgerActor, LedgerWithFee
from tests.support import eventually
from tests.test_replay import LEDGER, record_at, record_history

pytestmark = pytest.mark.anyio
runner = CliRunner()
FAST = NodeConfig(block_ms=50, retry_base_s=0.01, retry_cap_s=0.05, lease_ttl_ms=2000)
WALLET = Address("wallet", "w")


@pytest.fixture(autouse=True)
def broken() -> Iterator[None]:
    admin_systems.BROKEN["charge"] = True
    yield
    admin_systems.BROKEN["charge"] = True


@pytest.fixture
async def wallets(redis: RedisClient) -> AsyncIterator[ActorSystem]:
    async with ActorSystem(WalletActor(), app=APP, partitions=2, client=redis) as system:
        yield system


@asynccontextmanager
async def running(system: ActorSystem) -> AsyncIterator[Node]:
    node = Node(system, FAST)
    async with anyio.create_task_group() as group:
        await group.start(node.run)
        try:
            yield node
        finally:
            node.stop()


async def owners(system: ActorSystem) -> list[str | None]:
    return [info.owner for info in (await inspect(system)).partitions]


async def dead_count(system: ActorSystem) -> int:
    return sum([1 async for _ in dead_letters(system)])


# inspect


async def test_inspect_shows_the_owners_of_a_running_node(wallets: ActorSystem) -> None:
    before = await inspect(wallets)
    assert before.nodes == []
    assert [(p.kind, p.partition, p.initialized) for p in before.partitions] == [
        ("wallet", 0, False),
        ("wallet", 1, False),
    ]
    async with running(wallets) as node:

        async def all_owned() -> bool:
            return await owners(wallets) == [node.node_id, node.node_id]

        await eventually(all_owned)
        report = await inspect(wallets)
        [member] = report.nodes
        assert member.id == node.node_id
        assert member.live
        assert 0 < member.expires_in_ms <= FAST.lease_ttl_ms
        for info in report.partitions:
            assert info.initialized
            assert info.epoch >= 1
            assert info.lease_ms is not None
            assert 0 < info.lease_ms <= FAST.lease_ttl_ms
        assert [(k.kind, k.partitions, k.owned) for k in report.kinds] == [("wallet", 2, 2)]
    await node.stopped.wait()
    after = await inspect(wallets)
    assert after.nodes == []
    assert [info.owner for info in after.partitions] == [None, None]


async def test_inspect_counts_lag_pending_outbox_dead_letters_and_timers(
    wallets: ActorSystem,
) -> None:
    await init(wallets)
    client, keys = wallets.client, wallets.keys
    number = keys.partition_of(WALLET)
    for amount in (1, 2, 3):
        await wallets.send(WALLET, Charge(amount))
    partition = wallets.partition("wallet", number)
    await partition.inbox.read("reader-1", count=1)
    now = await admin.server_time_ms(client)
    await client.zadd(partition.timers_key, {b"due": now - 1000, b"later": now + 60_000})
    await client.xadd(partition.outbox_key, {"due": 0, "to": "x", "m": b"m"})
    await partition.dead_letters.add(
        b"data", reason="malformed", source_stream="s", source_id="1-0", attempts=1
    )
    report = await inspect(wallets)
    info = report.partitions[number]
    assert (info.inbox, info.lag, info.pending) == (3, 2, 1)
    assert [(c.name, c.pending) for c in info.consumers] == [("reader-1", 1)]
    assert (info.outbox, info.dead_letters, info.timers, info.timers_due) == (1, 1, 2, 1)
    [kind] = report.kinds
    assert (kind.lag, kind.pending, kind.outbox, kind.dead_letters, kind.timers_due) == (
        2,
        1,
        1,
        1,
        1,
    )


# init


async def test_init_creates_groups_and_loads_scripts_once(wallets: ActorSystem) -> None:
    await wallets.client.script_flush()
    first = await init(wallets)
    assert len(first.groups_created) == 4  # 2 partitions x (inbox group, relay group)
    assert first.scripts_loaded == [script.name for script in all_scripts()]
    assert "requeue" in first.scripts_loaded
    second = await init(wallets)
    assert (second.groups_created, second.groups_existing) == ([], 4)
    assert (second.scripts_loaded, second.scripts_present) == ([], len(all_scripts()))
    report = await inspect(wallets)
    assert [info.initialized for info in report.partitions] == [True, True]


# dead letters


async def test_requeue_after_the_fix_handles_the_message_exactly_once(
    wallets: ActorSystem,
) -> None:
    async with running(wallets):
        message_id = await wallets.send(WALLET, Charge(7))

        async def dead() -> bool:
            return await dead_count(wallets) == 1

        await eventually(dead)
        [view] = [view async for view in dead_letters(wallets)]
        assert (view.reason, view.attempts, view.target) == ("handler-error", 2, str(WALLET))
        assert "payment provider is down" in view.detail
        assert (view.message.id, view.message.payload) == (message_id, {"amount": 7})
        ref = DeadLetterRef.parse(view.ref)
        assert await dead_letter(wallets, ref) == view

        admin_systems.BROKEN["charge"] = False  # the fix is deployed
        await requeue(wallets, ref)

        async def handled() -> bool:
            return (await wallets.state_of(WALLET)).version == 1

        await eventually(handled)
        with pytest.raises(AdminError, match="no dead letter"):
            await requeue(wallets, ref)
        # A later message lands at version 2: the requeued one was not handled twice.
        answer = await wallets.ask(WALLET, Charge(1))
        assert answer.version == 2
    view_after = await wallets.state_of(WALLET)
    assert (view_after.state.spent, view_after.state.charges) == (8, 2)
    assert await dead_count(wallets) == 0
    handled_ids = [
        wallets.codec.decode_envelope(entry.message).id
        async for entry in handled_messages(wallets, WALLET)
    ]
    assert handled_ids[0] == message_id
    assert len(handled_ids) == 2


async def test_unreadable_dead_letters_are_not_requeued_and_drop_removes(
    wallets: ActorSystem,
) -> None:
    stream = DeadLetters(wallets.client, wallets.keys.dead_letters("wallet", 1))
    entry_id = await stream.add(
        b"\xc1 junk", reason="malformed", source_stream="inbox", source_id="1-0", attempts=1
    )
    ref = DeadLetterRef.parse(entry_id.decode(), kind="wallet", partition=1)
    assert str(ref) == f"wallet/1/{entry_id.decode()}"
    with pytest.raises(AdminError, match="not a readable envelope"):
        await requeue(wallets, ref)
    [view] = [view async for view in dead_letters(wallets, reason="malformed")]
    assert view.message.error is not None
    assert [view async for view in dead_letters(wallets, reason="handler-error")] == []
    await drop(wallets, ref)
    with pytest.raises(AdminError, match="no dead letter"):
        await drop(wallets, ref)
    for text in ("nope", "wallet/x/1-0", "wallet/1/abc"):
        with pytest.raises(AdminError, match="is not a dead letter"):
            DeadLetterRef.parse(text)
    with pytest.raises(AdminError, match="partitions 0 to 1"):
        await dead_letter(wallets, DeadLetterRef("wallet", 5, "1-0"))


# migrate


def tally(actor_id: str) -> Address:
    return Address("tally", actor_id)


async def write_old(client: RedisClient) -> None:
    """a: three v1 events and a v1 snapshot at version 2; b: one v1 event; c: a v1 event and
    a v2 event (written by today's code after the upgrade)."""
    old = ActorSystem(OldTally(), app=MIGRATE_APP, partitions=2, codec=Codec(OLD), client=client)
    new = ActorSystem(TallyActor(), app=MIGRATE_APP, partitions=2, codec=Codec(NEW), client=client)
    for name, amounts in {"a": [1, 2, 3], "b": [4], "c": [5]}.items():
        records = [
            old.codec.event(AddedV1(amount), recorded_at=1000 * amount) for amount in amounts
        ]
        await old.store.append_records(tally(name), records, expected_version=0)
    await old.store.save_snapshot(tally("a"), TallyV1(3), 2)
    await new.store.append(tally("c"), [Added(7)], expected_version=1)


def stored_records(system: ActorSystem, address: Address) -> AsyncIterator[tuple[int, Any]]:
    return system.store.read_records(address)


@pytest.fixture
async def tallies(redis: RedisClient) -> AsyncIterator[ActorSystem]:
    await write_old(redis)
    async with ActorSystem(
        TallyActor(), app=MIGRATE_APP, partitions=2, codec=Codec(NEW), client=redis
    ) as system:
        yield system


async def snapshot_of(system: ActorSystem) -> dict[str, Any]:
    """Every stored record of the three tallies, decoded (for before/after comparisons)."""
    result: dict[str, Any] = {}
    for name in "abc":
        result[name] = [
            (version, record.type, record.schema_version, record.recorded_at)
            async for version, record in stored_records(system, tally(name))
        ]
    return result


async def test_migrate_turns_v1_events_into_current_ones_and_a_rerun_changes_nothing(
    tallies: ActorSystem,
) -> None:
    states = {name: await tallies.state_of(tally(name)) for name in "abc"}
    before = await snapshot_of(tallies)
    raw_before = await tallies.client.xrange(tallies.keys.events(tally("a")))

    dry = await migrate(tallies, dry_run=True)
    assert (dry.actors, dry.events, dry.outdated_events, dry.outdated_actors) == (3, 6, 5, 3)
    assert (dry.outdated_snapshots, dry.rewritten_events, dry.rewritten_snapshots) == (1, 0, 0)
    assert dry.outdated_types == {"test.migrate.added": [1], "test.migrate.tally": [1]}
    assert await tallies.client.xrange(tallies.keys.events(tally("a"))) == raw_before

    scanned: list[int] = []
    report = await migrate(tallies, progress=scanned.append)
    assert report.ok
    assert (report.rewritten_events, report.rewritten_actors, report.rewritten_snapshots) == (
        5,
        3,
        1,
    )
    assert sum(scanned) == 6
    after = await snapshot_of(tallies)
    for name in "abc":
        # Same versions, types and times; every record at the current schema version.
        assert [(v, t, at) for v, t, _, at in after[name]] == [
            (v, t, at) for v, t, _, at in before[name]
        ]
        assert {schema_version for _, _, schema_version, _ in after[name]} == {2}
        assert await tallies.state_of(tally(name)) == states[name]
    events = [stored.event async for stored in tallies.store.read(tally("a"))]
    assert events == [Added(100, "migrated"), Added(200, "migrated"), Added(300, "migrated")]
    snapshot = await tallies.store.load_snapshot(tally("a"))
    assert snapshot is not None
    assert (snapshot.version, snapshot.record.schema_version, snapshot.state) == (
        2,
        2,
        Tally(300),
    )
    assert (await verify(tallies)).ok

    again = await migrate(tallies)
    assert (again.events, again.outdated_events, again.rewritten_events) == (6, 0, 0)
    assert (again.outdated_snapshots, again.rewritten_snapshots) == (0, 0)
    assert await snapshot_of(tallies) == after
    leftovers = [key async for key in tallies.client.scan_iter(match="*migrating*")]
    assert leftovers == []


async def test_migrate_copies_what_is_appended_while_it_runs(
    tallies: ActorSystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    swap = scripts.SWAP_STREAM
    appended: list[int] = []

    async def racing(client: RedisClient, keys: list[str], args: list[Any]) -> Any:
        if not appended:  # a node commits between the copy and the swap
            appended.append(await tallies.store.append(tally("b"), [Added(9)], None))
        return await swap(client, keys, args)

    monkeypatch.setattr(admin, "SWAP_STREAM", racing)
    report = await migrate(tallies, [tally("b")])
    assert report.ok
    assert appended == [2]
    records = [(v, r.schema_version) async for v, r in stored_records(tallies, tally("b"))]
    assert records == [(1, 2), (2, 2)]
    assert (await tallies.state_of(tally("b"))).state == Tally(409)


async def test_migrate_leaves_an_actor_it_cannot_read_as_it_was(tallies: ActorSystem) -> None:
    old_codec = Codec(OLD)
    record = msgspec.structs.replace(old_codec.event(AddedV1(1)), type="test.migrate.gone")
    await tallies.store.append_encoded(tally("b"), [old_codec.encode(record)], 1)
    raw_before = await tallies.client.xrange(tallies.keys.events(tally("b")))
    report = await migrate(tallies)
    assert not report.ok
    [problem] = report.problems
    assert (problem.address, problem.version) == ("tally/b", 2)
    assert "test.migrate.gone" in problem.detail
    assert await tallies.client.xrange(tallies.keys.events(tally("b"))) == raw_before
    assert report.rewritten_actors == 2  # a and c


# replay --at TIME and check --since


async def test_state_at_a_time(redis: RedisClient) -> None:
    async with ActorSystem(LedgerActor(), app=LEDGER_APP, partitions=4, client=redis) as system:
        codec = system.codec
        records = [codec.event(Deposited(n), recorded_at=1000 * n) for n in (1, 2, 3)]
        await system.store.append_records(LEDGER, records, expected_version=0)
        for at_ms, version, balance in [(999, 0, 0), (2000, 2, 3), (2999, 2, 3), (10**13, 3, 6)]:
            view = await state_at_time(system, LEDGER, at_ms)
            assert (view.version, view.state.balance) == (version, balance)

    assert parse_moment("3") == ("version", 3)
    assert parse_moment("1700000000000") == ("time", 1_700_000_000_000)
    assert parse_moment("1970-01-01T00:00:02") == ("time", 2000)
    assert parse_moment("1970-01-01T01:00:02+01:00") == ("time", 2000)
    assert parse_moment("2023-11-14T22:13:20Z") == ("time", 1_700_000_000_000)
    with pytest.raises(ReplayError, match="neither an ISO 8601 time"):
        parse_moment("yesterday")


async def test_check_since_reruns_only_the_later_messages(redis: RedisClient) -> None:
    async with ActorSystem(LedgerActor(), app=LEDGER_APP, partitions=4, client=redis) as system:
        await record_history(system)
        times = [entry.at_ms async for entry in handled_messages(system, LEDGER)]
        changed = ActorSystem(LedgerWithFee(), app=LEDGER_APP, partitions=4, client=redis)
        # The changed withdraw handler diverges at the 4th message (withdraw 30).
        diverged = await check_actor(changed, LEDGER, since_ms=times[3])
        assert diverged.divergence is not None
        assert diverged.divergence.event_version == 3
        later = await check_actor(changed, LEDGER, since_ms=times[3] + 1)
        assert later.divergence is None
        assert (later.messages, later.events) == (sum(t > times[3] for t in times), 4)


# The command line, on the real server.


def invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout + result.stderr


@asynccontextmanager
async def real_wallets(url: str) -> AsyncIterator[ActorSystem]:
    client = create_client(url)
    try:
        await client.flushall()
        async with ActorSystem(WalletActor(), app=APP, partitions=2, client=client) as system:
            yield system
    finally:
        await client.aclose()


async def in_thread(*args: str) -> tuple[int, str]:
    """Run a command while this test's event loop keeps a node running (the command line runs
    its own event loop, in the worker thread)."""
    return await anyio.to_thread.run_sync(lambda: invoke(*args))


@pytest.mark.integration
async def test_inspect_command_shows_the_owners_of_a_running_node(redis_url: str) -> None:
    spec = "tests.admin_systems:system"
    async with real_wallets(redis_url) as wallets, running(wallets) as node:

        async def all_owned() -> bool:
            return await owners(wallets) == [node.node_id, node.node_id]

        await eventually(all_owned)
        code, output = await in_thread("inspect", spec, "--url", redis_url, "--json")
        assert code == 0, output
        report = json.loads(output)
        assert [n["id"] for n in report["nodes"]] == [node.node_id]
        assert [p["owner"] for p in report["partitions"]] == [node.node_id, node.node_id]
        code, output = await in_thread("inspect", "--app", APP, "--url", redis_url)
        assert code == 0, output
        assert output.count(node.node_id) == 3  # the nodes table and two partitions
        assert "live" in output
    code, output = invoke("inspect", spec, "--app", APP, "--url", redis_url)
    assert code == 2
    assert "give the system" in output


@pytest.mark.integration
async def test_dead_commands(redis_url: str) -> None:
    spec = "tests.admin_systems:system"
    url = ("--url", redis_url)
    async with real_wallets(redis_url) as wallets, running(wallets):
        await wallets.send(WALLET, Charge(7))

        async def dead() -> bool:
            return await dead_count(wallets) == 1

        await eventually(dead)
        code, output = await in_thread("dead", "list", spec, *url, "--json")
        assert code == 0, output
        [listed] = json.loads(output)
        ref = listed["ref"]
        code, output = await in_thread("dead", "list", "--app", APP, *url)
        assert code == 0, output
        assert "handler-error" in output
        assert "1 dead letter" in output
        code, output = await in_thread("dead", "show", ref, spec, *url)
        assert code == 0, output
        assert "payment provider is down" in output
        assert '"amount": 7' in output

        code, output = await in_thread("dead", "requeue", spec, *url, "--all")
        assert code == 1
        assert "--all would requeue 1 dead letter: add --yes" in output
        code, output = await in_thread("dead", "requeue", spec, *url, "--all", "--id", ref)
        assert code == 2

        admin_systems.BROKEN["charge"] = False
        code, output = await in_thread("dead", "requeue", spec, *url, "--id", ref)
        assert code == 0, output
        assert f"requeued {ref} -> inbox entry" in output

        async def handled() -> bool:
            return (await wallets.state_of(WALLET)).version == 1

        await eventually(handled)
        code, output = await in_thread("dead", "requeue", spec, *url, "--id", ref)
        assert code == 1
        assert "no dead letter" in output
        assert "Traceback" not in output
        code, output = await in_thread("dead", "drop", spec, *url, "--all", "--yes")
        assert (code, output.strip()) == (0, "no dead letters to drop")
        code, output = await in_thread("dead", "show", "wallet/9/1-0", spec, *url)
        assert code == 1
        assert output.startswith("error:")
        assert "Traceback" not in output


async def write_old_at(url: str) -> None:
    client = create_client(url)
    try:
        await client.flushall()
        await write_old(client)
    finally:
        await client.aclose()


@pytest.mark.integration
def test_init_migrate_and_replay_at_time_commands(redis_url: str) -> None:
    spec = "tests.admin_systems:tallies"
    url = ("--url", redis_url)
    anyio.run(write_old_at, redis_url)
    code, output = invoke("init", spec, *url)
    assert code == 0, output
    assert "consumer groups: 4 created, 0 already there" in output
    code, output = invoke("init", spec, *url, "--json")
    assert code == 0, output
    assert json.loads(output)["groups_existing"] == 4

    code, output = invoke("migrate", spec, *url, "--dry-run")
    assert code == 0, output
    assert "5 outdated events in 3 actors and 1 outdated snapshot would be rewritten" in output
    code, output = invoke("migrate", spec, *url)
    assert code == 0, output
    assert "rewrote 5 events of 3 actors and 1 snapshot" in output
    code, output = invoke("migrate", spec, *url, "--json")
    assert code == 0, output
    assert json.loads(output)["rewritten_events"] == 0
    code, output = invoke("verify", spec, *url)
    assert code == 0, output
    code, output = invoke("migrate", spec, *url, "--kind", "nothing")
    assert code == 1
    assert "hosts no kind 'nothing'" in output

    # Events of tally/a were recorded at 1 s, 2 s and 3 s after the epoch.
    at = ("--at", "1970-01-01T00:00:02.500Z", "--json")
    code, output = invoke("replay", "tally/a", spec, *url, *at)
    assert code == 0, output
    assert json.loads(output) == {"actor": "tally/a", "version": 2, "state": {"total_cents": 300}}
    code, output = invoke("replay", "tally/a", spec, *url, "--at", "whenever")
    assert code == 1
    assert "neither an ISO 8601 time" in output


@pytest.mark.integration
def test_check_since_command(redis_url: str) -> None:
    anyio.run(record_at, redis_url)
    spec = "tests.replay_systems:changed"
    code, output = invoke("check", spec, "--url", redis_url, "--since", "2000-01-01")
    assert code == 1, output
    code, output = invoke("check", spec, "--url", redis_url, "--since", "2999-01-01")
    assert code == 0, output
    assert "0 messages of 1 actor" in output
