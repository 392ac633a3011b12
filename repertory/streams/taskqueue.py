"""A task queue: stateless workers compete for tasks in one consumer group (R5).

Tasks are envelopes on `{app:queue:name}:tasks`; every task ends as exactly one entry on
`:results` (success, or failure after its last attempt, then also on `:dead`). A worker's claim
lasts a visibility timeout that a long task extends by heartbeating; a dead worker's tasks are
taken over once their claim has lapsed.
"""

import msgspec

from repertory.schemas import Codec, Envelope
from repertory.schemas.records import now_ms
from repertory.streams.appender import StreamAppender
from repertory.streams.batching import Batcher
from repertory.streams.client import RedisClient
from repertory.streams.inbox import Inbox, InboxEntry
from repertory.streams.keys import KeyLayout
from repertory.streams.scripts import APPEND_ONCE, SETTLE

WORKERS_GROUP = "workers"


class TaskResult(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The outcome of one task. `value` is the handler's return value encoded by the queue's
    codec (type and schema version beside it); `error` says why a failed task failed."""

    task_id: str
    task_type: str
    ok: bool
    worker: str
    attempts: int
    finished_at: int
    value_type: str | None = None
    value_version: int | None = None
    value: bytes | None = None
    error: str | None = None


class TaskQueue:
    def __init__(
        self,
        client: RedisClient,
        name: str,
        *,
        keys: KeyLayout | None = None,
        codec: Codec | None = None,
    ) -> None:
        self.client = client
        self.name = name
        self.codec = codec or Codec()
        tag = (keys or KeyLayout()).queue(name)
        self.tasks_key = f"{tag}:tasks"
        self.results_key = f"{tag}:results"
        self.dead_key = f"{tag}:dead"
        self.appended_key = f"{tag}:appended"
        self.inbox = Inbox(client, self.tasks_key, WORKERS_GROUP)
        self._appender = StreamAppender(client)
        self._settles: Batcher[tuple[bytes, list[tuple[str, bytes]]], int] = Batcher(
            self._settle_batch
        )
        """Tasks that finish together (a worker's concurrent ones) settle in one call."""
        self._result_decoder = msgspec.msgpack.Decoder(TaskResult)

    async def ensure(self) -> None:
        await self.inbox.ensure_group()

    async def enqueue(self, task: msgspec.Struct, *, task_id: str | None = None) -> str:
        """Queue a task; returns its id. Concurrent enqueues share round trips."""
        envelope = self.codec.envelope(f"queue/{self.name}", task, message_id=task_id)
        await self._appender.add(self.tasks_key, self.codec.encode(envelope))
        return envelope.id

    async def enqueue_once(self, task: msgspec.Struct, *, task_id: str) -> bool:
        """Queue a task unless a task with this id was ever queued here: an enqueue that can be
        repeated (by a follower of a coordinator's events). False if it was queued before."""
        envelope = self.codec.envelope(f"queue/{self.name}", task, message_id=task_id)
        data = self.codec.encode(envelope)
        keys = [self.appended_key, self.tasks_key]
        return bool(await APPEND_ONCE(self.client, keys, [f"task:{task_id}", data]))

    async def dead_letter_once(self, task: msgspec.Struct, *, task_id: str) -> bool:
        """Record a task that will not be tried again on the dead-letter stream, once per id
        (why it failed is in the result and in the coordinator's log)."""
        envelope = self.codec.envelope(f"queue/{self.name}", task, message_id=task_id)
        data = self.codec.encode(envelope)
        keys = [self.appended_key, self.dead_key]
        return bool(await APPEND_ONCE(self.client, keys, [f"dead:{task_id}", data]))

    def decode(self, entry: InboxEntry) -> tuple[Envelope, msgspec.Struct]:
        """The task's envelope and payload (raises DecodeError for bad input)."""
        envelope = self.codec.decode_envelope(entry.data or b"")
        return envelope, self.codec.message_of(envelope)

    async def complete(
        self, worker: str, entry: InboxEntry, envelope: Envelope, value: msgspec.Struct | None
    ) -> bool:
        """Record the task's result and ack it, once. False if another worker settled it."""
        value_type = value_version = encoded = None
        if value is not None:
            info, raw = self.codec.payload(value)
            value_type, value_version, encoded = info.name, info.version, bytes(raw)
        result = TaskResult(
            task_id=envelope.id,
            task_type=envelope.type,
            ok=True,
            worker=worker,
            attempts=envelope.attempt + 1,
            finished_at=now_ms(),
            value_type=value_type,
            value_version=value_version,
            value=encoded,
        )
        return await self._settle(entry, [(self.results_key, msgspec.msgpack.encode(result))])

    async def fail(
        self,
        worker: str,
        entry: InboxEntry,
        envelope: Envelope | None,
        error: str,
        *,
        max_attempts: int,
        dead_letter: bool = True,
    ) -> bool:
        """A failed attempt: queue the task again while attempts remain, else dead-letter it
        and record the failure as its result. False if another worker settled it.

        With `dead_letter=False` the last failure is only a result: a coordinator that
        re-queues failed tasks itself decides what is dead."""
        attempts = 1 if envelope is None else envelope.attempt + 1
        if envelope is not None and attempts < max_attempts:
            retry = msgspec.structs.replace(envelope, attempt=attempts)
            return await self._settle(entry, [(self.tasks_key, self.codec.encode(retry))])
        result = TaskResult(
            task_id=envelope.id if envelope else entry.id.decode(),
            task_type=envelope.type if envelope else "",
            ok=False,
            worker=worker,
            attempts=attempts,
            finished_at=now_ms(),
            error=error,
        )
        appends = [(self.results_key, msgspec.msgpack.encode(result))]
        if dead_letter:
            appends.insert(0, (self.dead_key, entry.data or b""))
        return await self._settle(entry, appends)

    async def _settle(self, entry: InboxEntry, appends: list[tuple[str, bytes]]) -> bool:
        return bool(await self._settles.submit((entry.id, appends)))

    async def _settle_batch(self, batch: list[tuple[bytes, list[tuple[str, bytes]]]]) -> list[int]:
        keys = [self.tasks_key, self.results_key, self.dead_key]
        args: list[bytes | str | int] = [WORKERS_GROUP]
        for entry_id, appends in batch:
            args += [entry_id, len(appends)]
            for key, message in appends:
                args += [keys.index(key) + 1, message]
        return [int(settled) for settled in await SETTLE(self.client, keys, args)]

    async def results(
        self, *, after: bytes | str = b"0", count: int = 1000
    ) -> list[tuple[bytes, TaskResult]]:
        """Results after the stream id `after` (exclusive), oldest first."""
        lower = (
            "-"
            if after in (b"0", "0")
            else f"({after.decode() if isinstance(after, bytes) else after}"
        )
        entries = await self.client.xrange(self.results_key, lower, "+", count=count)
        return [
            (entry_id, self._result_decoder.decode(fields[b"m"])) for entry_id, fields in entries
        ]

    def value_of(self, result: TaskResult) -> msgspec.Struct | None:
        if result.value is None or result.value_type is None or result.value_version is None:
            return None
        return self.codec.decode_payload(result.value_type, result.value_version, result.value)

    async def pending_count(self) -> int:
        return (await self.inbox.pending()).count

    async def unsettled(self) -> int:
        """Tasks queued or in progress: settled tasks are deleted from the stream."""
        return int(await self.client.xlen(self.tasks_key))
