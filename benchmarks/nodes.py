"""Many nodes: failover time after SIGKILL, rebalancing time when a node joins, and throughput
with 1, 2 and 4 node processes on one embedded server.

    python -m benchmarks.nodes [--quick] [--runs 20] [--markdown]

Real `repertory run` processes serve the counter actors of tests/counter_system.py (6
partitions) on a fresh embedded server; the default NodeConfig (lease TTL 3 s). Time is
observed from outside, as a user would: partition owners (the lease keys) and committed
counts (the partitions' seen-sets).
"""

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks.harness import empty
from repertory.runtime.system import ActorSystem
from repertory.streams.client import RedisClient, create_client
from repertory.streams.embedded import EmbeddedServer
from repertory.streams.keys import Address
from tests.counter_system import PARTITIONS, Add
from tests.counter_system import Counter as CounterActor

ROOT = Path(__file__).resolve().parent.parent
KIND = "counter"


def start_node(url: str, node_id: str) -> subprocess.Popen[bytes]:
    command = ["run", "tests.counter_system:system", "--url", url, "--node-id", node_id]
    return subprocess.Popen(
        [sys.executable, "-m", "repertory", *command],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop_all(nodes: Sequence[subprocess.Popen[bytes]]) -> None:
    for node in nodes:
        if node.poll() is None:
            node.kill()
        node.wait()


async def wait_until(condition: Callable[[], Awaitable[bool]], timeout: float = 60) -> float:
    """Seconds until `condition()` holds, polled every 10 ms."""
    started = time.monotonic()
    while not await condition():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"not reached within {timeout} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


@dataclass(frozen=True)
class Bench:
    client: RedisClient
    url: str
    system: ActorSystem

    async def owners(self) -> Counter[str | None]:
        partitions = [self.system.partition(KIND, n) for n in range(PARTITIONS)]
        return Counter([await partition.owner() for partition in partitions])

    async def balanced(self, names: set[str]) -> bool:
        held = await self.owners()
        return set(held) == names and max(held.values()) - min(held.values()) <= 1

    async def committed(self) -> int:
        total = 0
        for number in range(PARTITIONS):
            total += int(await self.client.zcard(self.system.partition(KIND, number).seen_key))
        return total

    async def reset(self) -> None:
        await empty(self.client)


async def failover_times(bench: Bench, runs: int, console: Console) -> list[float]:
    """SIGKILL one of two balanced nodes; time until the survivor owns every partition."""
    times = []
    for run in range(runs):
        await bench.reset()
        nodes = {name: start_node(bench.url, name) for name in ("a", "b")}
        try:
            await wait_until(partial(bench.balanced, set(nodes)))
            nodes["a"].send_signal(signal.SIGKILL)
            times.append(await wait_until(partial(bench.balanced, {"b"})))
            console.print(f"[dim]failover {run + 1}/{runs}: {times[-1]:.2f} s[/]")
        finally:
            stop_all(list(nodes.values()))
    return times


async def rebalance_times(bench: Bench, runs: int, console: Console) -> list[float]:
    """A node joins one that holds every partition; time until each holds its share."""
    times = []
    for run in range(runs):
        await bench.reset()
        nodes = {"a": start_node(bench.url, "a")}
        try:
            await wait_until(partial(bench.balanced, {"a"}))
            nodes["b"] = start_node(bench.url, "b")
            times.append(await wait_until(partial(bench.balanced, {"a", "b"})))
            console.print(f"[dim]rebalance {run + 1}/{runs}: {times[-1]:.2f} s (incl. start)[/]")
        finally:
            stop_all(list(nodes.values()))
    return times


async def throughput(bench: Bench, processes: int, messages: int, actors: int) -> float:
    """Messages per second handled by `processes` balanced nodes: the clock runs from the
    first send of a pipelined burst until the last commit."""
    await bench.reset()
    names = {f"n{i}" for i in range(processes)}
    nodes = [start_node(bench.url, name) for name in sorted(names)]
    try:
        await wait_until(partial(bench.balanced, names))
        codec, keys = bench.system.codec, bench.system.keys
        started = time.monotonic()
        pipeline = bench.client.pipeline(transaction=False)
        for index in range(messages):
            address = Address(KIND, f"c{index % actors}")
            envelope = codec.encode(codec.envelope(str(address), Add()))
            pipeline.xadd(keys.inbox_of(address), {b"m": envelope})
        await pipeline.execute()
        await wait_until(partial(_done, bench, messages), timeout=600)
        return messages / (time.monotonic() - started)
    finally:
        stop_all(nodes)


async def _done(bench: Bench, messages: int) -> bool:
    return await bench.committed() >= messages


@dataclass(frozen=True)
class Results:
    failover: list[float]
    rebalance: list[float]
    rates: dict[int, float]
    messages: int
    actors: int


async def measure(url: str, runs: int, messages: int, actors: int, console: Console) -> Results:
    client = create_client(url)
    try:
        system = ActorSystem(CounterActor(), app="counters", partitions=PARTITIONS, client=client)
        bench = Bench(client, url, system)
        failover = await failover_times(bench, runs, console)
        rebalance = await rebalance_times(bench, max(2, runs // 4), console)
        rates = {}
        for processes in (1, 2, 4):
            rates[processes] = await throughput(bench, processes, messages, actors)
            console.print(f"[dim]{processes} node(s): {rates[processes]:,.0f} msgs/s[/]")
        return Results(failover, rebalance, rates, messages, actors)
    finally:
        await client.aclose()


def tables(results: Results) -> list[Table]:
    timing = Table(title="failover and rebalancing (default NodeConfig, lease TTL 3 s)")
    for column in ("what", "runs", "median s", "max s"):
        timing.add_column(column)
    for name, values in (
        ("failover after SIGKILL (1 of 2 nodes)", results.failover),
        ("rebalance when a node joins (incl. its start)", results.rebalance),
    ):
        timing.add_row(
            name, str(len(values)), f"{statistics.median(values):.2f}", f"{max(values):.2f}"
        )
    rate = Table(
        title=f"throughput: {results.messages:,} messages to {results.actors:,} counters, "
        f"{os.cpu_count()} cores"
    )
    for column in ("node processes", "msgs/s", "vs 1 node", "per core used"):
        rate.add_column(column)
    one = results.rates[1]
    cores = os.cpu_count() or 1
    for processes, value in results.rates.items():
        rate.add_row(
            str(processes),
            f"{value:,.0f}",
            f"{value / one:.2f}x",
            f"{value / min(processes, cores):,.0f}",
        )
    return [timing, rate]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.nodes", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--runs", type=int, default=20, help="failover runs (default 20)")
    args = parser.parse_args(argv)
    runs = 2 if args.quick else args.runs
    messages, actors = (600, 60) if args.quick else (20_000, 1_000)
    console = Console()
    progress = Console(stderr=True)
    with (
        tempfile.TemporaryDirectory(prefix="rep-nodes-") as folder,
        EmbeddedServer(Path(folder) / "data") as server,
    ):
        results = asyncio.run(measure(server.url, runs, messages, actors, progress))
    for table in tables(results):
        console.print(table)


if __name__ == "__main__":
    main()
