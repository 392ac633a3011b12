"""The followers of the coordinator's and the health monitor's logs resume from their cursors:
stopped midway (their process restarted) and started again, they miss nothing decided while
they were down and repeat nothing in effect. The node watcher makes nodes agents of the health
monitor: registered, beaten for while their membership is fresh, deregistered when they leave,
found down when they die."""

from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from typing import Any

import anyio
import msgspec
import pytest

from repertory.actors.agents import (
    AgentDown,
    AgentLeft,
    AgentRejoined,
    Deregister,
    HealthMonitor,
    Heartbeat,
    PlannedTask,
    RecordResult,
    RecoveryDecided,
    RecoveryDone,
    Register,
    TaskDispatched,
    dispatch_id,
    task_spec,
)
from repertory.runtime.agents_demo import Work, make_system
from repertory.runtime.agents_followers import (
    Cursor,
    Dispatcher,
    NodeWatcher,
    RecoveryExecutor,
    follow,
    forward_results,
)
from repertory.runtime.agents_worker import COORDINATOR, MONITOR
from repertory.runtime.supervisor import Supervisor, SupervisorConfig
from repertory.runtime.system import ActorSystem
from repertory.streams.client import RedisClient
from repertory.streams.keys import Address
from repertory.streams.membership import Membership
from repertory.streams.taskqueue import TaskQueue, TaskResult
from tests.support import eventually
from tests.test_health_monitor import Harness

pytestmark = pytest.mark.anyio


def agents_on(client: RedisClient) -> ActorSystem:
    system = make_system(None)
    return ActorSystem(*system.actors.values(), app="agents", partitions=4, client=client)


def dispatched(project: str, index: int) -> TaskDispatched:
    spec = task_spec(PlannedTask(f"t{index:02d}", Work(index, 0.0)))
    return TaskDispatched(
        project_id=project,
        task=spec,
        attempt=1,
        dispatch_id=dispatch_id(project, spec.task_id, 1),
    )


async def run_until(
    follower: Callable[..., Coroutine[Any, Any, None]], done: Callable[[], Awaitable[bool]]
) -> None:
    """Run a follower until `done`, then stop it (as a killed process would, between entries)."""
    async with anyio.create_task_group() as group:
        await group.start(follower)
        await eventually(done, timeout=10)
        group.cancel_scope.cancel()


def at(cursor: Cursor, position: str) -> Callable[[], Awaitable[bool]]:
    async def reached() -> bool:
        return await cursor.get() == position

    return reached


async def inbox_messages(system: ActorSystem, address: Address) -> list[Any]:
    entries = await system.client.xrange(system.keys.inbox_of(address))
    codec = system.codec
    return [codec.message_of(codec.decode_envelope(fields[b"m"])) for _, fields in entries]


async def test_the_dispatcher_resumes_from_its_cursor(redis: RedisClient) -> None:
    system = agents_on(redis)
    dispatcher = Dispatcher(system)
    handled: list[int] = []

    async def handle(stored: Any) -> None:
        await dispatcher(stored)
        handled.append(stored.version)

    cursor = Cursor(redis, system.keys, "dispatcher")
    dispatching = partial(follow, system, COORDINATOR, handle, cursor)
    await system.store.append(COORDINATOR, [dispatched("p", i) for i in range(5)], 0)
    await run_until(dispatching, at(cursor, "5"))
    # Decided while the dispatcher is down: taken up when it starts again, nothing twice.
    await system.store.append(COORDINATOR, [dispatched("p", i) for i in range(5, 10)], 5)
    await run_until(dispatching, at(cursor, "10"))
    assert handled == list(range(1, 11))
    # A crash after an effect but before its cursor was saved repeats the handling, not the
    # effect: each dispatch is on the queue once.
    await cursor.set("7")
    await run_until(dispatching, at(cursor, "10"))
    assert handled[10:] == [8, 9, 10]
    queue = TaskQueue(redis, "p", keys=system.keys)
    entries = await redis.xrange(queue.tasks_key)
    queued = [queue.codec.decode_envelope(fields[b"m"]).id for _, fields in entries]
    assert queued == [dispatch_id("p", f"t{i:02d}", 1) for i in range(10)]


async def test_the_results_consumer_resumes_from_its_cursor(redis: RedisClient) -> None:
    system = agents_on(redis)
    queue = TaskQueue(redis, "p", keys=system.keys)

    async def add_results(indexes: range) -> str:
        last = b""
        for index in indexes:
            result = TaskResult(
                task_id=dispatch_id("p", f"t{index:02d}", 1),
                task_type="demo.agents.work",
                ok=True,
                worker="w",
                attempts=1,
                finished_at=index,
            )
            last = await redis.xadd(queue.results_key, {b"m": msgspec.msgpack.encode(result)})
        return last.decode()

    cursor = Cursor(redis, system.keys, "results:p")
    consuming = partial(forward_results, system, queue, cursor)
    await run_until(consuming, at(cursor, await add_results(range(4))))
    await run_until(consuming, at(cursor, await add_results(range(4, 8))))
    sent = await inbox_messages(system, COORDINATOR)
    assert all(isinstance(message, RecordResult) for message in sent)
    assert [m.dispatch_id for m in sent] == [dispatch_id("p", f"t{i:02d}", 1) for i in range(8)]


