"""Inbox helpers and dead letters on fakeredis and on the real embedded server."""

import pytest

from repertory.streams.client import RedisClient
from repertory.streams.deadletters import DeadLetters
from repertory.streams.inbox import Inbox
from repertory.streams.keys import KeyLayout

pytestmark = pytest.mark.anyio

KEYS = KeyLayout("t")


def inbox(redis: RedisClient) -> Inbox:
    return Inbox(redis, KEYS.inbox("worker", 0), KEYS.group("worker"))


async def test_group_creation_is_idempotent(redis: RedisClient) -> None:
    box = inbox(redis)
    assert await box.ensure_group() is True
    assert await box.ensure_group() is False


async def test_read_ack_and_pending(redis: RedisClient) -> None:
    box = inbox(redis)
    await box.ensure_group()
    ids = [await box.add(f"m{i}".encode()) for i in range(5)]
    first = await box.read("c1", count=3)
    assert [e.data for e in first] == [b"m0", b"m1", b"m2"]
    second = await box.read("c2", count=10)
    assert [e.data for e in second] == [b"m3", b"m4"]
    assert await box.read("c1", count=10) == []

    summary = await box.pending()
    assert summary.count == 5
    assert summary.consumers == {"c1": 3, "c2": 2}
    assert (summary.lowest_id, summary.highest_id) == (ids[0], ids[4])

    assert await box.ack(*[e.id for e in first]) == 3
    assert await box.ack(first[0].id) == 0
    assert (await box.pending()).consumers == {"c2": 2}
    rows = await box.pending_entries(consumer="c2")
    assert [(r.id, r.consumer, r.deliveries) for r in rows] == [
        (ids[3], "c2", 1),
        (ids[4], "c2", 1),
    ]


async def test_a_restarted_consumer_reads_its_own_pending_first(redis: RedisClient) -> None:
    box = inbox(redis)
    await box.ensure_group()
    await box.add(b"a")
    await box.add(b"b")
    delivered = await box.read("c1")
    again = await box.read_own_pending("c1")
    assert [e.id for e in again] == [e.id for e in delivered]
    await box.ack(delivered[0].id)
    assert [e.data for e in await box.read_own_pending("c1")] == [b"b"]


async def test_autoclaim_moves_idle_entries_to_another_consumer(redis: RedisClient) -> None:
    box = inbox(redis)
    await box.ensure_group()
    await box.add(b"task")
    (taken,) = await box.read("dead-worker")
    claimed = await box.autoclaim("rescuer", min_idle_ms=0)
    assert [e.id for e in claimed.entries] == [taken.id]
    assert claimed.entries[0].data == b"task"
    assert claimed.deleted_ids == []
    rows = await box.pending_entries()
    assert [(r.consumer, r.deliveries) for r in rows] == [("rescuer", 2)]


async def test_autoclaim_respects_min_idle(redis: RedisClient) -> None:
    box = inbox(redis)
    await box.ensure_group()
    await box.add(b"task")
    await box.read("busy-worker")
    claimed = await box.autoclaim("rescuer", min_idle_ms=60_000)
    assert claimed.entries == []
    assert (await box.pending()).consumers == {"busy-worker": 1}


async def test_extend_keeps_the_entry_with_its_owner(redis: RedisClient) -> None:
    box = inbox(redis)
    await box.ensure_group()
    await box.add(b"long task")
    (entry,) = await box.read("worker")
    assert await box.extend("worker", entry.id) == 1
    assert [r.consumer for r in await box.pending_entries()] == ["worker"]
    await box.ack(entry.id)
    assert await box.extend("worker", entry.id) == 0


@pytest.mark.integration
async def test_lag_counts_undelivered_entries(real_redis: RedisClient) -> None:
    box = inbox(real_redis)
    await box.ensure_group()
    for i in range(4):
        await box.add(str(i).encode())
    assert await box.lag() == 4
    await box.read("c", count=3)
    assert await box.lag() == 1


async def test_trim_acked_keeps_only_in_flight_and_undelivered(redis: RedisClient) -> None:
    box = inbox(redis)
    await box.ensure_group()
    for i in range(6):
        await box.add(str(i).encode())
    delivered = await box.read("c", count=4)
    await box.ack(delivered[0].id, delivered[1].id, delivered[3].id)
    assert await box.trim_acked() == 2
    assert await redis.xlen(box.stream) == 4
    await box.ack(delivered[2].id)
    assert await box.trim_acked() == 2
    remaining = await box.read("c", count=10)
    assert [e.data for e in remaining] == [b"4", b"5"]
    await box.ack(*[e.id for e in remaining])
    assert await box.trim_acked() == 2
    assert await redis.xlen(box.stream) == 0


async def test_dead_letters_keep_the_message_and_its_reason(redis: RedisClient) -> None:
    dead = DeadLetters(redis, KEYS.dead_letters("worker", 0))
    first = await dead.add(
        b"\xff\x00not an envelope",
        reason="malformed",
        detail="msgpack: truncated",
        source_stream="s",
        source_id=b"1-0",
        attempts=5,
    )
    await dead.add(b"x", reason="handler-error", source_stream="s", source_id="2-0", attempts=5)
    assert await dead.count() == 2
    letters = await dead.list()
    assert [(d.reason, d.source_id, d.attempts) for d in letters] == [
        ("malformed", "1-0", 5),
        ("handler-error", "2-0", 5),
    ]
    assert letters[0].data == b"\xff\x00not an envelope"
    assert letters[0].detail == "msgpack: truncated"
    assert [d.id for d in await dead.list(after=first)] == [letters[1].id]
    fetched = await dead.get(first)
    assert fetched == letters[0]
    assert await dead.remove(first) == 1
    assert await dead.get(first) is None
    assert await dead.count() == 1


async def test_extend_never_steals_back_an_entry_taken_over(redis: RedisClient) -> None:
    box = inbox(redis)
    await box.ensure_group()
    await box.add(b"task")
    (entry,) = await box.read("slow-worker")
    await box.autoclaim("rescuer", min_idle_ms=0)
    assert await box.extend("slow-worker", entry.id) == 0
    assert [r.consumer for r in await box.pending_entries()] == ["rescuer"]
