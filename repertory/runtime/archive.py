"""Whole-namespace tools behind `repertory verify`, `repertory export` and `repertory import`.

- `verify`: versions contiguous, every event decodable and upcastable by today's code, every
  snapshot equal to a replay of the events up to its version;
- `export_lines` / `import_lines`: the namespace as JSON lines, byte-exact (each stored record
  travels as base64, next to a readable `view` for people and `jq`), so that export, import into
  an empty namespace and export again give the same file.

Both stream: a log is read a batch at a time and folded as it goes, never held whole.
"""

from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from typing import Any, Literal

import msgspec

from repertory.actors.model import Actor
from repertory.runtime.replay import (
    ReplayError,
    actors_of,
    diff_values,
    handled_messages,
    kinds_of,
    parse_entry_id,
    raw_events,
)
from repertory.runtime.system import ActorSystem
from repertory.schemas import Codec, Envelope, EventRecord, SnapshotRecord
from repertory.schemas.errors import DecodeError, RepertoryError
from repertory.streams.eventstore import ConflictError, EntryBatch
from repertory.streams.keys import Address, KeyLayoutError

EXPORT_FORMAT = "repertory-export"
EXPORT_VERSION = 1
IMPORT_BATCH = 500
MAX_REPORTED_PROBLEMS = 1000

# Verification.

ProblemKind = Literal[
    "gap",
    "undecodable-event",
    "applier-error",
    "undecodable-snapshot",
    "stale-snapshot",
    "snapshot-ahead",
]


