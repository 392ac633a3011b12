"""The `repertory` command line: version, the embedded server's start/stop/status, running a
node, the demo, the replay and debugging tools (replay, check, verify, export, import) and the
operating tools (inspect, dead, init, migrate).

A RepertoryError ends the command with its message on stderr and exit code 1, no traceback.
"""

import dataclasses
import enum
import json
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from repertory import __version__
from repertory.schemas.errors import RepertoryError
from repertory.streams.embedded import EmbeddedServer, EmbeddedServerError, ServerStatus

if TYPE_CHECKING:  # the replay tools are imported by their commands only
    from rich.progress import Progress

    from repertory.actors.agents import Strategy
    from repertory.runtime.admin import (
        DeadLetterRef,
        DeadLetterView,
        InitReport,
        InspectReport,
        MigrationReport,
    )
    from repertory.runtime.archive import ImportReport, VerifyReport
    from repertory.runtime.replay import ActorCheck, Divergence, FieldChange, TimelineEntry
    from repertory.runtime.system import ActorSystem, ActorView
    from repertory.streams.keys import Address

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="repertory: an event-sourced actor runtime on Redis Streams.",
)
server_app = typer.Typer(
    no_args_is_help=True,
    help="The embedded valkey-server of a data folder (used when no Redis URL is given).",
)
app.add_typer(server_app, name="server")

# Soft wrap: paths and URLs stay on one line, whatever the terminal width.
console = Console(soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True)


class FsyncPolicy(enum.StrEnum):
    ALWAYS = "always"
    EVERYSEC = "everysec"
    NO = "no"


DataDir = Annotated[
    Path,
    typer.Option("--data-dir", help="Folder holding the server's data, log and socket."),
]


@contextmanager
def _reported() -> Iterator[None]:
    """Turn a RepertoryError into a one-line message and exit code 1."""
    try:
        yield
    except RepertoryError as error:
        errors.print(f"[bold red]error:[/] {escape(str(error))}")
        raise typer.Exit(1) from None


def _show_version(value: bool) -> None:
    if value:
        console.print(__version__)
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """repertory: an event-sourced actor runtime on Redis Streams."""


@server_app.command("start")
def server_start(
    data_dir: DataDir = Path(".repertory"),
    port: Annotated[
        int | None,
        typer.Option(help="Also listen on 127.0.0.1:PORT (default: the unix socket only)."),
    ] = None,
    fsync: Annotated[
        FsyncPolicy, typer.Option(help="AOF fsync policy: always, everysec or no.")
    ] = FsyncPolicy.EVERYSEC,
) -> None:
    """Start the embedded server in DATA_DIR, or report the one already running there."""
    with _reported():
        server = EmbeddedServer(data_dir, port=port, appendfsync=fsync.value)
        started = server.start()
        status = server.status()
        if status is None:
            raise EmbeddedServerError(f"the server in {server.data_dir} stopped right away")
    verb = "started" if started else "already running:"
    console.print(
        f"{verb} valkey-server pid {status.pid} at {status.url}"
        + (f" and redis://127.0.0.1:{status.port}" if status.port else "")
        + f" (data in {status.data_dir}, appendfsync {status.appendfsync})"
    )


@server_app.command("stop")
def server_stop(data_dir: DataDir = Path(".repertory")) -> None:
    """Stop the embedded server of DATA_DIR gracefully (the AOF is flushed first)."""
    with _reported():
        server = EmbeddedServer(data_dir)
        stopped = server.stop()
    if stopped:
        console.print(f"stopped the valkey-server of {server.data_dir}")
    else:
        console.print(f"no valkey-server was running in {server.data_dir}")


