"""`repertory spawn`: N child processes (nodes, or worker agents) under one supervisor.

Like an OTP one-for-one supervisor: a child that exits and whose restart policy says so is
restarted after an exponential backoff, and more than `max_restarts` restarts within `period_s`
stop the whole group (something is wrong that restarting will not fix). SIGTERM or SIGINT is
forwarded to every child for a graceful stop; a child still running after the grace period is
killed. No child outlives the supervisor, even when it is cancelled.

Restart policies, as in OTP: `permanent` children (nodes) are restarted whenever they exit
unasked; `transient` ones (worker agents whose health strategy is `restart`) only when they
fail, so a worker that finished its project exits 0 and stays done; `temporary` ones are never
restarted by the supervisor (a health monitor's recovery decides: `replace` starts a new child).
A group whose children are all done for good stops by itself, which is not a failure.
"""

import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import anyio
from anyio.abc import Process, TaskGroup

from repertory.runtime.system import ActorSystem
from repertory.schemas.errors import RepertoryError

logger = logging.getLogger("repertory.supervisor")

RestartPolicy = Literal["permanent", "transient", "temporary"]


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
    restart: RestartPolicy = "permanent"
    fresh_ids: bool = False
    """Each start of a child runs under its own id, `NAME.N` (worker agents: the health monitor
    sees the killed one fall silent and a new one register). Otherwise a child keeps its name
    (nodes: a restarted node takes its own partitions back at once)."""
    log_dir: Path | None = None
    """Each start's output goes to `LOG_DIR/ID.log` (appended) instead of the supervisor's."""


@dataclass
class Child:
    name: str
    restart: RestartPolicy
    process: Process | None = None
    ids: list[str] = field(default_factory=list)
    """The id of each start, in order."""
    pids: list[int] = field(default_factory=list)
    exits: list[int] = field(default_factory=list)
    """The exit code of each start that ended, in order (negative: killed by that signal)."""
    retired: bool = False
    """Stopped for good by `replace`: its supervision ends with its process."""
    replaced_by: str | None = None
    """The name of the child started in its place."""
    restart_requested: bool = False
    supervised: bool = False
    """A supervising task runs it, or will restart it after its backoff."""

    @property
    def starts(self) -> int:
        return len(self.ids)

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def current(self) -> str | None:
        """The id of the latest start (running or not)."""
        return self.ids[-1] if self.ids else None


