"""`repertory demo`: a coordinator, a health monitor and worker processes on the embedded server.

This process runs a node (the coordinator and the health monitor actors) and three followers
that carry out what those actors decided, idempotently: the dispatcher enqueues each
`TaskDispatched` once by its dispatch id, the results consumer sends each result to the
coordinator with the result's stream id as idempotency key, and the recovery executor carries
out each `RecoveryDecided` (kill, release the agent's pending work, start a replacement) and
reports it back. Worker agents are separate processes (`repertory.runtime.agents_worker`); one
is killed with SIGKILL mid-project, and the summary shows where its task went.

`repertory replay coordinator/main repertory.runtime.agents_demo:system` replays the log.
"""

import logging
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import anyio
import msgspec
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from repertory.actors.agents import (
    AgentDown,
    AgentRecovered,
    AgentZombie,
    Coordinator,
    CoordinatorState,
    DegradedEntered,
    DegradedLeft,
    HealthMonitor,
    HealthPolicy,
    HealthState,
    PlannedTask,
    RecordResult,
    RecoveryDecided,
    RecoveryDone,
    StartProject,
    TaskCompleted,
    TaskDeadLettered,
    TaskDispatched,
    dispatch_id,
)
from repertory.runtime.agents_worker import COORDINATOR, MONITOR, JsonLogFormatter
from repertory.runtime.node import Node, NodeConfig
from repertory.runtime.system import ActorSystem
from repertory.schemas import schema
from repertory.schemas.errors import RepertoryError
from repertory.streams.embedded import EmbeddedServer
from repertory.streams.eventstore import StoredEvent
from repertory.streams.keys import Address
from repertory.streams.taskqueue import WORKERS_GROUP, TaskQueue, TaskResult

logger = logging.getLogger("repertory.agents")


@schema("demo.agents.work")
class Work(msgspec.Struct, frozen=True):
    index: int
    seconds: float


@schema("demo.agents.work_done")
class WorkDone(msgspec.Struct, frozen=True):
    index: int


async def do_work(task: msgspec.Struct) -> WorkDone:
    """The demo's task handler: about a second of (simulated) work."""
    if not isinstance(task, Work):
        raise TypeError(f"not a demo task: {type(task).__name__}")
    await anyio.sleep(task.seconds)
    return WorkDone(task.index)


_GOAL = re.compile(r"(\d+) tasks of ([0-9.]+) s")


def plan(goal: str) -> Sequence[PlannedTask]:
    """The demo's planner, a plain function: '20 tasks of 1.0 s' -> 20 independent tasks."""
    found = _GOAL.search(goal)
    if found is None:
        raise RepertoryError(f"the demo planner does not understand {goal!r}")
    count, seconds = int(found[1]), float(found[2])
    return [PlannedTask(f"t{index:02d}", Work(index, seconds)) for index in range(count)]


def make_system(url: str | None, policy: HealthPolicy | None = None) -> ActorSystem:
    return ActorSystem(
        Coordinator(plan), HealthMonitor(policy), url=url, app="agents", partitions=4
    )


system = make_system(None)
"""For `repertory run|replay|check ... repertory.runtime.agents_demo:system`."""


def _log(message: str, **fields: Any) -> None:
    logger.info(message, extra={"fields": fields})


async def follow(
    system: ActorSystem,
    address: Address,
    handle: Callable[[StoredEvent], Awaitable[None]],
    after: int = 0,
    poll_s: float = 0.05,
) -> None:
    """Call `handle` on each event of `address` after version `after`, in order, forever."""
    version = after
    while True:
        async for stored in system.store.read(address, start=version + 1):
            await handle(stored)
            version = stored.version
        await anyio.sleep(poll_s)


