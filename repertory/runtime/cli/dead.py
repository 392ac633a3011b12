"""`repertory dead list|show|requeue|drop`: the dead letters of a namespace, the messages given
up on, per partition."""

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from repertory.runtime.cli.options import (
    AppName,
    AsJson,
    OnlyKind,
    OnlyPartition,
    Partitions,
    StoreDir,
    SystemSpec,
    Url,
    loaded_system,
    open_store,
)
from repertory.runtime.cli.output import (
    console,
    counted,
    json_text,
    print_error,
    print_json,
    print_unwrapped,
    reported,
    short_json,
    utc_time,
)

if TYPE_CHECKING:
    from repertory.runtime.admin import DeadLetterRef, DeadLetterView
    from repertory.runtime.system import ActorSystem

commands = typer.Typer(
    no_args_is_help=True,
    help="Dead letters: messages given up on, per partition. list, show, requeue, drop.",
)

# The options of requeue and drop.
DeadIds = Annotated[
    list[str] | None,
    typer.Option(
        "--id",
        help="A dead letter as KIND/PARTITION/ENTRY-ID (or an entry id with --kind and "
        "--partition); repeatable.",
    ),
]
DeadAll = Annotated[bool, typer.Option("--all", help="Every dead letter selected by the filters.")]
DeadYes = Annotated[bool, typer.Option("--yes", help="Confirm --all.")]
DeadReason = Annotated[str | None, typer.Option(help="With --all: only this reason.")]


def _refs(ids: list[str] | None, kind: str | None, partition: int | None) -> "list[DeadLetterRef]":
    from repertory.runtime.admin import DeadLetterRef

    return [DeadLetterRef.parse(text, kind=kind, partition=partition) for text in ids or []]


def _dead_row(table: Table, view: "DeadLetterView") -> None:
    message = view.message
    if message.error is not None and not message.type:
        what = f"[red]unreadable[/] ({view.size} bytes)"
    else:
        what = f"{escape(message.type)} {escape(short_json(message.payload, 30))}"
    table.add_row(
        escape(view.ref),
        utc_time(view.dead_at),
        escape(view.reason),
        str(view.attempts),
        what,
        escape(view.detail if len(view.detail) <= 40 else view.detail[:39] + "…"),
    )


def _dead_table(title: str) -> Table:
    table = Table(title=title)
    for column in ("dead letter", "dead since (UTC)", "reason", "attempts", "message"):
        table.add_column(column, no_wrap=True)
    table.add_column("detail (see `dead show`)")
    return table


@commands.command("list")
def dead_list(
    system: SystemSpec = None,
    app_name: AppName = None,
    partitions: Partitions = None,
    kind: OnlyKind = None,
    partition: OnlyPartition = None,
    reason: Annotated[str | None, typer.Option(help="Only dead letters with this reason.")] = None,
    url: Url = None,
    data_dir: StoreDir = None,
    as_json: AsJson = False,
) -> None:
    """List the dead letters, partition by partition, oldest first."""
    import anyio

    from repertory.runtime import admin

    if partition is not None and kind is None:
        raise typer.BadParameter("--partition needs --kind")

    async def main(loaded: "ActorSystem | None") -> int:
        count = 0
        table = _dead_table("dead letters")
        separator = "["
        async with open_store(loaded, app_name, partitions, url, data_dir) as opened:
            letters = admin.dead_letters(opened, kind=kind, partition=partition, reason=reason)
            async for view in letters:
                count += 1
                if as_json:  # written as read: any number of dead letters
                    typer.echo(separator + json_text(view))
                    separator = ","
                else:
                    _dead_row(table, view)
        if as_json:
            typer.echo("[]" if separator == "[" else "]")
        elif count:
            print_unwrapped(table)
            console.print(f"{counted(count, 'dead letter')}")
        else:
            console.print("no dead letters")
        return count

    with reported(), loaded_system(system, app_name) as loaded:
        anyio.run(main, loaded)


