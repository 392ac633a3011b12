"""`repertory run MODULE:SYSTEM` as a real process: it serves messages, and SIGTERM stops it
gracefully (messages in hand are finished and committed, nothing is left pending, exit 0)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from repertory.runtime.system import ActorSystem
from repertory.streams.client import RedisClient
from tests.sleepy_system import Nap, Sleeper
from tests.support import eventually

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
REPERTORY = str(Path(sys.executable).parent / "repertory")  # the installed console script


def start_node(url: str, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [REPERTORY, "run", "tests.sleepy_system:system", "--url", url, *extra],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


async def wait_for_exit(process: subprocess.Popen[bytes], timeout: float) -> int:
    return await anyio.to_thread.run_sync(process.wait, timeout)


@pytest.mark.anyio
async def test_sigterm_finishes_the_messages_in_hand_and_exits_0(
    real_redis: RedisClient, redis_url: str
) -> None:
    system = ActorSystem(Sleeper(), app="sleepy", partitions=2, client=real_redis)
    actors = [f"sleeper/s{i}" for i in range(6)]
    for number in range(2):  # as the node does; creating them first lets the test count
        await system.partition("sleeper", number).ensure_groups()
    process = start_node(redis_url)
    try:
        for actor in actors:
            await system.send(actor, Nap(0.5))

        async def all_in_hand() -> bool:
            pending = 0
            for number in range(2):
                pending += (await system.partition("sleeper", number).inbox.pending()).count
            return pending == len(actors)

        # Every message has been read by the node and none is committed yet: all in flight.
        await eventually(all_in_hand, timeout=20)
        process.send_signal(signal.SIGTERM)
        assert await wait_for_exit(process, timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
    for actor in actors:
        assert (await system.state_of(actor)).state.count == 1
    for number in range(2):
        assert (await system.partition("sleeper", number).inbox.pending()).count == 0


def test_an_unknown_system_is_a_clear_error(redis_url: str) -> None:
    result = subprocess.run(
        [REPERTORY, "run", "tests.nowhere:system", "--url", redis_url],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert b"cannot import 'tests.nowhere'" in result.stderr
