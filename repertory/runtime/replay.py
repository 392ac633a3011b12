"""Replaying an actor's history to debug it (guarantee G7), as a Python API for notebooks and
tests and behind `repertory replay` and `repertory check`.

- `timeline`: the actor's events in order, each with the message that caused it (from the
  handled-message stream the commit script writes), and the messages it refused;
- `state_at` / `states_at`: the state folded from the events up to a version;
- `state_at_time`: the state after the last event recorded at or before a time;
- `diff_states`: what changed between two states, field by field;
- `follow`: the timeline, then new entries as they are committed;
- `check_actor` / `check`: re-run every recorded message through today's handler code from
  the state before it and report the first divergence from the recorded events.

Everything streams: logs are read in batches and folded as they come, never held whole.
The timeline needs no actor code (payloads are shown as stored); states and checks need it.
"""

import datetime
import itertools
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import anyio
import msgspec

from repertory.actors.model import Actor, Context, Rejected
from repertory.runtime.system import ActorSystem, ActorView
from repertory.schemas import Codec, EventRecord
from repertory.schemas.errors import DecodeError, RepertoryError
from repertory.streams.client import RedisClient, create_client
from repertory.streams.keys import Address, KeyLayout, KeyLayoutError

READ_BATCH = 1000
# A blocking read must stay under the client's socket timeout (see ClientConfig).
FOLLOW_BLOCK_MS = 1000


class ReplayError(RepertoryError):
    """A replay that cannot be done: no such version, no code for the kind, a wrong layout."""


# The plain data shapes. Payloads are shown as stored (plain dicts), so a timeline can be read
# without the code that wrote it, and encodes as JSON as is.


