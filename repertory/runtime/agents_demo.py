"""`repertory demo`: a coordinator, a health monitor and worker processes on the embedded server.

This process runs a node (the coordinator and the health monitor actors), the followers that
carry out what those actors decided (`repertory.runtime.agents_followers`: the dispatcher, the
results consumer and the recovery executor, each resuming from its cursor, and the node
watcher), and a `Supervisor` of worker agent processes (`repertory.runtime.agents_worker`),
the same one that `repertory spawn --workers` runs. One worker is killed with SIGKILL
mid-project; the summary shows where its task went.

`repertory replay coordinator/main repertory.runtime.agents_demo:system` replays the log.
"""

import logging
import os
import re
import signal
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

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
    Deregister,
    HealthMonitor,
    HealthPolicy,
    HealthState,
    PlannedTask,
    RecoveryDecided,
    StartProject,
    Strategy,
    TaskCompleted,
)
from repertory.runtime import eventloop
from repertory.runtime.agents_followers import (
    Cursor,
    Dispatcher,
    NodeWatcher,
    RecoveryExecutor,
    follow,
    forward_results,
    log_event,
)
from repertory.runtime.agents_worker import COORDINATOR, MONITOR, JsonLogFormatter, worker_command
from repertory.runtime.node import Node, NodeConfig
from repertory.runtime.supervisor import Supervisor, SupervisorConfig
from repertory.runtime.system import ActorSystem
from repertory.schemas import schema
from repertory.schemas.errors import RepertoryError
from repertory.streams.embedded import EmbeddedServer
from repertory.streams.eventstore import StoredEvent
from repertory.streams.taskqueue import TaskQueue, TaskResult

logger = logging.getLogger("repertory.agents")

HANDLER = "repertory.runtime.agents_demo:do_work"
_STOP_GRACE_S = 5.0
"""How long a worker may take to finish its task when the demo is interrupted."""


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


@dataclass(kw_only=True)
class DemoConfig:
    tasks: int = 20
    workers: int = 4
    seconds: float = 1.0
    kill: bool = True
    visibility_s: float = 5.0
    strategy: Strategy = "restart"
    """The workers' recovery strategy: `restart` (the supervisor restarts a killed worker),
    `replace` (the recovery executor starts a new one) or `alert` (nobody: a person)."""
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
    node_id: str = ""

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

    def short(self, text: str) -> str:
        """Agent ids in `text` without this run's suffix (the project's), for display."""
        return text.replace(f"-{self.project_id.rsplit('-', 1)[-1]}", "")


@dataclass
class _Live:
    results: list[TaskResult] = field(default_factory=list)
    decisions: list[str] = field(default_factory=list)
    recoveries: list[AgentRecovered] = field(default_factory=list)
    detected_at_ms: int = 0
    failures: int = 0
    coordinator: CoordinatorState | None = None
    health: HealthState | None = None

    async def observe(self, stored: StoredEvent) -> None:
        """The health monitor's decisions, for the live view and the log."""
        event = stored.event
        if isinstance(event, AgentDown | AgentZombie | DegradedEntered | DegradedLeft):
            self.decisions.append(f"{type(event).__name__} {msgspec.json.encode(event).decode()}")
            if isinstance(event, AgentDown | AgentZombie):
                self.failures += 1
                self.detected_at_ms = self.detected_at_ms or event.at_ms
        elif isinstance(event, RecoveryDecided):
            self.decisions.append(f"RecoveryDecided {event.agent_id}: {event.action}")
        elif isinstance(event, AgentRecovered):
            self.recoveries.append(event)
        else:
            return
        log_event("health decision", "health." + type(event).__name__, detail=event)


def worker_supervisor(url: str, project_id: str, config: DemoConfig) -> Supervisor:
    """The project's worker agents under a supervisor, as `repertory spawn --workers` runs them:
    a worker that is done exits 0 and stays done; one killed is restarted by the supervisor
    (strategy `restart`) or left to the health monitor's recovery (`replace`, `alert`)."""
    command = worker_command(
        HANDLER,
        url=url,
        queue=project_id,
        project_id=project_id,
        visibility_s=config.visibility_s,
        heartbeat_s=config.policy.heartbeat_ms / 1000,
        strategy=config.strategy,
        stop_grace_s=_STOP_GRACE_S,
    )
    supervision = SupervisorConfig(
        processes=config.workers,
        restart="transient" if config.strategy == "restart" else "temporary",
        fresh_ids=True,
        log_dir=config.log_dir,
        shutdown_timeout_s=_STOP_GRACE_S,
    )
    return Supervisor(command, supervision, prefix=f"worker-{project_id.rsplit('-', 1)[-1]}")


