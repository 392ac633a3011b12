"""The health monitor driven by a simulated clock: every message is handled at a time the test
chooses (the handler's `ctx.now_ms`) and durable timers fire when the test advances the clock,
so down and zombie detection and degraded mode are deterministic."""

import random
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest

from repertory.actors.agents import (
    AgentDown,
    AgentRecovered,
    AgentZombie,
    Coordinator,
    DegradedEntered,
    DegradedLeft,
    Deregister,
    HealthMonitor,
    Heartbeat,
    RecoveryDecided,
    RecoveryDone,
    Register,
    SetMode,
    StartProject,
    Strategy,
)
from repertory.actors.model import Actor, Context, Rejected
from repertory.runtime.agents_demo import plan
from repertory.streams.keys import Address

pytestmark = pytest.mark.anyio


@dataclass
class Harness:
    """One actor, handled in-process at simulated times; its timers kept in a due list."""

    actor: Actor[Any]
    address: Address
    state: Any = None
    version: int = 0
    now_ms: int = 0
    events: list[msgspec.Struct] = field(default_factory=list)
    sent: list[tuple[str, msgspec.Struct]] = field(default_factory=list)
    timers: list[tuple[int, int, msgspec.Struct]] = field(default_factory=list)
    _count: int = 0

    def __post_init__(self) -> None:
        self.state = self.actor.initial

    async def deliver(self, message: msgspec.Struct) -> list[msgspec.Struct]:
        self._count += 1
        ctx = Context(self.address, self.version, f"m-{self._count}", self.now_ms)
        events = await self.actor.handle(self.state, message, ctx)
        self.state = self.actor.fold(self.state, events)
        self.version += len(events)
        self.events.extend(events)
        for out in ctx.outgoing:
            if out.target == self.address and out.delay_ms:
                self.timers.append((self.now_ms + out.delay_ms, self._count, out.message))
            else:
                self.sent.append((str(out.target), out.message))
        return events

    async def advance(self, to_ms: int) -> None:
        """Fire every timer due up to `to_ms`, each at its due time, then stop the clock there."""
        while True:
            due = sorted(t for t in self.timers if t[0] <= to_ms)
            if not due:
                break
            self.timers.remove(due[0])
            self.now_ms = max(self.now_ms, due[0][0])
            await self.deliver(due[0][2])
        self.now_ms = to_ms

    def of(self, kind: type[msgspec.Struct]) -> list[Any]:
        return [event for event in self.events if isinstance(event, kind)]


def monitor() -> Harness:
    return Harness(HealthMonitor(), Address("health", "main"))


async def beat_until(h: Harness, agents: list[str], until_ms: int, **beat: int) -> None:
    """Each agent heartbeats every 2 s (the default) until `until_ms`."""
    while h.now_ms + 2000 <= until_ms:
        await h.advance(h.now_ms + 2000)
        for agent in agents:
            await h.deliver(Heartbeat(agent_id=agent, **beat))


async def test_an_agent_that_stops_beating_is_down_within_5_s() -> None:
    h = monitor()
    await h.deliver(Register(agent_id="w1", strategy="restart"))
    await beat_until(h, ["w1"], 10_000)
    last_beat = h.now_ms
    await h.advance(last_beat + 6000)
    (down,) = h.of(AgentDown)
    assert down.agent_id == "w1"
    assert 4000 < down.at_ms - last_beat <= 5000
    (decision,) = h.of(RecoveryDecided)
    assert (decision.agent_id, decision.action) == ("w1", "restart")
    await h.deliver(RecoveryDone(agent_id="w1", action="restart", replacement="w2"))
    await h.deliver(RecoveryDone(agent_id="w1", action="restart", replacement="w2"))
    assert len(h.of(AgentRecovered)) == 1  # a repeated report changes nothing
    assert h.state.agents["w1"].status == "recovered"


async def test_a_zombie_beats_but_makes_no_progress() -> None:
    h = monitor()
    await h.deliver(Register(agent_id="busy", strategy="replace"))
    await h.deliver(Register(agent_id="stuck", strategy="replace"))
    for step in range(1, 9):  # 16 s: "busy" finishes a task every beat, "stuck" never does
        await h.advance(step * 2000)
        await h.deliver(Heartbeat(agent_id="busy", pending=1, progress=step))
        await h.deliver(Heartbeat(agent_id="stuck", pending=1, progress=0))
    (zombie,) = h.of(AgentZombie)
    assert zombie.agent_id == "stuck"
    assert zombie.idle_ms > 10_000
    assert not h.of(AgentDown)
    assert [(d.agent_id, d.action) for d in h.of(RecoveryDecided)] == [("stuck", "replace")]
    # It gets going again: it rejoins instead of being recovered.
    await h.deliver(Heartbeat(agent_id="stuck", pending=0, progress=1))
    assert h.state.agents["stuck"].status == "up"


