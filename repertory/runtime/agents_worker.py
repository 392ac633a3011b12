"""A worker agent process: `python -m repertory.runtime.agents_worker --url URL --queue Q ...`.

Stateless: it registers with the health monitor, heartbeats (with how much work it holds and
how much it has finished, so the monitor can tell a zombie from a busy agent), takes tasks from
the shared queue with a `Worker` (whose own heartbeat keeps each claim), and exits 0 once the
queue is empty and the coordinator's log says the project is complete.
"""

import argparse
import importlib
import json
import logging
import sys
import time
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
from repertory.runtime.system import ActorSystem
from repertory.runtime.worker import TaskHandler, Worker, WorkerConfig
from repertory.streams.keys import Address
from repertory.streams.taskqueue import TaskQueue

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
    project_id: str
    visibility_s: float = 5.0
    heartbeat_s: float = 2.0
    strategy: Strategy = "restart"
    block_ms: int = 200


async def run_agent(system: ActorSystem, handler: TaskHandler, options: AgentOptions) -> int:
    """Serve the queue until the project is complete; returns the tasks this agent settled."""
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
        logger.info(
            "agent registered",
            extra={"fields": {"event": "agent.registered", "agent": options.agent_id}},
        )
        async with anyio.create_task_group() as group:
            group.start_soon(beat)
            while not await _project_done(system, options.project_id):
                await worker.run(until_empty=True)
            group.cancel_scope.cancel()
        await system.send(MONITOR, Deregister(agent_id=options.agent_id))
        logger.info(
            "agent done",
            extra={
                "fields": {"event": "agent.done", "agent": options.agent_id, "settled": progress}
            },
        )
    return worker.handled


async def _project_done(system: ActorSystem, project_id: str) -> bool:
    state = (await system.state_of(COORDINATOR)).state
    assert isinstance(state, CoordinatorState)
    project = state.projects.get(project_id)
    return project is not None and project.done


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m repertory.runtime.agents_worker")
    parser.add_argument("--url", required=True)
    parser.add_argument("--app", default="agents")
    parser.add_argument("--queue", required=True)
    parser.add_argument("--project", required=True)
    parser.add_argument("--agent-id", required=True)
    parser.add_argument("--handler", default="repertory.runtime.agents_demo:do_work")
    parser.add_argument("--visibility", type=float, default=5.0)
    parser.add_argument("--heartbeat", type=float, default=2.0)
    parser.add_argument("--strategy", choices=["restart", "replace", "alert"], default="restart")
    args = parser.parse_args(argv)
    json_logging(agent=args.agent_id)
    # The demo's task types are registered by importing the handler's module.
    handler = load_handler(args.handler)
    strategy: Strategy = args.strategy
    options = AgentOptions(
        agent_id=args.agent_id,
        queue=args.queue,
        project_id=args.project,
        visibility_s=args.visibility,
        heartbeat_s=args.heartbeat,
        strategy=strategy,
    )
    started = time.monotonic()
    count = anyio.run(run_agent, agents_system(args.url, app=args.app), handler, options)
    logger.info(
        "agent exiting",
        extra={
            "fields": {
                "event": "agent.exit",
                "agent": args.agent_id,
                "handled": count,
                "seconds": round(time.monotonic() - started, 3),
            }
        },
    )


if __name__ == "__main__":
    main()