async def run_project(url: str, config: DemoConfig, console: Console | None = None) -> DemoReport:
    """Run one project end to end on the server at `url` and report what happened."""
    config.log_dir.mkdir(parents=True, exist_ok=True)
    project_id = f"project-{uuid.uuid4().hex[:6]}"
    goal = f"{config.tasks} tasks of {config.seconds} s"
    agents = make_system(url, config.policy)
    live = _Live()
    visibility_ms = round(config.visibility_s * 1000)
    async with agents:
        queue = TaskQueue(agents.client, project_id, keys=agents.keys)
        await queue.ensure()
        supervisor = worker_supervisor(url, project_id, config)

        def cursor(name: str) -> Cursor:
            return Cursor(agents.client, agents.keys, name)

        executor = RecoveryExecutor(
            agents,
            supervisor,
            queue,
            visibility_ms=visibility_ms,
            cursor=cursor(f"recovery:{project_id}:{supervisor.prefix}"),
        )
        watcher = NodeWatcher(agents, every_s=min(1.0, config.policy.heartbeat_ms / 2000))
        # The live view starts after what earlier runs left in the logs.
        coordinator_from = await agents.store.version(COORDINATOR)
        monitor_from = await agents.store.version(MONITOR)
        report = DemoReport(
            project_id=project_id,
            queue=queue.name,
            wall_s=0.0,
            sequential_s=config.tasks * config.seconds,
            tasks=config.tasks,
            completed=0,
            dead=0,
            ok_results={},
            completions={},
            done_by={},
        )
        async with anyio.create_task_group() as group:
            node = Node(agents, NodeConfig(node_id=f"demo-{os.getpid()}"))
            report.node_id = node.node_id
            await group.start(node.run)
            await group.start(Dispatcher(agents, codec=queue.codec).run, cursor("dispatcher"))
            results = cursor(f"results:{queue.name}")
            await group.start(
                partial(forward_results, on_result=live.results.append), agents, queue, results
            )
            await group.start(executor.run)
            await group.start(
                partial(follow, start=monitor_from), agents, MONITOR, live.observe, None
            )
            group.start_soon(watcher.run)
            group.start_soon(partial(supervisor.run, handle_signals=False))
            await agents.ask(COORDINATOR, StartProject(project_id=project_id, goal=goal))
            log_event("project started", "project.started", project=project_id, goal=goal)
            await _watch(agents, supervisor, queue, config, report, live, console)
            # The node leaves: the monitor hears it from here (it runs on that node).
            await agents.ask(MONITOR, Deregister(agent_id=node.node_id, reason="stopping"))
            node.stop()
            await node.stopped.wait()
            group.cancel_scope.cancel()
        report.exit_codes = supervisor.exit_codes()
        await _account(agents, report, live, coordinator_from)
    return report


