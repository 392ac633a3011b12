"""The demo scenario end to end, smaller: 8 tasks, 3 worker processes under the supervisor, one
SIGKILL, on the session's embedded server. Every task completes once in effect, the killed
worker's task is re-processed by another worker, and the health monitor recorded the failure
and its recovery: with strategy `restart` the supervisor restarted the killed worker (a new
incarnation of the same child), with `replace` the recovery executor started a new child.
The demo's node is an agent of the monitor too, and leaves it when the demo ends."""

import logging
import signal
from pathlib import Path

import anyio
import pytest

from repertory.actors.agents import HealthPolicy, HealthState, Strategy
from repertory.runtime.agents_demo import DemoConfig, make_system, run_project
from repertory.runtime.agents_worker import MONITOR

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


@pytest.mark.parametrize("strategy", ["restart", "replace"])
async def test_a_project_survives_a_killed_worker_exactly_once(
    redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, strategy: Strategy
) -> None:
    caplog.set_level(logging.INFO, logger="repertory.agents")
    policy = HealthPolicy(heartbeat_ms=500, check_every_ms=100)
    config = DemoConfig(
        tasks=8,
        workers=3,
        seconds=0.4,
        visibility_s=3.0,
        strategy=strategy,
        policy=policy,
        log_dir=tmp_path,
    )
    report = await run_project(redis_url, config)

    assert report.exactly_once, report
    assert report.completed == 8
    assert report.dead == 0
    assert report.victim is not None
    assert report.victim_tasks
    for task, worker in report.moved.items():
        assert worker != report.victim, f"{task} was not re-processed"
    assert report.exit_codes[report.victim] == -signal.SIGKILL
    assert all(code == 0 for agent, code in report.exit_codes.items() if agent != report.victim)

    (recovery,) = [r for r in report.recoveries if r.agent_id == report.victim]
    assert recovery.action == strategy
    assert recovery.replacement in report.exit_codes
    slot = report.victim.rsplit(".", 1)[0]
    if strategy == "restart":
        assert recovery.replacement == f"{slot}.2"
    else:
        assert not recovery.replacement.startswith(f"{slot}.")
    async with make_system(redis_url) as system:
        health = (await system.state_of(MONITOR)).state
        assert isinstance(health, HealthState)
        assert health.agents[report.victim].status == "recovered"
        assert health.agents[recovery.replacement].status == "left"
        assert report.detected_at_ms - report.killed_at_ms < 5000
        node = health.agents[report.node_id]
        assert (node.role, node.status) == ("node", "left")
    logged = {getattr(record, "fields", {}).get("event") for record in caplog.records}
    assert {"task.enqueued", "task.result", "health.AgentDown", "health.RecoveryDecided"} <= logged
    logs = anyio.Path(tmp_path).glob("worker-*.log")
    worker_logs = "".join([await path.read_text() async for path in logs])
    assert "took task" in worker_logs
