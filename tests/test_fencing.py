"""Fencing (G4): a node whose lease was taken over commits nothing, whether it finds out
through its epoch at commit time or after being paused (SIGSTOP) past its lease."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from repertory.runtime.system import ActorSystem
from repertory.streams.client import RedisClient
from repertory.streams.keys import Address
from repertory.streams.partition import Commit, CommitStatus, Lease, SeenWindow
from tests.sleepy_system import Nap, Sleeper
from tests.support import eventually

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


async def test_a_stale_epoch_commits_and_dead_letters_nothing(redis: RedisClient) -> None:
    system = ActorSystem(Sleeper(), app="fenced", partitions=1, client=redis)
    partition = system.partition("sleeper", 0)
    await partition.ensure_groups()
    address = Address("sleeper", "s")
    envelope = system.codec.encode(system.codec.envelope(str(address), Nap(0)))
    await partition.inbox.add(envelope)
    (entry,) = await partition.inbox.read("old")
    old_epoch = await partition.acquire("old", 60_000, now_ms=0)
    assert old_epoch is not None

    # The old node's lease lapses (a pause); another node takes the partition over.
    new_epoch = await partition.acquire("new", 60_000, now_ms=60_000)
    assert new_epoch == old_epoch + 1

    commit = Commit(dedupe_id="m1", handled=envelope, handled_at=0, inbox_entry=entry.id)
    result = await partition.commit(
        address, 0, [commit], epoch=old_epoch, now_ms=0, seen=SeenWindow()
    )
    assert result.status is CommitStatus.FENCED
    moved = await partition.dead_letters.move_from_inbox(
        partition.inbox.stream,
        partition.group,
        entry.id,
        envelope,
        reason="handler-error",
        attempts=5,
        epoch_key=partition.epoch_key,
        epoch=old_epoch,
    )
    assert moved is None
    assert await system.store.version(address) == 0
    assert await partition.dead_letters.count() == 0
    assert (await partition.inbox.pending()).count == 1  # still there for the new owner


async def test_a_lease_lapses_at_its_expiry_and_a_takeover_bumps_the_epoch(
    redis: RedisClient,
) -> None:
    partition = ActorSystem(Sleeper(), app="leases", partitions=1, client=redis).partition(
        "sleeper", 0
    )
    assert await partition.acquire("a", 1000, now_ms=0) == 1
    assert await partition.acquire("b", 1000, now_ms=999) is None
    assert await partition.acquire("a", 1000, now_ms=500) == 1  # renewed: same epoch
    assert await partition.lease(1400) == Lease("a", 1500)
    assert await partition.owner(1500) is None  # lapsed, though its key is still there
    assert await partition.acquire("b", 1000, now_ms=1500) == 2
    assert await partition.acquire("a", 1000, now_ms=1600) is None
    assert not await partition.release("a")
    assert await partition.release("b")
    assert await partition.owner(1600) is None
    assert await partition.acquire("a", 1000, now_ms=1600) == 3  # free: taken anew

    # On the server's clock (no time given; it is far past 1.6 s) the lease lapsed long ago,
    # and a lease taken now lapses by itself too: its key expires.
    assert await partition.acquire("a", 60_000) == 4
    assert 0 < await redis.pttl(partition.lease_key) <= 60_000
    assert await partition.owner() == "a"


def start_node(url: str, node_id: str) -> subprocess.Popen[bytes]:
    command = ["run", "tests.sleepy_system:system", "--url", url, "--node-id", node_id]
    return subprocess.Popen(
        [sys.executable, "-m", "repertory", *command],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.mark.integration
async def test_a_node_paused_past_its_lease_commits_nothing_when_resumed(
    real_redis: RedisClient, redis_url: str
) -> None:
    system = ActorSystem(Sleeper(), app="sleepy", partitions=2, client=real_redis)
    address = Address("sleeper", "paused")
    partition = system.partition("sleeper", system.keys.partition_of(address))
    paused = start_node(redis_url, "paused")
    successor: subprocess.Popen[bytes] | None = None
    try:

        async def owns_everything(node: str) -> bool:
            owners = [await system.partition("sleeper", n).owner() for n in range(2)]
            return owners == [node, node]

        await eventually(lambda: owns_everything("paused"), timeout=30)
        await system.send(address, Nap(2.0))

        async def in_hand() -> bool:
            return (await partition.inbox.pending()).count == 1

        await eventually(in_hand)
        paused.send_signal(signal.SIGSTOP)  # in the middle of the two-second handler
        successor = start_node(redis_url, "successor")
        await eventually(lambda: owns_everything("successor"), timeout=30)

        async def handled_once() -> bool:
            return await system.store.version(address) == 1

        await eventually(handled_once, timeout=30)
        paused.send_signal(signal.SIGCONT)

        # The resumed node finishes its handler, is refused, and goes on as a member.
        async def shared() -> bool:
            owners = {await system.partition("sleeper", n).owner() for n in range(2)}
            return owners == {"paused", "successor"}

        await eventually(shared, timeout=30)
        assert paused.poll() is None
        assert await system.store.version(address) == 1
        assert await real_redis.xlen(system.keys.handled(address)) == 1
    finally:
        for process in (paused, successor):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
                process.wait()
