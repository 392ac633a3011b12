"""Everything one (kind, partition) does in Redis: commit, timers, lease, inbox, dead letters.

All the keys here share the partition's hash tag, so each operation is one atomic script,
also on Redis Cluster.
"""

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgspec

from repertory.streams.client import RedisClient
from repertory.streams.deadletters import DeadLetters
from repertory.streams.inbox import Inbox
from repertory.streams.keys import Address, KeyLayout, KeyLayoutError, events_key, handled_key
from repertory.streams.scripts import COMMIT, FIRE_TIMERS, LEASE, RELEASE_LEASE

RELAY_GROUP = "relay"


class CommitStatus(enum.IntEnum):
    COMMITTED = 1
    CONFLICT = 0  # the actor's version moved: reload and handle again
    DUPLICATE = -1  # a message was handled before: nothing written (a batch of one is acked)
    FENCED = -2  # the partition's epoch moved: this node lost it, nothing written


class CommitResult(NamedTuple):
    status: CommitStatus
    version: int
    """The actor's version after the commit, or its current version on a conflict."""
    duplicate: int | None = None
    """On DUPLICATE, the position in the batch of the first message handled before."""


class GroupCommitResult(NamedTuple):
    """What a commit of several actors came to; on anything but COMMITTED, nothing written."""

    status: CommitStatus
    versions: tuple[int, ...] = ()
    """On COMMITTED, each actor's version after the commit, in order (over every partition
    committed, in order)."""
    actor: int | None = None
    """On CONFLICT or DUPLICATE, the position of the actor concerned (over every partition)."""
    position: int | None = None
    """On DUPLICATE, the position among that actor's commits of the first message handled
    before."""
    version: int = 0
    """On CONFLICT, that actor's current version; on FENCED, the partition's epoch."""
    partition: int | None = None
    """On FENCED, the position of the partition concerned."""
    conflicts: tuple[tuple[int, int], ...] = ()
    """On CONFLICT, every actor found with another version: its position and its version
    (the first is `actor` and `version`)."""


class Commit(msgspec.Struct, frozen=True, gc=False):
    """The whole effect of handling one message, written at once or not at all.

    `local` messages go straight to this partition's inbox, `timers` to its timer set (due ms,
    message), `remote` ones (due ms or 0, target inbox or timer-set key, message) to its
    outbox for the relay.
    """

    dedupe_id: str
    handled: bytes
    handled_at: int
    """When the handler ran (ms): the time its context gave it, which replays give it again."""
    events: Sequence[bytes] = ()
    local: Sequence[bytes] = ()
    timers: Sequence[tuple[int, bytes]] = ()
    remote: Sequence[tuple[int, str, bytes]] = ()
    inbox_entry: bytes | None = None
    rejected: str = ""


class Lease(NamedTuple):
    owner: str
    expires_ms: int
    """When it lapses unless renewed: on the server's clock, or the clock the node was given."""


class ActorCommits(NamedTuple):
    """One actor's part of a commit: the version its commits start from, and the commits."""

    address: Address
    expected_version: int
    commits: Sequence[Commit]


class PartitionCommits(NamedTuple):
    """One partition's part of a commit: the epoch its committer holds (None: unfenced) and
    its actors' commits."""

    partition: "Partition"
    epoch: int | None
    actors: Sequence[ActorCommits]


@dataclass(frozen=True, slots=True)
class SeenWindow:
    """How long, and how many, handled message ids a partition remembers for dedupe.

    A commit prunes the partition's older ids once `trim_every_ms` has passed since its
    committer last did (by the time it commits at): between two prunings the set may hold the
    ids of that span beyond `limit`, and ids older than `window_ms` by up to that span. Pruning
    at every commit cost two more commands per partition in each script call."""

    window_ms: int = 24 * 3600 * 1000
    limit: int = 100_000
    trim_every_ms: int = 1000


