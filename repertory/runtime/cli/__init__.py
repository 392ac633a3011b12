"""The `repertory` command line: version, the embedded server's start/stop/status, running a
node, the demo, the replay and debugging tools (replay, check, verify, export, import) and the
operating tools (inspect, dead, init, migrate).

One module per command group; this one puts them together under the root command, in the
order `repertory --help` lists them. The options several commands share are declared once, in
`options`; what they print goes through `output`.

A RepertoryError ends the command with its message on stderr and exit code 1, no traceback.
"""

from typing import Annotated

import typer

from repertory import __version__
from repertory.runtime.cli import dead, debug, nodes, operations, server, store
from repertory.runtime.cli.output import console

__all__ = ["app", "main"]

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="repertory: an event-sourced actor runtime on Redis Streams.",
)
# Unnamed: their commands are the root's own, listed in this order; then the two groups.
for group in (nodes, debug, store, operations):
    app.add_typer(group.commands)
app.add_typer(server.commands, name="server")
app.add_typer(dead.commands, name="dead")


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


def main() -> None:
    app()
