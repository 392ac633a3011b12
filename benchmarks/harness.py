"""The benchmark harness: variants of one measurement run side by side in one process.

A suite (`bench_<name>.py`) defines `suite(env)`, an async context manager yielding its
benchmarks. A benchmark is one measurement done several ways (its variants); exactly one
variant is the baseline (the same Redis commands by hand, with no framework), and the others
carry a target: the least fraction of the baseline's rate they must reach.

Everything runs on one embedded valkey-server started in a temporary folder (unix socket, AOF
with `appendfsync everysec`). Each benchmark runs one discarded warm-up round and then
`rounds` measured rounds; every round runs each variant once, rotating their order, so that
drift on a busy machine falls on all variants alike. A variant's ratio is the median of its
per-round ratios to the baseline's rate in the same round.
"""

import argparse
import asyncio
import gc
import importlib
import json
import math
import os
import pkgutil
import platform
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import redis.asyncio
from redis.asyncio.connection import DefaultParser
from rich.console import Console
from rich.table import Table

from repertory.runtime import eventloop
from repertory.streams.client import RedisClient
from repertory.streams.embedded import EmbeddedServer, Fsync

APPENDFSYNC: Fsync = "everysec"
WARMUP_ROUNDS = 1
DEFAULT_ROUNDS = 5
QUICK_ROUNDS = 2
SUITE_PREFIX = "bench_"


@dataclass(frozen=True, slots=True)
class Sample:
    """One round of one variant: `ops` operations in `seconds`, and the latency of each timed
    operation (empty when the variant only timed the whole round)."""

    ops: int
    seconds: float
    latencies: Sequence[float] = ()

    @property
    def rate(self) -> float:
        return self.ops / self.seconds


RoundRunner = Callable[[int], Awaitable[Sample]]
"""Runs one round of a variant; gets the round's index (0 is the warm-up) so that each round
can work on keys of its own."""


@dataclass(frozen=True, slots=True)
class Variant:
    """One way of doing a benchmark's work. `target` is the least ratio of its rate to the
    baseline's rate that it must reach (None: reported without a target)."""

    name: str
    run: RoundRunner
    baseline: bool = False
    target: float | None = None


@dataclass(frozen=True, slots=True)
class Benchmark:
    """One measurement and its variants. `unit` names what an operation is (rates are
    `unit`/s); `latency_of` names what a latency measures, when the variants time operations.
    `prepare` runs once before the rounds (after the database is emptied)."""

    name: str
    description: str
    unit: str
    variants: Sequence[Variant]
    latency_of: str | None = None
    prepare: Callable[[], Awaitable[None]] | None = None

    def __post_init__(self) -> None:
        baselines = [variant.name for variant in self.variants if variant.baseline]
        if len(baselines) != 1:
            raise ValueError(f"{self.name!r} needs exactly one baseline variant, has {baselines}")
        names = [variant.name for variant in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name!r} has variants with the same name: {names}")

    @property
    def baseline(self) -> Variant:
        return next(variant for variant in self.variants if variant.baseline)


@dataclass(frozen=True, slots=True)
class Environment:
    """What a suite gets: the server's URL and whether to use tiny sizes."""

    url: str
    quick: bool

    def size(self, full: int, quick: int) -> int:
        return quick if self.quick else full


SuiteFactory = Callable[[Environment], AbstractAsyncContextManager[Sequence[Benchmark]]]


@dataclass(frozen=True, slots=True)
class Suite:
    name: str
    description: str
    factory: SuiteFactory


# Measuring.


async def timed(ops: int, body: Callable[[], Awaitable[object]]) -> Sample:
    """Time `body` as a whole, which does `ops` operations."""
    clock = time.perf_counter
    start = clock()
    await body()
    return Sample(ops, clock() - start)


async def sequential(
    calls: int, call: Callable[[int], Awaitable[object]], *, ops_per_call: int = 1
) -> Sample:
    """Await `call(i)` for i in 0..calls-1 one after another, timing each call."""
    clock = time.perf_counter
    latencies = [0.0] * calls
    start = clock()
    for index in range(calls):
        began = clock()
        await call(index)
        latencies[index] = clock() - began
    return Sample(calls * ops_per_call, clock() - start, latencies)


async def concurrent(
    workers: int,
    calls: int,
    call: Callable[[int, int], Awaitable[object]],
    *,
    ops_per_call: int = 1,
) -> Sample:
    """Run `workers` tasks at once, each awaiting `call(worker, i)` for i in 0..calls-1 one
    after another and timing each call; the round lasts until the last task is done."""
    clock = time.perf_counter
    latencies = [0.0] * (workers * calls)

    async def work(worker: int) -> None:
        offset = worker * calls
        for index in range(calls):
            began = clock()
            await call(worker, index)
            latencies[offset + index] = clock() - began

    start = clock()
    async with asyncio.TaskGroup() as group:
        for worker in range(workers):
            group.create_task(work(worker))
    return Sample(workers * calls * ops_per_call, clock() - start, latencies)


