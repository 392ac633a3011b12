"""The event loop repertory's processes run on (nodes, workers, the demos): uvloop where it is
installed (a dependency everywhere but Windows), which spends less CPU per message than the
standard asyncio loop; `REPERTORY_EVENT_LOOP=asyncio` picks the standard loop instead."""

import importlib.util
import os
from collections.abc import Awaitable, Callable
from typing import Literal, TypeVar, TypeVarTuple

import anyio

from repertory.schemas.errors import RepertoryError

EVENT_LOOP_VARIABLE = "REPERTORY_EVENT_LOOP"

EventLoopName = Literal["uvloop", "asyncio"]

_Result = TypeVar("_Result")
_Arguments = TypeVarTuple("_Arguments")


class EventLoopChoiceError(RepertoryError, ValueError):
    """`REPERTORY_EVENT_LOOP` names a loop that is unknown or not installed."""


def event_loop_name() -> EventLoopName:
    """uvloop when installed and not declined through `REPERTORY_EVENT_LOOP`."""
    chosen = os.environ.get(EVENT_LOOP_VARIABLE, "").strip().lower()
    if chosen not in ("", "uvloop", "asyncio"):
        raise EventLoopChoiceError(
            f"{EVENT_LOOP_VARIABLE}={chosen!r}: expected 'uvloop' or 'asyncio'"
        )
    if chosen == "asyncio":
        return "asyncio"
    if importlib.util.find_spec("uvloop") is None:
        if chosen == "uvloop":
            raise EventLoopChoiceError(f"{EVENT_LOOP_VARIABLE}=uvloop, but uvloop is not installed")
        return "asyncio"
    return "uvloop"


def run(func: Callable[[*_Arguments], Awaitable[_Result]], *args: *_Arguments) -> _Result:
    """`anyio.run` on the loop `event_loop_name()` picks."""
    use_uvloop = event_loop_name() == "uvloop"
    return anyio.run(func, *args, backend="asyncio", backend_options={"use_uvloop": use_uvloop})
