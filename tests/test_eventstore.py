"""The event store on fakeredis and on the real embedded server."""

import uuid
from typing import Any
from unittest import mock

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio.cluster import RedisCluster

from repertory.schemas import Codec, DecodeError, Format, schema
from repertory.streams.client import RedisClient
from repertory.streams.eventstore import (
    ACTIVATION_PAGE,
    ConflictError,
    EntryBatch,
    EventStore,
    Loaded,
)
from repertory.streams.keys import Address, KeyLayout

pytestmark = pytest.mark.anyio


@schema("test.store.noted")
class Noted(msgspec.Struct, frozen=True):
    text: str
    n: int = 0


@schema("test.store.tally")
class Tally(msgspec.Struct, frozen=True):
    total: int


def actor() -> Address:
    return Address("note", str(uuid.uuid4()))


async def test_append_then_read_gives_the_events_in_order(redis: RedisClient) -> None:
    store = EventStore(redis)
    address = actor()
    assert await store.version(address) == 0
    assert await store.append(address, [Noted("a"), Noted("b")], expected_version=0) == 2
    assert await store.append(address, [Noted("c", n=3)], expected_version=2) == 3
    read = [stored async for stored in store.read(address)]
    assert [s.version for s in read] == [1, 2, 3]
    assert [s.event for s in read] == [Noted("a"), Noted("b"), Noted("c", n=3)]
    assert {s.record.type for s in read} == {"test.store.noted"}
    assert await store.version(address) == 3


async def test_stale_expected_version_conflicts_and_writes_nothing(redis: RedisClient) -> None:
    store = EventStore(redis)
    address = actor()
    await store.append(address, [Noted("a")], expected_version=0)
    with pytest.raises(ConflictError) as raised:
        await store.append(address, [Noted("b"), Noted("c")], expected_version=0)
    assert (raised.value.expected, raised.value.actual) == (0, 1)
    assert raised.value.address == address
    with pytest.raises(ConflictError) as ahead:
        await store.append(address, [Noted("d")], expected_version=5)
    assert (ahead.value.expected, ahead.value.actual) == (5, 1)
    assert [s.event async for s in store.read(address)] == [Noted("a")]


async def test_no_expected_version_appends_at_the_end(redis: RedisClient) -> None:
    store = EventStore(redis)
    address = actor()
    await store.append(address, [Noted("a")], expected_version=None)
    assert await store.append(address, [Noted("b")], expected_version=None) == 2


async def test_metadata_travels_with_each_event(redis: RedisClient) -> None:
    store = EventStore(redis)
    address = actor()
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    await store.append(
        address,
        [Noted("a")],
        expected_version=0,
        causation_id="msg-1",
        correlation_id="corr-1",
        traceparent=traceparent,
    )
    (stored,) = [s async for s in store.read(address)]
    assert stored.record.causation_id == "msg-1"
    assert stored.record.correlation_id == "corr-1"
    assert stored.record.traceparent == traceparent
    assert stored.record.recorded_at > 0


@pytest.mark.parametrize("batch", [1, 3, 1000])
async def test_read_ranges_stream_in_batches(redis: RedisClient, batch: int) -> None:
    store = EventStore(redis, read_batch=batch)
    address = actor()
    await store.append(address, [Noted(str(i), n=i) for i in range(1, 11)], expected_version=0)
    assert [s.version async for s in store.read(address)] == list(range(1, 11))
    assert [s.event.n async for s in store.read(address, start=4, stop=7)] == [4, 5, 6, 7]  # type: ignore[attr-defined]
    assert [s.version async for s in store.read(address, start=10)] == [10]
    assert [s.version async for s in store.read(address, start=11)] == []
    versions = [v async for v, _ in store.read_records(address, start=0, stop=2)]
    assert versions == [1, 2]


async def test_json_streams_are_readable_by_a_msgpack_store(redis: RedisClient) -> None:
    address = actor()
    await EventStore(redis, codec=Codec(format=Format.JSON)).append(
        address, [Noted("json")], expected_version=0
    )
    await EventStore(redis).append(address, [Noted("msgpack")], expected_version=1)
    raw = await redis.xrange(KeyLayout().events(address))
    assert raw[0][1][b"e"].startswith(b"{")
    assert [s.event async for s in EventStore(redis).read(address)] == [
        Noted("json"),
        Noted("msgpack"),
    ]


async def test_event_stream_ids_are_versions(redis: RedisClient) -> None:
    store = EventStore(redis)
    address = actor()
    await store.append(address, [Noted("a"), Noted("b")], expected_version=0)
    ids = [entry_id for entry_id, _ in await redis.xrange(store.keys.events(address))]
    assert ids == [b"1-0", b"2-0"]