class MessageSummary(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A handled message: its id, type and payload as stored, and who sent it."""

    id: str
    type: str
    schema_version: int
    payload: Any
    sender: str | None = None
    error: str | None = None
    """Why the stored envelope could not be read, if it could not."""


class TimelineEntry(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One step of an actor's history: an event, or a message it refused.

    `version` is the actor's version after the event; for a refusal, the (unchanged) version
    the message was refused at, with `event_type` None and `rejected` the reason.
    """

    version: int
    at_ms: int
    event_type: str | None = None
    event_schema_version: int | None = None
    event: Any = None
    cause: MessageSummary | None = None
    rejected: str | None = None
    error: str | None = None
    """Why the stored event could not be read, if it could not."""


class FieldChange(msgspec.Struct, frozen=True, kw_only=True):
    """One difference between two values: `path` like `items[2].price`; `before`/`after` are
    None where the field is absent on that side."""

    path: str
    change: Literal["changed", "added", "removed"]
    before: Any = None
    after: Any = None


class HandledEntry(msgspec.Struct, frozen=True, kw_only=True):
    """An entry of an actor's handled-message stream (written by commit.lua)."""

    entry_id: str
    message: bytes
    at_ms: int
    from_version: int
    to_version: int
    rejected: str

    @property
    def refused(self) -> bool:
        return self.from_version == self.to_version and self.rejected != ""


# Opening a namespace.


@asynccontextmanager
async def open_namespace(
    system: ActorSystem | None = None,
    *,
    app: str | None = None,
    partitions: int | None = None,
    url: str | None = None,
    data_dir: str | Path | None = None,
) -> AsyncIterator[ActorSystem]:
    """A connected ActorSystem for reading (and importing into) a namespace.

    Give the system (its actor code folds states and re-runs handlers) or just its `app` name
    (enough for timelines, structural verification, export and import); then the partition
    count is read from the keys unless given. With no `url`, the embedded server of `data_dir`
    is used, started for the duration if it is not running (the data of stopped nodes stays
    readable) and stopped again afterwards only if started here.
    """
    if (system is None) == (app is None):
        raise ReplayError("give either the actor system (MODULE:SYSTEM) or its app name")
    url = url if url is not None else (system.url if system is not None else None)
    folder = Path(data_dir) if data_dir is not None else None
    if folder is None:
        folder = system.data_dir if system is not None else Path(".repertory")
    server = None
    if url is None:
        from repertory.streams.embedded import EmbeddedServer

        server = EmbeddedServer(folder)
        await anyio.to_thread.run_sync(server.start)
        url = server.url
    client = create_client(url)
    try:
        if system is not None:
            layout = system.keys
            if partitions is not None:
                layout = KeyLayout(layout.app, partitions=partitions, per_kind=layout.per_kind)
            actors = system.actors.values()
            opened = ActorSystem(*actors, app=layout.app, codec=system.codec, client=client)
        else:
            assert app is not None
            layout = (
                KeyLayout(app, partitions=partitions)
                if partitions is not None
                else await discover_layout(client, app)
            )
            opened = ActorSystem(app=app, client=client)
        opened.keys = layout
        yield opened
    finally:
        await client.aclose()
        if server is not None and server.started_here:
            await anyio.to_thread.run_sync(server.stop)


async def _scan(client: RedisClient, pattern: str) -> AsyncIterator[str]:
    async for key in client.scan_iter(match=pattern, count=1000):
        yield key.decode() if isinstance(key, bytes) else str(key)


async def discover_layout(client: RedisClient, app: str) -> KeyLayout:
    """The key layout of `app` as its keys show it: each kind's partition count is one more
    than the highest partition number among its keys (a node creates the keys of every
    partition it owns). `actors_of` then rejects the layout if any actor's key disagrees."""
    probe = KeyLayout(app)
    highest: dict[str, int] = {}
    async for key in _scan(client, probe.kind_pattern("*")):
        try:
            kind, partition, _ = probe.parse_key(key)
        except KeyLayoutError:
            continue  # task queues and reply streams share the app's prefix
        highest[kind] = max(partition, highest.get(kind, 0))
    return KeyLayout(app, per_kind={kind: top + 1 for kind, top in highest.items()})


async def kinds_of(system: ActorSystem) -> list[str]:
    """The actor kinds that have data in the namespace, and those the system hosts, sorted."""
    found = set(system.actors)
    async for key in _scan(system.client, system.keys.kind_pattern("*")):
        try:
            kind, _, _ = system.keys.parse_key(key)
        except KeyLayoutError:
            continue
        found.add(kind)
    return sorted(found)


async def actors_of(system: ActorSystem, kind: str) -> list[Address]:
    """The actors of `kind` with events or handled messages, sorted by id (so that reports and
    exports come out in the same order every time; only the ids are held)."""
    keys = system.keys
    ids: set[str] = set()
    for pattern, prefix in (
        (keys.events_pattern(kind), "ev:"),
        (keys.handled_pattern(kind), "msg:"),
    ):
        async for key in _scan(system.client, pattern):
            _, partition, rest = keys.parse_key(key)
            actor_id = rest.removeprefix(prefix)
            expected = keys.partition_of(Address(kind, actor_id))
            if partition != expected:
                raise ReplayError(
                    f"{kind}/{actor_id} is stored in partition {partition}, but with "
                    f"{keys.partitions_of(kind)} partitions it would be in {expected}: "
                    "give the namespace's partition count (--partitions)"
                )
            ids.add(actor_id)
    return [Address(kind, actor_id) for actor_id in sorted(ids)]


# Reading the streams.


async def raw_event_batches(
    system: ActorSystem, address: Address, start: int = 1, stop: int | None = None
) -> AsyncIterator[list[tuple[bytes, bytes]]]:
    """(entry id, encoded record) of the actor's event stream, undecoded, a batch (one XRANGE)
    at a time: for tools that must show a corrupt entry rather than stop at it. A missing
    record field gives b""."""
    async for entry_ids, records in system.store.entry_batches(address, start, stop):
        yield list(zip(entry_ids, records, strict=True))


async def raw_events(
    system: ActorSystem, address: Address, start: int = 1, stop: int | None = None
) -> AsyncIterator[tuple[bytes, bytes]]:
    """`raw_event_batches` one entry at a time."""
    async for batch in raw_event_batches(system, address, start, stop):
        for entry in batch:
            yield entry


def parse_entry_id(entry_id: bytes) -> tuple[int, int]:
    milliseconds, _, sequence = entry_id.partition(b"-")
    return int(milliseconds), int(sequence or 0)


def _handled_entry(entry_id: bytes, fields: dict[bytes, bytes]) -> HandledEntry:
    return HandledEntry(
        entry_id=entry_id.decode(),
        message=fields.get(b"m", b""),
        at_ms=int(fields.get(b"at", 0)),
        from_version=int(fields.get(b"from", 0)),
        to_version=int(fields.get(b"to", 0)),
        rejected=fields.get(b"rejected", b"").decode(errors="replace"),
    )


async def handled_messages(
    system: ActorSystem, address: Address, after: str = "-"
) -> AsyncIterator[HandledEntry]:
    """The messages the actor handled, in the order it handled them, after entry id `after`."""
    key = system.keys.handled(address)
    lower = after if after == "-" else f"({after}"
    while True:
        entries = await system.client.xrange(key, lower, "+", count=READ_BATCH)
        for entry_id, fields in entries:
            yield _handled_entry(entry_id, fields)
        if len(entries) < READ_BATCH:
            return
        lower = f"({entries[-1][0].decode()}"


def summarize_message(codec: Codec, data: bytes) -> MessageSummary:
    try:
        envelope = codec.decode_envelope(data)
    except DecodeError as error:
        return MessageSummary(id="", type="", schema_version=0, payload=None, error=str(error))
    payload, problem = _plain(codec, envelope.payload)
    return MessageSummary(
        id=envelope.id,
        type=envelope.type,
        schema_version=envelope.schema_version,
        payload=payload,
        sender=envelope.sender,
        error=problem,
    )


def _plain(codec: Codec, raw: msgspec.Raw) -> tuple[Any, str | None]:
    """A payload as plain data, or None and why it cannot be read."""
    try:
        return codec.plain(raw), None
    except DecodeError as error:
        return None, str(error)


def _event_entry(
    codec: Codec, version: int, data: bytes, cause: MessageSummary | None
) -> TimelineEntry:
    try:
        record = codec.decode_event(data)
    except DecodeError as error:
        return TimelineEntry(version=version, at_ms=0, cause=cause, error=str(error))
    payload, error_text = _plain(codec, record.payload)
    return TimelineEntry(
        version=version,
        at_ms=record.recorded_at,
        event_type=record.type,
        event_schema_version=record.schema_version,
        event=payload,
        cause=cause,
        error=error_text,
    )


class _TimelineReader:
    """Merges an actor's event stream with its handled-message stream, resumably: each `read`
    continues where the previous one stopped (which is what `follow` needs)."""

    def __init__(self, system: ActorSystem, address: Address, start: int) -> None:
        self.system = system
        self.address = address
        self.start = max(start, 1)
        self.next_version = self.start
        self.last_handled = "-"
        self.pending: deque[HandledEntry] = deque()
        self.exhausted = False
        self.cause: tuple[HandledEntry, MessageSummary] | None = None

    async def _peek(self) -> HandledEntry | None:
        if not self.pending and not self.exhausted:
            key = self.system.keys.handled(self.address)
            lower = "-" if self.last_handled == "-" else f"({self.last_handled}"
            entries = await self.system.client.xrange(key, lower, "+", count=READ_BATCH)
            self.pending.extend(_handled_entry(entry_id, fields) for entry_id, fields in entries)
            if entries:
                self.last_handled = entries[-1][0].decode()
            self.exhausted = len(entries) < READ_BATCH
        return self.pending[0] if self.pending else None

    def _refusal(self, handled: HandledEntry) -> TimelineEntry:
        return TimelineEntry(
            version=handled.from_version,
            at_ms=handled.at_ms,
            cause=summarize_message(self.system.codec, handled.message),
            rejected=handled.rejected,
        )

    async def _handled_before(self, version: int) -> AsyncIterator[TimelineEntry]:
        """Refusals that came before event `version`; drops handled entries that end before it."""
        while (handled := await self._peek()) is not None:
            if handled.refused and handled.from_version < version:
                if handled.from_version >= self.start - 1:
                    yield self._refusal(handled)
            elif handled.to_version >= version:
                return
            self.pending.popleft()

    async def read(self, stop: int | None = None) -> AsyncIterator[TimelineEntry]:
        """The entries from where the last read ended up to event `stop` (or the end)."""
        self.exhausted = False  # new handled entries may have been committed since
        codec = self.system.codec
        async for entry_id, data in raw_events(self.system, self.address, self.next_version, stop):
            version, _ = parse_entry_id(entry_id)
            async for refusal in self._handled_before(version):
                yield refusal
            handled = await self._peek()
            cause = None
            if handled is not None and handled.from_version < version <= handled.to_version:
                if self.cause is None or self.cause[0] is not handled:
                    self.cause = (handled, summarize_message(codec, handled.message))
                cause = self.cause[1]
            yield _event_entry(codec, version, data, cause)
            self.next_version = version + 1
        limit = self.next_version if stop is None else min(self.next_version, stop)
        async for refusal in self._handled_before(limit):
            yield refusal


async def timeline(
    system: ActorSystem, target: Address | str, start: int = 1, stop: int | None = None
) -> AsyncIterator[TimelineEntry]:
    """The actor's events from version `start` to `stop` (inclusive), each with the message
    that caused it, and the messages it refused in between, in the order they happened."""
    address = _address(target)
    async for entry in _TimelineReader(system, address, start).read(stop):
        yield entry


async def follow(
    system: ActorSystem, target: Address | str, start: int = 1
) -> AsyncIterator[TimelineEntry]:
    """The timeline from `start`, then each new entry as it is committed (blocking reads of
    both streams, so nothing is polled); runs until the caller stops iterating."""
    address = _address(target)
    reader = _TimelineReader(system, address, start)
    keys = system.keys
    while True:
        async for entry in reader.read():
            yield entry
        # Wait for anything newer than what was read; the commit writes both streams at once.
        streams = {
            keys.events(address): f"{reader.next_version - 1}-0",
            keys.handled(address): "0-0" if reader.last_handled == "-" else reader.last_handled,
        }
        await system.client.xread(streams, count=1, block=FOLLOW_BLOCK_MS)


# States.


def _address(target: Address | str) -> Address:
    return Address.parse(target) if isinstance(target, str) else target


def actor_for(system: ActorSystem, address: Address) -> Actor[Any]:
    actor = system.actors.get(address.kind)
    if actor is None:
        raise ReplayError(
            f"no actor code for kind {address.kind!r}: states and checks need the system that "
            "hosts it (MODULE:SYSTEM)"
        )
    return actor


async def states_at(
    system: ActorSystem, target: Address | str, versions: Iterable[int]
) -> dict[int, ActorView]:
    """The actor's state at each of `versions`, folded from its events in one pass (snapshots
    are not used: this is what the log says, whatever a snapshot holds)."""
    address = _address(target)
    actor = actor_for(system, address)
    wanted = sorted(set(versions))
    if not wanted:
        return {}
    if wanted[0] < 0:
        raise ReplayError(f"a version must be >= 0, got {wanted[0]}")
    current = await system.store.version(address)
    if wanted[-1] > current:
        raise ReplayError(f"{address} is at version {current}; there is no version {wanted[-1]}")
    views: dict[int, ActorView] = {}
    state, version = actor.initial, 0
    remaining = deque(wanted)
    while remaining and remaining[0] == 0:
        views[remaining.popleft()] = ActorView(0, state)
    decode = system.codec.decode_event_payloads
    # A decoded batch at a time, folded up to each wanted version inside it: no per-event
    # Python work but the appliers.
    stop = wanted[-1] if remaining else 0
    async for batch in system.store.entry_batches(address, 1, stop):
        if not batch.runs_from(version + 1):
            break  # a gap: reported below
        events = decode(batch.records)
        base, folded = version, 0  # events[i] is version base + i + 1
        while remaining and remaining[0] <= base + len(events):
            version = remaining.popleft()
            state = actor.fold(state, events[folded : version - base])
            folded = version - base
            views[version] = ActorView(version, state)
        if not remaining:
            break
        state = actor.fold(state, events[folded:])
        version = base + len(events)
    if remaining:
        raise ReplayError(f"{address}: the log has no event {remaining[0]} (a gap: run verify)")
    return views


async def state_at(system: ActorSystem, target: Address | str, version: int) -> ActorView:
    """The actor's state after its first `version` events (0: its initial state)."""
    return (await states_at(system, target, [version]))[version]


async def state_at_time(system: ActorSystem, target: Address | str, at_ms: int) -> ActorView:
    """The actor's state after the last event recorded at or before `at_ms` (unix ms): the
    events are folded up to the first one recorded later. Clocks of different nodes may
    disagree, so times are not always increasing along a log; a prefix of the log is the only
    state the actor ever had, hence the first later event ends it."""
    address = _address(target)
    actor = actor_for(system, address)
    state, version = actor.initial, 0
    async for stored in system.store.read(address):
        if stored.record.recorded_at > at_ms:
            break
        state, version = actor.apply(state, stored.event), stored.version
    return ActorView(version, state)


# Below this an integer is a version, from it on unix milliseconds: no log has 10**11 events,
# and 10**11 ms is March 1973.
EPOCH_MS_FROM = 10**11


def parse_time(text: str) -> int:
    """Unix milliseconds from an ISO 8601 time (UTC unless it gives an offset; `Z` accepted)
    or from a number of milliseconds."""
    cleaned = text.strip()
    if cleaned.isdigit():
        return int(cleaned)
    try:
        moment = datetime.datetime.fromisoformat(cleaned.replace("Z", "+00:00"))
    except ValueError:
        raise ReplayError(
            f"{text!r} is neither an ISO 8601 time (2026-11-23T11:51:15.841) nor unix ms"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return int(moment.timestamp() * 1000)


def parse_moment(text: str) -> tuple[Literal["version", "time"], int]:
    """What `replay --at` names: a version (an integer below EPOCH_MS_FROM), else a time."""
    cleaned = text.strip()
    if cleaned.isdigit() and int(cleaned) < EPOCH_MS_FROM:
        return "version", int(cleaned)
    return "time", parse_time(cleaned)


def diff_values(before: Any, after: Any, path: str = "") -> list[FieldChange]:
    """The differences between two values, field by field (structs and dicts by key, lists by
    position), as plain data."""
    return _diff(msgspec.to_builtins(before), msgspec.to_builtins(after), path)


def _diff(before: Any, after: Any, path: str) -> list[FieldChange]:
    if isinstance(before, dict) and isinstance(after, dict):
        changes: list[FieldChange] = []
        for key in [*before, *(key for key in after if key not in before)]:
            inner = f"{path}.{key}" if path else str(key)
            if key not in after:
                changes.append(FieldChange(path=inner, change="removed", before=before[key]))
            elif key not in before:
                changes.append(FieldChange(path=inner, change="added", after=after[key]))
            else:
                changes.extend(_diff(before[key], after[key], inner))
        return changes
    if isinstance(before, list) and isinstance(after, list):
        changes = []
        for index, (old, new) in enumerate(itertools.zip_longest(before, after)):
            inner = f"{path}[{index}]"
            if index >= len(after):
                changes.append(FieldChange(path=inner, change="removed", before=old))
            elif index >= len(before):
                changes.append(FieldChange(path=inner, change="added", after=new))
            else:
                changes.extend(_diff(old, new, inner))
        return changes
    if before == after and type(before) is type(after):
        return []
    return [FieldChange(path=path or "(value)", change="changed", before=before, after=after)]


def diff_states(before: ActorView, after: ActorView) -> list[FieldChange]:
    return diff_values(before.state, after.state)


# The determinism check (G7).


DivergenceKind = Literal[
    "event-field",
    "event-type",
    "missing-event",
    "extra-event",
    "rejection",
    "handler-error",
    "undecodable-event",
    "undecodable-message",
    "applier-error",
    "history",
]


class Divergence(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Where today's code first stops reproducing an actor's recorded history.

    `version` is the actor version the message was handled at (its events start at
    version + 1); `event_version` is the version of the first differing event; `fields`
    compares the recorded event (before) with the produced one (after).
    """

    address: str
    kind: DivergenceKind
    detail: str
    version: int
    event_version: int | None = None
    message_id: str | None = None
    message_type: str | None = None
    recorded_type: str | None = None
    produced_type: str | None = None
    fields: list[FieldChange] = []


class ActorCheck(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The check of one actor: how much was replayed and the first divergence, if any."""

    address: str
    messages: int
    events: int
    divergence: Divergence | None = None


class _Decoded(msgspec.Struct, frozen=True):
    version: int
    record: EventRecord | None
    event: msgspec.Struct | None
    error: str | None


class _EventCursor:
    """The actor's events one at a time, each decoded on its own, so that one event today's
    code cannot read is reported rather than ending the stream."""

    def __init__(self, system: ActorSystem, address: Address) -> None:
        self.codec = system.codec
        self.entries = aiter(raw_events(system, address))

    async def next(self) -> _Decoded | None:
        try:
            entry_id, data = await anext(self.entries)
        except StopAsyncIteration:
            return None
        version, _ = parse_entry_id(entry_id)
        try:
            record = self.codec.decode_event(data)
            return _Decoded(version, record, self.codec.event_of(record), None)
        except DecodeError as error:
            return _Decoded(version, None, None, str(error))


class _Replay:
    """The state of one actor's check: the recorded state and version, folded as it goes."""

    def __init__(self, system: ActorSystem, address: Address) -> None:
        self.system = system
        self.address = address
        self.actor = actor_for(system, address)
        self.cursor = _EventCursor(system, address)
        self.state: Any = self.actor.initial
        self.version = 0
        self.events = 0

    def diverge(self, kind: DivergenceKind, detail: str, **details: Any) -> Divergence:
        return Divergence(
            address=str(self.address), kind=kind, detail=detail, version=self.version, **details
        )

    async def take(self) -> _Decoded | Divergence:
        """The next recorded event, folded in."""
        decoded = await self.cursor.next()
        if decoded is None:
            return self.diverge("history", f"the log ends at version {self.version}")
        return self.fold(decoded)

    def fold(self, decoded: _Decoded) -> _Decoded | Divergence:
        if decoded.version != self.version + 1:
            return self.diverge(
                "history", f"event {decoded.version} follows {self.version} (a gap: run verify)"
            )
        if decoded.event is None or decoded.record is None:
            return self.diverge(
                "undecodable-event",
                f"event {decoded.version}: {decoded.error}",
                event_version=decoded.version,
            )
        try:
            self.state = self.actor.apply(self.state, decoded.event)
        except Exception as error:
            return self.diverge(
                "applier-error",
                f"applying event {decoded.version} ({decoded.record.type}) raised {error!r}",
                event_version=decoded.version,
                recorded_type=decoded.record.type,
            )
        self.version = decoded.version
        self.events += 1
        return decoded

    async def message(self, handled: HandledEntry) -> Divergence | None:
        """Re-run one handled message and compare; then fold the recorded events."""
        while self.version < handled.from_version:  # events no message caused (an import)
            taken = await self.take()
            if isinstance(taken, Divergence):
                return taken
        if self.version != handled.from_version:
            return self.diverge(
                "history",
                f"message {handled.entry_id} was handled at version {handled.from_version}, "
                f"after version {self.version} was recorded",
            )
        codec = self.system.codec
        try:
            envelope = codec.decode_envelope(handled.message)
            message = codec.message_of(envelope)
        except DecodeError as error:
            return self.diverge("undecodable-message", f"message {handled.entry_id}: {error}")
        about = {"message_id": envelope.id, "message_type": envelope.type}
        # The recorded clock and ids, as the node gave them: a handler sees what it saw then.
        ctx = Context(
            self.address,
            self.version,
            envelope.id,
            handled.at_ms,
            correlation_id=envelope.correlation_id or envelope.id,
        )
        refusal: str | None = None
        try:
            produced = await self.actor.handle(self.state, message, ctx)
        except Rejected as rejected:
            produced, refusal = [], rejected.reason
        except Exception as error:
            return self.diverge("handler-error", f"the handler raised {error!r}", **about)
        recorded_refusal = handled.rejected if handled.refused else None
        if refusal != recorded_refusal:
            then = f"refused ({recorded_refusal})" if recorded_refusal is not None else "accepted"
            now = f"refuses it ({refusal})" if refusal is not None else "accepts it"
            return self.diverge("rejection", f"recorded: {then}; today's code {now}", **about)
        start = self.version
        recorded: list[_Decoded] = []
        while self.version < handled.to_version:
            taken = await self.take()
            if isinstance(taken, Divergence):
                return taken
            recorded.append(taken)
        return self._compare(start, recorded, produced, about)

    async def skip(self, handled: HandledEntry) -> Divergence | None:
        """Fold the events a message recorded without re-running it (before `--since`)."""
        while self.version < handled.to_version:
            taken = await self.take()
            if isinstance(taken, Divergence):
                return taken
        return None

    def _compare(
        self,
        start: int,
        recorded: Sequence[_Decoded],
        produced: Sequence[msgspec.Struct],
        about: dict[str, Any],
    ) -> Divergence | None:
        registry = self.system.codec.registry
        pairs = itertools.zip_longest(recorded, produced)
        for version, (old, new) in enumerate(pairs, start=start + 1):
            new_type = None if new is None else registry.info_for(type(new)).name
            old_type = None if old is None or old.record is None else old.record.type
            details = dict(about, event_version=version)
            details.update(recorded_type=old_type, produced_type=new_type, version=start)
            if old is None:
                detail = f"today's code also produces {new_type} as event {version}"
                return self._at("extra-event", detail, details)
            if new is None:
                detail = f"today's code no longer produces event {version} ({old_type})"
                return self._at("missing-event", detail, details)
            if old_type != new_type:
                detail = f"event {version} was {old_type}, today's code produces {new_type}"
                return self._at("event-type", detail, details)
            fields = diff_values(old.event, new)
            if fields:
                names = ", ".join(change.path for change in fields)
                detail = f"event {version} ({old_type}) differs in {names}"
                return self._at("event-field", detail, dict(details, fields=fields))
        return None

    def _at(self, kind: DivergenceKind, detail: str, details: dict[str, Any]) -> Divergence:
        return Divergence(address=str(self.address), kind=kind, detail=detail, **details)


async def check_actor(
    system: ActorSystem, target: Address | str, *, since_ms: int | None = None
) -> ActorCheck:
    """Re-run every message the actor handled through today's handlers, each from the state
    the recorded events give before it, and compare what they produce with what was recorded.
    Stops at the first divergence (later ones usually follow from it); events after the last
    message are still decoded and folded, to report any that today's code cannot read.

    With `since_ms`, messages handled before that time are not re-run: their recorded events
    are only folded, to give the later ones the state they saw."""
    address = _address(target)
    replay = _Replay(system, address)
    messages = 0
    divergence: Divergence | None = None
    async for handled in handled_messages(system, address):
        if since_ms is not None and handled.at_ms < since_ms:
            divergence = await replay.skip(handled)
            if divergence is not None:
                break
            continue
        divergence = await replay.message(handled)
        if divergence is not None:
            break
        messages += 1
    else:
        while (decoded := await replay.cursor.next()) is not None:
            folded = replay.fold(decoded)
            if isinstance(folded, Divergence):
                divergence = folded
                break
    return ActorCheck(
        address=str(address), messages=messages, events=replay.events, divergence=divergence
    )


async def check(
    system: ActorSystem,
    *,
    kind: str | None = None,
    actor_id: str | None = None,
    since_ms: int | None = None,
) -> AsyncIterator[ActorCheck]:
    """`check_actor` on every actor of the system (or of one kind, or one actor)."""
    kinds = [kind] if kind is not None else sorted(system.actors)
    for name in kinds:
        if name not in system.actors:
            raise ReplayError(
                f"the system hosts no kind {name!r} (it hosts {sorted(system.actors)})"
            )
        addresses = (
            [Address(name, actor_id)] if actor_id is not None else await actors_of(system, name)
        )
        for address in addresses:
            yield await check_actor(system, address, since_ms=since_ms)
