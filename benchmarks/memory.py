"""Server memory per actor, and what the embedded server's `stream-node-max-bytes` changes.

    python -m benchmarks.memory [--quick] [--actors 100000] [--events 100000]

On one fresh embedded server, once at the servers' default `stream-node-max-bytes` (4096) and
once at the embedded server's own (`repertory.streams.embedded.STREAM_NODE_MAX_BYTES`):

- many actors: a real node handles one message for each of `--actors` counter actors (sent
  beforehand); `used_memory` after, less before, per actor: its event stream, its stream of
  handled messages, its dedupe id and its share of the partitions' keys;
- one long log: `--events` events appended to one actor, 1,000 a call; MEMORY USAGE of its
  event stream per event, and the time `rebuild` (activation) takes to read and fold them.
"""

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
from rich.console import Console
from rich.table import Table

from benchmarks.nodes import KIND, Bench
from repertory.runtime.node import Node
from repertory.runtime.system import ActorSystem, rebuild
from repertory.streams.client import RedisClient, create_client
from repertory.streams.embedded import STREAM_NODE_MAX_BYTES, EmbeddedServer
from repertory.streams.keys import Address
from tests.counter_system import PARTITIONS, Add, Added
from tests.counter_system import Counter as CounterActor

SERVER_DEFAULT = 4096
"""`stream-node-max-bytes` in Redis 7+ and Valkey unless configured."""
APPEND_BATCH = 1000
REBUILDS = 3


@dataclass(frozen=True)
class Row:
    node_max_bytes: int
    bytes_per_actor: float
    bytes_per_event: float
    rebuild_ms: float


async def _used_memory(client: RedisClient) -> int:
    return int((await client.info("memory"))["used_memory"])


async def many_actors(bench: Bench, actors: int) -> float:
    """Bytes of server memory per actor once each of `actors` handled one message."""
    client, system = bench.client, bench.system
    await bench.reset()
    before = await _used_memory(client)
    codec, keys = system.codec, system.keys
    for first in range(0, actors, APPEND_BATCH):
        pipeline = client.pipeline(transaction=False)
        for index in range(first, min(first + APPEND_BATCH, actors)):
            address = Address(KIND, f"c{index}")
            envelope = codec.encode(codec.envelope(str(address), Add()))
            pipeline.xadd(keys.inbox_of(address), {b"m": envelope})
        await pipeline.execute()
    node = Node(system)
    async with anyio.create_task_group() as group:
        await group.start(node.run)
        deadline = time.monotonic() + 600
        while await bench.committed() < actors:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{actors:,} messages not committed within 600 s")
            await asyncio.sleep(0.05)
        node.stop()
        await node.stopped.wait()
    return (await _used_memory(client) - before) / actors


async def long_log(bench: Bench, events: int) -> tuple[float, float]:
    """Bytes per event of one actor's `events`-event stream, and the median time in ms to
    rebuild the actor from it."""
    client, system = bench.client, bench.system
    await bench.reset()
    address = Address(KIND, "long")
    store = system.store
    written = 0
    while written < events:
        count = min(APPEND_BATCH, events - written)
        written = await store.append(address, [Added(1)] * count, written)
    usage = await client.memory_usage(system.keys.events(address), samples=0)
    times = []
    for _ in range(REBUILDS):
        started = time.perf_counter()
        view = await rebuild(store, system.actors[KIND], address)
        times.append((time.perf_counter() - started) * 1000)
        if view.version != events:
            raise RuntimeError(f"rebuilt at version {view.version}, expected {events}")
    return int(usage or 0) / events, statistics.median(times)


async def measure(url: str, actors: int, events: int, console: Console) -> list[Row]:
    client = create_client(url)
    rows = []
    try:
        system = ActorSystem(CounterActor(), app="memory", partitions=PARTITIONS, client=client)
        bench = Bench(client, url, system)
        for node_max_bytes in (SERVER_DEFAULT, STREAM_NODE_MAX_BYTES):
            await client.config_set("stream-node-max-bytes", node_max_bytes)
            per_actor = await many_actors(bench, actors)
            console.print(f"[dim]{node_max_bytes}: {per_actor:,.0f} B per actor[/]")
            per_event, rebuild_ms = await long_log(bench, events)
            console.print(f"[dim]{node_max_bytes}: {per_event:,.0f} B per event[/]")
            rows.append(Row(node_max_bytes, per_actor, per_event, rebuild_ms))
        await bench.reset()
    finally:
        await client.aclose()
    return rows


def table(rows: Sequence[Row], actors: int, events: int) -> Table:
    result = Table(title="server memory (used_memory, MEMORY USAGE) by stream-node-max-bytes")
    for column in (
        "stream-node-max-bytes",
        f"per actor ({actors:,} actors, 1 message each)",
        f"per event (one actor, {events:,} events)",
        "rebuild of that actor, median ms",
    ):
        result.add_column(column, justify="right")
    for row in rows:
        result.add_row(
            f"{row.node_max_bytes:,}"
            + (" (servers' default)" if row.node_max_bytes == SERVER_DEFAULT else ""),
            f"{row.bytes_per_actor:,.0f} B",
            f"{row.bytes_per_event:,.0f} B",
            f"{row.rebuild_ms:,.0f}",
        )
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--actors", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=100_000)
    args = parser.parse_args(argv)
    actors, events = (2_000, 2_000) if args.quick else (args.actors, args.events)
    progress = Console(stderr=True)
    with (
        tempfile.TemporaryDirectory(prefix="rep-memory-") as folder,
        EmbeddedServer(Path(folder) / "data") as server,
    ):
        rows = asyncio.run(measure(server.url, actors, events, progress))
    Console().print(table(rows, actors, events))


if __name__ == "__main__":
    main()
