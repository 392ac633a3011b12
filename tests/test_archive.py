"""`verify`, `export` and `import`: a planted gap, corrupt entry and stale snapshot are found;
export -> import into an empty namespace -> export gives the same file."""

import json
from pathlib import Path

import anyio
import fakeredis
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from repertory.actors.model import applier
from repertory.runtime.archive import ImportFileError, export_lines, import_lines, verify
from repertory.runtime.cli import app
from repertory.runtime.system import ActorSystem
from repertory.streams.client import RedisClient, create_client
from repertory.streams.keys import Address
from tests.replay_systems import APP, Deposited, Ledger, LedgerActor, Withdrawn

pytestmark = pytest.mark.anyio
runner = CliRunner()


async def write_accounts(system: ActorSystem) -> None:
    for name, amounts in {"a": [5, 7, 9], "b": [1], "c": [2, 3]}.items():
        events = [Deposited(amount) for amount in amounts]
        await system.store.append(Address("ledger", name), events, expected_version=0)
    view = await system.state_of("ledger/a")
    await system.store.save_snapshot(Address("ledger", "a"), view.state, view.version)


async def test_a_sound_store_verifies(redis: RedisClient) -> None:
    async with ActorSystem(LedgerActor(), app=APP, partitions=4, client=redis) as system:
        await write_accounts(system)
        counted: list[int] = []
        report = await verify(system, progress=counted.append)
        assert report.ok, report.problems
        assert (report.actors, report.events, report.snapshots) == (3, 6, 1)
        assert sum(counted) == 6


async def test_verify_finds_a_gap_a_corrupt_entry_and_a_stale_snapshot(
    redis: RedisClient,
) -> None:
    async with ActorSystem(LedgerActor(), app=APP, partitions=4, client=redis) as system:
        await write_accounts(system)
        keys, codec = system.keys, system.codec
        # A gap: version 5 written after 3 (the append script never does this).
        record = codec.encode(codec.event(Deposited(1)))
        await redis.xadd(keys.events(Address("ledger", "a")), {"e": record}, id="5-0")
        # A corrupt entry: bytes that are no event record.
        await redis.xadd(keys.events(Address("ledger", "b")), {"e": b"\xc1garbage"}, id="2-0")
        # A stale snapshot: not the state the events give at its version.
        await system.store.save_snapshot(Address("ledger", "c"), Ledger(99, [99]), 2)
        report = await verify(system)
        found = {(p.address, p.kind, p.version) for p in report.problems}
        assert found == {
            ("ledger/a", "gap", 4),
            ("ledger/b", "undecodable-event", 2),
            ("ledger/c", "stale-snapshot", 2),
        }
        stale = next(p for p in report.problems if p.kind == "stale-snapshot")
        assert "balance: replay 5, snapshot 99" in stale.detail

        # Without the code only the structure is checked: the gap and the corrupt entry.
        bare = ActorSystem(app=APP, partitions=4, client=redis)
        structural = await verify(bare)
        assert {(p.address, p.kind) for p in structural.problems} == {
            ("ledger/a", "gap"),
            ("ledger/b", "undecodable-event"),
        }
        assert structural.unchecked_kinds == ["ledger"]


class Fussy(LedgerActor):
    """The ledger, except that its applier cannot take a deposit of 13."""

    @applier
    def deposited(self, state: Ledger, event: Deposited) -> Ledger:
        if event.amount == 13:
            raise ValueError("unlucky")
        return Ledger(state.balance + event.amount, [*state.entries, event.amount])


async def test_verify_folds_logs_longer_than_a_read_batch(redis: RedisClient) -> None:
    """2,500 events (three XRANGE batches), a snapshot inside the second batch: sound, then
    stale; and an applier that raises at event 1,700 is reported there."""
    address = Address("ledger", "long")
    amounts = [index % 5 + 1 for index in range(2500)]
    amounts[1699] = 13
    async with ActorSystem(LedgerActor(), app=APP, partitions=4, client=redis) as system:
        version = 0
        for start in range(0, len(amounts), 500):
            events = [Deposited(amount) for amount in amounts[start : start + 500]]
            version = await system.store.append(address, events, expected_version=version)
        state = Ledger(sum(amounts[:1500]), amounts[:1500])
        await system.store.save_snapshot(address, state, 1500)
        report = await verify(system, [address])
        assert report.ok, report.problems
        assert (report.events, report.snapshots) == (2500, 1)

        await system.store.save_snapshot(address, Ledger(1, [1]), 1500)
        report = await verify(system, [address])
        assert [(p.kind, p.version) for p in report.problems] == [("stale-snapshot", 1500)]

        fussy = ActorSystem(Fussy(), app=APP, partitions=4, client=redis)
        report = await verify(fussy, [address])
        assert [(p.kind, p.version) for p in report.problems] == [
            ("stale-snapshot", 1500),
            ("applier-error", 1700),
        ]
        assert "test.replay.deposited raised ValueError('unlucky')" in report.problems[1].detail


