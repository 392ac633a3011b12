"""Replay tools: verify and replay (states_at, timeline) against raw XRANGE + msgspec decode.

The raw baseline reads the same stream with XRANGE in batches of 1,000, its replies taken as
the server sends them (as the event store takes them; `raw, redis-py xrange()` is the same
through redis-py's reply callback, for reference), and decodes each entry with one msgspec
pass into a struct mirroring the event record with its payload typed. The tools do more:
verify also checks that versions run on without a gap and folds the state (going entry by
entry where a batch has a problem), states_at folds it, so the ratio is what that costs.

`python -m benchmarks.bench_replay memory [--quick]` measures the peak memory of `verify` at
two log sizes (100,000 and 1,000,000 events; --quick: 2,000 and 20,000) on its own embedded
server: it must not grow with the log.
"""

import argparse
import asyncio
import resource
import tempfile
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import redis.asyncio
from rich.console import Console
from rich.table import Table

from benchmarks.bench_eventstore import Deposited, raw_replay, raw_replay_parsed
from benchmarks.harness import (
    APPENDFSYNC,
    Benchmark,
    Environment,
    RoundRunner,
    Sample,
    Variant,
    timed,
)
from repertory.actors.model import Actor, applier
from repertory.runtime.archive import verify
from repertory.runtime.replay import states_at, timeline
from repertory.runtime.system import ActorSystem
from repertory.schemas import schema
from repertory.streams.client import create_client
from repertory.streams.embedded import EmbeddedServer
from repertory.streams.keys import Address

TARGET = 0.8
APP = "benchreplay"
KIND = "ledger"
WRITE_BATCH = 1000
MEMORY_SIZES = (100_000, 1_000_000)
QUICK_MEMORY_SIZES = (2_000, 20_000)


@schema("bench.replay.balance", version=1)
class Balance(msgspec.Struct, frozen=True, gc=False):
    total: int = 0


class Ledger(Actor[Balance]):
    kind = KIND
    initial = Balance()

    @applier
    def deposited(self, state: Balance, event: Deposited) -> Balance:
        return Balance(state.total + event.amount)


async def write_log(system: ActorSystem, address: Address, total: int) -> None:
    """`total` events in appends of WRITE_BATCH, encoded once (writing is not measured)."""
    codec = system.codec
    pool = [
        codec.encode(
            codec.event(
                Deposited(index % 997 + 1, f"acct-{index % 89:04d}", "EUR", 1.7e9 + index),
                causation_id=f"message-{index}",
            )
        )
        for index in range(WRITE_BATCH)
    ]
    written = 0
    while written < total:
        count = min(WRITE_BATCH, total - written)
        written = await system.store.append_encoded(address, pool[:count], written)


def _check(what: str, actual: int, expected: int) -> None:
    # A benchmark that silently did less work than it claims would flatter itself.
    if actual != expected:
        raise RuntimeError(f"{what}: {actual}, expected {expected}")


@asynccontextmanager
async def suite(env: Environment) -> AsyncIterator[Sequence[Benchmark]]:
    client = create_client(env.url)
    # The baseline's client has the same settings as repertory's (see bench_eventstore).
    raw_client = create_client(env.url)
    system = ActorSystem(Ledger(), app=APP, partitions=4, client=client)
    try:
        yield [
            _verify(env, system, raw_client),
            _replay(env, system, raw_client),
        ]
    finally:
        await client.aclose()
        await raw_client.aclose()


def _raw_variants(raw_client: "redis.asyncio.Redis", key: str, total: int) -> list[Variant]:
    """The baseline, and for reference the same through redis-py's xrange()."""

    def raw_round_with(
        replay: Callable[["redis.asyncio.Redis", str], Awaitable[int]],
    ) -> RoundRunner:
        async def raw_round(round_index: int) -> Sample:
            async def body() -> None:
                _check(f"entries read from {key}", await replay(raw_client, key), total)

            return await timed(total, body)

        return raw_round

    return [
        Variant("raw XRANGE + decode", raw_round_with(raw_replay), baseline=True),
        Variant("raw, redis-py xrange()", raw_round_with(raw_replay_parsed)),
    ]


