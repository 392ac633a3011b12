"""Time, read through one interface so tests can drive leases, timers and idle detection."""

import time
from typing import Protocol

import anyio


class Clock(Protocol):
    def now_ms(self) -> int:
        """Wall-clock time in unix milliseconds (recorded with messages and timers)."""
        ...

    def lease_now_ms(self) -> int | None:
        """The time leases and memberships expire by: None for the Redis server's clock (so
        nodes whose clocks disagree still agree on who holds what), else this time (a
        simulated clock, which tests move past a lease on purpose)."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class RealClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def lease_now_ms(self) -> None:
        return None

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)