class WorkerPool:
    """The worker agent processes of one run, each logging JSON lines to its own file."""

    def __init__(
        self,
        url: str,
        queue: str,
        project_id: str,
        log_dir: Path,
        *,
        visibility_s: float,
        heartbeat_s: float,
    ) -> None:
        self.url, self.queue, self.project_id, self.log_dir = url, queue, project_id, log_dir
        self.visibility_s, self.heartbeat_s = visibility_s, heartbeat_s
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []
        self.suffix = project_id.rsplit("-", 1)[-1]

    def start(self) -> str:
        agent_id = f"worker-{len(self.processes) + 1}.{self.suffix}"
        log = (self.log_dir / f"{agent_id}.log").open("ab")
        self._logs.append(log)
        command = [
            sys.executable,
            "-m",
            "repertory.runtime.agents_worker",
            *("--url", self.url, "--queue", self.queue, "--project", self.project_id),
            *("--agent-id", agent_id, "--visibility", str(self.visibility_s)),
            *("--heartbeat", str(self.heartbeat_s)),
        ]
        self.processes[agent_id] = subprocess.Popen(command, stdout=log, stderr=log)
        _log("worker started", event="worker.started", agent=agent_id)
        return agent_id

    def kill(self, agent_id: str) -> bool:
        process = self.processes.get(agent_id)
        if process is None or process.poll() is not None:
            return False
        process.send_signal(signal.SIGKILL)
        process.wait()
        return True

    def running(self) -> list[str]:
        return [name for name, process in self.processes.items() if process.poll() is None]

    def exit_codes(self) -> dict[str, int | None]:
        return {name: process.poll() for name, process in self.processes.items()}

    def close(self) -> None:
        """No process outlives the run: a worker still there is stopped, then killed."""
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for log in self._logs:
            log.close()


async def release(queue: TaskQueue, agent_id: str, visibility_ms: int) -> list[str]:
    """Make `agent_id`'s pending tasks claimable by any worker now (replace: its work moves):
    each stays owned by it but looks idle for a whole visibility timeout, so the next
    XAUTOCLAIM of a live worker takes it instead of waiting for the timeout to run out."""
    rows = await queue.inbox.pending_entries(consumer=agent_id)
    ids = [row.id for row in rows]
    if ids:
        await queue.client.xclaim(
            queue.tasks_key, WORKERS_GROUP, agent_id, 0, ids, idle=visibility_ms, justid=True
        )
    return [entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id) for entry_id in ids]


@dataclass(kw_only=True)
class DemoConfig:
    tasks: int = 20
    workers: int = 4
    seconds: float = 1.0
    kill: bool = True
    visibility_s: float = 5.0
    policy: HealthPolicy = field(default_factory=HealthPolicy)
    timeout_s: float = 50.0
    log_dir: Path = Path(".repertory/agents-demo")


@dataclass(kw_only=True)
class DemoReport:
    project_id: str
    queue: str
    wall_s: float
    sequential_s: float
    tasks: int
    completed: int
    dead: int
    ok_results: dict[str, int]
    completions: dict[str, int]
    done_by: dict[str, str]
    victim: str | None = None
    victim_tasks: list[str] = field(default_factory=list)
    killed_at_ms: int = 0
    detected_at_ms: int = 0
    recoveries: list[AgentRecovered] = field(default_factory=list)
    health_decisions: list[str] = field(default_factory=list)
    exit_codes: dict[str, int | None] = field(default_factory=dict)

    @property
    def exactly_once(self) -> bool:
        """Every task completed, by exactly one successful result and one completion event."""
        every = set(self.done_by)
        return (
            self.completed == self.tasks
            and all(self.ok_results.get(task, 0) == 1 for task in every)
            and all(self.completions.get(task, 0) == 1 for task in every)
            and len(every) == self.tasks
        )

    @property
    def moved(self) -> dict[str, str]:
        """The killed worker's tasks and who completed each instead."""
        return {task: self.done_by.get(task, "?") for task in self.victim_tasks}


@dataclass
class _Live:
    results: list[TaskResult] = field(default_factory=list)
    decisions: list[str] = field(default_factory=list)
    recoveries: list[AgentRecovered] = field(default_factory=list)
    detected_at_ms: int = 0
    failures: int = 0
    coordinator: CoordinatorState | None = None
    health: HealthState | None = None


