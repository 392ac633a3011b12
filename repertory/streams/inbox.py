"""Inbox streams read through a consumer group: read, ack, reclaim, inspect, trim."""

from collections.abc import Sequence
from typing import Any

import msgspec
import redis.asyncio
from redis.exceptions import ResponseError

from repertory.streams.client import RedisClient
from repertory.streams.scripts import EXTEND

MESSAGE_FIELD = b"m"


class InboxEntry(msgspec.Struct, frozen=True, gc=False):
    """One delivered inbox entry: its stream id and the encoded envelope it carries.

    `data` is None when the entry has no message field (written by a foreign client): the
    reader dead-letters it instead of failing.
    """

    id: bytes
    data: bytes | None


class PendingEntry(msgspec.Struct, frozen=True, gc=False):
    id: bytes
    consumer: str
    idle_ms: int
    deliveries: int


class PendingSummary(msgspec.Struct, frozen=True):
    count: int
    lowest_id: bytes | None
    highest_id: bytes | None
    consumers: dict[str, int]


class AutoclaimResult(msgspec.Struct, frozen=True):
    """Entries taken over from idle consumers, the cursor to continue from, and the ids whose
    entries had been deleted from the stream (they are no longer pending)."""

    next_start: bytes
    entries: list[InboxEntry]
    deleted_ids: list[bytes]


def _entries(raw: list[Any]) -> list[InboxEntry]:
    # XAUTOCLAIM and XREADGROUP return a nil field list for entries deleted while pending.
    return [
        InboxEntry(entry_id, fields.get(MESSAGE_FIELD) if fields else None)
        for entry_id, fields in raw
    ]


def _raw_entries(raw: list[Any]) -> list[InboxEntry]:
    """Entries as the server sends them, [[id, [field, value, ...] or nil], ...]."""
    entries = []
    for entry_id, fields in raw:
        if fields and fields[0] == MESSAGE_FIELD:
            entries.append(InboxEntry(entry_id, fields[1]))
        else:  # another layout (a foreign writer), or nil for an entry deleted while pending
            found = dict(zip(fields[::2], fields[1::2], strict=True)) if fields else {}
            entries.append(InboxEntry(entry_id, found.get(MESSAGE_FIELD)))
    return entries


async def read_inboxes(
    client: RedisClient,
    group: str,
    consumer: str,
    streams: Sequence[str],
    *,
    count: int = 100,
    block_ms: int | None = None,
) -> list[list[InboxEntry]]:
    """New entries of several inboxes of one consumer group for `consumer`, in one round trip
    (up to `count` from each): a node reads every partition of a kind it holds at once. The
    streams must be reachable by one command: on a Cluster, one stream at a time. Returns each
    stream's entries, in the order of `streams`; they become pending until acked. `block_ms`
    must stay below the client's socket timeout."""
    options: list[Any] = [b"COUNT", count]
    if block_ms is not None:
        options += [b"BLOCK", block_ms]
    if isinstance(client, redis.asyncio.Redis):
        # The command name as bytes skips redis-py's reply callback, which builds a dict per
        # entry; the reply is taken as the server sends it.
        reply = await client.execute_command(
            b"XREADGROUP", b"GROUP", group, consumer, *options, b"STREAMS", *streams,
            *[b">"] * len(streams),
        )  # fmt: skip
    else:
        reply = await client.xreadgroup(
            group, consumer, dict.fromkeys(streams, ">"), count=count, block=block_ms
        )
    found: dict[bytes, list[InboxEntry]] = {}
    # [[stream, entries], ...] over RESP2; a map of stream -> entries over RESP3 (fakeredis).
    for stream, raw in reply.items() if isinstance(reply, dict) else reply or []:
        name = stream if isinstance(stream, bytes) else stream.encode()
        parsed = bool(raw) and isinstance(raw[0][1], dict)  # redis-py's callback ran
        found[name] = _entries(raw) if parsed else _raw_entries(raw)
    return [found.get(stream.encode(), []) for stream in streams]


