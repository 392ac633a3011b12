"""Three node processes under load; SIGKILL one, then another: the survivors take the dead
nodes' partitions over within the lease bound, and every acknowledged send is handled exactly
once in effect (each counter ends equal to the sends it was acknowledged)."""

import os
import signal
import subprocess
import sys
import time
from collections import Counter as Tally
from functools import partial
from pathlib import Path

import anyio
import pytest

from repertory.runtime.system import ActorSystem
from repertory.streams.client import RedisClient
from repertory.streams.keys import Address
from tests.counter_system import PARTITIONS, Add, Counter
from tests.support import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

ROOT = Path(__file__).resolve().parent.parent
FAILOVER_BOUND_S = 5.0  # the default: lease TTL (3 s) plus polls, with room for a loaded machine


def start_node(url: str, node_id: str) -> subprocess.Popen[bytes]:
    command = ["run", "tests.counter_system:system", "--url", url, "--node-id", node_id]
    return subprocess.Popen(
        [sys.executable, "-m", "repertory", *command],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def test_killed_nodes_fail_over_and_no_acknowledged_send_is_lost(
    real_redis: RedisClient, redis_url: str
) -> None:
    system = ActorSystem(Counter(), app="counters", partitions=PARTITIONS, client=real_redis)
    nodes = {name: start_node(redis_url, name) for name in ("f1", "f2", "f3")}
    acknowledged: Tally[str] = Tally()
    actors = [f"counter/c{i}" for i in range(24)]

    async def owners() -> list[str | None]:
        return [await system.partition("counter", n).owner() for n in range(PARTITIONS)]

    async def owned_only_by(alive: set[str]) -> bool:
        held = await owners()
        return set(held) <= alive and None not in held

    async def balanced(alive: set[str]) -> bool:
        held = Tally(await owners())
        return set(held) == alive and set(held.values()) == {PARTITIONS // len(alive)}

    try:
        async with anyio.create_task_group() as load:
            stop_load = anyio.Event()

            async def send_until_stopped() -> None:
                # Stopped by a flag, not by cancellation, which could land between a send and
                # its count.
                index = 0
                while not stop_load.is_set():
                    actor = actors[index % len(actors)]
                    await system.send(actor, Add())
                    acknowledged[actor] += 1
                    index += 1
                    await anyio.sleep(0.002)

            load.start_soon(send_until_stopped)
            failovers = []
            for victim in ("f1", "f2"):
                alive = {name for name, p in nodes.items() if p.poll() is None}
                await eventually(partial(balanced, alive), timeout=30)
                nodes[victim].send_signal(signal.SIGKILL)
                nodes[victim].wait()
                killed_at = time.monotonic()
                survivors = {name for name, p in nodes.items() if p.poll() is None}
                await eventually(partial(owned_only_by, survivors), timeout=30)
                failovers.append(time.monotonic() - killed_at)
            await anyio.sleep(1)
            stop_load.set()

        async def all_counted() -> bool:
            for actor in actors:
                if (await system.state_of(actor)).state.total != acknowledged[actor]:
                    return False
            return True

        await eventually(all_counted, timeout=30)
        print("failover times (s):", [round(t, 2) for t in failovers])
        assert max(failovers) < FAILOVER_BOUND_S, failovers
        # Exactly once in effect: each acknowledged send is one event, none twice.
        for actor in actors:
            assert (await system.state_of(Address.parse(actor))).version == acknowledged[actor]
    finally:
        for process in nodes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