@server_app.command("status")
def server_status(
    data_dir: DataDir = Path(".repertory"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Show the embedded server of DATA_DIR; exit code 1 when none is running."""
    with _reported():
        server = EmbeddedServer(data_dir)
        status = server.status()
    if as_json:
        fields = {} if status is None else dataclasses.asdict(status)
        document = {"running": status is not None, "data_dir": str(server.data_dir)} | fields
        typer.echo(json.dumps(document, indent=2))
    elif status is None:
        console.print(f"no valkey-server is running in {server.data_dir}")
    else:
        # Wide enough for whole paths: a wrapped path cannot be copied.
        _print_unwrapped(_status_table(status))
    if status is None:
        raise typer.Exit(1)


def _print_unwrapped(table: Table) -> None:
    """Print a table as wide as its widest row needs, however narrow the terminal: node ids,
    paths and entry ids must stay whole to be copied."""
    needed = Measurement.get(console, console.options.update_width(4096), table).maximum
    Console(file=console.file, width=max(console.width, needed)).print(table)


def _status_table(status: ServerStatus) -> Table:
    table = Table(title="embedded valkey-server", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    rows = {
        "pid": str(status.pid),
        "url": status.url,
        "tcp": f"redis://127.0.0.1:{status.port}" if status.port else "off",
        "socket": status.socket_path,
        "data dir": status.data_dir,
        "appendfsync": status.appendfsync,
        "aof": "on" if status.aof_enabled else "off",
        "uptime": f"{status.uptime_seconds} s",
        "memory": f"{status.used_memory_bytes / 2**20:.1f} MiB",
    }
    for name, value in rows.items():
        table.add_row(name, value)
    return table


@app.command()
def demo(
    url: Annotated[
        str | None,
        typer.Option(help="Redis URL to use (default: the embedded server of DATA_DIR)."),
    ] = None,
    data_dir: DataDir = Path(".repertory"),
) -> None:
    """Run the demo: a coordinator splits a project into 20 tasks, 4 worker processes do them,
    one is killed mid-task and the health monitor recovers it; exit 1 unless every task
    completed exactly once."""
    from repertory.runtime.agents_demo import run_demo  # heavy imports only for this command

    with _reported():
        run_demo(url=url, data_dir=data_dir)


@app.command()
def run(
    system: Annotated[str, typer.Argument(help="The ActorSystem to serve, as MODULE:ATTRIBUTE.")],
    url: Annotated[
        str | None, typer.Option(help="Redis URL to use instead of the system's own.")
    ] = None,
    node_id: Annotated[
        str | None, typer.Option(help="This node's name (default: host, pid and a suffix).")
    ] = None,
    shutdown_timeout: Annotated[
        float, typer.Option(help="Seconds a graceful stop may take to finish in-flight work.")
    ] = 10.0,
) -> None:
    """Run one node of SYSTEM in the foreground until SIGTERM or SIGINT.

    On a signal it stops reading, finishes and commits the messages in hand, releases its
    partitions and exits 0.
    """
    import anyio

    from repertory.runtime.node import NodeConfig, default_node_id
    from repertory.runtime.runner import load_system, serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with _reported():
        actor_system = load_system(system)
        if url is not None:
            actor_system.url = url
        config = NodeConfig(
            node_id=node_id or default_node_id(), shutdown_timeout_s=shutdown_timeout
        )
        anyio.run(serve, actor_system, config)


class WorkerStrategy(enum.StrEnum):
    RESTART = "restart"
    REPLACE = "replace"
    ALERT = "alert"


@app.command()
def spawn(
    system: Annotated[
        str | None,
        typer.Argument(
            help="The ActorSystem whose nodes to run, as MODULE:ATTRIBUTE (or give --workers).",
            show_default=False,
        ),
    ] = None,
    processes: Annotated[int, typer.Option("-n", "--processes", help="Child processes.")] = 2,
    workers: Annotated[
        str | None,
        typer.Option(
            help="Run worker agents instead of nodes: their task handler, as MODULE:FUNCTION.",
            show_default=False,
        ),
    ] = None,
    queue: Annotated[
        str | None,
        typer.Option(help="The task queue the workers serve (default: the project's name)."),
    ] = None,
    project: Annotated[
        str | None,
        typer.Option(help="Workers exit once the queue is empty and this project is complete."),
    ] = None,
    app_name: Annotated[
        str, typer.Option("--app", help="The workers' application namespace.")
    ] = "agents",
    strategy: Annotated[
        WorkerStrategy,
        typer.Option(
            help="What the health monitor does with a worker that fails: restart (this "
            "supervisor restarts it), replace (a new worker in its place), alert (nothing)."
        ),
    ] = WorkerStrategy.RESTART,
    visibility: Annotated[
        float, typer.Option(help="Seconds a worker's claim on a task lasts unrenewed.")
    ] = 5.0,
    heartbeat: Annotated[
        float, typer.Option(help="Seconds between a worker's heartbeats to the monitor.")
    ] = 2.0,
    log_dir: Annotated[
        Path | None,
        typer.Option(help="Write each child's output to LOG_DIR/ID.log instead of here."),
    ] = None,
    url: Annotated[
        str | None,
        typer.Option(help="Redis URL (default: the embedded server of DATA_DIR, shared)."),
    ] = None,
    data_dir: DataDir = Path(".repertory"),
    max_restarts: Annotated[
        int, typer.Option(help="Restarts allowed within --period before the group stops.")
    ] = 5,
    period: Annotated[float, typer.Option(help="The restart-intensity window, seconds.")] = 60.0,
    shutdown_timeout: Annotated[
        float, typer.Option(help="Seconds each child may take to stop gracefully.")
    ] = 10.0,
) -> None:
    """Run N node processes of SYSTEM, or N worker agents (--workers), under a supervisor.

    A crashed child is restarted with exponential backoff; too many restarts within the period
    stop the group (exit 1). SIGTERM or SIGINT is forwarded for a graceful stop of every child.
    Nodes: the partition owners are printed whenever they change, and if SYSTEM hosts a
    health monitor, the nodes are registered with it. Workers: a worker that is done (its
    project complete) exits 0 and is not restarted; the group stops when all are done; the
    health monitor's recovery decisions about them are carried out here.
    """
    import anyio

    from repertory.runtime.supervisor import Supervisor, SupervisorConfig

    if (system is None) == (workers is None):
        errors.print("[bold red]error:[/] give either SYSTEM (nodes) or --workers HANDLER")
        raise typer.Exit(2)
    queue = queue or project
    if workers is not None and queue is None:
        errors.print("[bold red]error:[/] --workers needs --queue (or --project)")
        raise typer.Exit(2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    strategies: dict[WorkerStrategy, Strategy] = {
        WorkerStrategy.RESTART: "restart",
        WorkerStrategy.REPLACE: "replace",
        WorkerStrategy.ALERT: "alert",
    }
    worker_strategy = strategies[strategy]
    config = SupervisorConfig(
        processes=processes,
        max_restarts=max_restarts,
        period_s=period,
        shutdown_timeout_s=shutdown_timeout,
        restart="permanent"
        if workers is None
        else ("transient" if worker_strategy == "restart" else "temporary"),
        fresh_ids=workers is not None,
        log_dir=log_dir,
    )

    def show(owners: dict[tuple[str, int], str | None]) -> None:
        table = Table(title="partition owners")
        for column in ("kind", "partition", "node"):
            table.add_column(column)
        for (kind, number), owner in sorted(owners.items()):
            table.add_row(kind, str(number), owner or "-")
        console.print(table)

    async def supervise_nodes(server_url: str, spec: str) -> None:
        from repertory.actors.agents import HealthMonitor
        from repertory.runtime.agents_followers import NodeWatcher
        from repertory.runtime.runner import load_system
        from repertory.runtime.supervisor import node_command, watch_owners

        actor_system = load_system(spec)
        actor_system.url = server_url
        supervisor = Supervisor(node_command(spec, server_url, shutdown_timeout), config)
        async with actor_system, anyio.create_task_group() as group:
            group.start_soon(watch_owners, actor_system, show)
            if any(isinstance(actor, HealthMonitor) for actor in actor_system.actors.values()):
                group.start_soon(NodeWatcher(actor_system).run)
            await supervisor.run()
            group.cancel_scope.cancel()

    async def supervise_workers(server_url: str, handler: str, queue_name: str) -> None:
        from repertory.runtime.agents_followers import run_worker_group
        from repertory.runtime.agents_worker import agents_system, worker_command
        from repertory.streams.taskqueue import TaskQueue

        command = worker_command(
            handler,
            url=server_url,
            queue=queue_name,
            project_id=project,
            app=app_name,
            visibility_s=visibility,
            heartbeat_s=heartbeat,
            strategy=worker_strategy,
            stop_grace_s=shutdown_timeout,
        )
        supervisor = Supervisor(command, config)
        async with agents_system(server_url, app=app_name) as agents:
            task_queue = TaskQueue(agents.client, queue_name, keys=agents.keys)
            await task_queue.ensure()
            await run_worker_group(
                agents, supervisor, task_queue, visibility_ms=round(visibility * 1000)
            )
        codes = ", ".join(f"{agent}: {code}" for agent, code in supervisor.exit_codes().items())
        console.print(f"workers stopped; exit codes: {codes}")

    def supervise(server_url: str) -> None:
        if system is not None:
            anyio.run(supervise_nodes, server_url, system)
        elif workers is not None and queue is not None:
            anyio.run(supervise_workers, server_url, workers, queue)

    with _reported():
        if url is not None:
            supervise(url)
            return
        with EmbeddedServer(data_dir) as server:
            supervise(server.url)


def main() -> None:
    app()


# Replay and debugging (issue 5). The system (MODULE:SYSTEM) brings the actor code that folds
# states and re-runs handlers; `--app` alone is enough to read what is stored.

SystemSpec = Annotated[
    str | None,
    typer.Argument(
        help="The ActorSystem, as MODULE:SYSTEM (or give --app instead).", show_default=False
    ),
]
AppName = Annotated[
    str | None,
    typer.Option("--app", help="The application namespace, when the system's code is not at hand."),
]
Partitions = Annotated[
    int | None,
    typer.Option(help="Partitions per kind (default: the system's, or read from the keys)."),
]
Url = Annotated[
    str | None,
    typer.Option(help="Redis URL (default: the system's, else the embedded server of DATA_DIR)."),
]
StoreDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir", help="The embedded server's folder (default: the system's, or .repertory)."
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]


@contextmanager
def _namespace_spec(system: str | None, app_name: str | None) -> Iterator["ActorSystem | None"]:
    """Load the system named on the command line, checking that exactly one of it and --app is
    given."""
    from repertory.runtime.runner import load_system

    if (system is None) == (app_name is None):
        raise typer.BadParameter("give the system as MODULE:SYSTEM or its namespace with --app")
    yield None if system is None else load_system(system)


def _open(
    system: "ActorSystem | None",
    app_name: str | None,
    partitions: int | None,
    url: str | None,
    data_dir: Path | None,
) -> "AbstractAsyncContextManager[ActorSystem]":
    from repertory.runtime.replay import open_namespace

    return open_namespace(system, app=app_name, partitions=partitions, url=url, data_dir=data_dir)


def _summary(value: object, width: int = 60) -> str:
    """A value as one line of compact JSON, cut to `width` characters."""
    import msgspec

    text = msgspec.json.encode(value).decode()
    return text if len(text) <= width else text[: width - 1] + "…"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _time(ms: int) -> str:
    import datetime

    moment = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _cause(entry: "TimelineEntry") -> str:
    cause = entry.cause
    if cause is None:
        return ""
    if cause.error is not None and not cause.type:
        return f"[red]unreadable message[/]: {escape(cause.error)}"
    return f"{escape(cause.type)} {escape(_summary(cause.payload, 40))} [dim]{cause.id[:8]}[/]"


def _event_cells(entry: "TimelineEntry") -> tuple[str, str]:
    if entry.rejected is not None:
        return "[red]refused[/]", escape(entry.rejected)
    if entry.event_type is None:
        return "[red]unreadable event[/]", escape(entry.error or "")
    if entry.error is not None:
        return escape(entry.event_type), f"[red]{escape(entry.error)}[/]"
    version = f" v{entry.event_schema_version}" if entry.event_schema_version != 1 else ""
    return escape(entry.event_type + version), escape(_summary(entry.event))


def _timeline_line(entry: "TimelineEntry") -> str:
    event, payload = _event_cells(entry)
    cause = _cause(entry)
    return f"v{entry.version}  {_time(entry.at_ms)}  {event} {payload}" + (
        f"  [dim]<-[/] {cause}" if cause else ""
    )


@app.command()
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
        async with _open(loaded, app_name, partitions, url, data_dir) as opened:
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

    with _reported(), _namespace_spec(system, app_name) as loaded:
        address = Address.parse(actor)
        try:
            anyio.run(main, loaded, address)
        except KeyboardInterrupt:
            return


def _print_entry_line(entry: "TimelineEntry", as_jsonl: bool) -> None:
    import msgspec

    if as_jsonl:
        typer.echo(msgspec.json.encode(entry).decode())
    else:
        console.print(_timeline_line(entry), highlight=False)


async def _print_timeline(
    address: "Address", entries: "AsyncIterator[TimelineEntry]", as_json: bool, as_jsonl: bool
) -> None:
    import msgspec

    if as_json or as_jsonl:
        # Written as it is read: a long history is never held whole.
        separator = "[" if as_json else ""
        async for entry in entries:
            text = msgspec.json.encode(entry).decode()
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
            str(entry.version), _time(entry.at_ms), event, payload, _cause(entry), style=style
        )
        rows += 1
    if rows == 0:
        raise RepertoryError(f"{address} has no events and no handled messages here")
    console.print(table)


def _print_state(address: "Address", view: "ActorView", as_json: bool) -> None:
    import msgspec
    from rich.json import JSON

    document = {"actor": str(address), "version": view.version, "state": view.state}
    text = msgspec.json.encode(document).decode()
    if as_json:
        typer.echo(text)
        return
    console.print(f"[bold]{escape(str(address))}[/] at version {view.version}:")
    console.print(JSON(msgspec.json.encode(view.state).decode()))


def _print_diff(
    address: "Address", versions: tuple[int, int], changes: "list[FieldChange]", as_json: bool
) -> None:
    import msgspec

    if as_json:
        document = {
            "actor": str(address),
            "from": versions[0],
            "to": versions[1],
            "changes": changes,
        }
        typer.echo(msgspec.json.encode(document).decode())
        return
    title = f"{escape(str(address))}: state from version {versions[0]} to {versions[1]}"
    if not changes:
        console.print(f"{title}: no change")
        return
    table = Table(title=title)
    for column in ("field", "change", "before", "after"):
        table.add_column(column)
    for change in changes:
        before = "" if change.change == "added" else escape(_summary(change.before, 50))
        after = "" if change.change == "removed" else escape(_summary(change.after, 50))
        table.add_row(escape(change.path), change.change, before, after)
    console.print(table)


def _progress() -> "Progress":
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=errors,
        transient=True,
        disable=not errors.is_terminal,  # no bar in logs and pipes
    )


@app.command()
def check(
    system: Annotated[str, typer.Argument(help="The ActorSystem, as MODULE:SYSTEM.")],
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
    import msgspec

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
        async with _open(loaded, None, None, url, data_dir) as opened:
            with _progress() as progress:
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
    with _reported():
        diverged = anyio.run(main, load_system(system))
    actors, messages = totals["actors"], totals["messages"]
    if as_json:
        document = {
            "ok": not diverged,
            "actors": actors,
            "messages": messages,
            "divergences": [result.divergence for result in diverged],
        }
        typer.echo(msgspec.json.encode(document).decode())
    else:
        for result in diverged:
            assert result.divergence is not None
            _print_divergence(result.divergence)
        if diverged:
            console.print(
                f"[bold red]{len(diverged)} of {_count(actors, 'actor')} diverged[/] "
                f"({_count(messages, 'message')} reproduced before the first divergences)"
            )
        else:
            console.print(
                f"[green]ok[/]: {_count(messages, 'message')} of {_count(actors, 'actor')} "
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
            recorded = "" if change.change == "added" else escape(_summary(change.before, 50))
            produced = "" if change.change == "removed" else escape(_summary(change.after, 50))
            table.add_row(escape(change.path), recorded, produced)
        console.print(table)


@app.command()
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
    import msgspec

    from repertory.runtime import archive

    async def main(loaded: "ActorSystem | None") -> "VerifyReport":
        async with _open(loaded, app_name, partitions, url, data_dir) as opened:
            addresses = await archive.plan(opened, kind)
            total = await archive.count_events(opened, addresses)
            with _progress() as progress:
                task = progress.add_task("verifying", total=total)
                return await archive.verify(
                    opened, addresses, progress=lambda n: progress.advance(task, n)
                )

    with _reported(), _namespace_spec(system, app_name) as loaded:
        report = anyio.run(main, loaded)
    if as_json:
        typer.echo(msgspec.json.encode(report).decode())
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
            f"{_count(report.events, 'event')} of {_count(report.actors, 'actor')}, "
            f"{_count(report.snapshots, 'snapshot')}"
        )
        if report.unchecked_kinds:
            summary += f" (structure only for {', '.join(report.unchecked_kinds)}: no actor code)"
        if report.ok:
            console.print(f"[green]ok[/]: {summary}")
        else:
            console.print(f"[bold red]{report.problem_count} problems[/] in {summary}")
    if not report.ok:
        raise typer.Exit(1)


@app.command()
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
        async with _open(loaded, app_name, partitions, url, data_dir) as opened:
            addresses = await archive.plan(opened, kind)
            total = await archive.count_events(opened, addresses)
            with _progress() as progress:
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

    with _reported(), _namespace_spec(system, app_name) as loaded:
        anyio.run(main, loaded)


@app.command("import")
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
        async with _open(loaded, app_name, partitions, url, data_dir) as opened:
            with _progress() as progress:
                task = progress.add_task("importing events", total=None)
                if str(source) == "-":
                    return await archive.import_lines(
                        opened, sys.stdin.buffer, progress=lambda n: progress.advance(task, n)
                    )
                with source.open("rb") as file:
                    return await archive.import_lines(
                        opened, file, progress=lambda n: progress.advance(task, n)
                    )

    with _reported(), _namespace_spec(system, app_name) as loaded:
        if str(source) != "-" and not source.is_file():
            raise RepertoryError(f"no export file at {source}")
        report = anyio.run(main, loaded)
    console.print(
        f"imported {_count(report.events, 'event')}, {_count(report.snapshots, 'snapshot')} and "
        f"{_count(report.handled, 'handled message')} of {_count(report.actors, 'actor')}"
    )


# Operating a namespace (issue 5): inspect, dead letters, init, migrate.

dead_app = typer.Typer(
    no_args_is_help=True,
    help="Dead letters: messages given up on, per partition. list, show, requeue, drop.",
)
app.add_typer(dead_app, name="dead")

OnlyKind = Annotated[str | None, typer.Option("--kind", help="Only this actor kind.")]
OnlyPartition = Annotated[
    int | None, typer.Option("--partition", help="Only this partition (with --kind).")
]


def _ms(value: int | None) -> str:
    return "" if value is None else f"{value / 1000:.1f} s"


@app.command("inspect")
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
    import msgspec

    from repertory.runtime import admin

    async def main(loaded: "ActorSystem | None") -> "InspectReport":
        async with _open(loaded, app_name, partitions, url, data_dir) as opened:
            return await admin.inspect(opened, kind=kind)

    with _reported(), _namespace_spec(system, app_name) as loaded:
        report = anyio.run(main, loaded)
    if as_json:
        typer.echo(msgspec.json.encode(report).decode())
        return
    console.print(
        f"namespace [bold]{escape(report.app)}[/] at {_time(report.server_time_ms)} UTC "
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
    _print_unwrapped(nodes)
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
    _print_unwrapped(kinds)
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
    _print_unwrapped(table)
    consumers = [(info, c) for info in report.partitions for c in info.consumers if c.pending]
    if consumers:
        pending = Table(title="pending per consumer")
        for column in ("kind", "#", "consumer", "pending"):
            pending.add_column(column)
        for info, consumer in consumers:
            pending.add_row(
                escape(info.kind), str(info.partition), escape(consumer.name), str(consumer.pending)
            )
        _print_unwrapped(pending)


def _refs(ids: list[str] | None, kind: str | None, partition: int | None) -> "list[DeadLetterRef]":
    from repertory.runtime.admin import DeadLetterRef

    return [DeadLetterRef.parse(text, kind=kind, partition=partition) for text in ids or []]


def _dead_row(table: Table, view: "DeadLetterView") -> None:
    message = view.message
    if message.error is not None and not message.type:
        what = f"[red]unreadable[/] ({view.size} bytes)"
    else:
        what = f"{escape(message.type)} {escape(_summary(message.payload, 30))}"
    table.add_row(
        escape(view.ref),
        _time(view.dead_at),
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


@dead_app.command("list")
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
    import msgspec

    from repertory.runtime import admin

    if partition is not None and kind is None:
        raise typer.BadParameter("--partition needs --kind")

    async def main(loaded: "ActorSystem | None") -> int:
        count = 0
        table = _dead_table("dead letters")
        separator = "["
        async with _open(loaded, app_name, partitions, url, data_dir) as opened:
            letters = admin.dead_letters(opened, kind=kind, partition=partition, reason=reason)
            async for view in letters:
                count += 1
                if as_json:  # written as read: any number of dead letters
                    typer.echo(separator + msgspec.json.encode(view).decode())
                    separator = ","
                else:
                    _dead_row(table, view)
        if as_json:
            typer.echo("[]" if separator == "[" else "]")
        elif count:
            _print_unwrapped(table)
            console.print(f"{_count(count, 'dead letter')}")
        else:
            console.print("no dead letters")
        return count

    with _reported(), _namespace_spec(system, app_name) as loaded:
        anyio.run(main, loaded)


@dead_app.command("show")
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
    import msgspec
    from rich.json import JSON

    from repertory.runtime import admin

    async def main(loaded: "ActorSystem | None") -> "DeadLetterView":
        [ref] = _refs([dead_letter], kind, partition)
        async with _open(loaded, app_name, partitions, url, data_dir) as opened:
            return await admin.dead_letter(opened, ref)

    with _reported(), _namespace_spec(system, app_name) as loaded:
        view = anyio.run(main, loaded)
    if as_json:
        typer.echo(msgspec.json.encode(view).decode())
        return
    table = Table(title=f"dead letter {escape(view.ref)}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    message = view.message
    rows = {
        "reason": view.reason,
        "detail": view.detail,
        "attempts": str(view.attempts),
        "dead since": f"{_time(view.dead_at)} UTC",
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
        console.print(JSON(msgspec.json.encode(message.payload).decode()))


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
        async with _open(loaded, app_name, partitions, url, data_dir) as opened:
            if every:
                # Only the references are held, never the messages.
                selected = admin.dead_letters(opened, kind=kind, partition=partition, reason=reason)
                refs = [admin.DeadLetterRef.parse(view.ref) async for view in selected]
                if not yes:
                    raise admin.AdminError(
                        f"--all would {verb} {_count(len(refs), 'dead letter')}: add --yes to "
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

    with _reported(), _namespace_spec(system, app_name) as loaded:
        anyio.run(main, loaded)
    past = "requeued" if verb == "requeue" else "dropped"
    for line in done:
        console.print(f"{past} {escape(line)}")
    for _ref, problem in failed:
        errors.print(f"[bold red]error:[/] {escape(problem)}")
    if not done and not failed:
        console.print(f"no dead letters to {verb}")
    elif len(done) + len(failed) > 1:
        console.print(f"{past} {len(done)} of {_count(len(done) + len(failed), 'dead letter')}")
    if failed:
        raise typer.Exit(1)


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


@dead_app.command("requeue")
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


@dead_app.command("drop")
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


@app.command("init")
def init_(
    system: Annotated[str, typer.Argument(help="The ActorSystem, as MODULE:SYSTEM.")],
    url: Url = None,
    data_dir: StoreDir = None,
    as_json: AsJson = False,
) -> None:
    """Create every partition's inbox and relay consumer groups (and their streams) and load
    every Lua script. Idempotent: run it before the first node, or any time."""
    import anyio
    import msgspec

    from repertory.runtime import admin
    from repertory.runtime.runner import load_system

    async def main(loaded: "ActorSystem") -> "InitReport":
        async with _open(loaded, None, None, url, data_dir) as opened:
            return await admin.init(opened)

    with _reported():
        report = anyio.run(main, load_system(system))
    if as_json:
        typer.echo(msgspec.json.encode(report).decode())
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


@app.command()
def migrate(
    system: Annotated[str, typer.Argument(help="The ActorSystem, as MODULE:SYSTEM.")],
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
    import msgspec

    from repertory.runtime import admin, archive
    from repertory.runtime.runner import load_system

    async def main(loaded: "ActorSystem") -> "MigrationReport":
        async with _open(loaded, None, None, url, data_dir) as opened:
            addresses = await admin.migration_plan(opened, kind)
            total = await archive.count_events(opened, addresses)
            with _progress() as progress:
                task = progress.add_task("scanning" if dry_run else "migrating", total=total)
                return await admin.migrate(
                    opened,
                    addresses,
                    dry_run=dry_run,
                    progress=lambda n: progress.advance(task, n),
                )

    with _reported():
        report = anyio.run(main, load_system(system))
    if as_json:
        typer.echo(msgspec.json.encode(report).decode())
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
        scanned = f"{_count(report.events, 'event')} of {_count(report.actors, 'actor')} scanned"
        if report.dry_run:
            console.print(
                f"dry run: {scanned}; {report.outdated_events} outdated events in "
                f"{_count(report.outdated_actors, 'actor')} and "
                f"{_count(report.outdated_snapshots, 'outdated snapshot')} would be rewritten"
                + (f" ({escape(types)})" if types else "")
            )
        else:
            console.print(
                f"{scanned}; rewrote {_count(report.rewritten_events, 'event')} of "
                f"{_count(report.rewritten_actors, 'actor')} and "
                f"{_count(report.rewritten_snapshots, 'snapshot')} to the current versions"
                + (f" (from {escape(types)})" if types else "")
            )
    if not report.ok:
        raise typer.Exit(1)
