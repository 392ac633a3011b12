"""The replay benchmarks (benchmarks/bench_replay.py): a quick run of the suite gives a result
for every variant, and the memory measurement runs at two small log sizes. Nothing here
asserts a speed or a size: only that the figures are produced and the work was all done."""

import io
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import pytest
from rich.console import Console

from benchmarks import bench_replay
from benchmarks.harness import Benchmark, Environment, Suite, discover, run_suites


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


@pytest.mark.integration
@pytest.mark.anyio
async def test_a_quick_replay_run_gives_results_for_every_variant() -> None:
    replay = discover()["replay"]
    seen: list[Benchmark] = []

    @asynccontextmanager
    async def recording(env: Environment) -> AsyncIterator[Sequence[Benchmark]]:
        async with replay.factory(env) as benchmarks:
            seen.extend(benchmarks)
            yield benchmarks

    report = await run_suites(
        [Suite("replay", "", recording)], rounds=1, quick=True, console=_quiet()
    )
    expected = {(b.name, v.name) for b in seen for v in b.variants}
    assert {(result.benchmark, result.variant) for result in report.results} == expected
    assert [b.name for b in seen] == ["verify 2,000 events", "replay 2,000 events"]
    targets = {result.variant: result.target for result in report.results}
    assert targets["repertory verify"] == targets["repertory states_at"] == 0.8
    for result in report.results:
        assert result.rates[0] > 0


@pytest.mark.integration
@pytest.mark.anyio
async def test_verify_memory_is_measured_at_two_log_sizes(redis_url: str) -> None:
    results = await bench_replay.measure_memory(redis_url, (500, 1500))
    assert [result.events for result in results] == [500, 1500]
    assert all(result.traced_peak_bytes > 0 for result in results)
    console = _quiet()
    console.print(bench_replay.memory_table(results))
    assert "1,500" in console.file.getvalue()  # type: ignore[attr-defined]


@pytest.mark.integration
def test_the_memory_command_line() -> None:
    console = Console(file=io.StringIO(), width=200)
    bench_replay.main(["memory", "--quick"], console=console)
    output = console.file.getvalue()  # type: ignore[attr-defined]
    assert "20,000" in output
    assert "MiB" in output