# Statistics.


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), interpolating linearly between the closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


@dataclass(frozen=True, slots=True)
class VariantResult:
    """A variant's measured rounds (the warm-up excluded) and what they add up to."""

    suite: str
    benchmark: str
    variant: str
    unit: str
    baseline: bool
    target: float | None
    rates: tuple[float, ...]
    """Operations per second, one per measured round."""
    ratios: tuple[float, ...]
    """Rate over the baseline's rate in the same round, one per measured round."""
    p50: float | None
    """Median latency in seconds over every timed operation of the measured rounds."""
    p99: float | None
    latency_of: str | None

    @property
    def median_rate(self) -> float:
        return statistics.median(self.rates)

    @property
    def spread(self) -> float:
        """(fastest - slowest round) / median rate: how much the rounds disagree."""
        return (max(self.rates) - min(self.rates)) / self.median_rate

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def passed(self) -> bool | None:
        """Whether the target is reached; None for the baseline or without a target."""
        if self.baseline or self.target is None:
            return None
        return self.ratio >= self.target

    def to_json(self) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "benchmark": self.benchmark,
            "variant": self.variant,
            "unit": self.unit,
            "baseline": self.baseline,
            "target": self.target,
            "median_rate": self.median_rate,
            "spread": self.spread,
            "ratio": self.ratio,
            "passed": self.passed,
            "rates": list(self.rates),
            "ratios": list(self.ratios),
            "p50_ms": None if self.p50 is None else self.p50 * 1000,
            "p99_ms": None if self.p99 is None else self.p99 * 1000,
            "latency_of": self.latency_of,
        }


def summarize(
    suite: str, benchmark: Benchmark, samples: Mapping[str, Sequence[Sample]]
) -> list[VariantResult]:
    """Results of `benchmark` from each variant's measured samples, given in round order."""
    baseline_rates = [sample.rate for sample in samples[benchmark.baseline.name]]
    results = []
    for variant in benchmark.variants:
        rounds = samples[variant.name]
        if len(rounds) != len(baseline_rates) or not rounds:
            raise ValueError(
                f"{benchmark.name}/{variant.name}: {len(rounds)} rounds, the baseline has "
                f"{len(baseline_rates)}"
            )
        rates = tuple(sample.rate for sample in rounds)
        latencies = [latency for sample in rounds for latency in sample.latencies]
        results.append(
            VariantResult(
                suite=suite,
                benchmark=benchmark.name,
                variant=variant.name,
                unit=benchmark.unit,
                baseline=variant.baseline,
                target=variant.target,
                rates=rates,
                ratios=tuple(rate / base for rate, base in zip(rates, baseline_rates, strict=True)),
                p50=percentile(latencies, 50) if latencies else None,
                p99=percentile(latencies, 99) if latencies else None,
                latency_of=benchmark.latency_of,
            )
        )
    return results


# Running.


@dataclass(slots=True)
class Report:
    meta: dict[str, Any]
    results: list[VariantResult] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"meta": self.meta, "results": [result.to_json() for result in self.results]}

    @property
    def failed(self) -> list[VariantResult]:
        return [result for result in self.results if result.passed is False]


def discover() -> dict[str, Suite]:
    """The suites of the `benchmarks` package: every `bench_<name>` module's `suite`."""
    package = importlib.import_module("benchmarks")
    suites = {}
    for module_info in pkgutil.iter_modules(package.__path__):
        if not module_info.name.startswith(SUITE_PREFIX):
            continue
        module = importlib.import_module(f"benchmarks.{module_info.name}")
        factory = getattr(module, "suite", None)
        if not callable(factory):
            raise TypeError(f"benchmarks.{module_info.name} defines no suite(env) function")
        name = module_info.name.removeprefix(SUITE_PREFIX)
        description = next(iter((module.__doc__ or "").strip().splitlines()), "")
        suites[name] = Suite(name, description, factory)
    return suites


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _load() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


async def _server_version(client: "redis.asyncio.Redis") -> str:
    info: dict[str, Any] = await client.info("server")
    if "valkey_version" in info:
        return f"valkey {info['valkey_version']}"
    return f"redis {info.get('redis_version', '?')}"


def _machine_meta(rounds: int, quick: bool) -> dict[str, Any]:
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "redis_py": _package_version("redis"),
        "hiredis": _package_version("hiredis"),
        "parser": DefaultParser.__name__,
        "msgspec": _package_version("msgspec"),
        "event_loop": _event_loop(),
        "transport": "unix socket",
        "appendfsync": APPENDFSYNC,
        "rounds": rounds,
        "warmup_rounds": WARMUP_ROUNDS,
        "quick": quick,
        "load_before": _load(),
    }


