"""The task queue and its workers: parallel consumers, retries, dead letters, heartbeats."""

from functools import partial
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
import pytest

from repertory.runtime.worker import Worker, WorkerConfig
from repertory.schemas import schema
from repertory.streams.client import RedisClient
from repertory.streams.inbox import AutoclaimResult
from repertory.streams.taskqueue import TaskQueue
from tests.support import eventually

pytestmark = pytest.mark.anyio


@schema("test.queue.square")
class Square(msgspec.Struct, frozen=True):
    n: int


@schema("test.queue.squared")
class Squared(msgspec.Struct, frozen=True):
    n: int
    square: int


async def square(task: msgspec.Struct) -> Squared:
    assert isinstance(task, Square)
    if task.n < 0:
        raise ValueError(f"negative: {task.n}")
    return Squared(task.n, task.n * task.n)


def config(name: str, **overrides: float) -> WorkerConfig:
    return WorkerConfig(worker_id=name, block_ms=20, **overrides)  # type: ignore[arg-type]


class Held:
    """A handler that holds every task until `release` is set: it counts the runs and the most
    that ran at once, and sets `started` once `expected` run at once."""

    def __init__(self, expected: int = 1) -> None:
        self.expected = expected
        self.runs = self.running = self.most = 0
        self.started = anyio.Event()
        self.release = anyio.Event()

    async def __call__(self, task: msgspec.Struct) -> Squared:
        self.runs += 1
        self.running += 1
        self.most = max(self.most, self.running)
        if self.running >= self.expected:
            self.started.set()
        await self.release.wait()
        self.running -= 1
        return await square(task)


@pytest.mark.parametrize("concurrency", [1, 4])
async def test_workers_share_the_queue_and_every_task_gets_one_result(
    redis: RedisClient, concurrency: int
) -> None:
    queue = TaskQueue(redis, "squares")
    await queue.ensure()
    ids = [await queue.enqueue(Square(n)) for n in range(30)]
    workers = [Worker(queue, square, config(f"w{i}", concurrency=concurrency)) for i in range(3)]
    async with anyio.create_task_group() as group:
        for worker in workers:
            group.start_soon(partial(worker.run, until_empty=True))
    results = [result for _, result in await queue.results()]
    assert sorted(r.task_id for r in results) == sorted(ids)
    assert all(r.ok for r in results)
    values = {queue.value_of(r) for r in results}
    assert values == {Squared(n, n * n) for n in range(30)}
    assert sum(w.handled for w in workers) == 30
    assert await queue.unsettled() == 0


@pytest.mark.parametrize("concurrency", [1, 4])
async def test_failing_tasks_are_retried_then_dead_lettered(
    redis: RedisClient, concurrency: int
) -> None:
    queue = TaskQueue(redis, "failing")
    await queue.ensure()
    bad = await queue.enqueue(Square(-1))
    good = await queue.enqueue(Square(2))
    worker = Worker(queue, square, config("w", max_attempts=3, concurrency=concurrency))
    await worker.run(until_empty=True)
    by_id = {r.task_id: r for _, r in await queue.results()}
    assert by_id[good].ok
    assert not by_id[bad].ok
    assert by_id[bad].attempts == 3
    assert by_id[bad].error == "ValueError: negative: -1"
    assert await redis.xlen(queue.dead_key) == 1


async def test_undecodable_tasks_are_dead_lettered_at_once(redis: RedisClient) -> None:
    queue = TaskQueue(redis, "garbage")
    await queue.ensure()
    await queue.inbox.add(b"\xc1\xc1")
    await Worker(queue, square, config("w")).run(until_empty=True)
    ((_, result),) = await queue.results()
    assert not result.ok
    assert result.error is not None
    assert result.error.startswith("malformed")
    assert await redis.xlen(queue.dead_key) == 1


async def test_a_dead_workers_task_is_taken_over_after_the_visibility_timeout(
    redis: RedisClient,
) -> None:
    queue = TaskQueue(redis, "takeover")
    await queue.ensure()
    task_id = await queue.enqueue(Square(4))
    (taken,) = await queue.inbox.read("crashed-worker", count=1)
    rescuer = Worker(queue, square, config("rescuer", visibility_timeout_s=0.2))
    await rescuer.run(until_empty=True)
    ((_, result),) = await queue.results()
    assert (result.task_id, result.worker, result.ok) == (task_id, "rescuer", True)
    assert taken.id


