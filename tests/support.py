"""Helpers shared by the tests: waiting for a condition with a deadline, never a bare sleep."""

from collections.abc import Awaitable, Callable

import anyio
from redis.asyncio.cluster import RedisCluster

from repertory.runtime.system import ActorSystem


async def eventually(
    condition: Callable[[], Awaitable[bool]], *, timeout: float = 10.0, every: float = 0.02
) -> None:
    """Wait until `condition()` holds; fail the test if it does not within `timeout` seconds."""
    with anyio.move_on_after(timeout):
        while not await condition():
            await anyio.sleep(every)
        return
    raise AssertionError(f"condition {condition!r} still false after {timeout} s")


def is_cluster(system: ActorSystem) -> bool:
    """Whether `system` runs on a Cluster, where one command reaches one partition's keys."""
    return isinstance(system.client, RedisCluster)
