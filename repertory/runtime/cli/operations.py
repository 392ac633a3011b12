"""Operating a namespace: `repertory inspect` (nodes, owners, lag, pending, dead letters,
timers), `repertory init` (consumer groups and scripts) and `repertory migrate` (old schema
versions rewritten)."""

from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from repertory.runtime.cli.options import (
    AppName,
    AsJson,
    OnlyKind,
    Partitions,
    RequiredSystem,
    StoreDir,
    SystemSpec,
    Url,
    loaded_system,
    open_store,
)
from repertory.runtime.cli.output import (
    console,
    counted,
    print_json,
    print_unwrapped,
    progress_bar,
    reported,
    utc_time,
)

if TYPE_CHECKING:
    from repertory.runtime.admin import InitReport, InspectReport, MigrationReport
    from repertory.runtime.system import ActorSystem

commands = typer.Typer()


@commands.command("inspect")
def inspect_(
    system: SystemSpec = None,
    app_name: AppName = None,
    partitions: Partitions = None,
    kind: OnlyKind = None,
    url: Url = None,
    data_dir: StoreDir = None,
    as_json: AsJson = False,
) -> None:
    """Show the namespace now: live nodes, each partition's owner, epoch and lease, consumer
    lag and pending per group and consumer, outbox backlog, dead letters and timers."""
    import anyio

    from repertory.runtime import admin

    async def main(loaded: "ActorSystem | None") -> "InspectReport":
        async with open_store(loaded, app_name, partitions, url, data_dir) as opened:
            return await admin.inspect(opened, kind=kind)

    with reported(), loaded_system(system, app_name) as loaded:
        report = anyio.run(main, loaded)
    if as_json:
        print_json(report)
        return
    console.print(
        f"namespace [bold]{escape(report.app)}[/] at {utc_time(report.server_time_ms)} UTC "
        "(server clock)"
    )
    nodes = Table(title="nodes")
    for column in ("node", "heartbeat expires in", "state"):
        nodes.add_column(column)
    for node in report.nodes:
        state = "[green]live[/]" if node.live else "[red]missed its heartbeat[/]"
        nodes.add_row(escape(node.id), _ms(node.expires_in_ms), state)
    if not report.nodes:
        nodes.add_row("[dim](none)[/]", "", "")
    print_unwrapped(nodes)
    kinds = Table(title="kinds")
    for column in ("kind", "partitions", "owned", "lag", "pending", "outbox", "dead", "timers"):
        kinds.add_column(column, justify="left" if column == "kind" else "right")
    for summary in report.kinds:
        kinds.add_row(
            escape(summary.kind),
            str(summary.partitions),
            str(summary.owned),
            str(summary.lag),
            str(summary.pending),
            str(summary.outbox),
            f"[red]{summary.dead_letters}[/]" if summary.dead_letters else "0",
            f"{summary.timers_due} due / {summary.timers}",
        )
    print_unwrapped(kinds)
    table = Table(title="partitions")
    for column in ("kind", "#", "owner", "epoch", "lease", "inbox", "lag", "pending"):
        table.add_column(column)
    for column in ("outbox", "dead", "timers"):
        table.add_column(column)
    for info in report.partitions:
        owner = escape(info.owner) if info.owner is not None else "[dim]-[/]"
        if not info.initialized:
            owner += " [dim](no group: run init)[/]"
        table.add_row(
            escape(info.kind),
            str(info.partition),
            owner,
            str(info.epoch),
            _ms(info.lease_ms),
            str(info.inbox),
            "?" if info.lag is None and info.initialized else str(info.lag or 0),
            str(info.pending),
            str(info.outbox),
            f"[red]{info.dead_letters}[/]" if info.dead_letters else "0",
            f"{info.timers_due} due / {info.timers}",
        )
    print_unwrapped(table)
    consumers = [(info, c) for info in report.partitions for c in info.consumers if c.pending]
    if consumers:
        pending = Table(title="pending per consumer")
        for column in ("kind", "#", "consumer", "pending"):
            pending.add_column(column)
        for info, consumer in consumers:
            pending.add_row(
                escape(info.kind), str(info.partition), escape(consumer.name), str(consumer.pending)
            )
        print_unwrapped(pending)


