"""The benchmark harness: its statistics, its rounds, and a quick run of the real suites.

Nothing here asserts a duration or a speed: only that the figures are computed right and that
every variant of every benchmark produces them.
"""

import io
import json
import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from rich.console import Console

from benchmarks.bench_runtime import PARTITIONS, _addresses_in, task_queues_installed
from benchmarks.harness import (
    WARMUP_ROUNDS,
    Benchmark,
    Environment,
    Sample,
    Suite,
    Variant,
    concurrent,
    discover,
    main,
    percentile,
    render_markdown,
    run_suites,
    sequential,
    summarize,
)
from repertory.streams.keys import KeyLayout


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


async def _never(round_index: int) -> Sample:
    raise AssertionError("summarize must not run a variant")


def test_percentile_interpolates_between_closest_ranks() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([4.0, 1.0, 3.0, 2.0], 0) == 1.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 100) == 4.0
    assert math.isclose(percentile([float(v) for v in range(1, 101)], 99), 99.01)
    assert percentile([7.0], 99) == 7.0


@pytest.mark.parametrize(("values", "q"), [([], 50), ([1.0], -1), ([1.0], 101)])
def test_percentile_rejects_what_has_none(values: list[float], q: float) -> None:
    with pytest.raises(ValueError, match="percentile"):
        percentile(values, q)


def test_summarize_computes_rates_ratios_spread_and_verdicts() -> None:
    benchmark = Benchmark(
        name="work",
        description="",
        unit="ops",
        latency_of="op",
        variants=[
            Variant("raw", _never, baseline=True),
            Variant("fast enough", _never, target=0.8),
            Variant("too slow", _never, target=0.95),
            Variant("reference", _never),
        ],
    )
    # Rates per round: raw 100, 200, 100; the others 90, 150, 95 (ratios 0.9, 0.75, 0.95).
    raw = [Sample(100, 1.0, [0.01, 0.03]), Sample(400, 2.0), Sample(50, 0.5, [0.02])]
    other = [Sample(90, 1.0), Sample(300, 2.0, [0.04]), Sample(95, 1.0)]
    samples = {"raw": raw, "fast enough": other, "too slow": other, "reference": other}

    results = {result.variant: result for result in summarize("suite", benchmark, samples)}

    baseline = results["raw"]
    assert baseline.rates == (100.0, 200.0, 100.0)
    assert baseline.median_rate == 100.0
    assert baseline.ratio == 1.0
    assert baseline.spread == 1.0
    assert baseline.passed is None
    assert baseline.p50 == 0.02
    assert baseline.p99 is not None
    assert math.isclose(baseline.p99, 0.0298)

    fast = results["fast enough"]
    assert fast.ratios == pytest.approx((0.9, 0.75, 0.95))
    # The ratio is the median of the per-round ratios, not a ratio of medians (95 / 100).
    assert fast.ratio == pytest.approx(0.9)
    assert fast.median_rate == 95.0
    assert fast.spread == pytest.approx((150 - 90) / 95)
    assert fast.passed is True
    assert fast.p50 == fast.p99 == 0.04
    assert results["too slow"].passed is False
    assert results["reference"].passed is None

    as_json = fast.to_json()
    assert as_json["ratio"] == pytest.approx(0.9)
    assert as_json["p50_ms"] == pytest.approx(40.0)
    assert as_json["rates"] == [90.0, 150.0, 95.0]


def test_summarize_refuses_unequal_rounds() -> None:
    benchmark = Benchmark(
        "work", "", "ops", [Variant("raw", _never, baseline=True), Variant("other", _never)]
    )
    samples = {"raw": [Sample(1, 1.0), Sample(1, 1.0)], "other": [Sample(1, 1.0)]}
    with pytest.raises(ValueError, match="rounds"):
        summarize("suite", benchmark, samples)


@pytest.mark.parametrize("baselines", [0, 2])
def test_a_benchmark_needs_exactly_one_baseline(baselines: int) -> None:
    variants = [Variant(f"v{index}", _never, baseline=index < baselines) for index in range(2)]
    with pytest.raises(ValueError, match="baseline"):
        Benchmark("work", "", "ops", variants)


@pytest.mark.anyio
async def test_sequential_and_concurrent_count_every_call() -> None:
    calls: list[tuple[int, ...]] = []

    async def one(index: int) -> None:
        calls.append((index,))

    async def many(worker: int, index: int) -> None:
        calls.append((worker, index))

    single = await sequential(5, one, ops_per_call=10)
    assert (single.ops, len(single.latencies)) == (50, 5)
    assert calls == [(index,) for index in range(5)]

    calls.clear()
    parallel = await concurrent(3, 4, many)
    assert (parallel.ops, len(parallel.latencies)) == (12, 12)
    assert sorted(calls) == [(worker, index) for worker in range(3) for index in range(4)]