def _format_rate(rate: float) -> str:
    return f"{rate:,.0f}"


async def _run_benchmark(
    suite: str, benchmark: Benchmark, rounds: int, console: Console
) -> list[VariantResult]:
    if benchmark.prepare is not None:
        console.print(f"[dim]{suite} · {benchmark.name}: preparing[/]", soft_wrap=True)
        await benchmark.prepare()
    variants = list(benchmark.variants)
    measured: dict[str, list[Sample]] = {variant.name: [] for variant in variants}
    for round_index in range(WARMUP_ROUNDS + rounds):
        shift = round_index % len(variants)
        rates: dict[str, float] = {}
        for variant in variants[shift:] + variants[:shift]:
            # Garbage left by the previous variant is collected here, not on this one's clock.
            gc.collect()
            sample = await variant.run(round_index)
            rates[variant.name] = sample.rate
            if round_index >= WARMUP_ROUNDS:
                measured[variant.name].append(sample)
        label = (
            "warm-up"
            if round_index < WARMUP_ROUNDS
            else f"round {round_index - WARMUP_ROUNDS + 1}/{rounds}"
        )
        figures = " · ".join(
            f"{variant.name} {_format_rate(rates[variant.name])}" for variant in variants
        )
        console.print(
            f"[dim]{suite} · {benchmark.name} · {label}: {figures} {benchmark.unit}/s[/]",
            soft_wrap=True,
        )
    return summarize(suite, benchmark, measured)


