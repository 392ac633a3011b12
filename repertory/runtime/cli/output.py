"""What the commands print: the two consoles, errors as one-line messages, JSON, tables that
keep ids whole, progress bars, and the small formats the tables share."""

import datetime
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import msgspec
import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from repertory.schemas.errors import RepertoryError

if TYPE_CHECKING:
    from rich.progress import Progress

# Soft wrap: paths and URLs stay on one line, whatever the terminal width.
console = Console(soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True)


def print_error(message: str) -> None:
    errors.print(f"[bold red]error:[/] {escape(message)}")


@contextmanager
def reported() -> Iterator[None]:
    """Turn a RepertoryError into a one-line message and exit code 1."""
    try:
        yield
    except RepertoryError as error:
        print_error(str(error))
        raise typer.Exit(1) from None


def json_text(value: object) -> str:
    """A value (a report, a struct, a dict of them) as one line of compact JSON."""
    return msgspec.json.encode(value).decode()


def print_json(value: object) -> None:
    typer.echo(json_text(value))


def print_unwrapped(table: Table) -> None:
    """Print a table as wide as its widest row needs, however narrow the terminal: node ids,
    paths and entry ids must stay whole to be copied."""
    needed = Measurement.get(console, console.options.update_width(4096), table).maximum
    Console(file=console.file, width=max(console.width, needed)).print(table)


def short_json(value: object, width: int = 60) -> str:
    """A value as one line of compact JSON, cut to `width` characters."""
    text = json_text(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def counted(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def utc_time(ms: int) -> str:
    moment = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def progress_bar() -> "Progress":
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
