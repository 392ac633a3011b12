"""Operating a namespace, as a Python API for notebooks and tests and behind `repertory
inspect`, `repertory dead`, `repertory init` and `repertory migrate`.

- `inspect`: the live nodes, each partition's owner and epoch, consumer lag and pending per
  group and consumer, outbox backlog, dead letters and timers;
- `dead_letters` / `dead_letter` / `requeue` / `drop`: the dead-letter streams of every
  partition; a requeue puts the message back on its inbox and removes the dead letter in one
  script call, so it is handled once;
- `init`: every partition's consumer groups and every Lua script, idempotently;
- `migrate`: rewrite stored events and snapshots of old schema versions to the current ones.

How a migration stays safe while nodes run: an actor's stream cannot be edited in place (its
entry ids are its versions, and XADD only appends), so the rewritten stream is built beside it
under the same hash tag (`KeyLayout.migrating`), with the same ids, and swapped in by a script
that first checks that the stream did not grow meanwhile (if it did, the new entries are copied
too and the swap tried again). A rewritten event decodes to exactly what upcasting the old one
gives, so a node that read part of the log before the swap and part after folds the same state,
and the commit script's version check (XLEN) sees the same length. A crash leaves at most a
stale copy, deleted by the next run; actors already migrated have nothing older than the
current version and are skipped, so a run can simply be repeated.
"""

from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import suppress
from typing import NamedTuple

import msgspec
from redis.exceptions import ResponseError

from repertory.runtime.replay import (
    MessageSummary,
    actors_of,
    kinds_of,
    parse_entry_id,
    raw_events,
    summarize_message,
)
from repertory.runtime.system import ActorSystem
from repertory.schemas.errors import DecodeError, RepertoryError
from repertory.streams import scripts
from repertory.streams.client import RedisClient
from repertory.streams.deadletters import DeadLetter, DeadLetters
from repertory.streams.eventstore import EVENT_FIELD
from repertory.streams.inbox import Inbox, as_text
from repertory.streams.keys import Address
from repertory.streams.partition import RELAY_GROUP
from repertory.streams.scripts import REPLACE_FIELD, REQUEUE, SWAP_STREAM, Script

PAGE = 500
COPY_BATCH = 1000
SWAP_ATTEMPTS = 20
MAX_REPORTED_PROBLEMS = 1000

Progress = Callable[[int], None]


class AdminError(RepertoryError):
    """An administrative request that cannot be done: no such dead letter, a wrong reference."""


async def server_time_ms(client: RedisClient) -> int:
    """The server's clock in unix ms: node expiries and leases are on that clock, not ours."""
    seconds, microseconds = await client.time()
    return int(seconds) * 1000 + int(microseconds) // 1000


# Inspecting.


class NodeInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A member of the namespace: `expires_in_ms` until its heartbeat runs out (negative: it
    missed it and is gone, though nobody removed it yet)."""

    id: str
    expires_in_ms: int
    live: bool


class ConsumerInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    pending: int


class PartitionInfo(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One (kind, partition). `initialized` is False when its inbox group does not exist yet
    (no node served it and `init` was not run); `lag` is None when the server cannot tell."""

    kind: str
    partition: int
    owner: str | None = None
    epoch: int = 0
    lease_ms: int | None = None
    """How long the owner's lease still runs (ms)."""
    initialized: bool = True
    inbox: int = 0
    lag: int | None = None
    pending: int = 0
    consumers: list[ConsumerInfo] = []
    outbox: int = 0
    dead_letters: int = 0
    timers: int = 0
    timers_due: int = 0


class KindInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A kind's partitions added up."""

    kind: str
    partitions: int
    owned: int
    lag: int
    pending: int
    outbox: int
    dead_letters: int
    timers: int
    timers_due: int


class InspectReport(msgspec.Struct, frozen=True, kw_only=True):
    app: str
    server_time_ms: int
    nodes: list[NodeInfo]
    kinds: list[KindInfo]
    partitions: list[PartitionInfo]


async def nodes_of(system: ActorSystem, now_ms: int | None = None) -> list[NodeInfo]:
    """The members of the namespace by their heartbeat expiry, on the server's clock."""
    client = system.client
    now = await server_time_ms(client) if now_ms is None else now_ms
    members = await client.zrange(system.keys.nodes(), 0, -1, withscores=True)
    return [
        NodeInfo(id=as_text(member), expires_in_ms=int(score) - now, live=int(score) > now)
        for member, score in members
    ]


