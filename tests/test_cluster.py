"""The runtime unchanged on a three-master Redis Cluster: every multi-key script stays inside
one hash slot, so sends, asks, batched commits, timers, the cross-partition relay, dead
letters, rebalancing between nodes and rebuilt state all work there as on one server."""

from collections.abc import AsyncIterator

import anyio
import pytest

from repertory.runtime.node import Node, NodeConfig
from repertory.runtime.system import ActorSystem
from repertory.streams.client import create_client
from repertory.streams.keys import Address
from tests.support import eventually
from tests.test_node import Account, Deposit, Explode, Remind, Transfer

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

PARTITIONS = 6


@pytest.fixture
async def system(cluster_url: str) -> AsyncIterator[ActorSystem]:
    client = create_client(cluster_url)
    try:
        async with ActorSystem(
            Account(), app=f"c{id(client) % 10_000}", partitions=PARTITIONS, client=client
        ) as connected:
            yield connected
    finally:
        await client.aclose()


def config(node_id: str) -> NodeConfig:
    return NodeConfig(node_id=node_id, block_ms=50, lease_ttl_ms=1000, retry_base_s=0.01)


async def test_the_runtime_works_unchanged_on_a_cluster(system: ActorSystem) -> None:
    async with anyio.create_task_group() as group:
        first = Node(system, config("k1"))
        await group.start(first.run)

        answer = await system.ask("account/ask", Deposit(5))
        assert answer.version == 1
        for _ in range(30):  # a backlog for one actor: batched commits
            await system.send("account/busy", Deposit(1))
        for target in ("t1", "t2", "t3", "t4"):  # across partitions, through the relay
            await system.send("account/source", Transfer(to=target, amount=2))
        await system.send("account/later", Remind(after_s=0.2, amount=7))  # a durable timer
        await system.send("account/poison", Explode())  # dead-lettered after its retries

        second = Node(system, config("k2"))
        await group.start(second.run)

        async def rebalanced() -> bool:
            owners = [await system.partition("account", n).owner() for n in range(PARTITIONS)]
            return owners.count("k1") == owners.count("k2") == PARTITIONS // 2

        await eventually(rebalanced)

        async def totals_are(expected: dict[str, int]) -> bool:
            for actor, total in expected.items():
                if (await system.state_of(actor)).state.total != total:
                    return False
            return True

        expected = {"account/busy": 30, "account/source": -8, "account/later": 7}
        expected |= {f"account/t{i}": 2 for i in range(1, 5)}
        await eventually(lambda: totals_are(expected))
        poisoned = Address("account", "poison")
        dead = system.partition("account", system.keys.partition_of(poisoned)).dead_letters

        async def dead_lettered() -> bool:
            return await dead.count() == 1

        await eventually(dead_lettered)
        first.stop()
        second.stop()
