"""`repertory spawn`: node processes under a supervisor that restarts a killed node, stops
the group when restarts come too fast, and stops every node gracefully on SIGTERM; and the
supervisor's other restart policies, used for worker agents: transient children that finish
stay done (and the group then stops by itself), temporary ones are restarted or replaced only
when asked, and no child outlives a cancelled supervisor."""

import os
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import anyio
import pytest
from typer.testing import CliRunner

from repertory.actors.agents import Deregister, HealthPolicy, HealthState, StartProject
from repertory.runtime.agents_demo import make_system
from repertory.runtime.agents_followers import Dispatcher, forward_results
from repertory.runtime.agents_worker import COORDINATOR, MONITOR
from repertory.runtime.cli import app
from repertory.runtime.node import Node, NodeConfig
from repertory.runtime.supervisor import RestartIntensityError, Supervisor, SupervisorConfig
from repertory.runtime.system import ActorSystem
from repertory.streams.client import RedisClient
from repertory.streams.taskqueue import TaskQueue
from tests.sleepy_system import Nap, Sleeper
from tests.support import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

ROOT = Path(__file__).resolve().parent.parent


def children_of(pid: int) -> set[int]:
    """The live child processes of `pid`, from /proc."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry.name))
    return found


def start_spawn(url: str) -> subprocess.Popen[bytes]:
    command = ["spawn", "tests.sleepy_system:system", "-n", "2", "--url", url]
    return subprocess.Popen(
        [sys.executable, "-m", "repertory", *command, "--shutdown-timeout", "5"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def test_a_killed_node_is_restarted_and_sigterm_stops_them_all(
    real_redis: RedisClient, redis_url: str
) -> None:
    system = ActorSystem(Sleeper(), app="sleepy", partitions=2, client=real_redis)
    supervisor = start_spawn(redis_url)
    try:

        async def two_owners() -> bool:
            owners = {await system.partition("sleeper", n).owner() for n in range(2)}
            return None not in owners and len(owners) == 2

        await eventually(two_owners, timeout=30)
        nodes = children_of(supervisor.pid)
        assert len(nodes) == 2
        victim = min(nodes)
        os.kill(victim, signal.SIGKILL)

        async def replaced() -> bool:
            now = children_of(supervisor.pid)
            return len(now) == 2 and victim not in now

        await eventually(replaced, timeout=30)
        actors = [f"sleeper/k{i}" for i in range(8)]
        for actor in actors:
            await system.send(actor, Nap(0.01))

        async def all_handled() -> bool:
            counts = [(await system.state_of(actor)).state.count for actor in actors]
            return counts == [1] * len(actors)

        await eventually(all_handled, timeout=30)
        survivors = children_of(supervisor.pid)
        supervisor.send_signal(signal.SIGTERM)
        code = await anyio.to_thread.run_sync(supervisor.wait, 30)
        assert code == 0
        assert not any(alive(pid) for pid in survivors)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()


async def test_restarts_beyond_the_intensity_stop_the_group() -> None:
    config = SupervisorConfig(processes=2, max_restarts=3, period_s=60, backoff_base_s=0.01)
    supervisor = Supervisor(lambda name: [sys.executable, "-c", "raise SystemExit(3)"], config)
    with pytest.raises(RestartIntensityError, match="more than 3 restarts"):
        await supervisor.run(handle_signals=False)
    crashes = [code for child in supervisor.children for code in child.exits if code == 3]
    assert len(crashes) == config.max_restarts + 1  # the crash over the limit stops the group
    assert all(
        child.process is not None and child.process.returncode is not None
        for child in supervisor.children
    )


def sleeper(_: str) -> list[str]:
    return ["sleep", "60"]


async def started(supervisor: Supervisor, agent_id: str) -> None:
    async def running() -> bool:
        return agent_id in supervisor.running()

    await eventually(running, timeout=10)


async def test_transient_children_that_finish_stay_done_and_the_group_stops() -> None:
    script = "import sys, pathlib; sys.exit(0 if pathlib.Path(sys.argv[1]).exists() else 3)"

    def command(agent_id: str) -> list[str]:
        # The first start of child 1 fails: restarted once, then both are done for good.
        if agent_id.endswith("-1.1"):
            return [sys.executable, "-c", script, "/nonexistent"]
        return [sys.executable, "-c", script, "/"]

    config = SupervisorConfig(processes=2, restart="transient", fresh_ids=True, backoff_base_s=0.01)
    supervisor = Supervisor(command, config, prefix="w")
    with anyio.fail_after(30):
        await supervisor.run(handle_signals=False)
    assert supervisor.failure is None
    assert supervisor.exit_codes() == {"w-1.1": 3, "w-1.2": 0, "w-2.1": 0}


async def test_a_killed_transient_child_comes_back_under_a_new_id_and_cancel_kills_all() -> None:
    config = SupervisorConfig(processes=2, restart="transient", fresh_ids=True, backoff_base_s=0.01)
    supervisor = Supervisor(sleeper, config, prefix="w")
    async with anyio.create_task_group() as group:
        group.start_soon(partial(supervisor.run, handle_signals=False))
        await started(supervisor, "w-1.1")
        assert await supervisor.kill("w-1.1")
        await started(supervisor, "w-1.2")
        assert not await supervisor.kill("w-1.1")  # that incarnation is gone
        # Asked to restart an incarnation already restarted: nothing more happens.
        assert await supervisor.restart("w-1.1") == "w-1.2"
        assert await supervisor.restart("w-2.1") == "w-2.2"
        await started(supervisor, "w-2.2")
        pids = [pid for child in supervisor.children for pid in child.pids]
        group.cancel_scope.cancel()
    assert supervisor.finished.is_set()
    assert not any(alive(pid) for pid in pids)
    codes = supervisor.exit_codes()
    assert codes["w-1.1"] == codes["w-2.1"] == -signal.SIGKILL
    assert set(codes) == {"w-1.1", "w-1.2", "w-2.1", "w-2.2"}


async def test_temporary_children_are_only_restarted_or_replaced_when_asked() -> None:
    config = SupervisorConfig(
        processes=2, restart="temporary", fresh_ids=True, shutdown_timeout_s=1
    )
    supervisor = Supervisor(sleeper, config, prefix="w")
    async with anyio.create_task_group() as group:
        group.start_soon(partial(supervisor.run, handle_signals=False))
        await started(supervisor, "w-1.1")
        await started(supervisor, "w-2.1")
        await supervisor.kill("w-1.1")
        assert "w-1.1" not in supervisor.running()
        assert supervisor.children[0].starts == 1  # temporary: not restarted by itself
        assert await supervisor.restart("w-1.1") == "w-1.2"
        await started(supervisor, "w-1.2")
        assert await supervisor.replace("w-2.1") == "w-3.1"
        assert await supervisor.replace("w-2.1") == "w-3.1"  # once, however often asked
        await started(supervisor, "w-3.1")
        assert sorted(supervisor.running()) == ["w-1.2", "w-3.1"]
        assert supervisor.children[1].retired
        supervisor.stop()
    assert supervisor.failure is None
    assert supervisor.exit_codes()["w-2.1"] == -signal.SIGKILL
    assert not supervisor.running()


async def test_replacing_the_only_child_does_not_end_the_group() -> None:
    config = SupervisorConfig(processes=1, restart="temporary", fresh_ids=True)
    supervisor = Supervisor(sleeper, config, prefix="w")
    async with anyio.create_task_group() as group:
        group.start_soon(partial(supervisor.run, handle_signals=False))
        await started(supervisor, "w-1.1")
        assert await supervisor.replace("w-1.1") == "w-2.1"
        await started(supervisor, "w-2.1")
        assert not supervisor.finished.is_set()
        supervisor.stop()
    assert supervisor.exit_codes()["w-1.1"] == -signal.SIGKILL


def start_spawn_workers(url: str, *options: str) -> subprocess.Popen[bytes]:
    handler = "repertory.runtime.agents_demo:do_work"
    return subprocess.Popen(
        [sys.executable, "-m", "repertory", "spawn", "--workers", handler, "--url", url, *options],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )


def agent_pid(parent: int, agent_id: str) -> int:
    """The child of `parent` running as worker agent `agent_id` (from its command line)."""
    for pid in children_of(parent):
        arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if agent_id.encode() in arguments:
            return pid
    raise AssertionError(f"no child of {parent} runs as {agent_id}")


async def test_spawned_workers_finish_a_project_through_a_kill_and_then_stop(
    real_redis: RedisClient, redis_url: str, tmp_path: Path
) -> None:
    """`repertory spawn --workers`: 2 supervised worker agents do a project; one is killed
    while it holds a task: the supervisor restarts it, the monitor's decision is carried out by
    the spawn process (its task handed back, `RecoveryDone`); when the project is complete every
    worker exits 0 and the supervisor stops by itself, exit code 0."""
    policy = HealthPolicy(heartbeat_ms=500, check_every_ms=100)
    agents = make_system(redis_url, policy)
    project = "spawned"
    async with agents, anyio.create_task_group() as group:
        await group.start(Node(agents, NodeConfig(node_id="spawn-test")).run)
        await group.start(Dispatcher(agents).run, None)
        queue = TaskQueue(agents.client, project, keys=agents.keys)
        await queue.ensure()
        await group.start(forward_results, agents, queue, None)
        await agents.ask(COORDINATOR, StartProject(project_id=project, goal="6 tasks of 0.3 s"))
        options = ("-n", "2", "--project", project, "--heartbeat", "0.5", "--visibility", "3")
        spawned = start_spawn_workers(redis_url, *options, "--log-dir", str(tmp_path))
        try:

            async def holding() -> bool:
                return bool(await queue.inbox.pending_entries())

            await eventually(holding, timeout=30)
            (row, *_) = await queue.inbox.pending_entries()
            victim = row.consumer
            os.kill(agent_pid(spawned.pid, victim), signal.SIGKILL)

            async def recovered() -> bool:
                health = (await agents.state_of(MONITOR)).state
                assert isinstance(health, HealthState)
                return health.agents[victim].status == "recovered"

            await eventually(recovered, timeout=30)
            code = await anyio.to_thread.run_sync(spawned.wait, 60)
            assert code == 0
            out = spawned.stdout.read().decode() if spawned.stdout else ""
        finally:
            if spawned.poll() is None:
                spawned.kill()
                spawned.wait()
        state = (await agents.state_of(COORDINATOR)).state
        assert state.projects[project].count("done") == 6
        health = (await agents.state_of(MONITOR)).state
        restarted = victim.rsplit(".", 1)[0] + ".2"
        assert health.agents[restarted].status == "left"
        group.cancel_scope.cancel()
    ok = [result.task_id for _, result in await queue.results() if result.ok]
    assert len(set(ok)) == len(ok) == 6  # each task once
    assert f"{victim}: -9" in out
    assert f"{restarted}: 0" in out


async def test_spawned_workers_without_a_project_stop_cleanly_on_sigterm(
    real_redis: RedisClient, redis_url: str
) -> None:
    agents = make_system(redis_url)
    spawned = start_spawn_workers(redis_url, "-n", "1", "--queue", "idle")
    try:
        inbox = agents.keys.inbox_of(MONITOR)

        async def registered() -> bool:
            return bool(await real_redis.xlen(inbox))

        await eventually(registered, timeout=30)
        spawned.send_signal(signal.SIGTERM)
        code = await anyio.to_thread.run_sync(spawned.wait, 30)
        out = spawned.stdout.read().decode() if spawned.stdout else ""
    finally:
        if spawned.poll() is None:
            spawned.kill()
            spawned.wait()
    assert code == 0
    assert out.rstrip().endswith(".1: 0")  # the worker stopped gracefully: exit 0
    entries = await real_redis.xrange(inbox)
    messages = [agents.codec.message_of(agents.codec.decode_envelope(f[b"m"])) for _, f in entries]
    (left,) = [m for m in messages if isinstance(m, Deregister)]
    assert left.reason == "stopped"


@pytest.mark.parametrize(
    ("arguments", "complaint"),
    [
        ([], "give either SYSTEM"),
        (["tests.sleepy_system:system", "--workers", "m:f"], "give either SYSTEM"),
        (["--workers", "m:f"], "needs --queue"),
    ],
)
def test_spawn_runs_either_nodes_or_workers(arguments: list[str], complaint: str) -> None:
    result = CliRunner().invoke(app, ["spawn", *arguments])
    assert result.exit_code == 2
    assert complaint in result.output
