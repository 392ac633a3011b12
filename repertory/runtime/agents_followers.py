"""The followers that carry out what the coordinator and the health monitor decided.

Actors decide, followers act: each follower reads a log in order and carries out each entry's
effect idempotently (keyed by ids the entries carry), then records how far it got in a cursor
kept in Redis, so a follower that stops (its process killed, restarted) resumes where it left
off: nothing decided meanwhile is missed, and an entry handled twice changes nothing twice.

- `Dispatcher`: the coordinator's `TaskDispatched` -> the project's queue, once per dispatch id;
  `TaskDeadLettered` -> the queue's dead letters, once.
- `forward_results`: a queue's results stream -> `RecordResult` to the coordinator (idempotency
  key: the result's stream id).
- `RecoveryExecutor`: the health monitor's `RecoveryDecided` about the worker agents of one
  `Supervisor` -> kill, hand the agent's tasks back, restart or replace it, and report
  `RecoveryDone`.
- `NodeWatcher`: the nodes of the membership set -> `Register`/`Heartbeat`/`Deregister` to the
  health monitor, as agents of role `node` (nodes stay unaware of the monitor).
"""

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from anyio.abc import TaskStatus

from repertory.actors.agents import (
    Deregister,
    HealthState,
    Heartbeat,
    RecordResult,
    RecoveryDecided,
    RecoveryDone,
    Register,
    Strategy,
    TaskDeadLettered,
    TaskDispatched,
    dispatch_id,
)
from repertory.runtime.agents_worker import COORDINATOR, MONITOR, release
from repertory.runtime.supervisor import Supervisor
from repertory.runtime.system import ActorSystem
from repertory.schemas import Codec
from repertory.streams.client import RedisClient
from repertory.streams.eventstore import StoredEvent
from repertory.streams.inbox import as_text
from repertory.streams.keys import Address, KeyLayout
from repertory.streams.taskqueue import TaskQueue, TaskResult

logger = logging.getLogger("repertory.agents")


def log_event(message: str, event: str, **fields: Any) -> None:
    """A structured log line: `event` names what happened, `fields` the details."""
    logger.info(message, extra={"fields": {"event": event, **fields}})


class Cursor:
    """How far one follower got, kept in Redis under its name: where it resumes."""

    def __init__(self, client: RedisClient, keys: KeyLayout, name: str) -> None:
        self.client = client
        self.name = name
        self.key = f"{{{keys.app}:followers}}:{name}"

    async def get(self) -> str | None:
        value = await self.client.get(self.key)
        return None if value is None else as_text(value)

    async def set(self, position: str) -> None:
        await self.client.set(self.key, position)