def _verify(env: Environment, system: ActorSystem, raw_client: "redis.asyncio.Redis") -> Benchmark:
    total = env.size(200_000, 2_000)
    address = Address(KIND, "verified")

    async def repertory_round(round_index: int) -> Sample:
        async def body() -> None:
            report = await verify(system, [address])
            if not report.ok:
                raise RuntimeError(f"verify found problems: {report.problems[:3]}")
            _check(f"events verified of {address}", report.events, total)

        return await timed(total, body)

    return Benchmark(
        name=f"verify {total:,} events",
        description=(
            f"one actor's {total:,}-event log verified (versions, decoding, fold) against "
            "reading and decoding it by hand"
        ),
        unit="events",
        prepare=lambda: write_log(system, address, total),
        variants=[
            *_raw_variants(raw_client, system.keys.events(address), total),
            Variant("repertory verify", repertory_round, target=TARGET),
        ],
    )


def _replay(env: Environment, system: ActorSystem, raw_client: "redis.asyncio.Redis") -> Benchmark:
    total = env.size(200_000, 2_000)
    address = Address(KIND, "replayed")

    async def states_round(round_index: int) -> Sample:
        async def body() -> None:
            views = await states_at(system, address, [total])
            _check(f"version replayed of {address}", views[total].version, total)

        return await timed(total, body)

    async def timeline_round(round_index: int) -> Sample:
        async def body() -> None:
            count = 0
            async for _entry in timeline(system, address):
                count += 1
            _check(f"timeline entries of {address}", count, total)

        return await timed(total, body)

    return Benchmark(
        name=f"replay {total:,} events",
        description=(
            f"one actor's {total:,}-event log folded to its last version (states_at), and "
            "shown as a timeline (each event as plain data, with its cause)"
        ),
        unit="events",
        prepare=lambda: write_log(system, address, total),
        variants=[
            *_raw_variants(raw_client, system.keys.events(address), total),
            Variant("repertory states_at", states_round, target=TARGET),
            Variant("repertory timeline", timeline_round),
        ],
    )


# Peak memory of verify, at two log sizes.


class MemoryResult(msgspec.Struct, frozen=True):
    events: int
    seconds: float
    traced_peak_bytes: int
    """The peak of Python allocations made during verify (tracemalloc)."""
    max_rss_bytes: int
    """The process's peak resident set size so far (it includes the written log's encoding
    pool and never goes down)."""


async def measure_memory(url: str, sizes: Sequence[int]) -> list[MemoryResult]:
    client = create_client(url)
    system = ActorSystem(Ledger(), app=APP, partitions=4, client=client)
    results = []
    try:
        for size in sizes:
            address = Address(KIND, f"memory-{size}")
            await write_log(system, address, size)
            tracemalloc.start()
            started = time.perf_counter()
            report = await verify(system, [address])
            seconds = time.perf_counter() - started
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            _check(f"events verified of {address}", report.events, size)
            if not report.ok:
                raise RuntimeError(f"verify found problems: {report.problems[:3]}")
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            results.append(MemoryResult(size, seconds, peak, rss))
            await client.delete(system.keys.events(address))
    finally:
        await client.aclose()
    return results


def memory_table(results: Sequence[MemoryResult]) -> Table:
    table = Table(title="peak memory of verify, one actor's log", title_justify="left")
    for column in ("events", "seconds (traced)", "traced peak", "max RSS of the process"):
        table.add_column(column, justify="right")
    for result in results:
        table.add_row(
            f"{result.events:,}",
            f"{result.seconds:.1f}",
            f"{result.traced_peak_bytes / 2**20:.2f} MiB",
            f"{result.max_rss_bytes / 2**20:.0f} MiB",
        )
    return table


def main(argv: Sequence[str] | None = None, *, console: Console | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_replay", description="Peak memory of verify."
    )
    parser.add_argument("what", choices=["memory"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    args = parser.parse_args(argv)
    sizes = QUICK_MEMORY_SIZES if args.quick else MEMORY_SIZES
    out = console or Console()
    with (
        tempfile.TemporaryDirectory(prefix="rep-bench-") as folder,
        EmbeddedServer(Path(folder) / "data", appendfsync=APPENDFSYNC) as server,
    ):
        results = asyncio.run(measure_memory(server.url, sizes))
    out.print(memory_table(results))


if __name__ == "__main__":
    main()
