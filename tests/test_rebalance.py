"""Several nodes share a system's partitions evenly: a joining node takes its share from the
running ones without stopping them, a leaving one hands its partitions back, and every
message sent meanwhile is handled once."""

from collections.abc import AsyncIterator

import anyio
import pytest
from anyio.abc import TaskGroup

from repertory.runtime.node import Node, NodeConfig
from repertory.runtime.system import ActorSystem
from repertory.streams.client import RedisClient
from repertory.streams.keys import Address
from tests.support import eventually
from tests.test_node import Account, Deposit

pytestmark = pytest.mark.anyio

PARTITIONS = 6


def config(node_id: str) -> NodeConfig:
    return NodeConfig(node_id=node_id, block_ms=50, lease_ttl_ms=600, retry_base_s=0.01)


@pytest.fixture
async def system(redis: RedisClient) -> AsyncIterator[ActorSystem]:
    async with ActorSystem(Account(), app="rebalance", partitions=PARTITIONS, client=redis) as s:
        yield s


async def owners(system: ActorSystem) -> list[str | None]:
    return [await system.partition("account", n).owner() for n in range(PARTITIONS)]


async def start(group: TaskGroup, system: ActorSystem, node_id: str) -> Node:
    node = Node(system, config(node_id))
    await group.start(node.run)
    return node


async def test_joining_and_leaving_nodes_rebalance_without_losing_messages(
    system: ActorSystem,
) -> None:
    actors = [Address("account", f"a{i}") for i in range(12)]
    sent = 0

    async def send_round() -> None:
        nonlocal sent
        for actor in actors:
            await system.send(actor, Deposit(1))
        sent += 1

    async def share_is(expected: dict[str, int]) -> bool:
        held = await owners(system)
        return {node: held.count(node) for node in expected} == expected

    async with anyio.create_task_group() as group:
        first = await start(group, system, "n1")
        await eventually(lambda: share_is({"n1": PARTITIONS}))
        await send_round()

        second = await start(group, system, "n2")
        await send_round()
        await eventually(lambda: share_is({"n1": 3, "n2": 3}))
        await send_round()

        third = await start(group, system, "n3")
        await eventually(lambda: share_is({"n1": 2, "n2": 2, "n3": 2}))
        await send_round()

        # Six over four: the first members in order take the remainder.
        fourth = await start(group, system, "n4")
        await eventually(lambda: share_is({"n1": 2, "n2": 2, "n3": 1, "n4": 1}))
        await send_round()
        fourth.stop()
        await fourth.stopped.wait()
        await eventually(lambda: share_is({"n1": 2, "n2": 2, "n3": 2}))

        third.stop()
        await third.stopped.wait()
        second.stop()
        await second.stopped.wait()
        await eventually(lambda: share_is({"n1": PARTITIONS}))
        await send_round()

        async def all_handled() -> bool:
            totals = [(await system.state_of(actor)).state.total for actor in actors]
            return totals == [sent] * len(actors)

        await eventually(all_handled)
        first.stop()
