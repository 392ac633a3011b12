"""The agents' main job: parallel speedup and failure detection time.

    python -m benchmarks.agents [--quick] [--kills 5]

Runs the demo's project (`repertory.runtime.agents_demo.run_project`: a coordinator and a
health monitor on a node, worker agents as separate processes) on a fresh embedded server:
20 tasks of 1 s on 1, 2, 4 and 8 workers without failures (wall time against the sequential
sum), then projects where one worker is killed with SIGKILL in the middle (time from the kill
until the health monitor records the agent down).
"""

import argparse
import asyncio
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks.harness import empty
from repertory.runtime.agents_demo import DemoConfig, DemoReport, run_project
from repertory.streams.client import create_client
from repertory.streams.embedded import EmbeddedServer


@dataclass(frozen=True)
class Results:
    tasks: int
    seconds: float
    speedup: dict[int, DemoReport]
    detections_s: list[float]


async def measure(
    url: str, folder: Path, tasks: int, seconds: float, workers: Sequence[int], kills: int
) -> Results:
    logs = folder / "logs"
    client = create_client(url)

    async def fresh_project(config: DemoConfig) -> DemoReport:
        # Each run starts from an empty server: the health monitor's memory of earlier kills
        # would otherwise put it in degraded mode, which refuses new projects (as it should).
        await empty(client)
        return _checked(await run_project(url, config))

    try:
        speedup = {}
        for count in workers:
            config = DemoConfig(
                tasks=tasks, workers=count, seconds=seconds, kill=False, log_dir=logs
            )
            speedup[count] = await fresh_project(config)
        detections = []
        for _ in range(kills):
            config = DemoConfig(tasks=tasks, workers=4, seconds=seconds, kill=True, log_dir=logs)
            report = await fresh_project(config)
            if report.victim is None or not report.detected_at_ms:
                raise RuntimeError(f"{report.project_id}: no worker was killed, or none detected")
            detections.append((report.detected_at_ms - report.killed_at_ms) / 1000)
    finally:
        await client.aclose()
    return Results(tasks, seconds, speedup, detections)


def _checked(report: DemoReport) -> DemoReport:
    # A run that lost or repeated a task would flatter its time.
    if not report.exactly_once:
        raise RuntimeError(f"{report.project_id}: not every task completed exactly once")
    return report


def tables(results: Results) -> list[Table]:
    speed = Table(
        title=f"{results.tasks} tasks of {results.seconds:g} s: wall time against the "
        "sequential sum"
    )
    for column in ("workers", "wall s", "speedup", "efficiency"):
        speed.add_column(column)
    for workers, report in results.speedup.items():
        factor = report.sequential_s / report.wall_s
        speed.add_row(
            str(workers), f"{report.wall_s:.2f}", f"{factor:.2f}x", f"{factor / workers:.0%}"
        )
    detection = Table(title="failure detection after SIGKILL (health monitor, 2 s heartbeats)")
    for column in ("runs", "median s", "max s"):
        detection.add_column(column)
    if results.detections_s:
        detection.add_row(
            str(len(results.detections_s)),
            f"{statistics.median(results.detections_s):.2f}",
            f"{max(results.detections_s):.2f}",
        )
    return [speed, detection]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.agents", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--kills", type=int, default=5, help="runs with a SIGKILL (default 5)")
    args = parser.parse_args(argv)
    tasks, seconds, workers, kills = (
        (8, 0.5, (1, 2), 1) if args.quick else (20, 1.0, (1, 2, 4, 8), args.kills)
    )
    with tempfile.TemporaryDirectory(prefix="rep-agents-") as name:
        folder = Path(name)
        with EmbeddedServer(folder / "data") as server:
            results = asyncio.run(measure(server.url, folder, tasks, seconds, workers, kills))
    console = Console()
    for table in tables(results):
        console.print(table)


if __name__ == "__main__":
    main()