async def test_snapshots_save_load_delete(redis: RedisClient) -> None:
    store = EventStore(redis)
    address = actor()
    assert await store.load_snapshot(address) is None
    await store.save_snapshot(address, Tally(total=7), version=4)
    snapshot = await store.load_snapshot(address)
    assert snapshot is not None
    assert (snapshot.version, snapshot.state) == (4, Tally(total=7))
    await store.save_snapshot(address, Tally(total=9), version=6)
    newer = await store.load_snapshot(address)
    assert newer is not None
    assert (newer.version, newer.state) == (6, Tally(total=9))
    assert await store.delete_snapshot(address) is True
    assert await store.delete_snapshot(address) is False
    assert await store.load_snapshot(address) is None


async def test_script_is_reloaded_after_the_server_forgets_it(redis: RedisClient) -> None:
    store = EventStore(redis)
    address = actor()
    await store.append(address, [Noted("a")], expected_version=0)
    await redis.script_flush()
    assert await store.append(address, [Noted("b")], expected_version=1) == 2


async def test_negative_expected_version_is_refused(redis: RedisClient) -> None:
    with pytest.raises(ValueError, match="expected_version"):
        await EventStore(redis).append(actor(), [Noted("a")], expected_version=-1)


async def test_entries_are_read_whatever_their_fields(redis: RedisClient) -> None:
    """Entries the append script did not write: the record is the `e` field wherever it is
    among the entry's fields, and b"" in an entry without one."""
    store = EventStore(redis, read_batch=2)
    address = actor()
    key = store.keys.events(address)
    await redis.xadd(key, {b"e": b"one"}, id="1-0")
    await redis.xadd(key, {b"x": b"1", b"e": b"two"}, id="2-0")
    await redis.xadd(key, {b"x": b"1"}, id="3-5")
    batches = [batch async for batch in store.entry_batches(address, 1, None)]
    assert [batch.entry_ids for batch in batches] == [[b"1-0", b"2-0"], [b"3-5"]]
    assert [batch.records for batch in batches] == [[b"one", b"two"], [b""]]
    assert batches[0].runs_from(1)
    assert not batches[0].runs_from(2)
    assert not batches[1].runs_from(3)


@settings(max_examples=300, deadline=None)
@given(
    ids=st.lists(st.tuples(st.integers(1, 120), st.sampled_from([0, 1, 10, 20, 100])), unique=True),
    version=st.integers(1, 120),
)
def test_a_batch_runs_from_a_version_only_if_its_ids_are_the_versions_from_it(
    ids: list[tuple[int, int]], version: int
) -> None:
    entry_ids = [b"%d-%d" % entry_id for entry_id in sorted(ids)]  # a stream's ids increase
    batch = EntryBatch(entry_ids, [b""] * len(entry_ids))
    expected = [b"%d-0" % (version + offset) for offset in range(len(entry_ids))]
    assert batch.runs_from(version) == (bool(entry_ids) and entry_ids == expected)


@pytest.mark.parametrize("fmt", list(Format))
async def test_a_stored_event_keeps_its_record_as_stored(redis: RedisClient, fmt: Format) -> None:
    store = EventStore(redis, codec=Codec(format=fmt))
    address = actor()
    await store.append(address, [Noted("a", n=1)], expected_version=0, causation_id="msg-1")
    (stored,) = [s async for s in store.read(address)]
    ((version, record),) = [item async for item in store.read_records(address)]
    assert (stored.version, stored.record) == (version, record)
    assert stored.record == store.codec.decode_event(stored.encoded)
    assert store.codec.event_of(stored.record) == stored.event == Noted("a", n=1)


# Activation: EventStore.load.


async def loaded(store: EventStore, address: Address) -> tuple[int | None, list[int], list[Any]]:
    """The snapshot's version, the last version of each batch, and every event after it."""
    return await unfold(await store.load(address))


async def unfold(one: Loaded) -> tuple[int | None, list[int], list[Any]]:
    snapshot, first, more = one
    lasts: list[int] = []
    events: list[Any] = []
    if first is not None:
        lasts.append(first[0])
        events.extend(first[1])
    if more is not None:
        async for last, batch in more:
            lasts.append(last)
            events.extend(batch)
    return (None if snapshot is None else snapshot.version), lasts, events


async def test_loading_a_new_actor_finds_nothing(redis: RedisClient) -> None:
    assert await loaded(EventStore(redis), actor()) == (None, [], [])


@pytest.mark.parametrize("fmt", list(Format))
@pytest.mark.parametrize(
    ("read_batch", "lasts", "lasts_after_4"),
    [(1000, [10], [10]), (4, [4, 8, 10], [8, 10]), (3, [3, 6, 9, 10], [7, 10])],
)
async def test_loading_gives_the_events_after_the_snapshot_a_batch_at_a_time(
    redis: RedisClient, fmt: Format, read_batch: int, lasts: list[int], lasts_after_4: list[int]
) -> None:
    store = EventStore(redis, codec=Codec(format=fmt), read_batch=read_batch)
    address = actor()
    notes = [Noted(str(i), n=i) for i in range(1, 11)]
    await store.append(address, notes, expected_version=0)
    assert await loaded(store, address) == (None, lasts, notes)
    await store.save_snapshot(address, Tally(total=4), version=4)
    assert await loaded(store, address) == (4, lasts_after_4, notes[4:])
    await store.save_snapshot(address, Tally(total=10), version=10)
    assert await loaded(store, address) == (10, [], [])