@pytest.mark.integration
@pytest.mark.anyio
async def test_rounds_rotate_the_variants_and_discard_the_warm_up() -> None:
    order: list[tuple[str, int]] = []

    def variant(
        name: str, ops: int, *, baseline: bool = False, target: float | None = None
    ) -> Variant:
        async def run(round_index: int) -> Sample:
            order.append((name, round_index))
            # The warm-up round is ten times faster: it must not reach the results.
            return Sample(ops * (10 if round_index < WARMUP_ROUNDS else 1), 1.0)

        return Variant(name, run, baseline=baseline, target=target)

    benchmark = Benchmark(
        "work", "", "ops", [variant("a", 10, baseline=True), variant("b", 5, target=0.4)]
    )

    @asynccontextmanager
    async def factory(env: Environment) -> AsyncIterator[Sequence[Benchmark]]:
        assert env.quick
        yield [benchmark]

    report = await run_suites([Suite("fake", "", factory)], rounds=3, quick=True, console=_quiet())

    assert order == [
        ("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2), ("b", 3), ("a", 3),
    ]  # fmt: skip
    a, b = report.results
    assert a.rates == (10.0, 10.0, 10.0)
    assert b.rates == (5.0, 5.0, 5.0)
    assert b.ratio == 0.5
    assert b.passed is True
    assert report.failed == []
    assert report.meta["appendfsync"] == "everysec"
    assert report.meta["server"].startswith("valkey")


@pytest.mark.integration
@pytest.mark.anyio
async def test_a_quick_run_gives_results_for_every_variant() -> None:
    eventstore = discover()["eventstore"]
    seen: list[Benchmark] = []

    @asynccontextmanager
    async def recording(env: Environment) -> AsyncIterator[Sequence[Benchmark]]:
        async with eventstore.factory(env) as benchmarks:
            seen.extend(benchmarks)
            yield benchmarks

    report = await run_suites(
        [Suite("eventstore", "", recording)], rounds=1, quick=True, console=_quiet()
    )

    expected = {
        (benchmark.name, variant.name) for benchmark in seen for variant in benchmark.variants
    }
    assert len(seen) == 4
    assert {(result.benchmark, result.variant) for result in report.results} == expected
    for result in report.results:
        assert len(result.rates) == 1
        assert result.rates[0] > 0
        if result.baseline:
            assert result.ratio == 1.0
        assert (result.p50 is None) == (result.latency_of is None)
    markdown = render_markdown(report)
    for benchmark in seen:
        assert f"eventstore · {benchmark.name}" in markdown


@pytest.mark.integration
@pytest.mark.anyio
async def test_a_quick_runtime_run_gives_results_for_every_variant() -> None:
    runtime = discover()["runtime"]
    seen: list[Benchmark] = []

    @asynccontextmanager
    async def recording(env: Environment) -> AsyncIterator[Sequence[Benchmark]]:
        async with runtime.factory(env) as benchmarks:
            seen.extend(benchmarks)
            yield benchmarks

    report = await run_suites(
        [Suite("runtime", "", recording)], rounds=1, quick=True, console=_quiet()
    )

    expected = {
        (benchmark.name, variant.name) for benchmark in seen for variant in benchmark.variants
    }
    names = [benchmark.name for benchmark in seen]
    # Throughput at three actor counts and with the most actors activated beforehand, the
    # node alone at those counts taking turns (flatness) and with actors in one partition or
    # spread over them, sends alone, latency at 1,000 msg/s for the three actor counts and at
    # 1,500 msg/s for 1,000 actors, three activations, and the task queues (sent while
    # handled, and a backlog drained) when the bench extra is installed.
    queues = task_queues_installed()
    assert len(seen) == 14 + 2 * queues, names
    assert sum(name.startswith("latency") for name in names) == 4
    assert sum("activated beforehand" in name for name in names) == 1
    flatness, spread = [benchmark for benchmark in seen if benchmark.name.startswith("flatness")]
    assert [variant.target for variant in flatness.variants] == [None, 0.9, 0.9, 0.9]
    assert [variant.baseline for variant in spread.variants] == [True] + [False] * 4
    assert sum("task queues" in name for name in names) == 2 * queues
    assert {(result.benchmark, result.variant) for result in report.results} == expected
    for result in report.results:
        assert len(result.rates) == 1
        assert result.rates[0] > 0
        assert (result.p50 is None) == (result.latency_of is None)
    markdown = render_markdown(report)
    for benchmark in seen:
        assert f"runtime · {benchmark.name}" in markdown


@pytest.mark.integration
def test_the_command_line_writes_json(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    printed = io.StringIO()

    status = main(
        ["--quick", "--rounds", "1", "--json", str(path), "eventstore"],
        console=Console(file=printed, width=200),
    )

    assert status == 0
    written = json.loads(path.read_text())
    assert written["meta"]["rounds"] == 1
    assert written["meta"]["quick"] is True
    variants = {(result["benchmark"], result["variant"]) for result in written["results"]}
    assert ("replay 2,500 events", "repertory") in variants
    assert ("replay 2,500 events", "raw redis-py") in variants
    assert "replay 2,500 events" in printed.getvalue()


def test_the_command_line_refuses_an_unknown_suite(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["no-such-suite"], console=_quiet())
    assert "unknown suite" in capsys.readouterr().err


def test_the_actors_against_partitions_are_where_the_row_says() -> None:
    layout = KeyLayout("any", partitions=PARTITIONS)
    one = _addresses_in([0], 16)
    assert len(set(one)) == 16
    assert {layout.partition_of(address) for address in one} == {0}
    each = _addresses_in(range(PARTITIONS), 2)
    # Round-robin over the partitions, two actors of each.
    assert [layout.partition_of(address) for address in each] == [*range(PARTITIONS)] * 2
    assert len(set(each)) == 2 * PARTITIONS
