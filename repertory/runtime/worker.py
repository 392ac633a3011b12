"""Workers of a task queue: take a task, heartbeat while it runs, settle it exactly once."""

import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio
import msgspec
from anyio.abc import TaskStatus

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


class Worker:
    """Consumes one task queue. A task's claim lasts `visibility_timeout_s`; the worker renews
    it every third of that while the handler runs, from its own task, so a busy handler cannot
    starve the heartbeat (unless it blocks the event loop: run CPU-bound work in a thread)."""

    def __init__(
        self, queue: TaskQueue, handler: TaskHandler, config: WorkerConfig | None = None
    ) -> None:
        self.queue = queue
        self.handler = handler
        self.config = config or WorkerConfig()
        self.handled = 0

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
        task_status.started()
        idle_polls = 0
        visibility_ms = round(self.config.visibility_timeout_s * 1000)
        # Dead workers' tasks can only be claimed once their visibility lapses: looking for
        # them a few times per timeout (and whenever the queue looks empty) is enough.
        reclaim_every_s = self.config.visibility_timeout_s / 4
        next_reclaim = 0.0
        busy = False
        while True:
            entries: list[InboxEntry] = []
            if not busy or anyio.current_time() >= next_reclaim:
                next_reclaim = anyio.current_time() + reclaim_every_s
                reclaimed = await self.queue.inbox.autoclaim(self.worker_id, visibility_ms, count=1)
                entries = reclaimed.entries
            if not entries:
                entries = await self.queue.inbox.read(
                    self.worker_id, count=1, block_ms=self.config.block_ms
                )
            busy = bool(entries)
            if entries:
                idle_polls = 0
                for entry in entries:
                    await self._work(entry)
                continue
            if until_empty and await self.queue.unsettled() == 0:
                idle_polls += 1
                if idle_polls >= self.config.idle_polls_before_exit:
                    logger.info("%s: queue %s is empty, stopping", self.worker_id, self.queue.name)
                    return

    async def _work(self, entry: InboxEntry) -> None:
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
        async with anyio.create_task_group() as group:
            group.start_soon(self._heartbeat, entry.id)
            try:
                outcome = await self.handler(task)
            except Exception as error:
                failure = f"{type(error).__name__}: {error}"
            group.cancel_scope.cancel()
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

    async def _heartbeat(self, entry_id: bytes) -> None:
        while True:
            await anyio.sleep(self.config.visibility_timeout_s / 3)
            if not await self.queue.inbox.extend(self.worker_id, entry_id):
                logger.warning("%s lost its claim on %s", self.worker_id, entry_id.decode())
                return