async def test_a_longer_log_goes_on_after_the_scripts_first_events(redis: RedisClient) -> None:
    store = EventStore(redis)
    address = actor()
    notes = [Noted(str(i)) for i in range(1, 101)]
    await store.append(address, notes, expected_version=0)
    assert await loaded(store, address) == (None, [ACTIVATION_PAGE, 100], notes)


@pytest.mark.parametrize(
    ("events", "snapshot", "round_trips"), [(0, None, 1), (5, None, 1), (5, 2, 2)]
)
async def test_activation_takes_one_round_trip_without_a_snapshot(
    redis: RedisClient, events: int, snapshot: int | None, round_trips: int
) -> None:
    store = EventStore(redis)
    address = actor()
    if events:
        await store.append(address, [Noted(str(i)) for i in range(events)], expected_version=0)
    if snapshot is not None:
        await store.save_snapshot(address, Tally(total=snapshot), version=snapshot)
    await store.load(actor())  # the script is loaded (a NOSCRIPT reply costs two commands more)
    with mock.patch.object(redis, "execute_command", wraps=redis.execute_command) as command:
        found = await loaded(store, address)
    assert found[:2] == (snapshot, [events] if events else [])
    assert command.call_count == round_trips


async def test_loading_raises_for_a_corrupt_snapshot_or_event(redis: RedisClient) -> None:
    store = EventStore(redis)
    address = actor()
    await store.append(address, [Noted("a")], expected_version=0)
    await redis.xadd(store.keys.events(address), {b"e": b"\xc1"}, id="2-0")
    with pytest.raises(DecodeError):
        await loaded(store, address)
    await redis.hset(store.keys.snapshots_of(address), address.id, b"\x85\xa4type\xc1")
    with pytest.raises(DecodeError):
        await store.load(address)


async def test_loading_takes_the_last_entry_for_the_version_as_reading_does(
    redis: RedisClient,
) -> None:
    """A gap (which the append script never writes): activation folds what is there and takes
    the version of the last entry, as it always has; `verify` is what reports gaps."""
    store = EventStore(redis, read_batch=2)
    address = actor()
    key = store.keys.events(address)
    for version in (1, 2, 3, 5):
        await redis.xadd(
            key,
            {b"e": store.codec.encode(store.codec.event(Noted(str(version))))},
            id=f"{version}-0",
        )
    assert await loaded(store, address) == (
        None,
        [2, 5],
        [Noted("1"), Noted("2"), Noted("3"), Noted("5")],
    )


async def test_loading_many_actors_takes_one_script_call(redis: RedisClient) -> None:
    """New actors, a short log, a snapshot with events after it, a log longer than the
    script's page, and a corrupt snapshot, spread over partitions: each loads as `load` would,
    the corrupt one gives its DecodeError in its place, and they cost one call (on a Cluster,
    where a script reaches one slot, one per partition)."""
    store = EventStore(redis, keys=KeyLayout("many", partitions=4))
    addresses = [actor() for _ in range(12)]
    short, with_snapshot, long, corrupt = addresses[:4]
    await store.append(short, [Noted("a"), Noted("b")], expected_version=0)
    await store.append(with_snapshot, [Noted(str(i)) for i in range(5)], expected_version=0)
    await store.save_snapshot(with_snapshot, Tally(total=3), version=3)
    notes = [Noted(str(i)) for i in range(ACTIVATION_PAGE + 8)]
    await store.append(long, notes, expected_version=0)
    await redis.hset(store.keys.snapshots_of(corrupt), corrupt.id, b"\x85\xa4type\xc1")
    partitions = {store.keys.partition_of(address) for address in addresses}
    assert len(partitions) > 1

    await store.load_many(addresses)  # the script is loaded
    with mock.patch.object(redis, "evalsha", wraps=redis.evalsha) as evalsha:
        many = await store.load_many(addresses)
    one_call = not isinstance(redis, RedisCluster)
    assert evalsha.call_count == (1 if one_call else len(partitions))

    assert isinstance(many[3], DecodeError)
    expected = {
        short: (None, [Noted("a"), Noted("b")]),
        with_snapshot: (3, [Noted("3"), Noted("4")]),
        long: (None, notes),
    }
    for address, one in zip(addresses, many, strict=True):
        if address == corrupt:
            continue
        assert not isinstance(one, DecodeError)
        version, _, events = await unfold(one)
        assert (version, events) == expected.get(address, (None, []))