class Inbox:
    """One stream read by one consumer group (the nodes hosting a kind)."""

    def __init__(self, client: RedisClient, stream: str, group: str) -> None:
        self.client = client
        self.stream = stream
        self.group = group

    async def ensure_group(self, start_id: str = "0") -> bool:
        """Create the stream and the group if missing. True if this call created the group."""
        try:
            await self.client.xgroup_create(self.stream, self.group, id=start_id, mkstream=True)
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise
            return False
        return True

    async def add(self, data: bytes, *, maxlen: int | None = None) -> bytes:
        """Append an encoded envelope; returns its entry id."""
        entry_id: bytes = await self.client.xadd(
            self.stream, {MESSAGE_FIELD: data}, maxlen=maxlen, approximate=True
        )
        return entry_id

    async def read(
        self, consumer: str, *, count: int = 100, block_ms: int | None = None
    ) -> list[InboxEntry]:
        """New entries for `consumer` (they become pending until acked). `block_ms` must stay
        below the client's socket timeout."""
        (entries,) = await read_inboxes(
            self.client, self.group, consumer, [self.stream], count=count, block_ms=block_ms
        )
        return entries

    async def read_own_pending(
        self, consumer: str, *, count: int = 100, after: bytes = b"0"
    ) -> list[InboxEntry]:
        """Entries delivered to `consumer` and not acked yet (a restarted consumer resumes)."""
        response = await self.client.xreadgroup(
            self.group, consumer, {self.stream: after}, count=count
        )
        if not response:
            return []
        return _entries(response[0][1])

    async def ack(self, *ids: bytes | str) -> int:
        if not ids:
            return 0
        return int(await self.client.xack(self.stream, self.group, *ids))

    async def autoclaim(
        self, consumer: str, min_idle_ms: int, *, start: bytes | str = b"0-0", count: int = 100
    ) -> AutoclaimResult:
        """Take over entries pending longer than `min_idle_ms` on any consumer."""
        next_start, raw, deleted = await self.client.xautoclaim(
            self.stream, self.group, consumer, min_idle_ms, start_id=start, count=count
        )
        return AutoclaimResult(next_start, _entries(raw), list(deleted))

    async def extend(self, consumer: str, *ids: bytes | str) -> int:
        """Reset the idle time of entries `consumer` still owns (a heartbeat), so no other
        consumer reclaims them; entries another consumer took over stay with it. Returns how
        many `consumer` still owned."""
        if not ids:
            return 0
        return int(await EXTEND(self.client, [self.stream], [self.group, consumer, *ids]))

    async def set_deliveries(self, consumer: str, entry_id: bytes | str, deliveries: int) -> None:
        """Record a retry in the entry's delivery count, so the count survives a crash."""
        await self.client.xclaim(
            self.stream, self.group, consumer, 0, [entry_id], retrycount=deliveries, justid=True
        )

    async def pending(self) -> PendingSummary:
        summary = await self.client.xpending(self.stream, self.group)
        return PendingSummary(
            count=int(summary["pending"]),
            lowest_id=summary["min"],
            highest_id=summary["max"],
            consumers={
                as_text(item["name"]): int(item["pending"]) for item in summary["consumers"]
            },
        )

    async def pending_entries(
        self,
        *,
        count: int = 100,
        consumer: str | None = None,
        min_idle_ms: int | None = None,
        start: bytes | str = "-",
    ) -> list[PendingEntry]:
        rows = await self.client.xpending_range(
            self.stream,
            self.group,
            min=start,
            max="+",
            count=count,
            consumername=consumer,
            idle=min_idle_ms,
        )
        return [
            PendingEntry(
                row["message_id"],
                as_text(row["consumer"]),
                int(row["time_since_delivered"]),
                int(row["times_delivered"]),
            )
            for row in rows
        ]

    async def lag(self) -> int | None:
        """Entries not yet delivered to the group; None when the server cannot tell (after
        deletions in the undelivered range)."""
        for group in await self.client.xinfo_groups(self.stream):
            if as_text(group["name"]) == self.group:
                lag = group.get("lag")
                return None if lag is None else int(lag)
        raise ResponseError(f"no consumer group {self.group!r} on {self.stream!r}")

    async def trim_acked(self) -> int:
        """Delete entries every consumer is done with: those before the oldest pending entry
        and not after the last delivered one. Inbox memory then follows in-flight work."""
        groups = await self.client.xinfo_groups(self.stream)
        info = next((g for g in groups if as_text(g["name"]) == self.group), None)
        if info is None:
            return 0
        last_delivered = as_text(info["last-delivered-id"])
        summary = await self.client.xpending(self.stream, self.group)
        if summary["pending"]:
            floor = as_text(summary["min"])
        else:
            ms, seq = last_delivered.split("-")
            floor = f"{ms}-{int(seq) + 1}"
        return int(await self.client.xtrim(self.stream, minid=floor, approximate=False))


def as_text(value: bytes | str) -> str:
    """A reply field as text, whether the client decodes replies or not."""
    return value.decode() if isinstance(value, bytes) else value