@commands.command("show")
def dead_show(
    dead_letter: Annotated[
        str, typer.Argument(help="The dead letter, as KIND/PARTITION/ENTRY-ID (see `dead list`).")
    ],
    system: SystemSpec = None,
    app_name: AppName = None,
    partitions: Partitions = None,
    kind: OnlyKind = None,
    partition: OnlyPartition = None,
    url: Url = None,
    data_dir: StoreDir = None,
    as_json: AsJson = False,
) -> None:
    """Show one dead letter: why it died, where it came from, and its message."""
    import anyio
    from rich.json import JSON

    from repertory.runtime import admin

    async def main(loaded: "ActorSystem | None") -> "DeadLetterView":
        [ref] = _refs([dead_letter], kind, partition)
        async with open_store(loaded, app_name, partitions, url, data_dir) as opened:
            return await admin.dead_letter(opened, ref)

    with reported(), loaded_system(system, app_name) as loaded:
        view = anyio.run(main, loaded)
    if as_json:
        print_json(view)
        return
    table = Table(title=f"dead letter {escape(view.ref)}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    message = view.message
    rows = {
        "reason": view.reason,
        "detail": view.detail,
        "attempts": str(view.attempts),
        "dead since": f"{utc_time(view.dead_at)} UTC",
        "from": f"{view.source_stream} entry {view.source_id}",
        "target": view.target or "",
        "message id": message.id,
        "message type": f"{message.type} v{message.schema_version}" if message.type else "",
        "sender": message.sender or "",
        "size": f"{view.size} bytes",
    }
    if message.error is not None:
        rows["unreadable"] = message.error
    for name, value in rows.items():
        if value:
            table.add_row(name, escape(value))
    console.print(table)
    if message.payload is not None:
        console.print("[bold]payload[/]:")
        console.print(JSON(json_text(message.payload)))


def _act_on_dead_letters(
    verb: str,
    system: str | None,
    app_name: str | None,
    partitions: int | None,
    ids: list[str] | None,
    every: bool,
    yes: bool,
    kind: str | None,
    partition: int | None,
    reason: str | None,
    url: str | None,
    data_dir: Path | None,
) -> None:
    """requeue or drop: the dead letters named by --id, or --all of those selected."""
    import anyio

    from repertory.runtime import admin

    if bool(ids) == every:
        raise typer.BadParameter("name dead letters with --id, or give --all (with --yes)")
    if partition is not None and kind is None:
        raise typer.BadParameter("--partition needs --kind")
    done: list[str] = []
    failed: list[tuple[str, str]] = []

    async def main(loaded: "ActorSystem | None") -> None:
        async with open_store(loaded, app_name, partitions, url, data_dir) as opened:
            if every:
                # Only the references are held, never the messages.
                selected = admin.dead_letters(opened, kind=kind, partition=partition, reason=reason)
                refs = [admin.DeadLetterRef.parse(view.ref) async for view in selected]
                if not yes:
                    raise admin.AdminError(
                        f"--all would {verb} {counted(len(refs), 'dead letter')}: add --yes to "
                        "do it (`dead list` shows them)"
                    )
            else:
                refs = _refs(ids, kind, partition)
            for ref in refs:
                try:
                    if verb == "requeue":
                        entry_id = await admin.requeue(opened, ref)
                        done.append(f"{ref} -> inbox entry {entry_id}")
                    else:
                        await admin.drop(opened, ref)
                        done.append(str(ref))
                except admin.AdminError as error:
                    failed.append((str(ref), str(error)))

    with reported(), loaded_system(system, app_name) as loaded:
        anyio.run(main, loaded)
    past = "requeued" if verb == "requeue" else "dropped"
    for line in done:
        console.print(f"{past} {escape(line)}")
    for _ref, problem in failed:
        print_error(problem)
    if not done and not failed:
        console.print(f"no dead letters to {verb}")
    elif len(done) + len(failed) > 1:
        console.print(f"{past} {len(done)} of {counted(len(done) + len(failed), 'dead letter')}")
    if failed:
        raise typer.Exit(1)


@commands.command("requeue")
def dead_requeue(
    system: SystemSpec = None,
    app_name: AppName = None,
    partitions: Partitions = None,
    ids: DeadIds = None,
    every: DeadAll = False,
    yes: DeadYes = False,
    kind: OnlyKind = None,
    partition: OnlyPartition = None,
    reason: DeadReason = None,
    url: Url = None,
    data_dir: StoreDir = None,
) -> None:
    """Put dead letters' messages back on their inboxes (same message id, so handled once) and
    remove the dead letters, each in one atomic step. Exit code 1 if any could not be."""
    _act_on_dead_letters(
        "requeue",
        system,
        app_name,
        partitions,
        ids,
        every,
        yes,
        kind,
        partition,
        reason,
        url,
        data_dir,
    )


@commands.command("drop")
def dead_drop(
    system: SystemSpec = None,
    app_name: AppName = None,
    partitions: Partitions = None,
    ids: DeadIds = None,
    every: DeadAll = False,
    yes: DeadYes = False,
    kind: OnlyKind = None,
    partition: OnlyPartition = None,
    reason: DeadReason = None,
    url: Url = None,
    data_dir: StoreDir = None,
) -> None:
    """Delete dead letters for good."""
    _act_on_dead_letters(
        "drop",
        system,
        app_name,
        partitions,
        ids,
        every,
        yes,
        kind,
        partition,
        reason,
        url,
        data_dir,
    )
