"""Time, read through one interface so tests can drive leases, timers and idle detection."""

import time
from typing import Protocol

import anyio


class Clock(Protocol):
    def now_ms(self) -> int:
        """Wall-clock time in unix milliseconds (recorded with messages and timers)."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class RealClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)