async def run_suites(
    suites: Sequence[Suite], *, rounds: int, quick: bool, console: Console
) -> Report:
    """Run `suites` on a fresh embedded server and return every variant's results."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    report = Report(_machine_meta(rounds, quick))
    # A short folder: the unix socket path must stay under ~100 bytes.
    with (
        tempfile.TemporaryDirectory(prefix="rep-bench-") as folder,
        EmbeddedServer(Path(folder) / "data", appendfsync=APPENDFSYNC) as server,
    ):
        admin = redis.asyncio.Redis.from_url(server.url)
        try:
            report.meta["server"] = await _server_version(admin)
            console.print(f"[dim]{_setting(report.meta)}[/]", soft_wrap=True)
            env = Environment(server.url, quick)
            for suite in suites:
                async with suite.factory(env) as benchmarks:
                    for benchmark in benchmarks:
                        # Each benchmark starts on an empty database (scripts stay loaded).
                        await empty(admin)
                        report.results.extend(
                            await _run_benchmark(suite.name, benchmark, rounds, console)
                        )
        finally:
            await admin.aclose()
    report.meta["load_after"] = _load()
    return report


async def empty(client: RedisClient) -> None:
    """Empty the server's database and its AOF before returning, off the clock.

    - A plain FLUSHALL follows the server's `lazyfree-lazy-user-flush` (yes on valkey): a
      server thread would free the last round's data (hundreds of thousands of streams after
      a 100,000-actor round) while the next round runs, on the same two cores.
    - The AOF is rewritten here, and only here: the server's own rule (rewrite once the AOF
      has doubled since the last rewrite, past 64 MB) is turned off. After a flush the AOF's
      base is next to nothing, so that rule rewrote it two to five times within each
      100,000-actor round: each time a fork (10-25 ms with the server stopped) and a child
      writing the whole dataset on the same two cores. A server that is not flushed every few
      seconds has a base the size of its data, and rewrites that much less often."""
    await client.execute_command("FLUSHALL", "SYNC")
    await client.config_set("auto-aof-rewrite-percentage", 0)
    await _aof_rewritten(client)  # one the server started on its own before this call
    await client.execute_command("BGREWRITEAOF")
    await _aof_rewritten(client)


async def _aof_rewritten(client: RedisClient) -> None:
    deadline = time.monotonic() + 60
    while True:
        persistence = await client.info("persistence")
        if not (persistence["aof_rewrite_in_progress"] or persistence["aof_rewrite_scheduled"]):
            return
        if time.monotonic() > deadline:
            raise TimeoutError("an AOF rewrite went on for over 60 s")
        await asyncio.sleep(0.005)


# Rendering.


def _setting(meta: Mapping[str, Any]) -> str:
    return (
        f"{meta.get('server', 'server')} embedded, {meta['transport']}, AOF appendfsync "
        f"{meta['appendfsync']} · {meta['rounds']} rounds (+{meta['warmup_rounds']} warm-up "
        f"discarded){' · quick sizes' if meta['quick'] else ''}"
    )


def _machine(meta: Mapping[str, Any]) -> str:
    load = f"load {meta['load_before']}"
    if "load_after" in meta:
        load += f" -> {meta['load_after']}"
    return (
        f"{meta['nproc']} CPUs ({meta['cpu']}) · Python {meta['python']} · redis-py "
        f"{meta['redis_py']} with hiredis {meta['hiredis']} ({meta['parser']}) · msgspec "
        f"{meta['msgspec']} · {meta['event_loop']} event loop · {load}"
    )


def _event_loop() -> str:
    name = eventloop.event_loop_name()
    return f"uvloop {_package_version('uvloop')}" if name == "uvloop" else name


def _latency(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1000:.3f}"


def _target(result: VariantResult) -> str:
    if result.baseline:
        return "baseline"
    return "" if result.target is None else f">= {result.target:.0%}"


def _verdict(result: VariantResult) -> str:
    return {None: "", True: "PASS", False: "FAIL"}[result.passed]


def _cells(result: VariantResult) -> tuple[str, ...]:
    """Variant, rate, spread, p50 ms, p99 ms, ratio, target, verdict."""
    return (
        result.variant,
        f"{result.median_rate:,.0f}",
        f"{result.spread:.0%}",
        _latency(result.p50),
        _latency(result.p99),
        f"{result.ratio:.0%}",
        _target(result),
        _verdict(result),
    )


def _groups(report: Report) -> dict[tuple[str, str], list[VariantResult]]:
    groups: dict[tuple[str, str], list[VariantResult]] = {}
    for result in report.results:
        groups.setdefault((result.suite, result.benchmark), []).append(result)
    return groups


def render_tables(report: Report) -> list[Table]:
    """One table per benchmark: narrow enough for an 80-column terminal."""
    tables = []
    for (suite, benchmark), results in _groups(report).items():
        first = results[0]
        latency = f" (latency per {first.latency_of})" if first.latency_of else ""
        table = Table(title=f"{suite} · {benchmark}{latency}", title_justify="left")
        table.add_column("Variant", no_wrap=True)
        for header in (f"{first.unit}/s", "Spread", "p50 ms", "p99 ms", "Ratio", "Target"):
            table.add_column(header, justify="right")
        for result in results:
            *cells, target, verdict = _cells(result)
            style = {"PASS": "green", "FAIL": "bold red"}.get(verdict)
            table.add_row(*cells, f"{target} [{style}]{verdict}[/]" if style else target)
        tables.append(table)
    return tables


def render_markdown(report: Report) -> str:
    lines = [
        f"Setting: {_setting(report.meta)}.",
        "",
        f"Machine: {_machine(report.meta)}.",
        "",
        "| Benchmark | Variant | Rate (median) | Spread | p50 ms | p99 ms | Ratio | Target "
        "| Result |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for (suite, benchmark), results in _groups(report).items():
        for index, result in enumerate(results):
            variant, rate, *rest = _cells(result)
            title = f"{suite} · {benchmark}" if index == 0 else ""
            cells = (title, variant, f"{rate} {result.unit}/s", *rest)
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# Command line.


def _parser(suites: Mapping[str, Suite]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run repertory's benchmarks next to their raw redis-py baselines.",
        epilog="suites: "
        + "; ".join(f"{suite.name}: {suite.description}" for suite in suites.values()),
    )
    parser.add_argument(
        "suites",
        nargs="*",
        metavar="suite",
        help=f"suites to run (default: all): {', '.join(suites)}",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument(
        "--rounds",
        type=int,
        help=f"measured rounds per benchmark (default {DEFAULT_ROUNDS}, {QUICK_ROUNDS} with "
        "--quick)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results as JSON")
    parser.add_argument(
        "--markdown", action="store_true", help="print a markdown table instead of the table"
    )
    parser.add_argument(
        "--check", action="store_true", help="exit with status 1 when a target is missed"
    )
    return parser


def main(argv: Sequence[str] | None = None, *, console: Console | None = None) -> int:
    available = discover()
    parser = _parser(available)
    args = parser.parse_args(argv)
    unknown = [name for name in args.suites if name not in available]
    if unknown:
        parser.error(f"unknown suite(s) {', '.join(unknown)}; known: {', '.join(available)}")
    selected = [available[name] for name in (args.suites or available)]
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS)
    if rounds < 1:
        parser.error("--rounds must be >= 1")
    out = console or Console()
    progress = Console(stderr=True) if console is None else console
    report = eventloop.run(
        partial(run_suites, selected, rounds=rounds, quick=args.quick, console=progress)
    )
    if args.markdown:
        out.print(render_markdown(report), markup=False, highlight=False, soft_wrap=True)
    else:
        out.print(_setting(report.meta), highlight=False, soft_wrap=True)
        out.print(_machine(report.meta), highlight=False, soft_wrap=True)
        for table in render_tables(report):
            out.print(table)
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return 1 if args.check and report.failed else 0
