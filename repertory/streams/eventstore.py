"""The event store: one stream per actor, appended atomically against an expected version."""

from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, NamedTuple

import msgspec
import redis.asyncio

from repertory.schemas import Codec, EventRecord, SnapshotRecord
from repertory.schemas.codec import decode_event_record
from repertory.schemas.errors import DecodeError, RepertoryError
from repertory.streams.client import RedisClient, is_cluster
from repertory.streams.keys import Address, KeyLayout, events_key, snapshots_key
from repertory.streams.scripts import ACTIVATE, APPEND

EVENT_FIELD = b"e"
ACTIVATION_PAGE = 32
"""Events that the activation script returns at most for an actor without a snapshot. A script
hands back stream entries at about 1.1 µs each of server time more than XRANGE does, and a
round trip costs 50-60 µs: a new actor or a short log is read in one round trip for less than
a second one would cost, and a longer log goes on with XRANGE pages of `read_batch`."""


class ConflictError(RepertoryError):
    """An append's expected version is not the actor's version: someone else wrote first."""

    def __init__(self, address: Address, expected: int, actual: int) -> None:
        super().__init__(f"{address}: expected version {expected}, actual {actual}")
        self.address = address
        self.expected = expected
        self.actual = actual


class StoredEvent(msgspec.Struct, frozen=True, gc=False):
    """An event as read back: its version in the actor's stream, its payload as today's type,
    and its record as stored."""

    version: int
    event: msgspec.Struct
    encoded: bytes
    """The event record byte for byte as the stream holds it."""

    @property
    def record(self) -> EventRecord:
        """The event record: its metadata, and its payload as stored (never upcast).

        Decoded from `encoded` on each access: reading decodes each record once, straight into
        today's type, and pays for the record only where it is asked for."""
        return decode_event_record(self.encoded)


class Snapshot(msgspec.Struct, frozen=True, gc=False):
    """A saved state and the actor version it folds up to."""

    version: int
    record: SnapshotRecord
    state: msgspec.Struct


class Loaded(NamedTuple):
    """An actor as activation reads it: its latest snapshot (None without one) and its events
    after it: those read with it, with the version of the last (None if none were), and the
    rest, a batch at a time, each batch with the version of its last event (None when there is
    none to read: a new actor, a short log, is folded without another round trip)."""

    snapshot: Snapshot | None
    first: tuple[int, list[msgspec.Struct]] | None
    more: AsyncIterator[tuple[int, list[msgspec.Struct]]] | None


def _version_of(entry_id: bytes) -> int:
    return int(entry_id[: entry_id.index(b"-")])


def _entry_id(version: int) -> bytes:
    return b"%d-0" % version


class EntryBatch(NamedTuple):
    """One XRANGE page of an actor's event stream, undecoded: the entry ids and, for each, its
    encoded record (b"" for an entry without one, which fails to decode)."""

    entry_ids: list[bytes]
    records: list[bytes]

    def runs_from(self, version: int) -> bool:
        """Whether the entries are exactly versions `version`, `version` + 1, ... (ids
        `<v>-0`), as the append script writes them."""
        ids = self.entry_ids
        count = len(ids)
        if not count or ids[0] != _entry_id(version) or ids[-1] != _entry_id(version + count - 1):
            return False
        # Ids only increase, so with every sequence 0 the first and last bound every version.
        # Each id has one "-": in the ids joined by spaces, "-0 " occurs once per id that
        # ends in "-0" (one C-level pass instead of a Python call per id).
        return (b" ".join(ids) + b" ").count(b"-0 ") == count


def _event_field(fields: list[bytes]) -> bytes:
    for index in range(0, len(fields) - 1, 2):
        if fields[index] == EVENT_FIELD:
            return fields[index + 1]
    return b""


def _entry_batch(reply: list[list[Any]]) -> EntryBatch:
    """An XRANGE reply as the server sends it, [[id, [field, value, ...]], ...]."""
    return EntryBatch(
        [entry_id for entry_id, _ in reply],
        [fields[1] if fields[0] == EVENT_FIELD else _event_field(fields) for _, fields in reply],
    )


def _after(batch: EntryBatch) -> str:
    """The XRANGE bound of the entries after the batch."""
    return f"({batch.entry_ids[-1].decode()}"


def _after_version(snapshot: Snapshot) -> str:
    """The XRANGE bound of the events after the snapshot."""
    return f"{snapshot.version + 1}-0"


