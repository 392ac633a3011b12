"""Multi-agent work (R4, R5): a coordinator that plans a goal into tasks and follows each one to
a final result, and a health monitor that watches agents and decides their recoveries.

Both are ordinary event-sourced actors: every decision is an event, so `repertory replay`
explains what they did and why. Neither touches Redis in a handler. Their effects on the world
(enqueueing a task, dead-lettering it, restarting a worker) are carried out by followers of
their committed events (see `repertory.runtime.agents_followers`), idempotently, keyed by ids
the events carry, so a follower that runs twice changes nothing twice.

Time is always the handler's `ctx.now_ms` and periodic checks are durable timers
(`ctx.schedule`), so a simulated clock drives the health monitor deterministically.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import msgspec

from repertory.actors.model import Actor, Context, Rejected, applier, command
from repertory.schemas import Codec, schema

# The coordinator.


@schema("agents.task_spec")
class TaskSpec(msgspec.Struct, frozen=True):
    """A planned task: its id within the project and its payload, encoded with its type name
    and schema version so that any registered task type fits in the coordinator's events."""

    task_id: str
    type: str
    version: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class PlannedTask:
    """What a planner returns: a task id unique within the project, and the task message."""

    task_id: str
    task: msgspec.Struct


Planner = Callable[[str], Sequence[PlannedTask]]
"""Decomposes a goal into tasks. Runs inside the coordinator's handler, so it must be
deterministic (a replay check re-runs it); plan with a model outside and pass the tasks in
`StartProject.tasks` instead."""

_SPEC_CODEC = Codec()


def task_spec(planned: PlannedTask, codec: Codec = _SPEC_CODEC) -> TaskSpec:
    info, raw = codec.payload(planned.task)
    return TaskSpec(planned.task_id, info.name, info.version, bytes(raw))


def dispatch_id(project_id: str, task_id: str, attempt: int) -> str:
    """The queue id of one attempt: the dispatcher's idempotency key for the enqueue."""
    return f"{project_id}:{task_id}:{attempt}"


@schema("agents.start_project")
class StartProject(msgspec.Struct, frozen=True, kw_only=True):
    project_id: str
    goal: str
    tasks: list[TaskSpec] = []
    """Pre-planned tasks; empty means: ask the coordinator's planner."""
    max_retries: int = 2
    """Failed attempts re-queued before a task is dead-lettered."""