async def run_project(url: str, config: DemoConfig, console: Console | None = None) -> DemoReport:
    """Run one project end to end on the server at `url` and report what happened."""
    config.log_dir.mkdir(parents=True, exist_ok=True)
    project_id = f"project-{uuid.uuid4().hex[:6]}"
    queue_name = project_id
    goal = f"{config.tasks} tasks of {config.seconds} s"
    agents = make_system(url, config.policy)
    live = _Live()
    visibility_ms = round(config.visibility_s * 1000)
    async with agents:
        queue = TaskQueue(agents.client, queue_name, keys=agents.keys)
        await queue.ensure()
        pool = WorkerPool(
            url,
            queue_name,
            project_id,
            config.log_dir,
            visibility_s=config.visibility_s,
            heartbeat_s=config.policy.heartbeat_ms / 1000,
        )
        # Followers start after what earlier runs left in the logs.
        coordinator_from = (await agents.state_of(COORDINATOR)).version
        monitor_from = (await agents.state_of(MONITOR)).version
        codec = queue.codec

        async def dispatch(stored: StoredEvent) -> None:
            event = stored.event
            if isinstance(event, TaskDispatched) and event.project_id == project_id:
                spec = event.task
                task = codec.decode_payload(spec.type, spec.version, spec.payload)
                fresh = await queue.enqueue_once(task, task_id=event.dispatch_id)
                _log(
                    "task enqueued",
                    event="task.enqueued",
                    task=spec.task_id,
                    dispatch=event.dispatch_id,
                    attempt=event.attempt,
                    duplicate=not fresh,
                )
            elif isinstance(event, TaskDeadLettered) and event.project_id == project_id:
                spec = event.task
                task = codec.decode_payload(spec.type, spec.version, spec.payload)
                dead_id = dispatch_id(project_id, spec.task_id, event.attempts)
                await queue.dead_letter_once(task, task_id=dead_id)
                _log("task dead-lettered", event="task.dead", task=spec.task_id, error=event.error)

        async def consume_results() -> None:
            cursor: bytes = b"0"
            while True:
                for entry_id, result in await queue.results(after=cursor):
                    record = RecordResult(
                        result_id=entry_id.decode(),
                        dispatch_id=result.task_id,
                        ok=result.ok,
                        worker=result.worker,
                        finished_at=result.finished_at,
                        error=result.error,
                        value_type=result.value_type,
                        value_version=result.value_version,
                        value=result.value,
                    )
                    key = f"result:{queue_name}:{entry_id.decode()}"
                    await agents.send(COORDINATOR, record, idempotency_key=key)
                    live.results.append(result)
                    _log(
                        "task result",
                        event="task.result",
                        dispatch=result.task_id,
                        worker=result.worker,
                        ok=result.ok,
                        error=result.error,
                    )
                    cursor = entry_id
                await anyio.sleep(0.05)

        async def recover(stored: StoredEvent) -> None:
            event = stored.event
            if isinstance(event, AgentDown | AgentZombie | DegradedEntered | DegradedLeft):
                live.decisions.append(
                    f"{type(event).__name__} {msgspec.json.encode(event).decode()}"
                )
                _log("health decision", event="health." + type(event).__name__, detail=event)
                if isinstance(event, AgentDown | AgentZombie):
                    live.failures += 1
                    live.detected_at_ms = live.detected_at_ms or event.at_ms
            elif isinstance(event, AgentRecovered):
                live.recoveries.append(event)
                _log("health decision", event="health.AgentRecovered", detail=event)
            elif isinstance(event, RecoveryDecided):
                live.decisions.append(f"RecoveryDecided {event.agent_id}: {event.action}")
                _log("health decision", event="health.RecoveryDecided", detail=event)
                if event.agent_id not in pool.processes or event.action == "alert":
                    return  # not ours to recover, or a person's call
                pool.kill(event.agent_id)  # a zombie or a paused process must not come back
                moved = await release(queue, event.agent_id, visibility_ms)
                replacement = pool.start() if event.action == "restart" else None
                done = RecoveryDone(
                    agent_id=event.agent_id,
                    action=event.action,
                    replacement=replacement,
                    detail=f"released {len(moved)} pending task(s)",
                )
                key = f"recovery:{event.agent_id}:{stored.version}"
                await agents.send(MONITOR, done, idempotency_key=key)

        report = DemoReport(
            project_id=project_id,
            queue=queue_name,
            wall_s=0.0,
            sequential_s=config.tasks * config.seconds,
            tasks=config.tasks,
            completed=0,
            dead=0,
            ok_results={},
            completions={},
            done_by={},
        )
        try:
            async with anyio.create_task_group() as group:
                node = Node(agents, NodeConfig(node_id=f"demo-{os.getpid()}"))
                await group.start(node.run)
                group.start_soon(follow, agents, COORDINATOR, dispatch, coordinator_from)
                group.start_soon(follow, agents, MONITOR, recover, monitor_from)
                group.start_soon(consume_results)
                for _ in range(config.workers):
                    pool.start()
                await agents.ask(COORDINATOR, StartProject(project_id=project_id, goal=goal))
                _log("project started", event="project.started", project=project_id, goal=goal)
                await _watch(agents, pool, queue, config, report, live, console, project_id)
                node.stop()
                await node.stopped.wait()
                group.cancel_scope.cancel()
        finally:
            pool.close()
        report.exit_codes = pool.exit_codes()
        await _account(agents, report, live, project_id, coordinator_from)
    return report


