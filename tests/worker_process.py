"""A worker process for the crash tests: `python -m tests.worker_process URL QUEUE WORKER_ID`.

Its tasks sleep for their `seconds` and return who did them; it exits when the queue is empty.
"""

import logging
import sys

import anyio
import msgspec

from repertory.runtime.worker import Worker, WorkerConfig
from repertory.schemas import schema
from repertory.streams.client import create_client
from repertory.streams.taskqueue import TaskQueue


@schema("test.process.nap")
class Nap(msgspec.Struct, frozen=True):
    index: int
    seconds: float


@schema("test.process.napped")
class Napped(msgspec.Struct, frozen=True):
    index: int


async def nap(task: msgspec.Struct) -> Napped:
    assert isinstance(task, Nap)
    await anyio.sleep(task.seconds)
    return Napped(task.index)


async def main(url: str, queue_name: str, worker_id: str, visibility_s: float) -> None:
    client = create_client(url)
    try:
        queue = TaskQueue(client, queue_name)
        config = WorkerConfig(worker_id=worker_id, visibility_timeout_s=visibility_s, block_ms=50)
        await Worker(queue, nap, config).run(until_empty=True)
    finally:
        await client.aclose()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    anyio.run(main, sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]))
