"""The replay tools: `repertory replay` (an actor's timeline, its state at a version or a time,
a state diff) and `repertory check` (today's handlers against the recorded events, G7)."""

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from repertory.runtime.cli.options import (
    AppName,
    AsJson,
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
    json_text,
    print_json,
    progress_bar,
    reported,
    short_json,
    utc_time,
)
from repertory.schemas.errors import RepertoryError

if TYPE_CHECKING:
    from repertory.runtime.replay import ActorCheck, Divergence, FieldChange, TimelineEntry
    from repertory.runtime.system import ActorSystem, ActorView
    from repertory.streams.keys import Address

commands = typer.Typer()


def _cause(entry: "TimelineEntry") -> str:
    cause = entry.cause
    if cause is None:
        return ""
    if cause.error is not None and not cause.type:
        return f"[red]unreadable message[/]: {escape(cause.error)}"
    return f"{escape(cause.type)} {escape(short_json(cause.payload, 40))} [dim]{cause.id[:8]}[/]"


def _event_cells(entry: "TimelineEntry") -> tuple[str, str]:
    if entry.rejected is not None:
        return "[red]refused[/]", escape(entry.rejected)
    if entry.event_type is None:
        return "[red]unreadable event[/]", escape(entry.error or "")
    if entry.error is not None:
        return escape(entry.event_type), f"[red]{escape(entry.error)}[/]"
    version = f" v{entry.event_schema_version}" if entry.event_schema_version != 1 else ""
    return escape(entry.event_type + version), escape(short_json(entry.event))


def _timeline_line(entry: "TimelineEntry") -> str:
    event, payload = _event_cells(entry)
    cause = _cause(entry)
    return f"v{entry.version}  {utc_time(entry.at_ms)}  {event} {payload}" + (
        f"  [dim]<-[/] {cause}" if cause else ""
    )


@commands.command()
def replay(
    actor: Annotated[str, typer.Argument(help="The actor, as KIND/ID.")],
    system: SystemSpec = None,
    app_name: AppName = None,
    partitions: Partitions = None,
    url: Url = None,
    data_dir: StoreDir = None,
    at: Annotated[
        str | None,
        typer.Option(
            "--at",
            help="Print the state at this version, or at this time (ISO 8601, UTC unless it "
            "says otherwise, or unix ms): after the last event recorded at or before it.",
        ),
    ] = None,
    diff: Annotated[
        tuple[int, int] | None,
        typer.Option("--diff", help="Show what changed in state from version V1 to V2."),
    ] = None,
    first: Annotated[int, typer.Option("--from", help="First version of the timeline.")] = 1,
    last: Annotated[int | None, typer.Option("--to", help="Last version of the timeline.")] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new entries as they commit.")
    ] = False,
    as_json: AsJson = False,
    as_jsonl: Annotated[
        bool, typer.Option("--jsonl", help="Print one JSON object per line.")
    ] = False,
) -> None:
    """Show an actor's history: its timeline (each event with the message that caused it, and
    the messages it refused), its state at a version, or a field-by-field state diff.

    Reads the store directly, so it works after the nodes are gone (the embedded server of
    DATA_DIR is started for the read if needed, and stopped again).
    """
    import anyio

    from repertory.runtime import replay as replaying
    from repertory.streams.keys import Address

    if sum((at is not None, diff is not None, follow)) > 1:
        raise typer.BadParameter("--at, --diff and --follow are alternatives")

    async def main(loaded: "ActorSystem | None", address: Address) -> None:
        async with open_store(loaded, app_name, partitions, url, data_dir) as opened:
            if at is not None or diff is not None:
                if loaded is None:
                    raise replaying.ReplayError(
                        "--at and --diff fold states with the actor code: give MODULE:SYSTEM"
                    )
                if at is not None:
                    what, value = replaying.parse_moment(at)
                    if what == "version":
                        view = await replaying.state_at(opened, address, value)
                    else:
                        view = await replaying.state_at_time(opened, address, value)
                    _print_state(address, view, as_json or as_jsonl)
                elif diff is not None:
                    views = await replaying.states_at(opened, address, diff)
                    changes = replaying.diff_states(views[diff[0]], views[diff[1]])
                    _print_diff(address, diff, changes, as_json or as_jsonl)
                return
            if follow:
                async for entry in replaying.follow(opened, address, first):
                    _print_entry_line(entry, as_jsonl or as_json)
                return
            entries = replaying.timeline(opened, address, first, last)
            await _print_timeline(address, entries, as_json, as_jsonl)

    with reported(), loaded_system(system, app_name) as loaded:
        address = Address.parse(actor)
        try:
            anyio.run(main, loaded, address)
        except KeyboardInterrupt:
            return


def _print_entry_line(entry: "TimelineEntry", as_jsonl: bool) -> None:
    if as_jsonl:
        print_json(entry)
    else:
        console.print(_timeline_line(entry), highlight=False)


