"""Helpers shared by the tests: waiting for a condition with a deadline, never a bare sleep."""

from collections.abc import Awaitable, Callable

import anyio


async def eventually(
    condition: Callable[[], Awaitable[bool]], *, timeout: float = 10.0, every: float = 0.02
) -> None:
    """Wait until `condition()` holds; fail the test if it does not within `timeout` seconds."""
    with anyio.move_on_after(timeout):
        while not await condition():
            await anyio.sleep(every)
        return
    raise AssertionError(f"condition {condition!r} still false after {timeout} s")
