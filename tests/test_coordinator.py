"""The coordinator's decisions, handled in-process: bounded retries then a dead letter, results
that repeat change nothing, the concurrency limit, and completion."""

import pytest

from repertory.actors.agents import (
    Coordinator,
    ProjectCompleted,
    RecordResult,
    SetMode,
    StartProject,
    TaskDeadLettered,
    TaskDispatched,
    dispatch_id,
)
from repertory.runtime.agents_demo import plan
from repertory.streams.keys import Address
from tests.test_health_monitor import Harness

pytestmark = pytest.mark.anyio


def result(project: str, task: str, attempt: int, *, ok: bool) -> RecordResult:
    return RecordResult(
        result_id=f"r-{task}-{attempt}",
        dispatch_id=dispatch_id(project, task, attempt),
        ok=ok,
        worker="w1",
        finished_at=0,
        error=None if ok else "boom",
    )


async def test_failed_tasks_are_retried_a_bounded_number_of_times_then_dead() -> None:
    c = Harness(Coordinator(plan), Address("coordinator", "main"))
    await c.deliver(StartProject(project_id="p", goal="2 tasks of 1 s", max_retries=1))
    await c.deliver(result("p", "t00", 1, ok=True))
    await c.deliver(result("p", "t00", 1, ok=True))  # repeated: nothing more
    await c.deliver(result("p", "t01", 1, ok=False))
    await c.deliver(result("p", "t01", 2, ok=False))
    dispatched = [(e.task.task_id, e.attempt) for e in c.of(TaskDispatched)]
    assert dispatched == [("t00", 1), ("t01", 1), ("t01", 2)]
    (dead,) = c.of(TaskDeadLettered)
    assert (dead.task.task_id, dead.attempts) == ("t01", 2)
    (done,) = c.of(ProjectCompleted)
    assert (done.completed, done.dead) == (1, 1)
    assert c.state.projects["p"].done


async def test_dispatch_stays_within_the_concurrency_limit() -> None:
    c = Harness(Coordinator(plan), Address("coordinator", "main"))
    await c.deliver(SetMode(True, 2))
    await c.deliver(SetMode(False, 2))
    await c.deliver(StartProject(project_id="p", goal="5 tasks of 1 s"))
    assert c.state.in_flight() == 2
    await c.deliver(result("p", "t00", 1, ok=True))
    assert c.state.in_flight() == 2
    assert len(c.of(TaskDispatched)) == 3
    await c.deliver(SetMode(False, 100))
    assert len(c.of(TaskDispatched)) == 5
