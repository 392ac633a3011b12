"""A worker killed with SIGKILL mid-task loses nothing: another worker process re-processes the
task after the visibility timeout, and every task has exactly one result."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from repertory.streams.client import RedisClient
from repertory.streams.taskqueue import TaskQueue
from tests.support import eventually
from tests.worker_process import Nap

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

ROOT = Path(__file__).resolve().parent.parent


def start_worker(
    url: str, queue: str, worker_id: str, visibility_s: float
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.worker_process", url, queue, worker_id, str(visibility_s)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


async def test_a_killed_workers_task_completes_on_another_worker_once(
    real_redis: RedisClient, redis_url: str
) -> None:
    queue = TaskQueue(real_redis, "crash")
    await queue.ensure()
    task_ids = [await queue.enqueue(Nap(i, 0.3)) for i in range(6)]
    processes = [start_worker(redis_url, "crash", "victim", 1.0)]
    try:

        async def victim_is_working() -> bool:
            rows = await queue.inbox.pending_entries()
            return any(row.consumer == "victim" for row in rows)

        await eventually(victim_is_working, timeout=30)
        processes[0].send_signal(signal.SIGKILL)
        assert processes[0].wait(timeout=10) == -signal.SIGKILL
        (in_flight,) = await queue.inbox.pending_entries()
        lost_entry = (await real_redis.xrange(queue.tasks_key, in_flight.id, in_flight.id))[0]
        lost_task = queue.codec.decode_envelope(lost_entry[1][b"m"]).id
        processes.append(start_worker(redis_url, "crash", "rescuer", 1.0))
        assert processes[1].wait(timeout=60) == 0
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    results = {result.task_id: result for _, result in await queue.results()}
    assert len(results) == len(await queue.results()) == len(task_ids)
    assert sorted(results) == sorted(task_ids)
    assert all(result.ok for result in results.values())
    assert results[lost_task].worker == "rescuer"
    assert await queue.unsettled() == 0
