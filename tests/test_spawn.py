"""`repertory spawn`: node processes under a supervisor that restarts a killed node, stops
the group when restarts come too fast, and stops every node gracefully on SIGTERM."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from repertory.runtime.supervisor import RestartIntensityError, Supervisor, SupervisorConfig
from repertory.runtime.system import ActorSystem
from repertory.streams.client import RedisClient
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