class Supervisor:
    """Runs `command(id)` for each of `config.processes` children until stopped, or until every
    child is done for good (never, with permanent children)."""

    def __init__(
        self,
        command: Callable[[str], list[str]],
        config: SupervisorConfig,
        *,
        prefix: str | None = None,
    ) -> None:
        if config.processes < 1:
            raise ValueError(f"processes must be >= 1, got {config.processes}")
        self.command = command
        self.config = config
        # Unique per supervisor, stable per child.
        self.prefix = prefix or f"{socket.gethostname()}-{os.getpid()}"
        self.children = [
            Child(f"{self.prefix}-{index}", config.restart)
            for index in range(1, config.processes + 1)
        ]
        self._restarts: deque[float] = deque()
        self._stop = anyio.Event()
        self._group: TaskGroup | None = None
        self._supervising = 0
        self.finished = anyio.Event()
        self.failure: RestartIntensityError | None = None

    def stop(self) -> None:
        self._stop.set()

    async def run(self, *, handle_signals: bool = True) -> None:
        """Supervise until `stop()`, a signal, every child done for good, or too many restarts
        (then raise)."""
        try:
            async with anyio.create_task_group() as group:
                if handle_signals:
                    group.start_soon(self._stop_on_signal)
                async with anyio.create_task_group() as children:
                    self._group = children
                    for child in self.children:
                        self._supervise_soon(child)
                    await self._stop.wait()
                    self._group = None
                    await self._terminate_all()
                group.cancel_scope.cancel()
        finally:
            self._group = None
            with anyio.CancelScope(shield=True):
                await self._terminate_all()  # cancelled: still, no child outlives the group
            self.finished.set()
        if self.failure is not None:
            raise self.failure

    def child_of(self, agent_id: str) -> Child | None:
        """The child that ran (or runs) under `agent_id`."""
        return next((child for child in self.children if agent_id in child.ids), None)

    def running(self) -> list[str]:
        return [child.ids[-1] for child in self.children if child.running]

    def exit_codes(self) -> dict[str, int | None]:
        """Every start's id and its exit code (None: still running)."""
        codes: dict[str, int | None] = {}
        for child in self.children:
            for index, agent_id in enumerate(child.ids):
                codes[agent_id] = child.exits[index] if index < len(child.exits) else None
        return codes

    async def kill(self, agent_id: str) -> bool:
        """SIGKILL the process running as `agent_id` and wait until it is gone; what follows is
        its restart policy's business. False if no process runs as that id any more."""
        child = self.child_of(agent_id)
        if child is None or child.current != agent_id or not child.running:
            return False
        assert child.process is not None
        child.process.kill()
        await child.process.wait()
        return True

    async def restart(self, agent_id: str) -> str | None:
        """Restart the child that ran as `agent_id` (killing it if it still runs as that id),
        whatever its policy; returns the id its next start runs under. Repeating it for the same
        id restarts nothing twice. None: not one of ours, retired, or the group is stopping."""
        child = self.child_of(agent_id)
        if child is None or child.retired or self._stop.is_set():
            return None
        following = self._id_of(child, child.ids.index(agent_id) + 2)
        if child.current != agent_id:
            return following  # restarted already
        if child.running:
            child.restart_requested = True
            await self.kill(agent_id)
        elif not child.supervised:
            # Done for good (a temporary child, or a transient one that exited 0): start again.
            if not self._may_restart():
                self._give_up()
                return None
            if not self._supervise_soon(child):
                return None
        return following

    async def replace(self, agent_id: str) -> str | None:
        """Retire the child running as `agent_id` (killed if still running, never restarted) and
        start a new child in its place; returns the new child's id. Repeating it returns the same
        replacement. None: not one of ours, already restarted under another id, or stopping."""
        child = self.child_of(agent_id)
        if child is None:
            return None
        if child.replaced_by is not None:
            replacement = next(c for c in self.children if c.name == child.replaced_by)
            return self._id_of(replacement, 1)
        if child.current != agent_id or self._stop.is_set() or self._group is None:
            return None
        if not self._may_restart():
            self._give_up()
            return None
        new = Child(f"{self.prefix}-{len(self.children) + 1}", child.restart)
        self.children.append(new)
        child.replaced_by = new.name
        child.retired = True
        # The new child is supervised before the old one's supervision ends, so the group
        # never looks done in between.
        self._supervise_soon(new)
        await self.kill(agent_id)
        return self._id_of(new, 1)

    def _id_of(self, child: Child, start: int) -> str:
        return f"{child.name}.{start}" if self.config.fresh_ids else child.name

    def _supervise_soon(self, child: Child) -> bool:
        if self._group is None:
            return False
        self._supervising += 1
        child.supervised = True
        self._group.start_soon(self._supervise, child)
        return True

    async def _stop_on_signal(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for received in signals:
                logger.info("%s: stopping every child", signal.Signals(received).name)
                self.stop()
                return

    async def _supervise(self, child: Child) -> None:
        try:
            await self._keep_running(child)
        finally:
            child.supervised = False
            self._supervising -= 1
            if self._supervising == 0:
                logger.info("every child is done: the group stops")
                self.stop()

    async def _keep_running(self, child: Child) -> None:
        failures = 0
        while not self._stop.is_set() and not child.retired:
            agent_id = self._id_of(child, child.starts + 1)
            code = await self._run_once(child, agent_id)
            requested, child.restart_requested = child.restart_requested, False
            if self._stop.is_set() or child.retired:
                return
            failed = code != 0
            log = logger.warning if failed else logger.info
            log("%s exited with %d", agent_id, code)
            if not requested and (
                child.restart == "temporary" or (child.restart == "transient" and not failed)
            ):
                return  # done for good
            if not self._may_restart():
                self._give_up()
                return
            if requested:
                continue  # asked for: at once
            failures += 1
            delay = min(self.config.backoff_cap_s, self.config.backoff_base_s * 2 ** (failures - 1))
            with anyio.move_on_after(delay):
                await self._stop.wait()

    async def _run_once(self, child: Child, agent_id: str) -> int:
        with ExitStack() as files:
            output = None
            if self.config.log_dir is not None:
                self.config.log_dir.mkdir(parents=True, exist_ok=True)
                output = files.enter_context((self.config.log_dir / f"{agent_id}.log").open("ab"))
            child.ids.append(agent_id)
            child.process = await anyio.open_process(
                self.command(agent_id), stdin=None, stdout=output, stderr=output
            )
            child.pids.append(child.process.pid)
            logger.info("started %s (pid %d)", agent_id, child.process.pid)
            try:
                return await child.process.wait()
            finally:
                if child.process.returncode is not None:
                    child.exits.append(child.process.returncode)

    def _may_restart(self) -> bool:
        now = time.monotonic()
        self._restarts.append(now)
        while self._restarts and self._restarts[0] < now - self.config.period_s:
            self._restarts.popleft()
        return len(self._restarts) <= self.config.max_restarts

    def _give_up(self) -> None:
        self.failure = RestartIntensityError(
            f"more than {self.config.max_restarts} restarts within "
            f"{self.config.period_s:g} s; stopping every child"
        )
        self.stop()

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
