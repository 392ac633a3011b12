"""Key layout: every key of a partition shares one hash tag, `{app:kind:partition}`.

One hash tag per (kind, partition) keeps all of a partition's keys in one Cluster slot, so a
single script can touch the inbox, an actor's events, the seen-set and the timers atomically.
"""

import re
import zlib
from collections.abc import Mapping
from typing import NamedTuple

from repertory.schemas.errors import RepertoryError

_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


class KeyLayoutError(RepertoryError, ValueError):
    """An application name, kind or actor address that cannot be turned into keys."""


def _check_name(what: str, value: str) -> str:
    if not _NAME.match(value):
        raise KeyLayoutError(f"{what} {value!r} must match {_NAME.pattern} (no braces, colons, /)")
    return value


class Address(NamedTuple):
    """An actor's address: its kind and its id, written `kind/id`."""

    kind: str
    id: str

    @classmethod
    def parse(cls, text: str) -> "Address":
        kind, sep, actor_id = text.partition("/")
        if not sep or not actor_id:
            raise KeyLayoutError(f"actor address {text!r} is not of the form 'kind/id'")
        return cls(_check_name("actor kind", kind), actor_id)

    def __str__(self) -> str:
        return f"{self.kind}/{self.id}"


def events_key(tag: str, actor_id: str) -> str:
    """The event stream of actor `actor_id` of the partition whose hash tag is `tag`."""
    return f"{tag}:ev:{actor_id}"


def handled_key(tag: str, actor_id: str) -> str:
    """The handled-message stream of actor `actor_id` of the partition tagged `tag`."""
    return f"{tag}:msg:{actor_id}"


def snapshots_key(tag: str) -> str:
    """The snapshot hash (actor id -> encoded snapshot record) of the partition tagged `tag`."""
    return f"{tag}:snap"


class KeyLayout:
    """Names every Redis key of one application namespace.

    `partitions` is the default partition count of a kind; `per_kind` overrides it. The count
    of a kind must not change while it has data: an actor's partition is
    `crc32(id) % partitions`, stable across processes and machines.
    """

    def __init__(
        self,
        app: str = "rep",
        *,
        partitions: int = 16,
        per_kind: Mapping[str, int] | None = None,
    ) -> None:
        self.app = _check_name("application name", app)
        if partitions < 1:
            raise KeyLayoutError(f"partitions must be >= 1, got {partitions}")
        self.partitions = partitions
        self.per_kind = dict(per_kind or {})
        self._inboxes: dict[tuple[str, int], str] = {}
        """Inbox keys made so far: every send names one."""
        for kind, count in self.per_kind.items():
            _check_name("actor kind", kind)
            if count < 1:
                raise KeyLayoutError(f"partitions of {kind!r} must be >= 1, got {count}")

    def partitions_of(self, kind: str) -> int:
        return self.per_kind.get(kind, self.partitions)

    def partition_of(self, address: Address) -> int:
        return zlib.crc32(address.id.encode()) % self.partitions_of(address.kind)

    def tag(self, kind: str, partition: int) -> str:
        return f"{{{self.app}:{_check_name('actor kind', kind)}:{partition}}}"

    def actor_tag(self, address: Address) -> str:
        """The hash tag of the actor's partition."""
        return self.tag(address.kind, self.partition_of(address))

    # Per actor.
    def events(self, address: Address) -> str:
        """The actor's event stream; entry ids are `<version>-0`."""
        return events_key(self.actor_tag(address), address.id)

    def handled(self, address: Address) -> str:
        """The messages the actor handled, each with the versions it moved between (replay)."""
        return handled_key(self.actor_tag(address), address.id)

    def migrating(self, address: Address) -> str:
        """The rewritten copy of the actor's event stream while a migration builds it."""
        return f"{self.actor_tag(address)}:migrating:{address.id}"

    # Per partition.
    def snapshots(self, kind: str, partition: int) -> str:
        """Hash: actor id -> encoded snapshot record."""
        return snapshots_key(self.tag(kind, partition))

    def snapshots_of(self, address: Address) -> str:
        return self.snapshots(address.kind, self.partition_of(address))

    def inbox(self, kind: str, partition: int) -> str:
        key = self._inboxes.get((kind, partition))
        if key is None:
            key = self._inboxes[kind, partition] = f"{self.tag(kind, partition)}:inbox"
        return key

    def inbox_of(self, address: Address) -> str:
        return self.inbox(address.kind, self.partition_of(address))

    def outbox(self, kind: str, partition: int) -> str:
        """Committed messages for other partitions, until the relay has forwarded them."""
        return f"{self.tag(kind, partition)}:outbox"

    def dead_letters(self, kind: str, partition: int) -> str:
        return f"{self.tag(kind, partition)}:dead"

    def lease(self, kind: str, partition: int) -> str:
        return f"{self.tag(kind, partition)}:lease"

    def epoch(self, kind: str, partition: int) -> str:
        return f"{self.tag(kind, partition)}:epoch"

    def timers(self, kind: str, partition: int) -> str:
        return f"{self.tag(kind, partition)}:timers"

    def seen(self, kind: str, partition: int) -> str:
        """Message ids already handled, for dedupe of re-sent messages."""
        return f"{self.tag(kind, partition)}:seen"

    def queue(self, name: str) -> str:
        """The hash tag of a task queue: its tasks, results and dead letters share one slot."""
        return f"{{{self.app}:queue:{_check_name('queue name', name)}}}"

    def nodes(self) -> str:
        """The live nodes of the namespace (zset: node id -> heartbeat expiry)."""
        return f"{{{self.app}:nodes}}"

    def group(self, kind: str) -> str:
        """The consumer group that the nodes hosting `kind` share."""
        return f"{self.app}:{_check_name('actor kind', kind)}"

    def events_pattern(self, kind: str) -> str:
        """A SCAN pattern matching every event stream of a kind."""
        return f"{{{self.app}:{kind}:*}}:ev:*"

    def handled_pattern(self, kind: str) -> str:
        """A SCAN pattern matching every handled-message stream of a kind."""
        return f"{{{self.app}:{kind}:*}}:msg:*"

    def kind_pattern(self, kind: str) -> str:
        """A SCAN pattern matching every key of a kind (`*` for every kind)."""
        return f"{{{self.app}:{kind}:*}}*"

    def parse_key(self, key: str) -> tuple[str, int, str]:
        """(kind, partition, rest) of a key of this namespace, the inverse of `tag`.

        Raises KeyLayoutError for a key of another namespace or shape."""
        prefix = f"{{{self.app}:"
        tag_end = key.find("}")
        if not key.startswith(prefix) or tag_end < 0:
            raise KeyLayoutError(f"{key!r} is not a key of application {self.app!r}")
        kind, _, partition = key[len(prefix) : tag_end].rpartition(":")
        if not kind or not partition.isdigit():
            raise KeyLayoutError(f"{key!r} is not a partition key of application {self.app!r}")
        return kind, int(partition), key[tag_end + 2 :]
