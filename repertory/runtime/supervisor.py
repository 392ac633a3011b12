"""`repertory spawn -n N MODULE:SYSTEM`: N node processes under one supervisor.

Like an OTP one-for-one supervisor: a child that exits without being asked to is restarted
after an exponential backoff, and more than `max_restarts` restarts within `period_s` stop the
whole group (something is wrong that restarting will not fix). SIGTERM or SIGINT is forwarded
to every child for a graceful stop; a child still running after the grace period is killed.
"""

import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
from anyio.abc import Process

from repertory.runtime.system import ActorSystem
from repertory.schemas.errors import RepertoryError

logger = logging.getLogger("repertory.supervisor")


class RestartIntensityError(RepertoryError):
    """Children crashed more often than the restart intensity allows: the group stopped."""


@dataclass(frozen=True, kw_only=True)
class SupervisorConfig:
    processes: int = 2
    max_restarts: int = 5
    period_s: float = 60.0
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0
    shutdown_timeout_s: float = 10.0
    """How long children get to stop gracefully (their own shutdown timeout) before a kill."""


@dataclass
class Child:
    name: str
    command: list[str]
    process: Process | None = None
    starts: int = 0
    exits: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid


class Supervisor:
    """Runs `command(name)` for each of `config.processes` children until stopped."""

    def __init__(
        self,
        command: Callable[[str], list[str]],
        config: SupervisorConfig,
        *,
        prefix: str | None = None,
    ) -> None:
        if config.processes < 1:
            raise ValueError(f"processes must be >= 1, got {config.processes}")
        self.config = config
        # Unique per supervisor, stable per child: a restarted child takes its own partitions
        # back at once instead of waiting for their leases to expire.
        prefix = prefix or f"{socket.gethostname()}-{os.getpid()}"
        self.children = [
            Child(f"{prefix}-{index}", command(f"{prefix}-{index}"))
            for index in range(1, config.processes + 1)
        ]
        self._restarts: deque[float] = deque()
        self._stop = anyio.Event()
        self.failure: RestartIntensityError | None = None

    def stop(self) -> None:
        self._stop.set()

    async def run(self, *, handle_signals: bool = True) -> None:
        """Supervise until `stop()`, a signal, or too many restarts (then raise)."""
        async with anyio.create_task_group() as group:
            if handle_signals:
                group.start_soon(self._stop_on_signal)
            async with anyio.create_task_group() as children:
                for child in self.children:
                    children.start_soon(self._supervise, child)
                await self._stop.wait()
                await self._terminate_all()
            group.cancel_scope.cancel()
        if self.failure is not None:
            raise self.failure

    async def _stop_on_signal(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for received in signals:
                logger.info("%s: stopping every node", signal.Signals(received).name)
                self.stop()
                return

    async def _supervise(self, child: Child) -> None:
        failures = 0
        while not self._stop.is_set():
            child.process = await anyio.open_process(
                child.command, stdin=None, stdout=None, stderr=None
            )
            child.starts += 1
            logger.info("started %s (pid %d)", child.name, child.process.pid)
            code = await child.process.wait()
            child.exits.append(code)
            if self._stop.is_set():
                return
            logger.warning("%s (pid %d) exited with %d", child.name, child.process.pid, code)
            if not self._may_restart():
                self.failure = RestartIntensityError(
                    f"more than {self.config.max_restarts} restarts within "
                    f"{self.config.period_s:g} s; stopping every node"
                )
                self.stop()
                return
            failures += 1
            delay = min(self.config.backoff_cap_s, self.config.backoff_base_s * 2 ** (failures - 1))
            with anyio.move_on_after(delay):
                await self._stop.wait()

    def _may_restart(self) -> bool:
        now = time.monotonic()
        self._restarts.append(now)
        while self._restarts and self._restarts[0] < now - self.config.period_s:
            self._restarts.popleft()
        return len(self._restarts) <= self.config.max_restarts

    async def _terminate_all(self) -> None:
        running = [c.process for c in self.children if c.process and c.process.returncode is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        with anyio.move_on_after(self.config.shutdown_timeout_s + 2):
            for process in running:
                await process.wait()
        for process in running:
            if process.returncode is None:
                logger.error("pid %d did not stop in time: killed", process.pid)
                process.kill()
                await process.wait()


def node_command(spec: str, url: str, shutdown_timeout_s: float) -> Callable[[str], list[str]]:
    """The command line of one child node of `spec`, connected to `url`."""

    def command(name: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "repertory",
            "run",
            spec,
            "--url",
            url,
            "--node-id",
            name,
            "--shutdown-timeout",
            str(shutdown_timeout_s),
        ]

    return command


async def watch_owners(
    system: ActorSystem, on_change: Callable[[dict[tuple[str, int], str | None]], None]
) -> None:
    """Call `on_change` with every (kind, partition) -> owning node, each time it changes."""
    last: dict[tuple[str, int], str | None] = {}
    while True:
        owners = {
            (kind, number): await system.partition(kind, number).owner()
            for kind in system.actors
            for number in range(system.keys.partitions_of(kind))
        }
        if owners != last:
            on_change(owners)
            last = owners
        await anyio.sleep(1)