async def test_degraded_mode_is_entered_after_4_failures_in_30_s_and_left_after_120_s() -> None:
    h = monitor()
    coordinator = "coordinator/main"
    agents = [f"w{i}" for i in range(6)]
    for agent in agents:
        await h.deliver(Register(agent_id=agent, notify=coordinator))
    await beat_until(h, agents, 4000)
    await beat_until(h, agents[:2], 12_000)  # w2..w5 die at 4 s: 4 failures (more than 3)
    (entered,) = h.of(DegradedEntered)
    assert entered.failures == 4
    assert entered.limit == 50
    assert h.state.degraded
    assert (coordinator, SetMode(True, 50)) in h.sent

    # The coordinator, told so, refuses new projects and lowers its concurrency limit.
    c = Harness(Coordinator(plan), Address("coordinator", "main"))
    await c.deliver(SetMode(True, 50))
    assert c.state.limit == 50
    with pytest.raises(Rejected) as refused:
        await c.deliver(StartProject(project_id="p", goal="2 tasks of 1 s"))
    assert refused.value.code == "degraded"

    # 119 s after entering, still degraded; at 120 s with no failure since, it leaves.
    await beat_until(h, agents[:2], entered.at_ms + 118_000)
    await h.advance(entered.at_ms + 119_000)
    assert h.state.degraded
    await beat_until(h, agents[:2], entered.at_ms + 122_000)
    (left,) = h.of(DegradedLeft)
    assert left.limit == 100
    assert left.at_ms - entered.at_ms >= 120_000
    assert left.failures < 2
    assert (coordinator, SetMode(False, 100)) in h.sent
    await c.deliver(SetMode(False, 100))
    accepted = await c.deliver(StartProject(project_id="p", goal="2 tasks of 1 s"))
    assert len(accepted) == 3  # the project and its 2 tasks dispatched


async def test_deregistered_agents_are_not_failures() -> None:
    h = monitor()
    await h.deliver(Register(agent_id="w1"))
    await h.deliver(Deregister(agent_id="w1"))
    await h.advance(60_000)
    assert not h.of(AgentDown)
    assert not h.state.checking  # nothing left to watch: the checks stop


@dataclass
class SimAgent:
    name: str
    strategy: Strategy
    next_beat: int
    mode: str = "ok"  # ok | crashed | hung
    progress: int = 0


@pytest.mark.parametrize("seed", [7, 2024])
async def test_at_least_90_percent_of_injected_failures_recover_unattended(seed: int) -> None:
    """Crashes (silence) and hangs (zombies) injected at random into a pool of 6 agents for
    10 simulated minutes; a simulated supervisor carries out each decision, but 5 % of its
    actions fail (a replacement that never comes up). Recovered = recorded `AgentRecovered`."""
    rng = random.Random(seed)
    h = monitor()
    pool: dict[str, SimAgent] = {}
    injected: set[str] = set()
    serial = 0

    async def spawn() -> str:
        nonlocal serial
        serial += 1
        name = f"a{serial}"
        strategy: Strategy = rng.choice(["restart", "replace"])
        pool[name] = SimAgent(name, strategy, h.now_ms + 2000)
        await h.deliver(Register(agent_id=name, strategy=strategy))
        return name

    for _ in range(6):
        await spawn()
    handled = 0
    for now in range(100, 600_000, 100):
        await h.advance(now)
        for agent in list(pool.values()):
            if agent.mode == "crashed" or agent.next_beat > now:
                continue
            agent.next_beat = now + 2000
            if agent.mode == "ok":
                roll = rng.random()
                if roll < 0.02:
                    agent.mode = "crashed"
                    injected.add(agent.name)
                    continue
                if roll < 0.03:
                    agent.mode = "hung"
                    injected.add(agent.name)
                else:
                    agent.progress += 1
            await h.deliver(Heartbeat(agent_id=agent.name, pending=1, progress=agent.progress))
        for decision in h.of(RecoveryDecided)[handled:]:
            handled += 1
            pool.pop(decision.agent_id)
            if rng.random() < 0.05:
                continue  # the action failed: only a person can help this one
            replacement = await spawn()
            done = RecoveryDone(
                agent_id=decision.agent_id, action=decision.action, replacement=replacement
            )
            await h.deliver(done)
        if len(pool) < 6:
            await spawn()
    # Failures injected in the last minute may not be decided yet: count those settled.
    settled = {d.agent_id for d in h.of(RecoveryDecided)}
    recovered = {r.agent_id for r in h.of(AgentRecovered)}
    assert recovered <= injected
    assert settled <= injected
    counted = injected & settled
    rate = len(recovered) / len(counted)
    print(
        f"seed {seed}: {len(injected)} failures injected, {len(counted)} detected, "
        f"{len(recovered)} recovered unattended ({rate:.0%}), "
        f"degraded mode entered {len(h.of(DegradedEntered))} times"
    )
    assert len(counted) >= 20
    assert rate >= 0.9