async def inspect_partition(
    system: ActorSystem, kind: str, number: int, now_ms: int
) -> PartitionInfo:
    partition = system.partition(kind, number)
    client = system.client
    owner = await partition.owner()
    lease_ms = int(await client.pttl(partition.lease_key)) if owner is not None else None
    inbox = partition.inbox
    try:
        lag = await inbox.lag()
        summary = await inbox.pending()
        initialized = True
    except ResponseError:  # no inbox stream or no group yet
        lag, summary, initialized = None, None, False
    consumers = (
        []
        if summary is None
        else [ConsumerInfo(name=name, pending=count) for name, count in summary.consumers.items()]
    )
    return PartitionInfo(
        kind=kind,
        partition=number,
        owner=owner,
        epoch=await partition.epoch(),
        lease_ms=None if lease_ms is None or lease_ms < 0 else lease_ms,
        initialized=initialized,
        inbox=int(await client.xlen(inbox.stream)),
        lag=lag,
        pending=0 if summary is None else summary.count,
        consumers=consumers,
        # The relay deletes what it forwarded: what is left is the backlog.
        outbox=int(await client.xlen(partition.outbox_key)),
        dead_letters=await partition.dead_letters.count(),
        timers=int(await client.zcard(partition.timers_key)),
        timers_due=int(await client.zcount(partition.timers_key, "-inf", now_ms)),
    )


async def inspect(system: ActorSystem, *, kind: str | None = None) -> InspectReport:
    """A picture of the namespace now: nodes, and every partition of every kind (the kinds the
    system hosts and those with keys in the store)."""
    now = await server_time_ms(system.client)
    kinds = [kind] if kind is not None else await kinds_of(system)
    partitions: list[PartitionInfo] = []
    summaries: list[KindInfo] = []
    for name in kinds:
        infos = [
            await inspect_partition(system, name, number, now)
            for number in range(system.keys.partitions_of(name))
        ]
        partitions.extend(infos)
        summaries.append(
            KindInfo(
                kind=name,
                partitions=len(infos),
                owned=sum(info.owner is not None for info in infos),
                lag=sum(info.lag or 0 for info in infos),
                pending=sum(info.pending for info in infos),
                outbox=sum(info.outbox for info in infos),
                dead_letters=sum(info.dead_letters for info in infos),
                timers=sum(info.timers for info in infos),
                timers_due=sum(info.timers_due for info in infos),
            )
        )
    return InspectReport(
        app=system.keys.app,
        server_time_ms=now,
        nodes=await nodes_of(system, now),
        kinds=summaries,
        partitions=partitions,
    )


# Dead letters.


class DeadLetterRef(NamedTuple):
    """Where a dead letter is: its kind, partition and entry id, written `kind/partition/id`
    (an entry id is unique only within its partition's stream)."""

    kind: str
    partition: int
    id: str

    def __str__(self) -> str:
        return f"{self.kind}/{self.partition}/{self.id}"

    @classmethod
    def parse(
        cls, text: str, *, kind: str | None = None, partition: int | None = None
    ) -> "DeadLetterRef":
        """`kind/partition/id`, or a bare entry id when the kind and partition are given."""
        parts = text.split("/")
        if len(parts) == 1 and kind is not None and partition is not None:
            parts = [kind, str(partition), text]
        if len(parts) != 3 or not parts[1].isdigit() or not _is_entry_id(parts[2]):
            raise AdminError(
                f"{text!r} is not a dead letter: give KIND/PARTITION/ENTRY-ID as `dead list` "
                "shows it (or an entry id with --kind and --partition)"
            )
        return cls(parts[0], int(parts[1]), parts[2])


def _is_entry_id(text: str) -> bool:
    milliseconds, _, sequence = text.partition("-")
    return milliseconds.isdigit() and (sequence == "" or sequence.isdigit())