async def _watch(
    agents: ActorSystem,
    supervisor: Supervisor,
    queue: TaskQueue,
    config: DemoConfig,
    report: DemoReport,
    live: _Live,
    console: Console | None,
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
                project = live.coordinator.projects.get(report.project_id)
                done = project.count("done") if project else 0
                if config.kill and report.victim is None and done >= kill_after:
                    await _kill_one(supervisor, queue, report)
                if display is not None:
                    display.update(_view(live, supervisor, report, config))
                recovered = (
                    report.victim is None
                    or config.strategy == "alert"
                    or any(r.agent_id == report.victim for r in live.recoveries)
                )
                finished = project is not None and project.done and supervisor.finished.is_set()
                if finished and recovered:
                    return
                await anyio.sleep(0.1)
        finally:
            if display is not None:
                display.update(_view(live, supervisor, report, config))
                display.stop()


async def _kill_one(supervisor: Supervisor, queue: TaskQueue, report: DemoReport) -> None:
    """SIGKILL a worker that holds a task right now, and note which tasks it held."""
    # The task taken last has the most time left: its worker will still hold it when killed.
    rows = sorted(await queue.inbox.pending_entries(), key=lambda row: row.idle_ms)
    running = set(supervisor.running())
    victim = next((row.consumer for row in rows if row.consumer in running), None)
    if victim is None:
        return
    report.killed_at_ms = time.time_ns() // 1_000_000
    await supervisor.kill(victim)
    # Read what it held only once it is dead: until then it may finish one task and take another.
    tasks = []
    for row in await queue.inbox.pending_entries(consumer=victim):
        for _, fields in await queue.client.xrange(queue.tasks_key, row.id, row.id):
            tasks.append(queue.codec.decode_envelope(fields[b"m"]).id)
    report.victim = victim
    report.victim_tasks = [task.split(":")[1] for task in tasks]
    log_event("worker killed", "worker.killed", agent=victim, held=tasks)


def _view(live: _Live, supervisor: Supervisor, report: DemoReport, config: DemoConfig) -> Group:
    coordinator = live.coordinator
    project = coordinator.projects.get(report.project_id) if coordinator else None
    done = project.count("done") if project else 0
    failures = sum(1 for r in live.results if not r.ok)
    header = Table.grid(padding=(0, 2))
    header.add_row(
        f"[bold]{report.project_id}[/]",
        f"tasks done [bold]{done}/{config.tasks}[/]",
        f"failed attempts {failures}",
        f"agent failures {live.failures}",
        f"recoveries {len(live.recoveries)}",
        "[yellow]degraded[/]" if live.health and live.health.degraded else "normal",
    )
    table = Table(title="agents")
    for column in ("agent", "pid", "process", "health", "tasks done"):
        table.add_column(column)
    per_worker = Counter(r.worker for r in live.results if r.ok)
    health = live.health.agents if live.health else {}
    if report.node_id in health:
        node = health[report.node_id]
        table.add_row(f"{report.node_id} (node)", str(os.getpid()), "running", node.status, "-")
    for child in supervisor.children:
        for index, agent in enumerate(child.ids):
            code = child.exits[index] if index < len(child.exits) else None
            state = "running" if code is None else ("killed" if code < 0 else f"exited {code}")
            status = health[agent].status if agent in health else "-"
            pid = str(child.pids[index]) if index < len(child.pids) else "-"
            table.add_row(report.short(agent), pid, state, status, str(per_worker[agent]))
    lines: list[Table | str] = [header, table]
    lines.extend(f"[dim]health:[/] {report.short(line)}" for line in live.decisions[-4:])
    return Group(*lines)


async def _account(agents: ActorSystem, report: DemoReport, live: _Live, after: int) -> None:
    """Count, from the logs, what took effect: results per task and completions per task."""
    state = (await agents.state_of(COORDINATOR)).state
    assert isinstance(state, CoordinatorState)
    project = state.projects[report.project_id]
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
        if isinstance(event, TaskCompleted) and event.project_id == report.project_id:
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
    per_worker = Counter(report.short(worker) for worker in report.done_by.values())
    table.add_row("per worker", ", ".join(f"{w}: {n}" for w, n in sorted(per_worker.items())))
    if report.victim is not None:
        table.add_row("killed (SIGKILL)", report.short(report.victim))
        moved = (
            ", ".join(f"{t} -> {report.short(w)}" for t, w in report.moved.items()) or "none held"
        )
        table.add_row("moved after the kill", moved)
        if report.detected_at_ms:
            seconds = (report.detected_at_ms - report.killed_at_ms) / 1000
            table.add_row("failure detected", f"{seconds:.1f} s after the kill")
    for recovery in report.recoveries:
        table.add_row(
            "recovery",
            f"{report.short(recovery.agent_id)}: {recovery.action}"
            + (f" -> {report.short(recovery.replacement)}" if recovery.replacement else "")
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


async def _run_until_sigterm(url: str, config: DemoConfig, console: Console) -> DemoReport:
    """The project, cut short by SIGTERM like by Ctrl-C: the supervisor then stops every worker,
    so no process outlives the demo."""
    report: DemoReport | None = None
    async with anyio.create_task_group() as group:

        async def cancel_on_sigterm() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM) as signals:
                async for _ in signals:
                    group.cancel_scope.cancel()

        group.start_soon(cancel_on_sigterm)
        report = await run_project(url, config, console)
        group.cancel_scope.cancel()
    if report is None:
        raise RepertoryError("stopped by SIGTERM; every worker was stopped")
    return report


def run_demo(url: str | None, data_dir: Path, *, config: DemoConfig | None = None) -> None:
    """`repertory demo`: exits 1 unless every task completed exactly once in effect."""
    console = Console()
    config = config or DemoConfig(log_dir=data_dir / "agents-demo")
    config.log_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(config.log_dir / "coordinator.log")
    handler.setFormatter(JsonLogFormatter(agent="coordinator"))
    # The supervisor's lines (workers started, exited) go to the same log, not over the view.
    for name in ("repertory.agents", "repertory.supervisor"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
        logging.getLogger(name).propagate = False
    try:
        if url is not None:
            report = eventloop.run(_run_until_sigterm, url, config, console)
        else:
            # The logs stay in data_dir (AOF) for `repertory replay`; the server is stopped
            # again only if this run started it, so no process outlives the demo.
            with EmbeddedServer(data_dir) as server:
                console.print(f"embedded valkey-server at {server.url} (data in {data_dir})")
                report = eventloop.run(_run_until_sigterm, server.url, config, console)
    finally:
        for name in ("repertory.agents", "repertory.supervisor"):
            logging.getLogger(name).removeHandler(handler)
        handler.close()
    _summary(report, console, data_dir, config)
    if not report.exactly_once:
        raise SystemExit(1)