def _ms(value: int | None) -> str:
    return "" if value is None else f"{value / 1000:.1f} s"


@commands.command("init")
def init_(
    system: RequiredSystem,
    url: Url = None,
    data_dir: StoreDir = None,
    as_json: AsJson = False,
) -> None:
    """Create every partition's inbox and relay consumer groups (and their streams) and load
    every Lua script. Idempotent: run it before the first node, or any time."""
    import anyio

    from repertory.runtime import admin
    from repertory.runtime.runner import load_system

    async def main(loaded: "ActorSystem") -> "InitReport":
        async with open_store(loaded, None, None, url, data_dir) as opened:
            return await admin.init(opened)

    with reported():
        report = anyio.run(main, load_system(system))
    if as_json:
        print_json(report)
        return
    created = len(report.groups_created)
    console.print(
        f"consumer groups: {created} created, {report.groups_existing} already there"
        + (f" ({escape(', '.join(report.groups_created))})" if 0 < created <= 8 else "")
    )
    console.print(
        f"scripts: {len(report.scripts_loaded)} loaded, {report.scripts_present} already loaded"
        + (f" ({', '.join(report.scripts_loaded)})" if report.scripts_loaded else "")
    )


@commands.command()
def migrate(
    system: RequiredSystem,
    kind: Annotated[str | None, typer.Option(help="Migrate only this actor kind.")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would be rewritten; write nothing.")
    ] = False,
    url: Url = None,
    data_dir: StoreDir = None,
    as_json: AsJson = False,
) -> None:
    """Rewrite stored events and snapshots of older schema versions to the current ones
    (upcast by today's code, re-encoded with the same metadata).

    Safe while nodes run (each actor's stream is rebuilt beside it and swapped in atomically if
    it did not change meanwhile) and safe to repeat: a second run finds nothing to do. Exit
    code 1 if an actor could not be migrated (it is left as it was).
    """
    import anyio

    from repertory.runtime import admin, archive
    from repertory.runtime.runner import load_system

    async def main(loaded: "ActorSystem") -> "MigrationReport":
        async with open_store(loaded, None, None, url, data_dir) as opened:
            addresses = await admin.migration_plan(opened, kind)
            total = await archive.count_events(opened, addresses)
            with progress_bar() as progress:
                task = progress.add_task("scanning" if dry_run else "migrating", total=total)
                return await admin.migrate(
                    opened,
                    addresses,
                    dry_run=dry_run,
                    progress=lambda n: progress.advance(task, n),
                )

    with reported():
        report = anyio.run(main, load_system(system))
    if as_json:
        print_json(report)
    else:
        if report.problems:
            table = Table(title="not migrated")
            for column in ("actor", "version", "problem"):
                table.add_column(column)
            for problem in report.problems:
                version = "" if problem.version is None else str(problem.version)
                table.add_row(escape(problem.address), version, escape(problem.detail))
            console.print(table)
        types = ", ".join(
            f"{name} v{'/v'.join(map(str, versions))}"
            for name, versions in sorted(report.outdated_types.items())
        )
        scanned = f"{counted(report.events, 'event')} of {counted(report.actors, 'actor')} scanned"
        if report.dry_run:
            console.print(
                f"dry run: {scanned}; {report.outdated_events} outdated events in "
                f"{counted(report.outdated_actors, 'actor')} and "
                f"{counted(report.outdated_snapshots, 'outdated snapshot')} would be rewritten"
                + (f" ({escape(types)})" if types else "")
            )
        else:
            console.print(
                f"{scanned}; rewrote {counted(report.rewritten_events, 'event')} of "
                f"{counted(report.rewritten_actors, 'actor')} and "
                f"{counted(report.rewritten_snapshots, 'snapshot')} to the current versions"
                + (f" (from {escape(types)})" if types else "")
            )
    if not report.ok:
        raise typer.Exit(1)