async def follow(
    system: ActorSystem,
    address: Address,
    handle: Callable[[StoredEvent], Awaitable[None]],
    cursor: Cursor | None,
    *,
    start: int = 0,
    poll_s: float = 0.05,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Call `handle` on each event of `address`, in order, forever: from the cursor's version
    (or after version `start` when it has none yet), saving the cursor after each effect."""
    saved = None if cursor is None else await cursor.get()
    version = start if saved is None else int(saved)
    task_status.started()
    while True:
        async for stored in system.store.read(address, start=version + 1):
            await handle(stored)
            version = stored.version
            if cursor is not None:
                await cursor.set(str(version))
        await anyio.sleep(poll_s)


class Dispatcher:
    """Follows the coordinator's log: enqueues each dispatched task on its project's queue
    (`queue_of(project id)`, the project id itself by default) once per dispatch id, and writes
    each dead-lettered task once."""

    def __init__(
        self,
        system: ActorSystem,
        *,
        codec: Codec | None = None,
        queue_of: Callable[[str], str] = str,
    ) -> None:
        self.system = system
        self.codec = codec or Codec()
        self.queue_of = queue_of
        self._queues: dict[str, TaskQueue] = {}

    def queue(self, project_id: str) -> TaskQueue:
        name = self.queue_of(project_id)
        if name not in self._queues:
            self._queues[name] = TaskQueue(
                self.system.client, name, keys=self.system.keys, codec=self.codec
            )
        return self._queues[name]

    async def __call__(self, stored: StoredEvent) -> None:
        event = stored.event
        if isinstance(event, TaskDispatched):
            spec = event.task
            task = self.codec.decode_payload(spec.type, spec.version, spec.payload)
            fresh = await self.queue(event.project_id).enqueue_once(task, task_id=event.dispatch_id)
            log_event(
                "task enqueued",
                "task.enqueued",
                task=spec.task_id,
                dispatch=event.dispatch_id,
                attempt=event.attempt,
                duplicate=not fresh,
            )
        elif isinstance(event, TaskDeadLettered):
            spec = event.task
            task = self.codec.decode_payload(spec.type, spec.version, spec.payload)
            dead_id = dispatch_id(event.project_id, spec.task_id, event.attempts)
            await self.queue(event.project_id).dead_letter_once(task, task_id=dead_id)
            log_event("task dead-lettered", "task.dead", task=spec.task_id, error=event.error)

    async def run(
        self, cursor: Cursor | None, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        await follow(self.system, COORDINATOR, self, cursor, task_status=task_status)


async def forward_results(
    system: ActorSystem,
    queue: TaskQueue,
    cursor: Cursor | None,
    *,
    on_result: Callable[[TaskResult], None] | None = None,
    poll_s: float = 0.05,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Send each result of `queue` to the coordinator, in order, forever, from the cursor's
    stream id (the first result when it has none), saving the cursor after each send."""
    position = (None if cursor is None else await cursor.get()) or "0"
    task_status.started()
    while True:
        for entry_id, result in await queue.results(after=position):
            result_id = entry_id.decode()
            record = RecordResult(
                result_id=result_id,
                dispatch_id=result.task_id,
                ok=result.ok,
                worker=result.worker,
                finished_at=result.finished_at,
                error=result.error,
                value_type=result.value_type,
                value_version=result.value_version,
                value=result.value,
            )
            key = f"result:{queue.name}:{result_id}"
            await system.send(COORDINATOR, record, idempotency_key=key)
            log_event(
                "task result",
                "task.result",
                dispatch=result.task_id,
                worker=result.worker,
                ok=result.ok,
                error=result.error,
            )
            if on_result is not None:
                on_result(result)
            position = result_id
            if cursor is not None:
                await cursor.set(position)
        await anyio.sleep(poll_s)


class RecoveryExecutor:
    """Carries out the health monitor's recovery decisions about the worker agents that one
    supervisor runs on one queue: `restart` kills the agent's process if it still runs and
    has the supervisor start that child again (a crashed transient child it restarts on its
    own); `replace` retires the child and starts a new one; both first hand the agent's tasks
    back to the queue. `alert` is a person's call. Each decision ends with `RecoveryDone`.

    A decision about an agent that is not (or no longer) this supervisor's but holds tasks on
    this queue (from before a restart of this process) still gets its tasks handed back."""

    def __init__(
        self,
        system: ActorSystem,
        supervisor: Supervisor,
        queue: TaskQueue,
        *,
        visibility_ms: int,
        cursor: Cursor | None = None,
    ) -> None:
        self.system = system
        self.supervisor = supervisor
        self.queue = queue
        self.visibility_ms = visibility_ms
        self.cursor = cursor

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Follow the monitor's log from the cursor; a new executor (no cursor yet) starts at the
        log's end: no decision made before it existed can be about its supervisor's agents."""
        start = await self.system.store.version(MONITOR)
        await follow(
            self.system, MONITOR, self.handle, self.cursor, start=start, task_status=task_status
        )

    async def handle(self, stored: StoredEvent) -> None:
        if isinstance(stored.event, RecoveryDecided):
            await self.carry_out(stored.event, stored.version)

    async def carry_out(self, decision: RecoveryDecided, version: int) -> RecoveryDone | None:
        """Act on one decision (recorded at `version`); returns what was reported, if anything.
        Safe to repeat: the supervisor restarts or replaces an agent once."""
        agent_id = decision.agent_id
        ours = self.supervisor.child_of(agent_id) is not None
        if decision.action == "alert" and ours:
            log_event("left to a person", "recovery.alert", agent=agent_id)
            return None
        replacement: str | None = None
        if ours and decision.action == "restart":
            replacement = await self.supervisor.restart(agent_id)
        elif ours and decision.action == "replace":
            replacement = await self.supervisor.replace(agent_id)
        # Killed first, so it cannot take more: its tasks go back to the others now.
        moved = await release(self.queue, agent_id, self.visibility_ms)
        if not ours and not moved:
            return None  # another group's agent, or nothing to hand back
        detail = f"released {len(moved)} pending task(s)"
        if not ours:
            detail += "; not a process of this group"
        elif replacement is None:
            detail += "; no new process: the group has stopped"
        done = RecoveryDone(
            agent_id=agent_id, action=decision.action, replacement=replacement, detail=detail
        )
        log_event("recovery done", "recovery.done", detail=done)
        key = f"recovery:{agent_id}:{version}"
        await self.system.send(MONITOR, done, idempotency_key=key)
        return done


async def run_worker_group(
    system: ActorSystem,
    supervisor: Supervisor,
    queue: TaskQueue,
    *,
    visibility_ms: int,
    handle_signals: bool = True,
) -> None:
    """`repertory spawn --workers`: the supervisor and the executor of its recovery decisions,
    until the supervisor stops (a signal, every worker done, or too many restarts)."""
    cursor = Cursor(system.client, system.keys, f"recovery:{queue.name}:{supervisor.prefix}")
    executor = RecoveryExecutor(
        system, supervisor, queue, visibility_ms=visibility_ms, cursor=cursor
    )
    async with anyio.create_task_group() as group:
        await group.start(executor.run)
        await supervisor.run(handle_signals=handle_signals)
        group.cancel_scope.cancel()


class NodeWatcher:
    """Makes the nodes of the membership set visible to the health monitor as agents of role
    `node`: registers each live node, heartbeats for it while its membership is fresh, and
    deregisters a node that left (removed before its expiry: a graceful stop). A node that
    dies stops being beaten for once its membership expires, so the monitor finds it down; one
    that comes back under its name (a supervisor's restart) rejoins.

    Rounds come every `every_s`, which must be shorter than the monitor's heartbeat period and
    than the nodes' membership TTL less their heartbeat period (3 s - 1 s by default), so that
    a node seen live at one round cannot both leave and expire before the next."""

    def __init__(
        self,
        system: ActorSystem,
        *,
        strategy: Strategy = "alert",
        every_s: float = 1.0,
        monitor: Address = MONITOR,
    ) -> None:
        self.system = system
        self.strategy = strategy
        self.every_s = every_s
        self.monitor = monitor
        self.expiry: dict[str, int] = {}
        """Each node watched, and when its membership was last seen to expire (server ms)."""
        self._seeded = False

    async def run(self) -> None:
        while True:
            await self.sync()
            await anyio.sleep(self.every_s)

    async def sync(self) -> None:
        """One round: register, beat for or deregister each node as the membership says."""
        client = self.system.client
        seconds, micros = await client.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        rows = await client.zrange(self.system.keys.nodes(), 0, -1, withscores=True)
        members = {as_text(member): int(score) for member, score in rows}
        if not self._seeded:
            await self._seed(members)
        for node, expiry in members.items():
            if expiry <= now_ms:
                continue  # silent: the monitor will notice
            if node not in self.expiry:
                register = Register(agent_id=node, role="node", strategy=self.strategy)
                await self.system.send(self.monitor, register)
                log_event("node registered", "node.registered", node=node)
            await self.system.send(self.monitor, Heartbeat(agent_id=node))
            self.expiry[node] = expiry
        for node, expiry in list(self.expiry.items()):
            if node in members:
                continue
            del self.expiry[node]
            if expiry > now_ms:
                await self.system.send(self.monitor, Deregister(agent_id=node, reason="left"))
                log_event("node left", "node.left", node=node)

    async def _seed(self, members: dict[str, int]) -> None:
        """Nodes the monitor already watches (from an earlier watcher) need no new register."""
        state = (await self.system.state_of(self.monitor)).state
        if isinstance(state, HealthState):
            for node, agent in state.agents.items():
                if agent.role == "node" and agent.status != "left" and node in members:
                    self.expiry[node] = members[node]
        self._seeded = True