def sleepers(_: str) -> list[str]:
    return ["sleep", "60"]


@pytest.mark.integration
async def test_the_recovery_executor_resumes_from_its_cursor(real_redis: RedisClient) -> None:
    system = agents_on(real_redis)
    queue = TaskQueue(real_redis, "p", keys=system.keys)
    await queue.ensure()
    config = SupervisorConfig(processes=3, restart="transient", fresh_ids=True)
    supervisor = Supervisor(sleepers, config, prefix="w")
    cursor = Cursor(real_redis, system.keys, "recovery:p:w")

    def executor() -> RecoveryExecutor:
        return RecoveryExecutor(system, supervisor, queue, visibility_ms=60_000, cursor=cursor)

    async def decide(agent_id: str, action: Any) -> str:
        decision = RecoveryDecided(agent_id=agent_id, action=action, reason="test", at_ms=0)
        return str(await system.store.append(MONITOR, [decision], None))

    async def running(*agents: str) -> bool:
        return set(agents) <= set(supervisor.running())

    async with anyio.create_task_group() as group:
        group.start_soon(partial(supervisor.run, handle_signals=False))
        await eventually(partial(running, "w-1.1", "w-2.1", "w-3.1"), timeout=10)
        # w-1.1 holds a task: handed back when it is restarted.
        await queue.enqueue(Work(0, 0.0), task_id="task-0")
        (taken,) = await queue.inbox.read("w-1.1", count=1)
        async with anyio.create_task_group() as following:
            await following.start(executor().run)
            await eventually(at(cursor, await decide("w-1.1", "restart")))
            following.cancel_scope.cancel()
        await eventually(partial(running, "w-1.2"), timeout=10)
        (released,) = await queue.inbox.pending_entries(min_idle_ms=60_000)
        assert released.id == taken.id
        # Decided while the executor is down: carried out when it starts again.
        version = await decide("w-2.1", "replace")
        await run_until(executor().run, at(cursor, version))
        await eventually(partial(running, "w-4.1"), timeout=10)
        # An alert is a person's call: nothing is done, nothing reported.
        await run_until(executor().run, at(cursor, await decide("w-3.1", "alert")))
        assert await running("w-3.1")
        assert [child.starts for child in supervisor.children] == [2, 1, 1, 1]
        assert supervisor.children[1].retired
        supervisor.stop()
    reports = await inbox_messages(system, MONITOR)
    assert [(r.agent_id, r.action, r.replacement) for r in reports] == [
        ("w-1.1", "restart", "w-1.2"),
        ("w-2.1", "replace", "w-4.1"),
    ]
    assert all(isinstance(report, RecoveryDone) for report in reports)


async def test_nodes_are_agents_of_the_health_monitor(redis: RedisClient) -> None:
    system = agents_on(redis)
    membership = Membership(redis, system.keys)
    watcher = NodeWatcher(system)
    monitor = Harness(HealthMonitor(), MONITOR)
    seen = 0

    async def round_at(now_ms: int) -> list[Any]:
        """One watcher round; its messages handled by the monitor at simulated `now_ms`."""
        nonlocal seen
        await watcher.sync()
        messages = (await inbox_messages(system, MONITOR))[seen:]
        seen += len(messages)
        await monitor.advance(now_ms)
        for message in messages:
            await monitor.deliver(message)
        return messages

    await membership.heartbeat("n1", 60_000)
    await membership.heartbeat("n2", 60_000)
    first = await round_at(0)
    assert Register(agent_id="n1", role="node", strategy="alert") in first
    assert Register(agent_id="n2", role="node", strategy="alert") in first
    assert monitor.state.agents["n1"].role == "node"
    await membership.leave("n1")  # a graceful stop
    # n2 dies: its membership expires (an expiry in the past), so nobody beats for it.
    await redis.zadd(system.keys.nodes(), {"n2": 1})
    second = await round_at(2000)
    assert second == [Deregister(agent_id="n1", reason="left")]
    await monitor.advance(6000)
    (down,) = monitor.of(AgentDown)
    assert down.agent_id == "n2"
    assert [event.agent_id for event in monitor.of(AgentLeft)] == ["n1"]
    await membership.heartbeat("n2", 60_000)  # restarted under its name by its supervisor
    assert await round_at(8000) == [Heartbeat(agent_id="n2")]
    (back,) = monitor.of(AgentRejoined)
    assert back.agent_id == "n2"