class EventStore:
    """Appends and reads actors' events and snapshots.

    Event stream entry ids are `<version>-0`, so reading a version range is a native XRANGE and a
    gap is impossible: the append script writes version n + 1 only after n.
    """

    def __init__(
        self,
        client: RedisClient,
        *,
        keys: KeyLayout | None = None,
        codec: Codec | None = None,
        read_batch: int = 1000,
    ) -> None:
        self.client = client
        self.keys = keys or KeyLayout()
        self.codec = codec or Codec()
        self.read_batch = read_batch

    async def append(
        self,
        address: Address,
        events: Sequence[msgspec.Struct],
        expected_version: int | None,
        *,
        causation_id: str | None = None,
        correlation_id: str | None = None,
        traceparent: str | None = None,
    ) -> int:
        """Append `events` after `expected_version` (None: whatever the version is).

        Returns the new version. Raises ConflictError, and writes nothing, when the actor's
        version is not `expected_version`.
        """
        codec = self.codec
        records = [
            codec.event(
                event,
                causation_id=causation_id,
                correlation_id=correlation_id,
                traceparent=traceparent,
            )
            for event in events
        ]
        return await self.append_records(address, records, expected_version)

    async def append_records(
        self, address: Address, records: Sequence[EventRecord], expected_version: int | None
    ) -> int:
        """Append already-built records (imports and migrations keep their original metadata)."""
        encode = self.codec.encode
        return await self.append_encoded(
            address, [encode(record) for record in records], expected_version
        )

    async def append_encoded(
        self, address: Address, encoded: Sequence[bytes], expected_version: int | None
    ) -> int:
        """Append encoded records byte for byte (an import must store exactly what it read)."""
        if expected_version is not None and expected_version < 0:
            raise ValueError(f"expected_version must be >= 0 or None, got {expected_version}")
        args: list[Any] = [-1 if expected_version is None else expected_version]
        args.extend(encoded)
        ok, version = await APPEND(self.client, [self.keys.events(address)], args)
        if not ok:
            raise ConflictError(
                address, -1 if expected_version is None else expected_version, version
            )
        return int(version)

    async def version(self, address: Address) -> int:
        return int(await self.client.xlen(self.keys.events(address)))

    async def entry_batches(
        self, address: Address, start: int, stop: int | None
    ) -> AsyncIterator[EntryBatch]:
        """The stream's entries from version `start` to `stop`, one XRANGE batch at a time,
        undecoded: for tools that must show a corrupt entry rather than stop at it."""
        upper = "+" if stop is None else f"{stop}-0"
        async for batch in self._pages(self.keys.events(address), f"{max(start, 1)}-0", upper):
            yield batch

    async def _pages(self, key: str, lower: str, upper: str) -> AsyncIterator[EntryBatch]:
        while True:
            batch = await self._xrange(key, lower, upper)
            if not batch.entry_ids:
                return
            yield batch
            if len(batch.entry_ids) < self.read_batch:
                return
            lower = _after(batch)

    async def _xrange(self, key: str, lower: str, upper: str) -> EntryBatch:
        client = self.client
        if isinstance(client, redis.asyncio.Redis):
            # redis-py's XRANGE reply callback builds a dict per entry, which costs about as
            # much as reading the reply itself: a command name given as bytes is not in its
            # table of callbacks, so the entries come as the server sends them, [id, [field,
            # value, ...]]. (A Cluster client routes a command by its name as text, so it gets
            # them parsed.)
            reply = await client.execute_command(
                b"XRANGE", key, lower, upper, b"COUNT", self.read_batch
            )
        else:
            reply = await client.xrange(key, lower, upper, count=self.read_batch)
        if reply and isinstance(reply[0][1], dict):  # parsed by redis-py: {field: value}
            return EntryBatch(
                [entry_id for entry_id, _ in reply],
                [fields.get(EVENT_FIELD, b"") for _, fields in reply],
            )
        return _entry_batch(reply)

    async def read_records(
        self, address: Address, start: int = 1, stop: int | None = None
    ) -> AsyncIterator[tuple[int, EventRecord]]:
        """Records with their versions from `start` to `stop` (inclusive), in batches, payloads
        left encoded: for tools that must not fail on a payload today's code cannot read."""
        decode = self.codec.decode_event
        async for entry_ids, records in self.entry_batches(address, start, stop):
            for entry_id, data in zip(entry_ids, records, strict=True):
                yield _version_of(entry_id), decode(data)

    async def read(
        self, address: Address, start: int = 1, stop: int | None = None
    ) -> AsyncIterator[StoredEvent]:
        """Events from `start` to `stop` (inclusive), decoded and upcast to today's types.

        Streams in batches of `read_batch`, so a long history is never held in memory whole.
        Raises DecodeError at the first event that cannot be decoded.
        """
        decode = self.codec.decode_event_payloads
        async for batch in self.entry_batches(address, start, stop):
            # Decoded a batch at a time, each record in one pass straight into today's type
            # (the record itself is decoded only if asked for: StoredEvent.record); the
            # generator suspends once per batch, not per event.
            events = decode(batch.records)
            first = _version_of(batch.entry_ids[0])
            if batch.runs_from(first):
                # As the append script writes them: no need to parse every id.
                versions: Iterable[int] = range(first, first + len(events))
            else:
                versions = map(_version_of, batch.entry_ids)
            for stored in map(StoredEvent, versions, events, batch.records):
                yield stored

    async def load(self, address: Address) -> Loaded:
        """The actor's latest snapshot and its events after it, for folding (activation).

        One script call reads the snapshot or, for an actor without one, its first events: a
        new actor or a short log costs one round trip. The events after a snapshot, and a
        longer log's, stream on a batch at a time. Raises DecodeError for a snapshot that
        cannot be decoded, and while iterating at the first event that cannot be.
        """
        (loaded,) = await self.load_many([address])
        if isinstance(loaded, DecodeError):
            raise loaded
        return loaded

    async def load_many(self, addresses: Sequence[Address]) -> list[Loaded | DecodeError]:
        """`load` for several actors in one script call (on a Cluster, one per partition among
        them): a node activates the actors a read brought together in one round trip. An
        actor whose snapshot cannot be decoded gets its DecodeError in its place; the others
        load."""
        count = min(self.read_batch, ACTIVATION_PAGE)
        groups: dict[str, list[int]] = {}
        one_call = not is_cluster(self.client)
        for index, address in enumerate(addresses):
            group = "" if one_call else self.keys.snapshots_of(address)
            groups.setdefault(group, []).append(index)
        loaded: dict[int, Loaded | DecodeError] = {}
        for indexes in groups.values():
            keys: list[str] = []
            for index in indexes:
                address = addresses[index]
                tag = self.keys.actor_tag(address)
                keys.extend((snapshots_key(tag), events_key(tag, address.id)))
            ids = [addresses[index].id for index in indexes]
            replies = await ACTIVATE(self.client, keys, [count, *ids])
            for index, stream, (data, reply) in zip(indexes, keys[1::2], replies, strict=True):
                loaded[index] = self._loaded(stream, data, reply, count)
        return [loaded[index] for index in range(len(addresses))]

    def _loaded(
        self, stream: str, data: bytes | None, reply: list[Any], count: int
    ) -> Loaded | DecodeError:
        """An actor as the activation script returned it (see `load`)."""
        try:
            if data is not None:
                snapshot = self._snapshot(data)
                return Loaded(snapshot, None, self._event_batches(stream, _after_version(snapshot)))
            first = _entry_batch(reply)
            if not first.entry_ids:
                return Loaded(None, None, None)
            events = self.codec.decode_event_payloads(first.records)
        except DecodeError as error:
            return error
        more = self._event_batches(stream, _after(first)) if len(first.entry_ids) == count else None
        return Loaded(None, (_version_of(first.entry_ids[-1]), events), more)

    async def _event_batches(
        self, key: str, lower: str
    ) -> AsyncIterator[tuple[int, list[msgspec.Struct]]]:
        """The events from the XRANGE bound `lower`, a batch at a time, each with the version
        of its last event. Raises DecodeError at the first event that cannot be decoded."""
        decode = self.codec.decode_event_payloads
        async for entry_ids, records in self._pages(key, lower, "+"):
            yield _version_of(entry_ids[-1]), decode(records)

    async def save_snapshot(self, address: Address, state: msgspec.Struct, version: int) -> None:
        record = self.codec.snapshot(state, version)
        await self.client.hset(
            self.keys.snapshots_of(address), address.id, self.codec.encode(record)
        )

    async def load_snapshot(self, address: Address) -> Snapshot | None:
        data = await self.client.hget(self.keys.snapshots_of(address), address.id)
        return None if data is None else self._snapshot(data)

    def _snapshot(self, data: bytes) -> Snapshot:
        record = self.codec.decode_snapshot(data)
        return Snapshot(record.version, record, self.codec.state_of(record))

    async def delete_snapshot(self, address: Address) -> bool:
        removed = await self.client.hdel(self.keys.snapshots_of(address), address.id)
        return bool(removed)
