"""A worker agent process, started by `repertory spawn --workers HANDLER` (or by hand:
`python -m repertory.runtime.agents_worker --url URL --queue Q --agent-id ID ...`).

Stateless: it registers with the health monitor, heartbeats (with how much work it holds and
how much it has finished, so the monitor can tell a zombie from a busy agent), takes tasks from
the shared queue with a `Worker` (whose own heartbeat keeps each claim), and exits 0 once the
queue is empty and the coordinator's log says the project is complete (given `--project`), or
on SIGTERM/SIGINT: the task in hand is finished first, anything else it holds is handed back.
"""

import argparse
import importlib
import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec

from repertory.actors.agents import (
    Coordinator,
    CoordinatorState,
    Deregister,
    HealthMonitor,
    Heartbeat,
    Register,
    Strategy,
)
from repertory.runtime import eventloop
from repertory.runtime.system import ActorSystem
from repertory.runtime.worker import TaskHandler, Worker, WorkerConfig
from repertory.streams.keys import Address
from repertory.streams.taskqueue import WORKERS_GROUP, TaskQueue

logger = logging.getLogger("repertory.agents.worker")

COORDINATOR = Address("coordinator", "main")
MONITOR = Address("health", "main")


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's `fields`."""

    def __init__(self, **static: str) -> None:
        super().__init__()
        self.static = static

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            **self.static,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            document.update(fields)
        return json.dumps(document, default=str)


def json_logging(stream: Any = None, **static: str) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonLogFormatter(**static))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


def agents_system(url: str | None, *, app: str = "agents") -> ActorSystem:
    """The system a worker talks to: it only sends to the monitor and reads the coordinator's
    log, so the coordinator needs no planner here."""
    return ActorSystem(Coordinator(), HealthMonitor(), url=url, app=app, partitions=4)


def load_handler(spec: str) -> TaskHandler:
    module_name, _, attribute = spec.partition(":")
    handler: TaskHandler = getattr(importlib.import_module(module_name), attribute)
    return handler


@dataclass(kw_only=True)
class AgentOptions:
    agent_id: str
    queue: str
    project_id: str | None = None
    """Exit once the queue is empty and this project is complete; None: serve until a signal."""
    visibility_s: float = 5.0
    heartbeat_s: float = 2.0
    strategy: Strategy = "restart"
    block_ms: int = 200
    stop_grace_s: float = 30.0
    """On a signal, how long the task in hand may take to finish before it is abandoned."""


async def release(queue: TaskQueue, agent_id: str, visibility_ms: int) -> list[str]:
    """Make `agent_id`'s pending tasks claimable by any worker now: each stays owned by it but
    looks idle for a whole visibility timeout, so the next XAUTOCLAIM of a live worker takes it
    instead of waiting for the timeout to run out. Returns their entry ids."""
    rows = await queue.inbox.pending_entries(consumer=agent_id)
    ids = [row.id for row in rows]
    if ids:
        await queue.client.xclaim(
            queue.tasks_key, WORKERS_GROUP, agent_id, 0, ids, idle=visibility_ms, justid=True
        )
    return [entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id) for entry_id in ids]


async def run_agent(
    system: ActorSystem,
    handler: TaskHandler,
    options: AgentOptions,
    *,
    stop: anyio.Event | None = None,
) -> int:
    """Serve the queue until the project is complete, or until `stop` is set (the process's
    signal handler sets it); returns the tasks this agent settled."""
    stop = stop or anyio.Event()
    busy = 0
    progress = 0

    async def tracked(task: msgspec.Struct) -> msgspec.Struct | None:
        nonlocal busy, progress
        busy += 1
        try:
            return await handler(task)
        finally:
            busy -= 1
            progress += 1

    async def beat() -> None:
        while True:
            beat = Heartbeat(agent_id=options.agent_id, pending=busy, progress=progress)
            await system.send(MONITOR, beat)
            await anyio.sleep(options.heartbeat_s)

    async def serve(worker: Worker) -> None:
        if options.project_id is None:
            await worker.run()
            return
        while not await _project_done(system, options.project_id):
            await worker.run(until_empty=True)

    async def stop_after_task_in_hand(worker: Worker, serving: anyio.CancelScope) -> None:
        await stop.wait()
        # Settled means acknowledged: wait until this agent holds nothing (or the grace ends).
        with anyio.move_on_after(options.stop_grace_s):
            while True:
                held = await worker.queue.inbox.pending_entries(consumer=options.agent_id)
                if not busy and not held:
                    break
                await anyio.sleep(0.02)
        serving.cancel()

    async with system:
        queue = TaskQueue(system.client, options.queue, keys=system.keys)
        config = WorkerConfig(
            worker_id=options.agent_id,
            visibility_timeout_s=options.visibility_s,
            max_attempts=1,  # the coordinator decides about retries and dead letters
            dead_letter=False,
            block_ms=options.block_ms,
        )
        worker = Worker(queue, tracked, config)
        register = Register(
            agent_id=options.agent_id, strategy=options.strategy, notify=str(COORDINATOR)
        )
        await system.send(MONITOR, register)
        _log_event("agent registered", "agent.registered", agent=options.agent_id)
        async with anyio.create_task_group() as group:
            group.start_soon(beat)
            with anyio.CancelScope() as serving:
                group.start_soon(stop_after_task_in_hand, worker, serving)
                await serve(worker)
            group.cancel_scope.cancel()
        reason = "stopped" if stop.is_set() else "finished"
        if stop.is_set():
            # A task taken but not begun when the stop came: handed back to the others at once.
            handed_back = await release(queue, options.agent_id, round(options.visibility_s * 1000))
            if handed_back:
                _log_event("tasks handed back", "agent.released", tasks=handed_back)
        await system.send(MONITOR, Deregister(agent_id=options.agent_id, reason=reason))
        _log_event("agent done", "agent.done", agent=options.agent_id, settled=progress)
    return worker.handled


