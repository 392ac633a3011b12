"""`repertory server start|stop|status`: the embedded valkey-server of a data folder."""

import dataclasses
import enum
import json
from typing import Annotated

import typer
from rich.table import Table

from repertory.runtime.cli.options import DEFAULT_DATA_DIR, DataDir
from repertory.runtime.cli.output import console, print_unwrapped, reported
from repertory.streams.embedded import EmbeddedServer, EmbeddedServerError, ServerStatus

commands = typer.Typer(
    no_args_is_help=True,
    help="The embedded valkey-server of a data folder (used when no Redis URL is given).",
)


class FsyncPolicy(enum.StrEnum):
    ALWAYS = "always"
    EVERYSEC = "everysec"
    NO = "no"


@commands.command("start")
def server_start(
    data_dir: DataDir = DEFAULT_DATA_DIR,
    port: Annotated[
        int | None,
        typer.Option(help="Also listen on 127.0.0.1:PORT (default: the unix socket only)."),
    ] = None,
    fsync: Annotated[
        FsyncPolicy, typer.Option(help="AOF fsync policy: always, everysec or no.")
    ] = FsyncPolicy.EVERYSEC,
) -> None:
    """Start the embedded server in DATA_DIR, or report the one already running there."""
    with reported():
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


@commands.command("stop")
def server_stop(data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Stop the embedded server of DATA_DIR gracefully (the AOF is flushed first)."""
    with reported():
        server = EmbeddedServer(data_dir)
        stopped = server.stop()
    if stopped:
        console.print(f"stopped the valkey-server of {server.data_dir}")
    else:
        console.print(f"no valkey-server was running in {server.data_dir}")


@commands.command("status")
def server_status(
    data_dir: DataDir = DEFAULT_DATA_DIR,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Show the embedded server of DATA_DIR; exit code 1 when none is running."""
    with reported():
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
        print_unwrapped(_status_table(status))
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