@schema("agents.record_result")
class RecordResult(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of the results stream, sent by the results consumer (idempotency key: the
    result's stream id)."""

    result_id: str
    dispatch_id: str
    ok: bool
    worker: str
    finished_at: int
    error: str | None = None
    value_type: str | None = None
    value_version: int | None = None
    value: bytes | None = None


@schema("agents.set_mode")
class SetMode(msgspec.Struct, frozen=True):
    """From the health monitor: degraded mode on or off and the concurrency limit to apply."""

    degraded: bool
    limit: int


@schema("agents.project_started")
class ProjectStarted(msgspec.Struct, frozen=True, kw_only=True):
    project_id: str
    goal: str
    tasks: list[TaskSpec]
    max_retries: int
    at_ms: int


@schema("agents.task_dispatched")
class TaskDispatched(msgspec.Struct, frozen=True, kw_only=True):
    """Carries the whole task so the dispatcher needs nothing but this event to enqueue it."""

    project_id: str
    task: TaskSpec
    attempt: int
    dispatch_id: str


@schema("agents.task_completed")
class TaskCompleted(msgspec.Struct, frozen=True, kw_only=True):
    project_id: str
    task_id: str
    dispatch_id: str
    worker: str
    result_id: str
    at_ms: int
    value_type: str | None = None
    value_version: int | None = None
    value: bytes | None = None


@schema("agents.task_failed")
class TaskFailed(msgspec.Struct, frozen=True, kw_only=True):
    project_id: str
    task_id: str
    dispatch_id: str
    worker: str
    error: str
    will_retry: bool
    at_ms: int


@schema("agents.task_dead_lettered")
class TaskDeadLettered(msgspec.Struct, frozen=True, kw_only=True):
    project_id: str
    task: TaskSpec
    attempts: int
    error: str


@schema("agents.project_completed")
class ProjectCompleted(msgspec.Struct, frozen=True, kw_only=True):
    project_id: str
    completed: int
    dead: int
    at_ms: int


@schema("agents.mode_changed")
class ModeChanged(msgspec.Struct, frozen=True):
    degraded: bool
    limit: int


TaskStatus = Literal["waiting", "queued", "done", "dead"]


@schema("agents.task_state")
class TaskState(msgspec.Struct, frozen=True, kw_only=True):
    spec: TaskSpec
    status: TaskStatus = "waiting"
    attempt: int = 0
    dispatch_id: str = ""
    worker: str = ""
    workers: list[str] = []
    """Every worker whose attempt ended with a result (failures first, in order)."""
    error: str = ""


@schema("agents.project_state")
class ProjectState(msgspec.Struct, frozen=True, kw_only=True):
    goal: str
    max_retries: int
    started_at: int
    tasks: dict[str, TaskState]
    order: list[str]
    finished_at: int = 0

    @property
    def done(self) -> bool:
        return self.finished_at > 0

    def count(self, status: TaskStatus) -> int:
        return sum(1 for task in self.tasks.values() if task.status == status)


@schema("agents.coordinator_state")
class CoordinatorState(msgspec.Struct, frozen=True, kw_only=True):
    projects: dict[str, ProjectState] = {}
    dispatches: dict[str, list[str]] = {}
    """Dispatch id -> [project id, task id], to settle a result."""
    degraded: bool = False
    limit: int = 100

    def in_flight(self) -> int:
        return sum(project.count("queued") for project in self.projects.values())


def _with_task(state: CoordinatorState, project_id: str, task: TaskState) -> CoordinatorState:
    project = state.projects[project_id]
    tasks = {**project.tasks, task.spec.task_id: task}
    projects = {**state.projects, project_id: msgspec.structs.replace(project, tasks=tasks)}
    return msgspec.structs.replace(state, projects=projects)


def _no_planner(goal: str) -> Sequence[PlannedTask]:
    raise Rejected(f"no planner configured and no tasks given for goal {goal!r}", code="no-plan")


class Coordinator(Actor[CoordinatorState]):
    """Plans projects into tasks, dispatches them within the concurrency limit, settles each on
    its result: done, re-queued (at most `max_retries` times) or dead-lettered; a project is
    complete when every task is done or dead. Refuses new projects in degraded mode."""

    kind = "coordinator"
    initial = CoordinatorState()
    snapshot_every = 200

    def __init__(self, planner: Planner = _no_planner) -> None:
        self.planner = planner

    @command
    def start_project(
        self, state: CoordinatorState, cmd: StartProject, ctx: Context
    ) -> list[msgspec.Struct]:
        if cmd.project_id in state.projects:
            return []  # a repeated start changes nothing
        if state.degraded:
            raise Rejected("degraded mode: new projects are paused", code="degraded")
        specs = cmd.tasks or [task_spec(planned) for planned in self.planner(cmd.goal)]
        if len({spec.task_id for spec in specs}) != len(specs):
            raise Rejected("task ids must be unique within a project", code="duplicate-task")
        started = ProjectStarted(
            project_id=cmd.project_id,
            goal=cmd.goal,
            tasks=specs,
            max_retries=cmd.max_retries,
            at_ms=ctx.now_ms,
        )
        return [started, *self._dispatch_more(self.apply(state, started))]

    @command
    def record_result(
        self, state: CoordinatorState, cmd: RecordResult, ctx: Context
    ) -> list[msgspec.Struct]:
        ref = state.dispatches.get(cmd.dispatch_id)
        if ref is None:
            return []
        project_id, task_id = ref
        project = state.projects[project_id]
        task = project.tasks[task_id]
        if task.status != "queued" or task.dispatch_id != cmd.dispatch_id:
            return []  # a stale or repeated result: this attempt is already settled
        events: list[msgspec.Struct] = []
        if cmd.ok:
            events.append(
                TaskCompleted(
                    project_id=project_id,
                    task_id=task_id,
                    dispatch_id=cmd.dispatch_id,
                    worker=cmd.worker,
                    result_id=cmd.result_id,
                    at_ms=ctx.now_ms,
                    value_type=cmd.value_type,
                    value_version=cmd.value_version,
                    value=cmd.value,
                )
            )
        else:
            retry = task.attempt <= project.max_retries
            error = cmd.error or "failed"
            events.append(
                TaskFailed(
                    project_id=project_id,
                    task_id=task_id,
                    dispatch_id=cmd.dispatch_id,
                    worker=cmd.worker,
                    error=error,
                    will_retry=retry,
                    at_ms=ctx.now_ms,
                )
            )
            if not retry:
                events.append(
                    TaskDeadLettered(
                        project_id=project_id, task=task.spec, attempts=task.attempt, error=error
                    )
                )
        after = self.fold(state, events)
        finished = after.projects[project_id]
        if all(t.status in ("done", "dead") for t in finished.tasks.values()):
            events.append(
                ProjectCompleted(
                    project_id=project_id,
                    completed=finished.count("done"),
                    dead=finished.count("dead"),
                    at_ms=ctx.now_ms,
                )
            )
            after = self.apply(after, events[-1])
        return [*events, *self._dispatch_more(after)]

    @command
    def set_mode(self, state: CoordinatorState, cmd: SetMode, ctx: Context) -> list[msgspec.Struct]:
        if (cmd.degraded, cmd.limit) == (state.degraded, state.limit):
            return []
        changed = ModeChanged(cmd.degraded, cmd.limit)
        return [changed, *self._dispatch_more(self.apply(state, changed))]

    def _dispatch_more(self, state: CoordinatorState) -> list[TaskDispatched]:
        """Waiting tasks (retries first, then in plan order) up to the concurrency limit."""
        room = state.limit - state.in_flight()
        events: list[TaskDispatched] = []
        for project_id, project in state.projects.items():
            waiting = [
                t for t in (project.tasks[i] for i in project.order) if t.status == "waiting"
            ]
            waiting.sort(key=lambda t: -t.attempt)
            for task in waiting:
                if room <= 0:
                    return events
                attempt = task.attempt + 1
                events.append(
                    TaskDispatched(
                        project_id=project_id,
                        task=task.spec,
                        attempt=attempt,
                        dispatch_id=dispatch_id(project_id, task.spec.task_id, attempt),
                    )
                )
                room -= 1
        return events

    @applier
    def project_started(self, state: CoordinatorState, event: ProjectStarted) -> CoordinatorState:
        project = ProjectState(
            goal=event.goal,
            max_retries=event.max_retries,
            started_at=event.at_ms,
            tasks={spec.task_id: TaskState(spec=spec) for spec in event.tasks},
            order=[spec.task_id for spec in event.tasks],
        )
        projects = {**state.projects, event.project_id: project}
        return msgspec.structs.replace(state, projects=projects)

    @applier
    def task_dispatched(self, state: CoordinatorState, event: TaskDispatched) -> CoordinatorState:
        task = state.projects[event.project_id].tasks[event.task.task_id]
        task = msgspec.structs.replace(
            task, status="queued", attempt=event.attempt, dispatch_id=event.dispatch_id
        )
        state = _with_task(state, event.project_id, task)
        dispatches = {**state.dispatches, event.dispatch_id: [event.project_id, task.spec.task_id]}
        return msgspec.structs.replace(state, dispatches=dispatches)

    @applier
    def task_completed(self, state: CoordinatorState, event: TaskCompleted) -> CoordinatorState:
        task = state.projects[event.project_id].tasks[event.task_id]
        task = msgspec.structs.replace(
            task, status="done", worker=event.worker, workers=[*task.workers, event.worker]
        )
        return _with_task(state, event.project_id, task)

    @applier
    def task_failed(self, state: CoordinatorState, event: TaskFailed) -> CoordinatorState:
        task = state.projects[event.project_id].tasks[event.task_id]
        task = msgspec.structs.replace(
            task,
            status="waiting" if event.will_retry else "dead",
            error=event.error,
            workers=[*task.workers, event.worker],
        )
        return _with_task(state, event.project_id, task)

    @applier
    def task_dead_lettered(
        self, state: CoordinatorState, event: TaskDeadLettered
    ) -> CoordinatorState:
        return state  # the task is already dead (TaskFailed); this event drives the dead letter

    @applier
    def project_completed(
        self, state: CoordinatorState, event: ProjectCompleted
    ) -> CoordinatorState:
        project = msgspec.structs.replace(
            state.projects[event.project_id], finished_at=max(1, event.at_ms)
        )
        return msgspec.structs.replace(
            state, projects={**state.projects, event.project_id: project}
        )

    @applier
    def mode_changed(self, state: CoordinatorState, event: ModeChanged) -> CoordinatorState:
        return msgspec.structs.replace(state, degraded=event.degraded, limit=event.limit)


# The health monitor.

Strategy = Literal["restart", "replace", "alert"]
AgentStatus = Literal["up", "down", "zombie", "recovered", "left"]


@schema("health.register")
class Register(msgspec.Struct, frozen=True, kw_only=True):
    agent_id: str
    role: str = "worker"
    strategy: Strategy = "replace"
    notify: str | None = None
    """An actor address told of degraded mode (`SetMode`), e.g. a coordinator."""


@schema("health.heartbeat")
class Heartbeat(msgspec.Struct, frozen=True, kw_only=True):
    agent_id: str
    pending: int = 0
    """Work the agent holds now."""
    progress: int = 0
    """A counter the agent increases whenever it finishes work (tasks settled)."""


@schema("health.deregister")
class Deregister(msgspec.Struct, frozen=True, kw_only=True):
    agent_id: str
    reason: str = "finished"


@schema("health.check")
class Check(msgspec.Struct, frozen=True):
    """The monitor's own periodic timer."""

    due_ms: int


@schema("health.recovery_done")
class RecoveryDone(msgspec.Struct, frozen=True, kw_only=True):
    """From whoever carried out a recovery decision: what it did, and the replacement agent."""

    agent_id: str
    action: Strategy
    replacement: str | None = None
    detail: str = ""


@schema("health.checks_started")
class ChecksStarted(msgspec.Struct, frozen=True):
    at_ms: int


@schema("health.checks_stopped")
class ChecksStopped(msgspec.Struct, frozen=True):
    at_ms: int


@schema("health.agent_registered")
class AgentRegistered(msgspec.Struct, frozen=True, kw_only=True):
    agent_id: str
    role: str
    strategy: Strategy
    notify: str | None
    at_ms: int


@schema("health.heartbeat_recorded")
class HeartbeatRecorded(msgspec.Struct, frozen=True, kw_only=True):
    agent_id: str
    pending: int
    progress: int
    at_ms: int


@schema("health.agent_left")
class AgentLeft(msgspec.Struct, frozen=True, kw_only=True):
    agent_id: str
    reason: str
    at_ms: int


@schema("health.agent_down")
class AgentDown(msgspec.Struct, frozen=True, kw_only=True):
    agent_id: str
    silent_ms: int
    at_ms: int


@schema("health.agent_zombie")
class AgentZombie(msgspec.Struct, frozen=True, kw_only=True):
    agent_id: str
    pending: int
    idle_ms: int
    at_ms: int


@schema("health.recovery_decided")
class RecoveryDecided(msgspec.Struct, frozen=True, kw_only=True):
    agent_id: str
    action: Strategy
    reason: str
    at_ms: int


@schema("health.agent_recovered")
class AgentRecovered(msgspec.Struct, frozen=True, kw_only=True):
    agent_id: str
    action: Strategy
    replacement: str | None
    detail: str
    at_ms: int


@schema("health.agent_rejoined")
class AgentRejoined(msgspec.Struct, frozen=True, kw_only=True):
    agent_id: str
    at_ms: int


@schema("health.degraded_entered")
class DegradedEntered(msgspec.Struct, frozen=True, kw_only=True):
    failures: int
    window_ms: int
    limit: int
    at_ms: int


@schema("health.degraded_left")
class DegradedLeft(msgspec.Struct, frozen=True, kw_only=True):
    failures: int
    window_ms: int
    limit: int
    at_ms: int


@schema("health.agent")
class AgentHealth(msgspec.Struct, frozen=True, kw_only=True):
    role: str
    strategy: Strategy
    status: AgentStatus
    last_beat_ms: int
    progress: int = 0
    progress_at_ms: int = 0
    pending: int = 0
    notify: str | None = None


@schema("health.state")
class HealthState(msgspec.Struct, frozen=True, kw_only=True):
    agents: dict[str, AgentHealth] = {}
    failures: list[int] = []
    """When each failure was detected (only those recent enough to matter)."""
    checking: bool = False
    degraded: bool = False
    degraded_since: int = 0
    limit: int = 100
    recoveries: int = 0


@dataclass(frozen=True, kw_only=True)
class HealthPolicy:
    heartbeat_ms: int = 2000
    missed_beats: int = 2
    """Beats missed in a row before an agent is down: 2 x 2 s, so detected within 5 s with a
    check every half second."""
    check_every_ms: int = 500
    zombie_after_ms: int = 10_000
    failure_window_ms: int = 30_000
    degraded_above: int = 3
    """More failures than this within the window: degraded mode."""
    calm_after_ms: int = 120_000
    calm_below: int = 2
    """Degraded mode ends after `calm_after_ms` with fewer failures than this in that time."""
    normal_limit: int = 100
    degraded_limit: int = 50


def _with_agent(state: HealthState, agent_id: str, agent: AgentHealth) -> HealthState:
    return msgspec.structs.replace(state, agents={**state.agents, agent_id: agent})


class HealthMonitor(Actor[HealthState]):
    """Agents register and heartbeat; a periodic check (a durable timer) finds agents that are
    down (missed beats) or zombies (beating, but holding work with no progress), decides each
    one's recovery by its strategy, and enters or leaves degraded mode."""

    kind = "health"
    initial = HealthState()
    snapshot_every = 200

    def __init__(self, policy: HealthPolicy | None = None) -> None:
        self.policy = policy or HealthPolicy()

    @command
    def register(self, state: HealthState, cmd: Register, ctx: Context) -> list[msgspec.Struct]:
        events: list[msgspec.Struct] = [
            AgentRegistered(
                agent_id=cmd.agent_id,
                role=cmd.role,
                strategy=cmd.strategy,
                notify=cmd.notify,
                at_ms=ctx.now_ms,
            )
        ]
        if not state.checking:
            events.append(ChecksStarted(ctx.now_ms))
            ctx.schedule(
                self.policy.check_every_ms / 1000, Check(ctx.now_ms + self.policy.check_every_ms)
            )
        if cmd.notify is not None and state.degraded:
            ctx.send(cmd.notify, SetMode(True, state.limit))
        return events

    @command
    def heartbeat(self, state: HealthState, cmd: Heartbeat, ctx: Context) -> list[msgspec.Struct]:
        agent = state.agents.get(cmd.agent_id)
        if agent is None or agent.status == "left":
            return []  # not registered (or gone): it must register first
        events: list[msgspec.Struct] = []
        if agent.status in ("down", "zombie", "recovered"):
            # A false alarm (a long pause) or a zombie that got going again: back in service.
            events.append(AgentRejoined(agent_id=cmd.agent_id, at_ms=ctx.now_ms))
        events.append(
            HeartbeatRecorded(
                agent_id=cmd.agent_id, pending=cmd.pending, progress=cmd.progress, at_ms=ctx.now_ms
            )
        )
        return events

    @command
    def deregister(self, state: HealthState, cmd: Deregister, ctx: Context) -> AgentLeft | None:
        if cmd.agent_id not in state.agents or state.agents[cmd.agent_id].status == "left":
            return None
        return AgentLeft(agent_id=cmd.agent_id, reason=cmd.reason, at_ms=ctx.now_ms)

    @command
    def recovery_done(
        self, state: HealthState, cmd: RecoveryDone, ctx: Context
    ) -> AgentRecovered | None:
        agent = state.agents.get(cmd.agent_id)
        if agent is None or agent.status not in ("down", "zombie"):
            return None  # already recovered (a repeated report) or back by itself
        return AgentRecovered(
            agent_id=cmd.agent_id,
            action=cmd.action,
            replacement=cmd.replacement,
            detail=cmd.detail,
            at_ms=ctx.now_ms,
        )

    @command
    def check(self, state: HealthState, cmd: Check, ctx: Context) -> list[msgspec.Struct]:
        policy, now = self.policy, ctx.now_ms
        events: list[msgspec.Struct] = []
        for agent_id, agent in state.agents.items():
            if agent.status != "up":
                continue
            silent = now - agent.last_beat_ms
            idle = now - agent.progress_at_ms
            if silent > policy.missed_beats * policy.heartbeat_ms:
                events.append(AgentDown(agent_id=agent_id, silent_ms=silent, at_ms=now))
                reason = f"no heartbeat for {silent} ms"
            elif agent.pending > 0 and idle > policy.zombie_after_ms:
                events.append(
                    AgentZombie(agent_id=agent_id, pending=agent.pending, idle_ms=idle, at_ms=now)
                )
                reason = f"{agent.pending} pending with no progress for {idle} ms"
            else:
                continue
            events.append(
                RecoveryDecided(agent_id=agent_id, action=agent.strategy, reason=reason, at_ms=now)
            )
        after = self.fold(state, events)
        recent = [at for at in after.failures if now - at <= policy.failure_window_ms]
        calm = [at for at in after.failures if now - at <= policy.calm_after_ms]
        mode: DegradedEntered | DegradedLeft | None = None
        if not after.degraded and len(recent) > policy.degraded_above:
            mode = DegradedEntered(
                failures=len(recent),
                window_ms=policy.failure_window_ms,
                limit=policy.degraded_limit,
                at_ms=now,
            )
        elif (
            after.degraded
            and now - after.degraded_since >= policy.calm_after_ms
            and len(calm) < policy.calm_below
        ):
            mode = DegradedLeft(
                failures=len(calm),
                window_ms=policy.calm_after_ms,
                limit=policy.normal_limit,
                at_ms=now,
            )
        if mode is not None:
            events.append(mode)
            after = self.apply(after, mode)
            for agent in after.agents.values():
                if agent.notify is not None and agent.status != "left":
                    ctx.send(agent.notify, SetMode(after.degraded, mode.limit))
        watching = after.degraded or any(a.status == "up" for a in after.agents.values())
        if watching:
            # The next check is due a period after this one was due, not after it ran late.
            due = max(cmd.due_ms + policy.check_every_ms, now + 1)
            ctx.schedule((due - now) / 1000, Check(due))
        else:
            events.append(ChecksStopped(now))
        return events

    @applier
    def checks_started(self, state: HealthState, event: ChecksStarted) -> HealthState:
        return msgspec.structs.replace(state, checking=True)

    @applier
    def checks_stopped(self, state: HealthState, event: ChecksStopped) -> HealthState:
        return msgspec.structs.replace(state, checking=False)

    @applier
    def agent_registered(self, state: HealthState, event: AgentRegistered) -> HealthState:
        agent = AgentHealth(
            role=event.role,
            strategy=event.strategy,
            status="up",
            last_beat_ms=event.at_ms,
            progress_at_ms=event.at_ms,
            notify=event.notify,
        )
        return _with_agent(state, event.agent_id, agent)

    @applier
    def heartbeat_recorded(self, state: HealthState, event: HeartbeatRecorded) -> HealthState:
        agent = state.agents[event.agent_id]
        moved = event.progress != agent.progress or event.pending == 0
        agent = msgspec.structs.replace(
            agent,
            last_beat_ms=event.at_ms,
            pending=event.pending,
            progress=event.progress,
            progress_at_ms=event.at_ms if moved else agent.progress_at_ms,
        )
        return _with_agent(state, event.agent_id, agent)

    @applier
    def agent_left(self, state: HealthState, event: AgentLeft) -> HealthState:
        agent = msgspec.structs.replace(state.agents[event.agent_id], status="left")
        return _with_agent(state, event.agent_id, agent)

    @applier
    def agent_down(self, state: HealthState, event: AgentDown) -> HealthState:
        return self._failed(state, event.agent_id, "down", event.at_ms)

    @applier
    def agent_zombie(self, state: HealthState, event: AgentZombie) -> HealthState:
        return self._failed(state, event.agent_id, "zombie", event.at_ms)

    def _failed(
        self, state: HealthState, agent_id: str, status: AgentStatus, at_ms: int
    ) -> HealthState:
        agent = msgspec.structs.replace(state.agents[agent_id], status=status)
        horizon = max(self.policy.failure_window_ms, self.policy.calm_after_ms)
        failures = [at for at in state.failures if at_ms - at <= horizon] + [at_ms]
        return msgspec.structs.replace(_with_agent(state, agent_id, agent), failures=failures)

    @applier
    def recovery_decided(self, state: HealthState, event: RecoveryDecided) -> HealthState:
        return state  # the decision itself; its follower carries it out

    @applier
    def agent_recovered(self, state: HealthState, event: AgentRecovered) -> HealthState:
        agent = msgspec.structs.replace(state.agents[event.agent_id], status="recovered")
        state = _with_agent(state, event.agent_id, agent)
        return msgspec.structs.replace(state, recoveries=state.recoveries + 1)

    @applier
    def agent_rejoined(self, state: HealthState, event: AgentRejoined) -> HealthState:
        agent = msgspec.structs.replace(
            state.agents[event.agent_id], status="up", progress_at_ms=event.at_ms
        )
        return _with_agent(state, event.agent_id, agent)

    @applier
    def degraded_entered(self, state: HealthState, event: DegradedEntered) -> HealthState:
        return msgspec.structs.replace(
            state, degraded=True, degraded_since=event.at_ms, limit=event.limit
        )

    @applier
    def degraded_left(self, state: HealthState, event: DegradedLeft) -> HealthState:
        return msgspec.structs.replace(state, degraded=False, degraded_since=0, limit=event.limit)