async def _watch(
    agents: ActorSystem,
    pool: WorkerPool,
    queue: TaskQueue,
    config: DemoConfig,
    report: DemoReport,
    live: _Live,
    console: Console | None,
    project_id: str,
) -> None:
    """Refresh the view, kill a worker mid-project, and return once the project is complete,
    every worker has exited and (after a kill) the monitor has recorded the recovery."""
    kill_after = max(1, config.tasks // 4)
    display = Live(console=console, refresh_per_second=8) if console is not None else None
    with anyio.fail_after(config.timeout_s):
        if display is not None:
            display.start()
        try:
            while True:
                live.coordinator = (await agents.state_of(COORDINATOR)).state
                live.health = (await agents.state_of(MONITOR)).state
                project = live.coordinator.projects.get(project_id) if live.coordinator else None
                done = project.count("done") if project else 0
                if config.kill and report.victim is None and done >= kill_after:
                    await _kill_one(pool, queue, report)
                if display is not None:
                    display.update(_view(live, pool, report, config, project_id))
                recovered = report.victim is None or any(
                    r.agent_id == report.victim for r in live.recoveries
                )
                if project is not None and project.done and not pool.running() and recovered:
                    return
                await anyio.sleep(0.1)
        finally:
            if display is not None:
                display.update(_view(live, pool, report, config, project_id))
                display.stop()


async def _kill_one(pool: WorkerPool, queue: TaskQueue, report: DemoReport) -> None:
    """SIGKILL a worker that holds a task right now, and note which tasks it held."""
    rows = await queue.inbox.pending_entries()
    running = set(pool.running())
    victim = next((row.consumer for row in rows if row.consumer in running), None)
    if victim is None:
        return
    report.killed_at_ms = time.time_ns() // 1_000_000
    pool.kill(victim)
    # Read what it held only once it is dead: until then it may finish one task and take another.
    tasks = []
    for row in await queue.inbox.pending_entries(consumer=victim):
        for _, fields in await queue.client.xrange(queue.tasks_key, row.id, row.id):
            tasks.append(queue.codec.decode_envelope(fields[b"m"]).id)
    report.victim = victim
    report.victim_tasks = [task.split(":")[1] for task in tasks]
    _log("worker killed", event="worker.killed", agent=victim, held=tasks)


def _short(agent: str) -> str:
    return agent.split(".", 1)[0]


def _view(
    live: _Live, pool: WorkerPool, report: DemoReport, config: DemoConfig, project_id: str
) -> Group:
    coordinator = live.coordinator
    project = coordinator.projects.get(project_id) if coordinator else None
    done = project.count("done") if project else 0
    failures = sum(1 for r in live.results if not r.ok)
    header = Table.grid(padding=(0, 2))
    header.add_row(
        f"[bold]{project_id}[/]",
        f"tasks done [bold]{done}/{config.tasks}[/]",
        f"failed attempts {failures}",
        f"agent failures {live.failures}",
        f"recoveries {len(live.recoveries)}",
        "[yellow]degraded[/]" if live.health and live.health.degraded else "normal",
    )
    table = Table(title="worker agents")
    for column in ("agent", "pid", "process", "health", "tasks done"):
        table.add_column(column)
    per_worker = Counter(r.worker for r in live.results if r.ok)
    health = live.health.agents if live.health else {}
    for agent, process in pool.processes.items():
        code = process.poll()
        state = "running" if code is None else ("killed" if code < 0 else f"exited {code}")
        status = health[agent].status if agent in health else "-"
        table.add_row(_short(agent), str(process.pid), state, status, str(per_worker[agent]))
    lines: list[Table | str] = [header, table]
    lines.extend(f"[dim]health:[/] {decision}" for decision in live.decisions[-4:])
    return Group(*lines)


async def _account(
    agents: ActorSystem, report: DemoReport, live: _Live, project_id: str, after: int
) -> None:
    """Count, from the logs, what took effect: results per task and completions per task."""
    state = (await agents.state_of(COORDINATOR)).state
    assert isinstance(state, CoordinatorState)
    project = state.projects[project_id]
    report.completed = project.count("done")
    # The project's own time, from its log: the run also waits for the recovery to be recorded.
    report.wall_s = (project.finished_at - project.started_at) / 1000 if project.done else 0.0
    report.dead = project.count("dead")
    report.done_by = {tid: t.worker for tid, t in project.tasks.items() if t.status == "done"}
    queue = TaskQueue(agents.client, report.queue, keys=agents.keys)
    for _, result in await queue.results():
        if result.ok:
            task = result.task_id.split(":")[1]
            report.ok_results[task] = report.ok_results.get(task, 0) + 1
    async for stored in agents.store.read(COORDINATOR, start=after + 1):
        event = stored.event
        if isinstance(event, TaskCompleted) and event.project_id == project_id:
            report.completions[event.task_id] = report.completions.get(event.task_id, 0) + 1
    report.recoveries = list(live.recoveries)
    report.detected_at_ms = live.detected_at_ms
    report.health_decisions = list(live.decisions)


def _summary(report: DemoReport, console: Console, data_dir: Path, config: DemoConfig) -> None:
    console.print()  # the live view's last frame does not end its line
    table = Table(title="summary", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    speedup = report.sequential_s / report.wall_s if report.wall_s else 0.0
    table.add_row("project", report.project_id)
    table.add_row("tasks", f"{report.completed}/{report.tasks} completed, {report.dead} dead")
    table.add_row(
        "wall time",
        f"{report.wall_s:.1f} s vs {report.sequential_s:.1f} s sequential ({speedup:.1f}x)",
    )
    per_worker = Counter(_short(worker) for worker in report.done_by.values())
    table.add_row("per worker", ", ".join(f"{w}: {n}" for w, n in sorted(per_worker.items())))
    if report.victim is not None:
        table.add_row("killed (SIGKILL)", _short(report.victim))
        moved = ", ".join(f"{t} -> {_short(w)}" for t, w in report.moved.items()) or "none held"
        table.add_row("moved after the kill", moved)
        if report.detected_at_ms:
            seconds = (report.detected_at_ms - report.killed_at_ms) / 1000
            table.add_row("failure detected", f"{seconds:.1f} s after the kill")
    for recovery in report.recoveries:
        table.add_row(
            "recovery",
            f"{_short(recovery.agent_id)}: {recovery.action}"
            + (f" -> {_short(recovery.replacement)}" if recovery.replacement else "")
            + f" ({recovery.detail})",
        )
    table.add_row("exactly once", "yes" if report.exactly_once else "[red]NO[/]")
    table.add_row("logs (JSON lines)", str(config.log_dir))
    table.add_row(
        "replay",
        f"repertory replay coordinator/main repertory.runtime.agents_demo:system "
        f"--data-dir {data_dir}",
    )
    console.print(table)


def run_demo(url: str | None, data_dir: Path, *, config: DemoConfig | None = None) -> None:
    """`repertory demo`: exits 1 unless every task completed exactly once in effect."""
    console = Console()
    config = config or DemoConfig(log_dir=data_dir / "agents-demo")
    config.log_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(config.log_dir / "coordinator.log")
    handler.setFormatter(JsonLogFormatter(agent="coordinator"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        if url is not None:
            report = anyio.run(run_project, url, config, console)
        else:
            # The logs stay in data_dir (AOF) for `repertory replay`; the server is stopped
            # again only if this run started it, so no process outlives the demo.
            with EmbeddedServer(data_dir) as server:
                console.print(f"embedded valkey-server at {server.url} (data in {data_dir})")
                report = anyio.run(run_project, server.url, config, console)
    finally:
        logger.removeHandler(handler)
        handler.close()
    _summary(report, console, data_dir, config)
    if not report.exactly_once:
        raise SystemExit(1)