def _log_event(message: str, event: str, **fields: Any) -> None:
    logger.info(message, extra={"fields": {"event": event, **fields}})


async def _project_done(system: ActorSystem, project_id: str) -> bool:
    state = (await system.state_of(COORDINATOR)).state
    assert isinstance(state, CoordinatorState)
    project = state.projects.get(project_id)
    return project is not None and project.done


async def _serve_until_signal(
    system: ActorSystem, handler: TaskHandler, options: AgentOptions
) -> int:
    stop = anyio.Event()
    async with anyio.create_task_group() as group:

        async def on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for received in signals:
                    _log_event("stopping", "agent.signal", signal=signal.Signals(received).name)
                    stop.set()

        group.start_soon(on_signal)
        handled = await run_agent(system, handler, options, stop=stop)
        group.cancel_scope.cancel()
    return handled


def worker_command(
    handler: str,
    *,
    url: str,
    queue: str,
    project_id: str | None = None,
    app: str = "agents",
    visibility_s: float = 5.0,
    heartbeat_s: float = 2.0,
    strategy: Strategy = "restart",
    stop_grace_s: float = 10.0,
) -> Callable[[str], list[str]]:
    """The command line of one worker agent process running as the id it is given (for
    `Supervisor`)."""

    def command(agent_id: str) -> list[str]:
        project = ["--project", project_id] if project_id is not None else []
        return [
            sys.executable,
            "-m",
            "repertory.runtime.agents_worker",
            *("--url", url, "--app", app, "--queue", queue, *project),
            *("--agent-id", agent_id, "--handler", handler, "--strategy", strategy),
            *("--visibility", str(visibility_s), "--heartbeat", str(heartbeat_s)),
            *("--stop-grace", str(stop_grace_s)),
        ]

    return command


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m repertory.runtime.agents_worker")
    parser.add_argument("--url", required=True)
    parser.add_argument("--app", default="agents")
    parser.add_argument("--queue", required=True)
    parser.add_argument("--project", help="exit once this project is complete")
    parser.add_argument("--agent-id", required=True)
    parser.add_argument("--handler", default="repertory.runtime.agents_demo:do_work")
    parser.add_argument("--visibility", type=float, default=5.0)
    parser.add_argument("--heartbeat", type=float, default=2.0)
    parser.add_argument("--strategy", choices=["restart", "replace", "alert"], default="restart")
    parser.add_argument(
        "--stop-grace", type=float, default=30.0, help="seconds to finish a task on a signal"
    )
    args = parser.parse_args(argv)
    json_logging(agent=args.agent_id)
    # The task types are registered by importing the handler's module.
    handler = load_handler(args.handler)
    strategy: Strategy = args.strategy
    options = AgentOptions(
        agent_id=args.agent_id,
        queue=args.queue,
        project_id=args.project,
        visibility_s=args.visibility,
        heartbeat_s=args.heartbeat,
        strategy=strategy,
        stop_grace_s=args.stop_grace,
    )
    started = time.monotonic()
    system = agents_system(args.url, app=args.app)
    count = eventloop.run(_serve_until_signal, system, handler, options)
    _log_event(
        "agent exiting",
        "agent.exit",
        agent=args.agent_id,
        handled=count,
        seconds=round(time.monotonic() - started, 3),
    )


if __name__ == "__main__":
    main()
