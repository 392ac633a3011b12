"""A namespace's store as a whole: `repertory verify` (contiguous, decodable, snapshots equal to
replays), `repertory export` (JSON lines) and `repertory import`."""

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from repertory.runtime.cli.options import (
    AppName,
    AsJson,
    Partitions,
    StoreDir,
    SystemSpec,
    Url,
    loaded_system,
    open_store,
)
from repertory.runtime.cli.output import console, counted, print_json, progress_bar, reported
from repertory.schemas.errors import RepertoryError

if TYPE_CHECKING:
    from repertory.runtime.archive import ImportReport, VerifyReport
    from repertory.runtime.system import ActorSystem

commands = typer.Typer()


@commands.command()
def verify(
    system: SystemSpec = None,
    app_name: AppName = None,
    partitions: Partitions = None,
    kind: Annotated[str | None, typer.Option(help="Verify only this actor kind.")] = None,
    url: Url = None,
    data_dir: StoreDir = None,
    as_json: AsJson = False,
) -> None:
    """Verify the store: versions contiguous, every event decodable and upcastable, every
    snapshot equal to a replay up to its version. Streams (any log size); exit code 1 when
    anything is wrong.

    With --app instead of the system, only the structure is verified (contiguity, readable
    records, snapshots not ahead of their log): decoding and replay need the actor code.
    """
    import anyio

    from repertory.runtime import archive

    async def main(loaded: "ActorSystem | None") -> "VerifyReport":
        async with open_store(loaded, app_name, partitions, url, data_dir) as opened:
            addresses = await archive.plan(opened, kind)
            total = await archive.count_events(opened, addresses)
            with progress_bar() as progress:
                task = progress.add_task("verifying", total=total)
                return await archive.verify(
                    opened, addresses, progress=lambda n: progress.advance(task, n)
                )

    with reported(), loaded_system(system, app_name) as loaded:
        report = anyio.run(main, loaded)
    if as_json:
        print_json(report)
    else:
        if report.problems:
            table = Table(title="problems")
            for column in ("actor", "version", "problem", "detail"):
                table.add_column(column)
            for problem in report.problems:
                version = "" if problem.version is None else str(problem.version)
                table.add_row(
                    escape(problem.address), version, problem.kind, escape(problem.detail)
                )
            console.print(table)
        summary = (
            f"{counted(report.events, 'event')} of {counted(report.actors, 'actor')}, "
            f"{counted(report.snapshots, 'snapshot')}"
        )
        if report.unchecked_kinds:
            summary += f" (structure only for {', '.join(report.unchecked_kinds)}: no actor code)"
        if report.ok:
            console.print(f"[green]ok[/]: {summary}")
        else:
            console.print(f"[bold red]{report.problem_count} problems[/] in {summary}")
    if not report.ok:
        raise typer.Exit(1)


@commands.command()
def export(
    system: SystemSpec = None,
    app_name: AppName = None,
    partitions: Partitions = None,
    kind: Annotated[str | None, typer.Option(help="Export only this actor kind.")] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file (default: stdout).")
    ] = None,
    url: Url = None,
    data_dir: StoreDir = None,
) -> None:
    """Export the namespace's events, snapshots and handled messages as JSON lines: exact
    (records as base64) with a readable `view` of each."""
    import sys

    import anyio

    from repertory.runtime import archive

    async def main(loaded: "ActorSystem | None") -> None:
        async with open_store(loaded, app_name, partitions, url, data_dir) as opened:
            addresses = await archive.plan(opened, kind)
            total = await archive.count_events(opened, addresses)
            with progress_bar() as progress:
                task = progress.add_task("exporting", total=total)
                lines = archive.export_lines(
                    opened, addresses, progress=lambda n: progress.advance(task, n)
                )
                if output is None:
                    stream = sys.stdout.buffer
                    async for line in lines:
                        stream.write(line)
                    stream.flush()
                    return
                with output.open("wb") as file:
                    async for line in lines:
                        file.write(line)

    with reported(), loaded_system(system, app_name) as loaded:
        anyio.run(main, loaded)


@commands.command("import")
def import_(
    source: Annotated[Path, typer.Argument(help="An export file (- for stdin).")],
    system: SystemSpec = None,
    app_name: AppName = None,
    partitions: Partitions = None,
    url: Url = None,
    data_dir: StoreDir = None,
) -> None:
    """Import an export into a namespace where none of its actors has data yet."""
    import sys

    import anyio

    from repertory.runtime import archive

    async def main(loaded: "ActorSystem | None") -> "ImportReport":
        async with open_store(loaded, app_name, partitions, url, data_dir) as opened:
            with progress_bar() as progress:
                task = progress.add_task("importing events", total=None)
                if str(source) == "-":
                    return await archive.import_lines(
                        opened, sys.stdin.buffer, progress=lambda n: progress.advance(task, n)
                    )
                with source.open("rb") as file:
                    return await archive.import_lines(
                        opened, file, progress=lambda n: progress.advance(task, n)
                    )

    with reported(), loaded_system(system, app_name) as loaded:
        if str(source) != "-" and not source.is_file():
            raise RepertoryError(f"no export file at {source}")
        report = anyio.run(main, loaded)
    console.print(
        f"imported {counted(report.events, 'event')}, {counted(report.snapshots, 'snapshot')} and "
        f"{counted(report.handled, 'handled message')} of {counted(report.actors, 'actor')}"
    )