class Problem(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One thing wrong in the store: where (actor, version) and what."""

    address: str
    kind: ProblemKind
    detail: str
    version: int | None = None


class VerifyReport(msgspec.Struct, kw_only=True):
    """What `verify` read and what it found. `problem_count` counts every problem; `problems`
    keeps the first MAX_REPORTED_PROBLEMS of them."""

    actors: int = 0
    events: int = 0
    snapshots: int = 0
    problems: list[Problem] = []
    problem_count: int = 0
    unchecked_kinds: list[str] = []
    """Kinds with data but no actor code here: only their structure was verified."""

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    def add(self, problem: Problem) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_REPORTED_PROBLEMS:
            self.problems.append(problem)


Progress = Callable[[int], None]


async def count_events(system: ActorSystem, addresses: Iterable[Address]) -> int:
    """The number of events of these actors (one XLEN each): the total of a progress bar."""
    total = 0
    for address in addresses:
        total += await system.store.version(address)
    return total


async def plan(system: ActorSystem, kind: str | None = None) -> list[Address]:
    """The actors that `verify` or `export` visit, kind by kind, each kind sorted by id."""
    kinds = [kind] if kind is not None else await kinds_of(system)
    return [address for name in kinds for address in await actors_of(system, name)]


async def verify(
    system: ActorSystem,
    addresses: Iterable[Address] | None = None,
    *,
    progress: Progress | None = None,
) -> VerifyReport:
    """Verify the store of the given actors (default: every actor of the namespace).

    Kinds the system has code for are decoded, upcast and folded, and their snapshots compared
    with the fold; other kinds get the structural checks only (contiguous versions, readable
    records and payloads, snapshots not ahead of the log). `progress` is called with the number
    of events read since its last call.
    """
    report = VerifyReport()
    unchecked: set[str] = set()
    for address in await plan(system) if addresses is None else addresses:
        report.actors += 1
        if address.kind not in system.actors:
            unchecked.add(address.kind)
        await _verify_actor(system, address, report, progress)
    report.unchecked_kinds = sorted(unchecked)
    return report


async def _verify_actor(
    system: ActorSystem, address: Address, report: VerifyReport, progress: Progress | None
) -> None:
    codec = system.codec
    actor = system.actors.get(address.kind)
    name = str(address)
    snapshot_version, snapshot_state = await _load_snapshot(system, address, report)
    state = None if actor is None else actor.initial
    folding = actor is not None  # until a gap or an unreadable event makes the fold meaningless
    expected = 1
    if snapshot_version == 0 and folding:
        _compare_snapshot(name, 0, state, snapshot_state, report)
    async for batch in system.store.entry_batches(address, 1, None):
        report.events += len(batch.records)
        decoded = _decode_run(codec, batch, expected) if folding else None
        if decoded is not None:
            # The common case, a whole batch sound: decoded in one pass of msgspec calls and
            # folded in one call, or two when the snapshot's version falls in the batch.
            assert actor is not None
            end = expected + len(decoded)
            rest, rest_from = decoded, expected
            if snapshot_version is not None and expected <= snapshot_version < end:
                cut = snapshot_version - expected + 1
                state, folding = _fold(codec, actor, state, decoded[:cut], expected, name, report)
                if folding:
                    _compare_snapshot(name, snapshot_version, state, snapshot_state, report)
                rest, rest_from = decoded[cut:], snapshot_version + 1
            if folding and rest:
                state, folding = _fold(codec, actor, state, rest, rest_from, name, report)
            expected = end
        else:
            # Entry by entry, to report each problem where it is.
            for entry_id, data in zip(batch.entry_ids, batch.records, strict=True):
                version, sequence = parse_entry_id(entry_id)
                if version != expected or sequence != 0:
                    detail = f"expected version {expected}, found entry {entry_id.decode()}"
                    report.add(Problem(address=name, kind="gap", detail=detail, version=expected))
                    folding = False
                expected = version + 1
                try:
                    record = codec.decode_event(data)
                    if actor is None:
                        codec.plain(record.payload)
                        continue
                    event = codec.event_of(record)
                except DecodeError as error:
                    report.add(
                        Problem(
                            address=name,
                            kind="undecodable-event",
                            detail=str(error),
                            version=version,
                        )
                    )
                    folding = False
                    continue
                if not folding or actor is None:
                    continue
                try:
                    state = actor.apply(state, event)
                except Exception as error:
                    detail = f"applying {record.type} raised {error!r}"
                    report.add(
                        Problem(address=name, kind="applier-error", detail=detail, version=version)
                    )
                    folding = False
                    continue
                if version == snapshot_version:
                    _compare_snapshot(name, version, state, snapshot_state, report)
        if progress is not None:
            progress(len(batch))
    if snapshot_version is not None and snapshot_version >= expected:
        detail = f"the snapshot is at version {snapshot_version}, the log ends at {expected - 1}"
        report.add(
            Problem(address=name, kind="snapshot-ahead", detail=detail, version=snapshot_version)
        )


def _decode_run(codec: Codec, batch: EntryBatch, expected: int) -> list[msgspec.Struct] | None:
    """The batch's events if its versions run on from `expected` without a gap and every entry
    decodes; else None (the caller then looks at each entry)."""
    if not batch.runs_from(expected):
        return None
    try:
        return codec.decode_event_payloads(batch.records)
    except DecodeError:
        return None


def _fold(
    codec: Codec,
    actor: Actor[Any],
    state: Any,
    events: list[msgspec.Struct],
    first: int,
    name: str,
    report: VerifyReport,
) -> tuple[Any, bool]:
    """`events` (versions `first`, ...) folded onto `state`, and whether that worked; if an
    applier raised, the problem is reported at the event that raised."""
    try:
        return actor.fold(state, events), True
    except Exception as error:
        failure = error
    # Again event by event, to find the one that raised.
    detail = f"applying events {first} to {first + len(events) - 1} raised {failure!r}"
    failed_at = first
    for version, event in enumerate(events, start=first):
        try:
            state = actor.apply(state, event)
        except Exception as error:
            detail = f"applying {codec.registry.info_for(type(event)).name} raised {error!r}"
            failed_at = version
            break
    report.add(Problem(address=name, kind="applier-error", detail=detail, version=failed_at))
    return state, False


async def _load_snapshot(
    system: ActorSystem, address: Address, report: VerifyReport
) -> tuple[int | None, Any]:
    """The snapshot's version and state (None for a state this code cannot read)."""
    data = await system.client.hget(system.keys.snapshots_of(address), address.id)
    if data is None:
        return None, None
    report.snapshots += 1
    codec = system.codec
    try:
        record = codec.decode_snapshot(data)
        if address.kind not in system.actors:
            codec.plain(record.payload)
            return record.version, None
        return record.version, codec.state_of(record)
    except DecodeError as error:
        report.add(Problem(address=str(address), kind="undecodable-snapshot", detail=str(error)))
        return None, None


def _compare_snapshot(
    name: str, version: int, replayed: Any, saved: Any, report: VerifyReport
) -> None:
    changes = diff_values(replayed, saved)
    if changes:
        fields = "; ".join(
            f"{change.path}: replay {change.before!r}, snapshot {change.after!r}"
            for change in changes
        )
        detail = f"the snapshot at version {version} differs from the replay: {fields}"
        report.add(Problem(address=name, kind="stale-snapshot", detail=detail, version=version))


# Export and import.


class ImportFileError(RepertoryError):
    """An export file that cannot be imported, or a namespace that is not empty."""


class Header(msgspec.Struct, frozen=True, tag="header", tag_field="record"):
    format: str = EXPORT_FORMAT
    version: int = EXPORT_VERSION


class EventLine(msgspec.Struct, frozen=True, tag="event", tag_field="record", kw_only=True):
    actor: str
    version: int
    data: bytes
    view: Any = None


class SnapshotLine(msgspec.Struct, frozen=True, tag="snapshot", tag_field="record", kw_only=True):
    actor: str
    version: int
    data: bytes
    view: Any = None


class HandledLine(msgspec.Struct, frozen=True, tag="handled", tag_field="record", kw_only=True):
    actor: str
    at: int
    from_version: int
    to_version: int
    rejected: str
    data: bytes
    view: Any = None


Line = Header | EventLine | SnapshotLine | HandledLine


def _view(
    codec: Codec, decode: Callable[[bytes], Envelope | EventRecord | SnapshotRecord], data: bytes
) -> Any:
    """A readable rendering of a stored record, its payload as plain data; never fails."""
    try:
        record = decode(data)
        view: dict[str, Any] = {
            name: getattr(record, name)
            for name in record.__struct_fields__
            if name != "payload" and getattr(record, name) is not None
        }
        view["payload"] = codec.plain(record.payload)
    except DecodeError as error:
        return {"error": str(error)}
    return view


async def export_lines(
    system: ActorSystem,
    addresses: Iterable[Address] | None = None,
    *,
    progress: Progress | None = None,
) -> AsyncIterator[bytes]:
    """The namespace (or these actors) as JSON lines, one per item, each ending in a newline: a
    header, then
    per actor its events in order, its snapshot and its handled messages."""
    codec = system.codec
    encoder = msgspec.json.Encoder()
    yield encoder.encode(Header()) + b"\n"
    for address in await plan(system) if addresses is None else addresses:
        name = str(address)
        async for entry_id, data in raw_events(system, address):
            version, _ = parse_entry_id(entry_id)
            view = _view(codec, codec.decode_event, data)
            line = EventLine(actor=name, version=version, data=data, view=view)
            yield encoder.encode(line) + b"\n"
            if progress is not None:
                progress(1)
        snapshot = await system.client.hget(system.keys.snapshots_of(address), address.id)
        if snapshot is not None:
            view = _view(codec, codec.decode_snapshot, snapshot)
            version = view.get("version", 0) if isinstance(view, dict) else 0
            snapshot_line = SnapshotLine(actor=name, version=version, data=snapshot, view=view)
            yield encoder.encode(snapshot_line) + b"\n"
        async for handled in handled_messages(system, address):
            handled_line = HandledLine(
                actor=name,
                at=handled.at_ms,
                from_version=handled.from_version,
                to_version=handled.to_version,
                rejected=handled.rejected,
                data=handled.message,
                view=_view(codec, codec.decode_envelope, handled.message),
            )
            yield encoder.encode(handled_line) + b"\n"


class ImportReport(msgspec.Struct, kw_only=True):
    actors: int = 0
    events: int = 0
    snapshots: int = 0
    handled: int = 0


async def import_lines(
    system: ActorSystem,
    lines: AsyncIterable[bytes] | Iterable[bytes],
    *,
    progress: Progress | None = None,
) -> ImportReport:
    """Import an export into this namespace; every actor in it must have no data here yet.

    Records are stored byte for byte (each is checked to be a record first); events are
    appended in batches with the expected-version check, so a skipped version fails cleanly.
    """
    importer = _Importer(system, progress)
    number = 0
    async for line in _aiter(lines):
        number += 1
        if not line.strip():
            continue
        try:
            parsed = importer.decoder.decode(line)
        except msgspec.DecodeError as error:
            raise ImportFileError(f"line {number}: not an export line: {error}") from None
        try:
            await importer.take(parsed, number)
        except (DecodeError, ReplayError, KeyLayoutError) as error:
            raise ImportFileError(f"line {number}: {error}") from None
    if number == 0 or not importer.header_seen:
        raise ImportFileError("the file is empty, not a repertory export")
    await importer.flush()
    return importer.report


async def _aiter(lines: AsyncIterable[bytes] | Iterable[bytes]) -> AsyncIterator[bytes]:
    if isinstance(lines, AsyncIterable):
        async for line in lines:
            yield line
    else:
        for line in lines:
            yield line


class _Importer:
    def __init__(self, system: ActorSystem, progress: Progress | None) -> None:
        self.system = system
        self.progress = progress
        self.decoder = msgspec.json.Decoder(Line)
        self.report = ImportReport()
        self.header_seen = False
        self.started: set[str] = set()
        self.batch_actor: Address | None = None
        self.batch_start = 0
        self.batch_line = 0
        self.batch: list[bytes] = []

    async def take(self, line: Line, number: int) -> None:
        if isinstance(line, Header):
            if line.format != EXPORT_FORMAT or line.version != EXPORT_VERSION:
                raise ImportFileError(
                    f"line {number}: a {line.format} v{line.version} file; this code reads "
                    f"{EXPORT_FORMAT} v{EXPORT_VERSION}"
                )
            self.header_seen = True
            return
        if not self.header_seen:
            raise ImportFileError(f"line {number}: the file does not start with an export header")
        address = Address.parse(line.actor)
        if line.actor not in self.started:
            await self.flush()
            await self._require_empty(address)
            self.started.add(line.actor)
            self.report.actors += 1
        if isinstance(line, EventLine):
            await self._event(address, line, number)
            return
        await self.flush()  # events first: a snapshot or message refers to them
        client, keys, codec = self.system.client, self.system.keys, self.system.codec
        if isinstance(line, SnapshotLine):
            codec.decode_snapshot(line.data)
            await client.hset(keys.snapshots_of(address), address.id, line.data)
            self.report.snapshots += 1
        else:
            fields = {
                b"m": line.data,
                b"at": line.at,
                b"from": line.from_version,
                b"to": line.to_version,
                b"rejected": line.rejected,
            }
            await client.xadd(keys.handled(address), fields)
            self.report.handled += 1

    async def _event(self, address: Address, line: EventLine, number: int) -> None:
        self.system.codec.decode_event(line.data)
        contiguous = self.batch_start + len(self.batch) == line.version
        if self.batch and (self.batch_actor != address or not contiguous):
            await self.flush()
        if not self.batch:
            self.batch_actor, self.batch_start, self.batch_line = address, line.version, number
        self.batch.append(line.data)
        if len(self.batch) >= IMPORT_BATCH:
            await self.flush()

    async def flush(self) -> None:
        if not self.batch or self.batch_actor is None:
            return
        try:
            await self.system.store.append_encoded(
                self.batch_actor, self.batch, expected_version=self.batch_start - 1
            )
        except ConflictError as error:
            raise ImportFileError(
                f"line {self.batch_line}: {error} (the file skips a version)"
            ) from None
        self.report.events += len(self.batch)
        if self.progress is not None:
            self.progress(len(self.batch))
        self.batch = []

    async def _require_empty(self, address: Address) -> None:
        client, keys = self.system.client, self.system.keys
        has_events = await client.exists(keys.events(address), keys.handled(address))
        has_snapshot = await client.hexists(keys.snapshots_of(address), address.id)
        if has_events or has_snapshot:
            raise ImportFileError(
                f"{address} already has data in application {keys.app!r}: import into an empty "
                "namespace"
            )