class Partition:
    def __init__(self, client: RedisClient, keys: KeyLayout, kind: str, number: int) -> None:
        self.client = client
        self.keys = keys
        self.kind = kind
        self.number = number
        self.group = keys.group(kind)
        self.tag = keys.tag(kind, number)
        self.inbox = Inbox(client, keys.inbox(kind, number), self.group)
        self.dead_letters = DeadLetters(client, keys.dead_letters(kind, number))
        self.outbox_key = keys.outbox(kind, number)
        self.timers_key = keys.timers(kind, number)
        self.seen_key = keys.seen(kind, number)
        self._trimmed_at_ms: int | None = None
        """When a commit through this object last pruned the seen-set (see `SeenWindow`): a
        call that does not commit prunes nothing."""
        self.epoch_key = keys.epoch(kind, number)
        self.lease_key = keys.lease(kind, number)

    def __repr__(self) -> str:
        return f"Partition({self.kind}:{self.number})"

    async def commit(
        self,
        address: Address,
        expected_version: int,
        commits: Sequence[Commit],
        *,
        epoch: int | None,
        now_ms: int,
        seen: SeenWindow,
    ) -> CommitResult:
        """Commit the outcomes of handling messages of one actor, in order, in one script call:
        all of them, or (on a conflict, a duplicate or a lost epoch) none."""
        result = await self.commit_many(
            [ActorCommits(address, expected_version, commits)],
            epoch=epoch,
            now_ms=now_ms,
            seen=seen,
        )
        if result.status is CommitStatus.COMMITTED:
            return CommitResult(result.status, result.versions[0])
        if result.status is CommitStatus.DUPLICATE:
            return CommitResult(result.status, expected_version, result.position)
        return CommitResult(result.status, result.version)

    async def commit_many(
        self,
        actors: Sequence["ActorCommits"],
        *,
        epoch: int | None,
        now_ms: int,
        seen: SeenWindow,
    ) -> "GroupCommitResult":
        """Commit the outcomes of handling messages of several actors of this partition in one
        script call (each actor's in order): all of them, or (on a conflict or a duplicate in
        any of them, or a lost epoch) none."""
        return await self.commit_partitions(
            [PartitionCommits(self, epoch, actors)], now_ms=now_ms, seen=seen
        )

    async def commit_partitions(
        self,
        parts: Sequence[PartitionCommits],
        *,
        now_ms: int,
        seen: SeenWindow,
        checked: bool = False,
    ) -> GroupCommitResult:
        """Commit the actors of several partitions of this kind in one script call, through
        this partition's client (every commit goes through here): all of them, or (on a
        conflict or a duplicate in any of them, or a lost epoch) none. The partitions' keys
        must be reachable by one script: on a Cluster, one partition at a time. `checked`
        says that each actor is known to be of its partition (a node checks an actor's
        address once, when its first message arrives), else each is checked here."""
        group = self.group
        args: list[Any] = [group, now_ms, seen.window_ms, seen.limit, len(parts)]
        keys: list[str] = []
        pruned: list[Partition] = []
        for partition, epoch, actors in parts:
            if partition.group != group:
                raise ValueError(f"{partition} is not of the kind of {self}")
            keys.extend(
                (
                    partition.inbox.stream,
                    partition.seen_key,
                    partition.epoch_key,
                    partition.outbox_key,
                    partition.timers_key,
                )
            )
            trim = partition._trim_due(now_ms, seen)
            if trim:
                pruned.append(partition)
            args.extend(("" if epoch is None else epoch, int(trim), len(actors)))
            tag, layout, number = partition.tag, partition.keys, partition.number
            for address, expected_version, commits in actors:
                if not checked and (
                    address.kind != partition.kind or layout.partition_of(address) != number
                ):
                    raise KeyLayoutError(f"{address} is not an actor of {partition}")
                keys.extend((events_key(tag, address.id), handled_key(tag, address.id)))
                args.extend((expected_version, len(commits)))
                for commit in commits:
                    args.extend(
                        (
                            commit.inbox_entry or "",
                            commit.dedupe_id,
                            commit.handled,
                            commit.rejected,
                            commit.handled_at,
                            len(commit.events),
                            *commit.events,
                            len(commit.local),
                            *commit.local,
                            len(commit.timers),
                        )
                    )
                    for due, message in commit.timers:
                        args.extend((due, message))
                    args.append(len(commit.remote))
                    for due, target, message in commit.remote:
                        args.extend((due, target, message))
        reply = await COMMIT(self.client, keys, args)
        status = CommitStatus(int(reply[0]))
        if status is CommitStatus.COMMITTED:
            for partition in pruned:
                partition._trimmed_at_ms = now_ms
            return GroupCommitResult(status, tuple(int(version) for version in reply[1:]))
        if status is CommitStatus.FENCED:
            return GroupCommitResult(
                status, partition=int(reply[1]) - 1, version=int(reply[2] or 0)
            )
        actor = int(reply[1]) - 1
        if status is CommitStatus.DUPLICATE:
            return GroupCommitResult(status, actor=actor, position=int(reply[2]) - 1)
        conflicts = tuple((int(reply[n]) - 1, int(reply[n + 1])) for n in range(1, len(reply), 2))
        return GroupCommitResult(status, actor=actor, version=int(reply[2]), conflicts=conflicts)

    def _trim_due(self, now_ms: int, seen: SeenWindow) -> bool:
        """Whether a commit at `now_ms` prunes the seen-set (a clock gone back: at once)."""
        last = self._trimmed_at_ms
        return last is None or not 0 <= now_ms - last < seen.trim_every_ms

    async def relay(self, consumer: str, *, count: int = 200) -> int:
        """Forward committed outbox entries to their target partitions, then drop them.

        A crash between forwarding and acking forwards again; receivers skip the duplicate by
        its dedupe id, and a re-added timer is the same set member. Returns how many moved.
        """
        response = await self.client.xreadgroup(
            RELAY_GROUP, consumer, {self.outbox_key: b"0"}, count=count
        )
        entries = response[0][1] if response else []
        if not entries:
            response = await self.client.xreadgroup(
                RELAY_GROUP, consumer, {self.outbox_key: b">"}, count=count
            )
            entries = response[0][1] if response else []
        for entry_id, fields in entries:
            if fields:
                due = int(fields[b"due"])
                if due:
                    await self.client.zadd(fields[b"to"].decode(), {fields[b"m"]: due})
                else:
                    await self.client.xadd(fields[b"to"].decode(), {b"m": fields[b"m"]})
            await self.client.xack(self.outbox_key, RELAY_GROUP, entry_id)
            await self.client.xdel(self.outbox_key, entry_id)
        return len(entries)

    async def ensure_groups(self) -> None:
        await self.inbox.ensure_group()
        await Inbox(self.client, self.outbox_key, RELAY_GROUP).ensure_group()

    async def seen(self, dedupe_id: str) -> bool:
        return await self.client.zscore(self.seen_key, dedupe_id) is not None

    async def fire_timers(self, now_ms: int, *, limit: int = 500) -> int:
        """Move due timers into the inbox; returns how many fired."""
        fired = await FIRE_TIMERS(
            self.client, [self.timers_key, self.inbox.stream], [now_ms, limit]
        )
        return int(fired)

    async def acquire(self, node_id: str, ttl_ms: int, *, now_ms: int | None = None) -> int | None:
        """Take or renew the lease; returns the epoch held, or None if another node holds it.

        Expiry is judged at `now_ms`, or by the server's clock when None (see `Clock`)."""
        epoch, _owner = await LEASE(
            self.client,
            [self.lease_key, self.epoch_key],
            [node_id, ttl_ms, "" if now_ms is None else now_ms],
        )
        return int(epoch) or None

    async def lease(self, now_ms: int | None = None) -> Lease | None:
        """The lease, or None when it is free: lapsed at `now_ms` or, when None, removed by
        the server's own expiry."""
        owner, expires = await self.client.hmget(self.lease_key, ["owner", "expires"])
        if owner is None or expires is None:
            return None
        lease = Lease(owner.decode(), int(expires))
        if now_ms is not None and lease.expires_ms <= now_ms:
            return None
        return lease

    async def owner(self, now_ms: int | None = None) -> str | None:
        lease = await self.lease(now_ms)
        return None if lease is None else lease.owner

    async def release(self, node_id: str) -> bool:
        return bool(await RELEASE_LEASE(self.client, [self.lease_key], [node_id]))

    async def epoch(self) -> int:
        return int(await self.client.get(self.epoch_key) or 0)
