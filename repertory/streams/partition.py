"""Everything one (kind, partition) does in Redis: commit, timers, lease, inbox, dead letters.

All the keys here share the partition's hash tag, so each operation is one atomic script,
also on Redis Cluster.
"""

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from repertory.streams.client import RedisClient
from repertory.streams.deadletters import DeadLetters
from repertory.streams.inbox import Inbox
from repertory.streams.keys import Address, KeyLayout
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


@dataclass(frozen=True, slots=True)
class Commit:
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


@dataclass(frozen=True, slots=True)
class SeenWindow:
    """How long, and how many, handled message ids a partition remembers for dedupe."""

    window_ms: int = 24 * 3600 * 1000
    limit: int = 100_000


class Partition:
    def __init__(self, client: RedisClient, keys: KeyLayout, kind: str, number: int) -> None:
        self.client = client
        self.keys = keys
        self.kind = kind
        self.number = number
        self.group = keys.group(kind)
        self.inbox = Inbox(client, keys.inbox(kind, number), self.group)
        self.dead_letters = DeadLetters(client, keys.dead_letters(kind, number))
        self.outbox_key = keys.outbox(kind, number)
        self.timers_key = keys.timers(kind, number)
        self.seen_key = keys.seen(kind, number)
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
        args: list[Any] = [
            self.group,
            "" if epoch is None else epoch,
            expected_version,
            now_ms,
            seen.window_ms,
            seen.limit,
            len(commits),
        ]
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
        keys = [
            self.keys.events(address),
            self.keys.handled(address),
            self.inbox.stream,
            self.seen_key,
            self.epoch_key,
            self.outbox_key,
            self.timers_key,
        ]
        status, value = await COMMIT(self.client, keys, args)
        outcome = CommitStatus(int(status))
        if outcome is CommitStatus.DUPLICATE:
            return CommitResult(outcome, expected_version, int(value) - 1)
        return CommitResult(outcome, int(value or 0))

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

    async def acquire(self, node_id: str, ttl_ms: int) -> int | None:
        """Take or renew the lease; returns the epoch held, or None if another node holds it."""
        epoch, _owner = await LEASE(
            self.client, [self.lease_key, self.epoch_key], [node_id, ttl_ms]
        )
        return int(epoch) or None

    async def owner(self) -> str | None:
        owner = await self.client.get(self.lease_key)
        return None if owner is None else owner.decode()

    async def release(self, node_id: str) -> bool:
        return bool(await RELEASE_LEASE(self.client, [self.lease_key], [node_id]))

    async def epoch(self) -> int:
        return int(await self.client.get(self.epoch_key) or 0)
