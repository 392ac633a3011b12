"""Workers of a task queue: take a task, heartbeat while it runs, settle it exactly once."""

import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio
import msgspec
from anyio.abc import TaskGroup, TaskStatus

from repertory.schemas.errors import DecodeError
from repertory.streams.inbox import InboxEntry
from repertory.streams.taskqueue import TaskQueue

logger = logging.getLogger("repertory.worker")

TaskHandler = Callable[[msgspec.Struct], Awaitable[msgspec.Struct | None]]


def default_worker_id() -> str:
    return f"worker-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    worker_id: str = field(default_factory=default_worker_id)
    visibility_timeout_s: float = 30.0
    max_attempts: int = 3
    block_ms: int = 500
    idle_polls_before_exit: int = 2
    dead_letter: bool = True
    """False when a coordinator re-queues failed tasks and dead-letters them itself."""
    concurrency: int = 1
    """Tasks the worker runs at once, each in a task of its own: one read takes as many as
    there is room for, so that a worker running many costs one read, not one per task."""

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")


class Worker:
    """Consumes one task queue, up to `concurrency` tasks at once. A task's claim lasts
    `visibility_timeout_s`; the worker renews the claims of every task in hand each third of
    that, from a task of its own, so a busy handler cannot starve the heartbeat (unless it
    blocks the event loop: run CPU-bound work in a thread)."""

    def __init__(
        self, queue: TaskQueue, handler: TaskHandler, config: WorkerConfig | None = None
    ) -> None:
        self.queue = queue
        self.handler = handler
        self.config = config or WorkerConfig()
        self.handled = 0
        self._in_hand: set[bytes] = set()
        """The entry ids of the tasks running: the heartbeat renews their claims."""
        self._room = anyio.Event()
        """Set when a task finishes: the reader waits for it while the worker is full."""

    @property
    def worker_id(self) -> str:
        return self.config.worker_id

    async def run(
        self,
        *,
        until_empty: bool = False,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Work until cancelled or, with `until_empty`, until no task is queued or in progress
        anywhere (in-progress ones may still come back to this worker if their owner dies)."""
        await self.queue.ensure()
        async with anyio.create_task_group() as worker:
            worker.start_soon(self._heartbeat)
            async with anyio.create_task_group() as running:
                task_status.started()
                await self._take_tasks(running, until_empty)
            worker.cancel_scope.cancel()  # every task taken is settled: no claim to renew

    async def _take_tasks(self, running: TaskGroup, until_empty: bool) -> None:
        """Take tasks while there is room for them, each into a task of its own in `running`;
        with `until_empty`, return once none is queued or in progress anywhere."""
        config, inbox = self.config, self.queue.inbox
        idle_polls = 0
        visibility_ms = round(config.visibility_timeout_s * 1000)
        # Dead workers' tasks can only be claimed once their visibility lapses: looking for
        # them a few times per timeout (and whenever the queue looks empty) is enough.
        reclaim_every_s = config.visibility_timeout_s / 4
        next_reclaim = 0.0
        busy = False
        while True:
            room = config.concurrency - len(self._in_hand)
            if not room:
                self._room = anyio.Event()
                await self._room.wait()
                continue
            entries: list[InboxEntry] = []
            if not busy or anyio.current_time() >= next_reclaim:
                next_reclaim = anyio.current_time() + reclaim_every_s
                entries = (await inbox.autoclaim(self.worker_id, visibility_ms, count=room)).entries
            if not entries:
                entries = await inbox.read(self.worker_id, count=room, block_ms=config.block_ms)
            busy = bool(entries)
            if entries:
                idle_polls = 0
                for entry in entries:
                    # A task of its own reclaimed (the event loop was blocked past its
                    # visibility) is running already.
                    if entry.id not in self._in_hand:
                        self._in_hand.add(entry.id)
                        running.start_soon(self._work, entry)
                continue
            if until_empty and not self._in_hand and await self.queue.unsettled() == 0:
                idle_polls += 1
                if idle_polls >= config.idle_polls_before_exit:
                    logger.info("%s: queue %s is empty, stopping", self.worker_id, self.queue.name)
                    return

    async def _work(self, entry: InboxEntry) -> None:
        try:
            await self._handle(entry)
        finally:
            self._in_hand.discard(entry.id)
            self._room.set()

    async def _handle(self, entry: InboxEntry) -> None:
        """Run the task's handler and settle the task with its outcome."""
        queue, worker = self.queue, self.worker_id
        try:
            envelope, task = queue.decode(entry)
        except DecodeError as error:
            logger.error("%s: undecodable task %s: %s", worker, entry.id.decode(), error)
            await queue.fail(worker, entry, None, f"{error.reason}: {error}", max_attempts=1)
            return
        logger.info(
            "%s took task %s (%s, attempt %d)",
            worker,
            envelope.id,
            envelope.type,
            envelope.attempt + 1,
        )
        outcome: msgspec.Struct | None = None
        failure: str | None = None
        try:
            outcome = await self.handler(task)
        except Exception as error:
            failure = f"{type(error).__name__}: {error}"
        if failure is None:
            settled = await queue.complete(worker, entry, envelope, outcome)
            logger.info(
                "%s finished task %s%s",
                worker,
                envelope.id,
                "" if settled else " (already settled)",
            )
        else:
            settled = await queue.fail(
                worker,
                entry,
                envelope,
                failure,
                max_attempts=self.config.max_attempts,
                dead_letter=self.config.dead_letter,
            )
            logger.warning("%s: task %s failed: %s", worker, envelope.id, failure)
        if settled:
            self.handled += 1

    async def _heartbeat(self) -> None:
        """Renew the claims of the tasks in hand, in one call, each third of the visibility."""
        while True:
            await anyio.sleep(self.config.visibility_timeout_s / 3)
            in_hand = list(self._in_hand)
            if not in_hand:
                continue
            kept = await self.queue.inbox.extend(self.worker_id, *in_hand)
            # A task settled while the call was out is no longer pending: not a lost claim.
            lost = sum(entry_id in self._in_hand for entry_id in in_hand) - kept
            if lost > 0:
                logger.warning("%s lost its claim on %d task(s) in hand", self.worker_id, lost)