@pytest.mark.parametrize("tasks", [1, 3])
async def test_long_tasks_keep_their_claims_by_heartbeating(redis: RedisClient, tasks: int) -> None:
    """One task, or several in hand at once: the worker renews every claim it holds."""
    queue = TaskQueue(redis, "long")
    await queue.ensure()
    for n in range(tasks):
        await queue.enqueue(Square(n))
    slow = Held(expected=tasks)
    visibility = 0.6
    owner = Worker(queue, slow, config("owner", visibility_timeout_s=visibility, concurrency=tasks))
    thief = Worker(queue, square, config("thief", visibility_timeout_s=visibility))
    async with anyio.create_task_group() as group:
        group.start_soon(lambda: owner.run(until_empty=True))
        with anyio.fail_after(10):
            await slow.started.wait()
        group.start_soon(lambda: thief.run(until_empty=True))
        # Let the tasks run through three visibility timeouts while the thief keeps looking.
        await anyio.sleep(3 * visibility)
        assert [row.consumer for row in await queue.inbox.pending_entries()] == ["owner"] * tasks
        slow.release.set()
    results = [result for _, result in await queue.results()]
    assert [result.worker for result in results] == ["owner"] * tasks
    assert thief.handled == 0


async def test_a_worker_runs_as_many_tasks_at_once_as_its_concurrency(
    redis: RedisClient,
) -> None:
    queue = TaskQueue(redis, "concurrent")
    await queue.ensure()
    ids = [await queue.enqueue(Square(n)) for n in range(7)]
    held = Held(expected=3)
    worker = Worker(queue, held, config("w", concurrency=3))
    async with anyio.create_task_group() as group:
        group.start_soon(partial(worker.run, until_empty=True))
        with anyio.fail_after(10):
            await held.started.wait()
        held.release.set()
    assert held.most == 3
    assert sorted(result.task_id for _, result in await queue.results()) == sorted(ids)
    assert worker.handled == 7
    assert await queue.unsettled() == 0


def test_a_worker_needs_room_for_one_task() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        WorkerConfig(concurrency=0)


async def test_tasks_that_finish_together_settle_together_each_once(
    redis: RedisClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = TaskQueue(redis, "together")
    await queue.ensure()
    for n in range(4):
        await queue.enqueue(Square(n))
    entries = await queue.inbox.read("w", count=4)
    envelopes = [queue.decode(entry)[0] for entry in entries]
    # The first was settled already: another worker took it over and finished it.
    assert await queue.complete("other", entries[0], envelopes[0], None)
    calls = 0
    evalsha = redis.evalsha

    async def counted(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        return await evalsha(*args)

    monkeypatch.setattr(redis, "evalsha", counted)
    settled: dict[int, bool] = {}

    async def complete(index: int) -> None:
        settled[index] = await queue.complete("w", entries[index], envelopes[index], None)

    async with anyio.create_task_group() as group:
        for index in range(4):
            group.start_soon(complete, index)
    assert settled == {0: False, 1: True, 2: True, 3: True}
    assert calls < 4  # the first goes alone; those that came while it was out, together
    workers = [result.worker for _, result in await queue.results()]
    assert sorted(workers) == ["other", "w", "w", "w"]
    assert await queue.unsettled() == 0


async def test_a_task_in_hand_that_comes_back_by_reclaim_is_not_run_twice(
    redis: RedisClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose event loop was blocked past a task's visibility reclaims its own task:
    the task is running already, and runs once."""
    queue = TaskQueue(redis, "reclaimed")
    await queue.ensure()
    await queue.enqueue(Square(5))
    held = Held()
    worker = Worker(queue, held, config("w", visibility_timeout_s=0.2, concurrency=2))
    reclaims = 0

    async def reclaim_own(consumer: str, min_idle_ms: int, **options: Any) -> AutoclaimResult:
        nonlocal reclaims
        await anyio.lowlevel.checkpoint()
        pending = await queue.inbox.pending_entries()
        entries = await queue.inbox.read_own_pending(consumer) if pending else []
        reclaims += bool(entries)
        return AutoclaimResult(b"0-0", entries, [])

    async def reclaimed_twice() -> bool:
        return reclaims >= 2

    async with anyio.create_task_group() as group:
        group.start_soon(partial(worker.run, until_empty=True))
        with anyio.fail_after(10):
            await held.started.wait()
        monkeypatch.setattr(queue.inbox, "autoclaim", reclaim_own)
        await eventually(reclaimed_twice)
        held.release.set()
    assert held.runs == 1
    assert worker.handled == 1
    ((_, result),) = await queue.results()
    assert result.ok