async def export_of(system: ActorSystem) -> list[bytes]:
    return [line async for line in export_lines(system)]


payloads = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "x.y", "long-id-" + "z" * 30]),
        st.lists(
            st.one_of(
                st.builds(Deposited, st.integers(-(2**40), 2**40)),
                st.builds(Withdrawn, st.integers(0, 100)),
            ),
            min_size=1,
            max_size=5,
        ),
        st.booleans(),
        st.lists(st.text(max_size=8), max_size=2),
    ),
    max_size=8,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=payloads)
async def test_export_import_export_gives_the_same_lines(
    batches: list[tuple[str, list[msgspec.Struct], bool, list[str]]],
) -> None:
    client: RedisClient = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    source = ActorSystem(LedgerActor(), app=APP, partitions=4, client=client)
    # The copy lives in another namespace, with another partition count.
    copy = ActorSystem(LedgerActor(), app="replaycopy", partitions=3, client=client)
    for actor_id, events, snapshot, refusals in batches:
        address = Address("ledger", actor_id)
        version = await source.store.append(address, events, None)
        if snapshot:
            view = await source.state_of(address)
            await source.store.save_snapshot(address, view.state, view.version)
        for reason in refusals:
            envelope = source.codec.envelope(str(address), Deposited(0))
            fields = {"m": source.codec.encode(envelope), "at": 7, "from": version, "to": version}
            await client.xadd(source.keys.handled(address), {**fields, "rejected": reason})
    exported = await export_of(source)
    report = await import_lines(copy, exported)
    assert report.events == sum(len(events) for _, events, _, _ in batches)
    assert await export_of(copy) == exported
    assert (await verify(copy)).ok
    await client.aclose()


async def test_import_refuses_a_namespace_with_data_and_bad_files(redis: RedisClient) -> None:
    async with ActorSystem(LedgerActor(), app=APP, partitions=4, client=redis) as system:
        await write_accounts(system)
        exported = await export_of(system)
        with pytest.raises(ImportFileError, match="already has data"):
            await import_lines(system, exported)
        other = ActorSystem(LedgerActor(), app="replayother", partitions=4, client=redis)
        with pytest.raises(ImportFileError, match="line 1: not an export line"):
            await import_lines(other, [b"{nope"])
        with pytest.raises(ImportFileError, match="does not start with an export header"):
            await import_lines(other, exported[1:])
        skipping = [exported[0], exported[2]]  # the first event of ledger/a is missing
        with pytest.raises(ImportFileError, match="line 2: ledger/a: expected version 1"):
            await import_lines(other, skipping)


async def write_at(url: str) -> None:
    client = create_client(url)
    try:
        await client.flushall()
        async with ActorSystem(LedgerActor(), app=APP, partitions=4, client=client) as system:
            await write_accounts(system)
            await system.store.save_snapshot(Address("ledger", "c"), Ledger(99, [99]), 2)
    finally:
        await client.aclose()


@pytest.mark.integration
def test_verify_export_import_commands(redis_url: str, tmp_path: Path) -> None:
    anyio.run(write_at, redis_url)
    spec = "tests.replay_systems:system"
    result = runner.invoke(app, ["verify", spec, "--url", redis_url, "--json"])
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert [(p["address"], p["kind"]) for p in report["problems"]] == [
        ("ledger/c", "stale-snapshot")
    ]
    ok = runner.invoke(app, ["verify", spec, "--url", redis_url, "--kind", "nothing"])
    assert ok.exit_code == 0, ok.output

    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    exported = runner.invoke(app, ["export", "--app", APP, "--url", redis_url, "-o", str(first)])
    assert exported.exit_code == 0, exported.output
    imported = runner.invoke(app, ["import", str(first), "--app", "copied", "--url", redis_url])
    assert imported.exit_code == 0, imported.output
    assert "imported 6 events, 2 snapshots" in imported.stdout
    again = runner.invoke(
        app,
        ["export", "--app", "copied", "--partitions", "16", "--url", redis_url, "-o", str(second)],
    )
    assert again.exit_code == 0, again.output
    assert first.read_bytes() == second.read_bytes()

    refused = runner.invoke(app, ["import", str(first), "--app", "copied", "--url", redis_url])
    assert refused.exit_code == 1
    assert "already has data" in refused.output
    missing = runner.invoke(
        app, ["import", str(tmp_path / "nope"), "--app", "x", "--url", redis_url]
    )
    assert missing.exit_code == 1
    assert "no export file" in missing.output
