"""The `repertory` command line: version, the embedded server's start/stop/status, running a
node, the demo.

A RepertoryError ends the command with its message on stderr and exit code 1, no traceback.
"""

import dataclasses
import enum
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from repertory import __version__
from repertory.schemas.errors import RepertoryError
from repertory.streams.embedded import EmbeddedServer, EmbeddedServerError, ServerStatus

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
        table = _status_table(status)
        # Wide enough for whole paths: a wrapped path cannot be copied.
        needed = Measurement.get(console, console.options.update_width(4096), table).maximum
        Console(file=console.file, width=max(console.width, needed)).print(table)
    if status is None:
        raise typer.Exit(1)


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
    """Run the demo: an event-sourced bank account written, rebuilt and shown as a table."""
    from repertory.runtime.demo import run_demo  # heavy imports only for this command

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


def main() -> None:
    app()