class DeadLetterView(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A dead letter with where it is and its message as far as it can be read."""

    ref: str
    kind: str
    partition: int
    id: str
    reason: str
    detail: str
    attempts: int
    dead_at: int
    source_stream: str
    source_id: str
    message: MessageSummary
    size: int
    target: str | None = None


def _view(system: ActorSystem, ref: DeadLetterRef, letter: DeadLetter) -> DeadLetterView:
    target: str | None = None
    with suppress(DecodeError):  # summarize_message says why
        target = system.codec.decode_envelope(letter.data).target
    return DeadLetterView(
        ref=str(ref),
        kind=ref.kind,
        partition=ref.partition,
        id=ref.id,
        reason=letter.reason,
        detail=letter.detail,
        attempts=letter.attempts,
        dead_at=letter.dead_at,
        source_stream=letter.source_stream,
        source_id=letter.source_id,
        message=summarize_message(system.codec, letter.data),
        size=len(letter.data),
        target=target,
    )


def _stream(system: ActorSystem, kind: str, partition: int) -> DeadLetters:
    count = system.keys.partitions_of(kind)
    if not 0 <= partition < count:
        raise AdminError(f"kind {kind!r} has partitions 0 to {count - 1}, not {partition}")
    return DeadLetters(system.client, system.keys.dead_letters(kind, partition))


async def dead_letters(
    system: ActorSystem,
    *,
    kind: str | None = None,
    partition: int | None = None,
    reason: str | None = None,
) -> AsyncIterator[DeadLetterView]:
    """Every dead letter (or those of one kind, partition or reason), partition by partition,
    oldest first, read a page at a time."""
    kinds = [kind] if kind is not None else await kinds_of(system)
    for name in kinds:
        numbers = [partition] if partition is not None else range(system.keys.partitions_of(name))
        for number in numbers:
            stream = _stream(system, name, number)
            after: bytes | str = "-"
            while True:
                page = await stream.list(count=PAGE, after=after)
                for letter in page:
                    if reason is None or letter.reason == reason:
                        yield _view(system, DeadLetterRef(name, number, letter.id.decode()), letter)
                if len(page) < PAGE:
                    break
                after = page[-1].id


async def dead_letter(system: ActorSystem, ref: DeadLetterRef) -> DeadLetterView:
    letter = await _stream(system, ref.kind, ref.partition).get(ref.id)
    if letter is None:
        raise AdminError(f"no dead letter {ref} (requeued or dropped already?)")
    return _view(system, ref, letter)


async def requeue(system: ActorSystem, ref: DeadLetterRef) -> str:
    """Put the dead letter's message back on its partition's inbox, exactly as it was received
    (same message id, so the dedupe still applies), and remove the dead letter, in one script
    call. Returns the new inbox entry id. The message's delivery count starts again.

    Refuses a message that is not a readable envelope or not for this partition: requeued, it
    could only be dead-lettered again."""
    view = await dead_letter(system, ref)
    if view.target is None:
        raise AdminError(
            f"{ref}: the message is not a readable envelope ({view.message.error}); drop it"
        )
    try:
        target = Address.parse(view.target)
    except RepertoryError as error:
        raise AdminError(f"{ref}: {error}; drop it") from None
    keys = system.keys
    if target.kind != ref.kind or keys.partition_of(target) != ref.partition:
        raise AdminError(f"{ref}: the message is for {target}, which is not in this partition")
    entry_id = await REQUEUE(
        system.client,
        [keys.dead_letters(ref.kind, ref.partition), keys.inbox(ref.kind, ref.partition)],
        [ref.id],
    )
    if not entry_id:
        raise AdminError(f"no dead letter {ref} (requeued or dropped already?)")
    return as_text(entry_id)


async def drop(system: ActorSystem, ref: DeadLetterRef) -> None:
    """Delete a dead letter for good."""
    removed = await _stream(system, ref.kind, ref.partition).remove(ref.id)
    if not removed:
        raise AdminError(f"no dead letter {ref} (requeued or dropped already?)")


# Initializing.


class InitReport(msgspec.Struct, kw_only=True):
    groups_created: list[str] = []
    groups_existing: int = 0
    scripts_loaded: list[str] = []
    scripts_present: int = 0


def all_scripts() -> list[Script]:
    """Every Lua script of repertory, in `repertory.streams.scripts`."""
    return sorted(
        (value for value in vars(scripts).values() if isinstance(value, Script)),
        key=lambda script: script.name,
    )


async def init(system: ActorSystem) -> InitReport:
    """Create every partition's inbox and relay groups (with their streams) and load every Lua
    script. Idempotent: what exists is left as it is."""
    report = InitReport()
    client, keys = system.client, system.keys
    for kind in sorted(system.actors):
        for number in range(keys.partitions_of(kind)):
            for stream, group in (
                (keys.inbox(kind, number), keys.group(kind)),
                (keys.outbox(kind, number), RELAY_GROUP),
            ):
                if await Inbox(client, stream, group).ensure_group():
                    report.groups_created.append(f"{stream} {group}")
                else:
                    report.groups_existing += 1
    for script in all_scripts():
        [present] = await client.script_exists(script.sha)
        if present:
            report.scripts_present += 1
        else:
            await client.script_load(script.source)
            report.scripts_loaded.append(script.name)
    return report


# Migrating.


class MigrationProblem(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """An actor that could not be migrated (left as it was), and why."""

    address: str
    detail: str
    version: int | None = None


class MigrationReport(msgspec.Struct, kw_only=True):
    """What a migration read and rewrote (in a dry run: would rewrite)."""

    dry_run: bool = False
    actors: int = 0
    events: int = 0
    outdated_events: int = 0
    outdated_actors: int = 0
    rewritten_events: int = 0
    rewritten_actors: int = 0
    outdated_snapshots: int = 0
    rewritten_snapshots: int = 0
    outdated_types: dict[str, list[int]] = {}
    """Each type found at an older schema version, and those versions."""
    problems: list[MigrationProblem] = []
    problem_count: int = 0

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    def add(self, problem: MigrationProblem) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_REPORTED_PROBLEMS:
            self.problems.append(problem)

    def outdated(self, type_name: str, version: int) -> None:
        versions = self.outdated_types.setdefault(type_name, [])
        if version not in versions:
            versions.append(version)
            versions.sort()


class _Cannot(Exception):
    """This actor cannot be migrated (an unreadable event, a failing upcaster)."""

    def __init__(self, detail: str, version: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.version = version


class _Migrator:
    def __init__(self, system: ActorSystem, report: MigrationReport, progress: Progress | None):
        self.system = system
        self.codec = system.codec
        self.registry = system.codec.registry
        self.report = report
        self.progress = progress

    def current_version(self, type_name: str, version: int) -> int:
        try:
            return self.registry.current(type_name).version
        except DecodeError as error:
            raise _Cannot(str(error), version) from None

    def rewrite(self, version: int, data: bytes) -> bytes | None:
        """The event record at the current schema version, or None if it is current already.
        Raises _Cannot for a record or payload today's code cannot read."""
        codec = self.codec
        try:
            record = codec.decode_event(data)
        except DecodeError as error:
            raise _Cannot(str(error), version) from None
        current = self.current_version(record.type, version)
        if record.schema_version >= current:
            return None
        try:
            event = codec.event_of(record)
            _, payload = codec.payload(event)
        except RepertoryError as error:
            raise _Cannot(f"{record.type} v{record.schema_version}: {error}", version) from None
        # The same metadata (time, causation, correlation, trace), the current version.
        rewritten = msgspec.structs.replace(
            record, schema_version=current, payload=payload, content_type=codec.content_type
        )
        return codec.encode(rewritten)

    async def scan(self, address: Address) -> int:
        """How many events of the actor are outdated (each upcast once, to find any that fail)."""
        outdated = 0
        unreported = 0
        async for entry_id, data in raw_events(self.system, address):
            version, _ = parse_entry_id(entry_id)
            self.report.events += 1
            unreported += 1
            if self.progress is not None and unreported >= COPY_BATCH:
                self.progress(unreported)
                unreported = 0
            if self.rewrite(version, data) is not None:
                outdated += 1
                record = self.codec.decode_event(data)
                self.report.outdated(record.type, record.schema_version)
        if self.progress is not None and unreported:
            self.progress(unreported)
        return outdated

    async def copy(self, address: Address, after: str) -> tuple[int, str]:
        """Copy the actor's entries after entry id `after` into the migration copy, rewritten;
        returns how many were copied and the last id."""
        client = self.system.client
        source, copy = self.system.keys.events(address), self.system.keys.migrating(address)
        lower = "-" if after == "" else f"({after}"
        copied, last = 0, after
        while True:
            entries = await client.xrange(source, lower, "+", count=COPY_BATCH)
            if not entries:
                return copied, last
            pipeline = client.pipeline(transaction=False)
            for entry_id, fields in entries:
                data = fields.get(EVENT_FIELD, b"")
                version, _ = parse_entry_id(entry_id)
                rewritten = self.rewrite(version, data)
                pipeline.xadd(
                    copy, {EVENT_FIELD: data if rewritten is None else rewritten}, id=entry_id
                )
            await pipeline.execute()
            copied += len(entries)
            last = entries[-1][0].decode()
            if len(entries) < COPY_BATCH:
                return copied, last
            lower = f"({last}"

    async def swap(self, address: Address) -> int:
        """Build the rewritten copy and swap it in; returns the stream's length."""
        client, keys = self.system.client, self.system.keys
        copy_key = keys.migrating(address)
        await client.delete(copy_key)  # a copy left by an interrupted run
        try:
            total, last = await self.copy(address, "")
            for _ in range(SWAP_ATTEMPTS):
                swapped, length = await SWAP_STREAM(
                    client, [keys.events(address), copy_key], [total, last]
                )
                if int(swapped):
                    return int(length)
                # Appended meanwhile (a node is serving the actor): copy those too, retry.
                more, last = await self.copy(address, last)
                total += more
            raise _Cannot(f"the stream kept growing over {SWAP_ATTEMPTS} attempts; try again")
        except BaseException:
            await client.delete(copy_key)
            raise

    async def snapshot(self, address: Address, dry_run: bool) -> None:
        client, keys, codec = self.system.client, self.system.keys, self.codec
        key = keys.snapshots_of(address)
        data = await client.hget(key, address.id)
        if data is None:
            return
        try:
            record = codec.decode_snapshot(data)
        except DecodeError as error:
            raise _Cannot(f"snapshot: {error}") from None
        current = self.current_version(record.type, record.version)
        if record.schema_version >= current:
            return
        self.report.outdated_snapshots += 1
        self.report.outdated(record.type, record.schema_version)
        try:
            state = codec.state_of(record)
            _, payload = codec.payload(state)
        except RepertoryError as error:
            raise _Cannot(f"snapshot {record.type} v{record.schema_version}: {error}") from None
        if dry_run:
            return
        rewritten = msgspec.structs.replace(
            record, schema_version=current, payload=payload, content_type=codec.content_type
        )
        replaced = await REPLACE_FIELD(client, [key], [address.id, data, codec.encode(rewritten)])
        # Not replaced: a node saved a newer snapshot meanwhile, written by today's code.
        if int(replaced):
            self.report.rewritten_snapshots += 1

    async def actor(self, address: Address, dry_run: bool) -> None:
        report = self.report
        report.actors += 1
        try:
            outdated = await self.scan(address)
            if outdated:
                report.outdated_events += outdated
                report.outdated_actors += 1
                if not dry_run:
                    await self.swap(address)
                    report.rewritten_events += outdated
                    report.rewritten_actors += 1
            await self.snapshot(address, dry_run)
        except _Cannot as problem:
            report.add(
                MigrationProblem(
                    address=str(address), detail=problem.detail, version=problem.version
                )
            )


async def migration_plan(system: ActorSystem, kind: str | None = None) -> list[Address]:
    """The actors a migration visits: those of the kinds the system hosts (their types are
    registered by its code), kind by kind, sorted by id."""
    if kind is not None and kind not in system.actors:
        raise AdminError(f"the system hosts no kind {kind!r} (it hosts {sorted(system.actors)})")
    kinds = [kind] if kind is not None else sorted(system.actors)
    return [address for name in kinds for address in await actors_of(system, name)]


async def migrate(
    system: ActorSystem,
    addresses: Iterable[Address] | None = None,
    *,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> MigrationReport:
    """Rewrite every stored event and snapshot of an older schema version than today's to the
    current version (decoded and upcast by the codec, re-encoded with the same metadata), actor
    by actor; `dry_run` only counts them. Safe while nodes run and safe to repeat (see the
    module's docstring). An actor with an event today's code cannot read or upcast is left
    untouched and reported. `progress` is called with the number of events scanned."""
    report = MigrationReport(dry_run=dry_run)
    migrator = _Migrator(system, report, progress)
    for address in await migration_plan(system) if addresses is None else addresses:
        await migrator.actor(address, dry_run)
    return report
