"""The stateful test base: give an actor kind and a pure model, get the fault rules and the
invariants.

```python
class CounterMachine(ActorMachine):
    actor = Counter()

    def model(self, state: Count, message: Add) -> Count:
        return Count(state.total + message.amount)

TestCounter = CounterMachine.TestCase
```

Hypothesis draws a schedule of sends and faults (crash at a handling point, kill at any await
point, graceful restart, lease expiry and takeover, re-delivery, duplicate sends, snapshot
deletion, simulated time, a paused node that is fenced, garbage in the inbox); after every
step the system recovers and the invariants are checked (see `simulation`). A failure shrinks
to a minimal schedule, raised as `GuaranteeViolation` with its seed and a line to replay it.
"""

from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Any, ClassVar, TypeVar, overload

import anyio
import anyio.from_thread
import msgspec
from anyio.abc import TaskStatus
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from repertory.actors.model import Actor
from repertory.runtime.testkit.simulation import (
    CRASH_POINTS,
    AdvanceClock,
    Crash,
    DeleteSnapshots,
    DuplicateSend,
    ExpireLeases,
    GuaranteeViolation,
    InjectGarbage,
    KillDuringBurst,
    Outcome,
    Pause,
    Redeliver,
    Restart,
    Send,
    Simulation,
    Step,
    run_schedule,
)
from repertory.runtime.testkit.strategies import malformed_bytes, messages

T = TypeVar("T")

ALL_FAULTS = frozenset(
    {
        "duplicate_send",
        "crash",
        "kill_during_a_burst",
        "restart",
        "expire_leases",
        "redeliver",
        "delete_snapshots",
        "advance_clock",
        "pause",
        "inject_garbage",
    }
)


def _enabled(fault: str) -> Callable[["ActorMachine"], bool]:
    return lambda machine: fault in machine.faults


def _actor_ids() -> st.SearchStrategy[str]:
    return st.runner().flatmap(lambda machine: st.sampled_from(list(machine.ids)))


def _messages() -> st.SearchStrategy[msgspec.Struct]:
    return st.runner().flatmap(lambda machine: machine.messages())


class SimulationMachine(RuleBasedStateMachine):
    """A state machine hosting a `Simulation` (made by `make_simulation`) in a blocking portal's
    event loop, so that its sync rules can drive it (`call`); a host task owns the simulation
    and its nodes until teardown."""

    def make_simulation(self, seed: int) -> Simulation:
        raise NotImplementedError(f"{type(self).__name__} must define make_simulation(seed)")

    @property
    def simulation(self) -> Simulation:
        assert self._simulation is not None, "the machine has not started"
        return self._simulation

    def __init__(self) -> None:
        super().__init__()
        self._simulation: Simulation | None = None
        self._portal_cm: Any = None
        self._portal: anyio.from_thread.BlockingPortal | None = None
        self._host: Future[None] | None = None
        self._stop: anyio.Event | None = None
        self.failed = False
        """A call raised: the example failed (a final check in teardown would only hide why)."""

    @initialize(seed=st.integers(0, 2**32 - 1))
    def start(self, seed: int) -> None:
        self._simulation = self.make_simulation(seed)
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self._portal = self._portal_cm.__enter__()
        self._host, _ = self._portal.start_task(self._run)

    async def _run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self._stop = anyio.Event()
        async with self.simulation:
            task_status.started()
            await self._stop.wait()

    def _host_failure(self) -> None:
        """Raise what ended the host early: a node that failed other than by a planned fault."""
        if self._host is not None and self._host.done() and not self._host.cancelled():
            self._host.result()

    @overload
    def call(self, function: Callable[[], Awaitable[T]]) -> T: ...

    @overload
    def call(self, function: Callable[[], T]) -> T: ...

    def call(self, function: Callable[[], Any]) -> Any:
        """Run `function()` in the simulation's event loop (awaited if it is a coroutine
        function) and return its result."""
        assert self._portal is not None
        self._host_failure()
        try:
            return self._portal.call(function)
        except BaseException:
            self.failed = True
            raise
        finally:
            self._host_failure()

    def teardown(self) -> None:
        if self._portal is None:
            return
        stop = self._stop
        if stop is not None:
            self._portal.call(stop.set)
        try:
            if self._host is not None:
                self._host.result()
        finally:
            self._portal_cm.__exit__(None, None, None)
            self._portal = None