async def _print_timeline(
    address: "Address", entries: "AsyncIterator[TimelineEntry]", as_json: bool, as_jsonl: bool
) -> None:
    if as_json or as_jsonl:
        # Written as it is read: a long history is never held whole.
        separator = "[" if as_json else ""
        async for entry in entries:
            text = json_text(entry)
            typer.echo(f"{separator}{text}" if as_json else text)
            separator = ","
        if as_json:
            typer.echo("[]" if separator == "[" else "]")
        return
    table = Table(title=f"the timeline of {escape(str(address))}")
    for column in ("version", "time (UTC)", "event"):
        table.add_column(column, no_wrap=True)
    table.add_column("payload")
    table.add_column("caused by")
    rows = 0
    async for entry in entries:
        event, payload = _event_cells(entry)
        style = "dim" if entry.rejected is not None else None
        table.add_row(
            str(entry.version), utc_time(entry.at_ms), event, payload, _cause(entry), style=style
        )
        rows += 1
    if rows == 0:
        raise RepertoryError(f"{address} has no events and no handled messages here")
    console.print(table)


def _print_state(address: "Address", view: "ActorView", as_json: bool) -> None:
    from rich.json import JSON

    if as_json:
        print_json({"actor": str(address), "version": view.version, "state": view.state})
        return
    console.print(f"[bold]{escape(str(address))}[/] at version {view.version}:")
    console.print(JSON(json_text(view.state)))


def _print_diff(
    address: "Address", versions: tuple[int, int], changes: "list[FieldChange]", as_json: bool
) -> None:
    if as_json:
        document = {
            "actor": str(address),
            "from": versions[0],
            "to": versions[1],
            "changes": changes,
        }
        print_json(document)
        return
    title = f"{escape(str(address))}: state from version {versions[0]} to {versions[1]}"
    if not changes:
        console.print(f"{title}: no change")
        return
    table = Table(title=title)
    for column in ("field", "change", "before", "after"):
        table.add_column(column)
    for change in changes:
        before = "" if change.change == "added" else escape(short_json(change.before, 50))
        after = "" if change.change == "removed" else escape(short_json(change.after, 50))
        table.add_row(escape(change.path), change.change, before, after)
    console.print(table)


@commands.command()
def check(
    system: RequiredSystem,
    kind: Annotated[str | None, typer.Option(help="Check only this actor kind.")] = None,
    actor: Annotated[
        str | None, typer.Option(help="Check only this actor: ID (with --kind) or KIND/ID.")
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(
            help="Re-run only messages handled at or after this time (ISO 8601 or unix ms); "
            "earlier events are folded, not re-run."
        ),
    ] = None,
    url: Url = None,
    data_dir: StoreDir = None,
    as_json: AsJson = False,
) -> None:
    """Replay every recorded message through today's handler code and compare the events it
    produces with the recorded ones (guarantee G7).

    Reports the first divergence of each actor (event type, field, recorded vs produced) and
    events today's code cannot decode or upcast. Exit code 0: everything reproduces; 1: a
    divergence or an error.
    """
    import anyio

    from repertory.runtime import replay as replaying
    from repertory.runtime.runner import load_system
    from repertory.streams.keys import Address

    async def main(loaded: "ActorSystem") -> "list[ActorCheck]":
        only_kind, actor_id = kind, actor
        if actor is not None and "/" in actor:
            only_kind, actor_id = Address.parse(actor)
        if actor_id is not None and only_kind is None:
            if len(loaded.actors) != 1:
                raise replaying.ReplayError("--actor ID needs --kind (or give KIND/ID)")
            only_kind = next(iter(loaded.actors))
        results: list[ActorCheck] = []
        async with open_store(loaded, None, None, url, data_dir) as opened:
            with progress_bar() as progress:
                task = progress.add_task("checking", total=None)
                since_ms = None if since is None else replaying.parse_time(since)
                checks = replaying.check(
                    opened, kind=only_kind, actor_id=actor_id, since_ms=since_ms
                )
                async for result in checks:
                    # Only divergent actors are kept: the report stays small for any store.
                    if result.divergence is not None:
                        results.append(result)
                    progress.update(task, advance=1, description=f"checking {result.address}")
                    totals["actors"] += 1
                    totals["messages"] += result.messages
        return results

    totals = {"actors": 0, "messages": 0}
    with reported():
        diverged = anyio.run(main, load_system(system))
    actors, messages = totals["actors"], totals["messages"]
    if as_json:
        document = {
            "ok": not diverged,
            "actors": actors,
            "messages": messages,
            "divergences": [result.divergence for result in diverged],
        }
        print_json(document)
    else:
        for result in diverged:
            assert result.divergence is not None
            _print_divergence(result.divergence)
        if diverged:
            console.print(
                f"[bold red]{len(diverged)} of {counted(actors, 'actor')} diverged[/] "
                f"({counted(messages, 'message')} reproduced before the first divergences)"
            )
        else:
            console.print(
                f"[green]ok[/]: {counted(messages, 'message')} of {counted(actors, 'actor')} "
                "reproduce their events"
            )
    if diverged:
        raise typer.Exit(1)


def _print_divergence(divergence: "Divergence") -> None:
    where = f"[bold]{escape(divergence.address)}[/] diverges at version {divergence.version}"
    if divergence.message_type is not None:
        where += f", message {escape(divergence.message_type)} [dim]{divergence.message_id}[/]"
    console.print(f"{where}: [red]{divergence.kind}[/]: {escape(divergence.detail)}")
    if divergence.fields:
        table = Table(title=f"event {divergence.event_version} ({divergence.recorded_type})")
        for column in ("field", "recorded", "produced today"):
            table.add_column(column)
        for change in divergence.fields:
            recorded = "" if change.change == "added" else escape(short_json(change.before, 50))
            produced = "" if change.change == "removed" else escape(short_json(change.after, 50))
            table.add_row(escape(change.path), recorded, produced)
        console.print(table)
