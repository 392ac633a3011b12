"""The arguments and options several commands share, each declared once here so that its name,
type and help read the same everywhere, and what they resolve to: a loaded system, an opened
namespace.

The system (MODULE:SYSTEM) brings the actor code that folds states and re-runs handlers;
`--app` alone is enough to read what is stored.
"""

from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from repertory.runtime.system import ActorSystem

DEFAULT_DATA_DIR = Path(".repertory")

# The embedded server's own commands, and those that start it for their processes.
DataDir = Annotated[
    Path,
    typer.Option("--data-dir", help="Folder holding the server's data, log and socket."),
]

# The commands that read or write a namespace's store.
SystemSpec = Annotated[
    str | None,
    typer.Argument(
        help="The ActorSystem, as MODULE:SYSTEM (or give --app instead).", show_default=False
    ),
]
RequiredSystem = Annotated[str, typer.Argument(help="The ActorSystem, as MODULE:SYSTEM.")]
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
OnlyKind = Annotated[str | None, typer.Option("--kind", help="Only this actor kind.")]
OnlyPartition = Annotated[
    int | None, typer.Option("--partition", help="Only this partition (with --kind).")
]


@contextmanager
def loaded_system(system: str | None, app_name: str | None) -> Iterator["ActorSystem | None"]:
    """Load the system named on the command line, checking that exactly one of it and --app is
    given."""
    from repertory.runtime.runner import load_system

    if (system is None) == (app_name is None):
        raise typer.BadParameter("give the system as MODULE:SYSTEM or its namespace with --app")
    yield None if system is None else load_system(system)


def open_store(
    system: "ActorSystem | None",
    app_name: str | None,
    partitions: int | None,
    url: str | None,
    data_dir: Path | None,
) -> "AbstractAsyncContextManager[ActorSystem]":
    """The namespace of the system (or of --app) on its server, started for the command if it
    is the embedded one."""
    from repertory.runtime.replay import open_namespace

    return open_namespace(system, app=app_name, partitions=partitions, url=url, data_dir=data_dir)