class ActorMachine(SimulationMachine):
    """Subclass with `actor` and `model`; optionally `ids`, `faults`, `messages`, `url`."""

    actor: ClassVar[Actor[Any]]
    ids: ClassVar[tuple[str, ...]] = ("a", "b", "c")
    partitions: ClassVar[int] = 2
    faults: ClassVar[frozenset[str]] = ALL_FAULTS
    url: ClassVar[str | None] = None
    """None: a fresh fakeredis per example; a URL: that server, a fresh namespace per example."""

    def model(self, state: Any, message: Any) -> Any:
        """The expected next state (or `(state, events)`); raise `Rejected` for a refusal.
        Pure: it sees no clock but `self.now_ms`, the simulated time of handling."""
        raise NotImplementedError(f"{type(self).__name__} must define model(state, message)")

    def messages(self) -> st.SearchStrategy[msgspec.Struct]:
        """The messages sent to the actors: by default, any of its command types."""
        return messages(self.actor)

    def check_effects(self) -> None:
        """Called after every check: assert here on effects outside the event log."""

    @property
    def now_ms(self) -> int:
        return self.simulation.clock.now_ms()

    @classmethod
    def replay_hint(cls) -> str:
        return f"{cls.__module__}.{cls.__qualname__}.replay"

    def make_simulation(self, seed: int) -> Simulation:
        return Simulation(
            self.actor,
            self.model,
            ids=self.ids,
            seed=seed,
            url=self.url,
            partitions=self.partitions,
            replay_hint=self.replay_hint(),
        )

    def apply(self, step: Step) -> None:
        self.call(lambda: self.simulation.apply(step))

    # The rules: one per step kind.

    @rule(actor=_actor_ids(), message=_messages())
    def send(self, actor: str, message: msgspec.Struct) -> None:
        self.apply(Send(actor, message))

    @precondition(_enabled("duplicate_send"))
    @rule(actor=_actor_ids(), message=_messages(), copies=st.integers(2, 3))
    def duplicate_send(self, actor: str, message: msgspec.Struct, copies: int) -> None:
        self.apply(DuplicateSend(actor, message, copies))

    @precondition(_enabled("crash"))
    @rule(actor=_actor_ids(), message=_messages(), point=st.sampled_from(CRASH_POINTS))
    def crash(self, actor: str, message: msgspec.Struct, point: str) -> None:
        self.apply(Crash(actor, message, point))

    @precondition(_enabled("kill_during_a_burst"))
    @rule(
        sends=st.lists(st.tuples(_actor_ids(), _messages()), min_size=1, max_size=6),
        turns=st.integers(0, 40),
    )
    def kill_during_a_burst(self, sends: list[tuple[str, msgspec.Struct]], turns: int) -> None:
        self.apply(KillDuringBurst(tuple(sends), turns))

    @precondition(_enabled("restart"))
    @rule()
    def restart(self) -> None:
        self.apply(Restart())

    @precondition(_enabled("expire_leases"))
    @rule()
    def expire_leases(self) -> None:
        self.apply(ExpireLeases())

    @precondition(_enabled("redeliver"))
    @rule(actor=_actor_ids())
    def redeliver(self, actor: str) -> None:
        self.apply(Redeliver(actor))

    @precondition(_enabled("delete_snapshots"))
    @rule()
    def delete_snapshots(self) -> None:
        self.apply(DeleteSnapshots())

    @precondition(_enabled("advance_clock"))
    @rule(ms=st.sampled_from([1, 1000, 60_000, 3_600_000]) | st.integers(1, 86_400_000))
    def advance_clock(self, ms: int) -> None:
        self.apply(AdvanceClock(ms))

    @precondition(_enabled("pause"))
    @rule(actor=_actor_ids(), message=_messages())
    def pause(self, actor: str, message: msgspec.Struct) -> None:
        self.apply(Pause(actor, message))

    @precondition(_enabled("inject_garbage"))
    @rule(
        actor=_actor_ids(),
        data=st.runner().flatmap(lambda machine: malformed_bytes(machine.actor, machine.ids)),
    )
    def inject_garbage(self, actor: str, data: bytes) -> None:
        self.apply(InjectGarbage(actor, data))

    @invariant()
    def guarantees_hold(self) -> None:
        self.call(self.simulation.check)
        try:
            self.check_effects()
        except GuaranteeViolation:
            raise
        except AssertionError as error:
            raise self.simulation.violation(f"check_effects: {error}") from error

    # Replaying a printed failure, outside hypothesis.

    @classmethod
    def replay(cls, *, seed: int, schedule: list[Step]) -> Outcome:
        """Run `schedule` with `seed` as the failure printed it; raises the same violation."""
        machine = cls()
        machine.start(seed)
        try:
            assert machine._portal is not None
            outcome: Outcome = machine._portal.call(run_schedule, machine.simulation, schedule)
            machine.check_effects()
            return outcome
        finally:
            machine.teardown()


def machine_settings(**overrides: Any) -> settings:
    """The active profile's settings (`ci` in this project's `make test`), made fit for
    machines that run a real node: no deadline, no slowness health checks."""
    base = {"deadline": None, "suppress_health_check": list(HealthCheck)}
    return settings(settings.default, **{**base, **overrides})


def run_machine(
    machine: type[SimulationMachine], *, url: str | None = None, **overrides: Any
) -> None:
    """Run `machine` as a test (on `url` if given, else fakeredis) under `machine_settings`."""
    target = machine if url is None else type(machine.__name__, (machine,), {"url": url})
    run_state_machine_as_test(target, settings=machine_settings(**overrides))


def find_violation(
    machine: type[SimulationMachine], *, url: str | None = None, **overrides: Any
) -> GuaranteeViolation:
    """Run `machine`, expecting it to fail; returns the shrunk violation (for testing the kit
    on planted bugs, or asserting a known bug is found)."""
    try:
        run_machine(machine, url=url, report_multiple_bugs=False, **overrides)
    except GuaranteeViolation as violation:
        return violation
    raise AssertionError(f"{machine.__name__}: no guarantee violation found")
