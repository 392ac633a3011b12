"""G1, G2, G3 and G5 as a hypothesis state machine that drives a real node and a pure model
with the same random schedule: sends, duplicate sends, transport re-deliveries, crashes at
chosen points of handling (before the handler, after it, before the commit, after it) and at
arbitrary await points, restarts, lease expiry and snapshot deletion.

After every step the node is recovered (restarted if it died) and, once it has caught up, every
acknowledged send has been handled exactly once in effect, in send order per actor, and the
rebuilt state equals the model's.
"""

import itertools
import uuid
from collections.abc import Callable

import anyio
import anyio.from_thread
import fakeredis
import msgspec
import pytest
from anyio.abc import TaskGroup, TaskStatus
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from repertory.actors.model import Actor, Context, applier, command
from repertory.runtime.node import Node, NodeConfig
from repertory.runtime.system import ActorSystem
from repertory.schemas import schema
from repertory.streams.client import RedisClient, create_client
from repertory.streams.keys import Address
from tests.support import eventually

ACTORS = ["a", "b", "c"]
CRASH_POINTS = ["before-handle", "after-handle", "before-commit", "after-commit"]


@schema("test.guarantee.append")
class Append(msgspec.Struct, frozen=True):
    seq: int


@schema("test.guarantee.appended")
class Appended(msgspec.Struct, frozen=True):
    seq: int


@schema("test.guarantee.log")
class Log(msgspec.Struct, frozen=True):
    seqs: list[int] = []


class Recorder(Actor[Log]):
    kind = "recorder"
    initial = Log()
    snapshot_every = 4

    @command
    def append(self, state: Log, cmd: Append, ctx: Context) -> Appended:
        return Appended(cmd.seq)

    @applier
    def appended(self, state: Log, event: Appended) -> Log:
        return Log([*state.seqs, event.seq])


class SimulatedCrash(BaseException):
    """Raised by the fault hook: the node dies at that point, as a killed process would. A
    BaseException, so no handler-failure path mistakes it for a failing handler."""


class Harness:
    """Runs nodes in an event loop owned by a blocking portal, so sync rules can drive them."""

    def __init__(self, system: ActorSystem, group: TaskGroup, block_ms: int | None) -> None:
        self.system = system
        self.block_ms = block_ms
        self.group = group
        self.crash_at: str | None = None
        self.node: Node | None = None
        self.scope = anyio.CancelScope()
        self.dead = anyio.Event()
        self.dead.set()
        self.node_id = "node-0"

    async def fault(self, point: str, address: Address | None) -> None:
        if self.crash_at == point:
            self.crash_at = None
            raise SimulatedCrash(point)

    async def start(self) -> None:
        node = Node(
            self.system,
            NodeConfig(
                node_id=self.node_id,
                block_ms=self.block_ms,
                poll_s=0.005,
                retry_base_s=0.01,
                lease_ttl_ms=3000,
            ),
            faults=self.fault,
        )
        scope = anyio.CancelScope()
        dead = anyio.Event()
        self.node, self.scope, self.dead = node, scope, dead

        async def run(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
            # Any other failure propagates: it ends the host, and the next step reports it.
            try:
                with scope:
                    try:
                        await node.run(task_status=task_status)
                    except* SimulatedCrash:
                        pass
            finally:
                dead.set()

        await self.group.start(run)

    async def kill(self) -> None:
        """Cancel the node wherever it is: no graceful step runs, leases are not released."""
        self.scope.cancel()
        await self.dead.wait()

    async def ensure_running(self) -> None:
        if self.dead.is_set():
            await self.start()


async def host(*, task_status: TaskStatus[TaskGroup] = anyio.TASK_STATUS_IGNORED) -> None:
    """Owns the nodes' tasks inside the portal's event loop until cancelled."""
    async with anyio.create_task_group() as group:
        task_status.started(group)
        await anyio.sleep_forever()


class NodeGuarantees(RuleBasedStateMachine):
    client_factory: Callable[[], RedisClient]
    block_ms: int | None

    def __init__(self) -> None:
        super().__init__()
        self.portal_cm = anyio.from_thread.start_blocking_portal()
        self.portal = self.portal_cm.__enter__()
        self.client = self.portal.call(self._make_client)
        self.system = ActorSystem(
            Recorder(), app=f"g{uuid.uuid4().hex[:8]}", partitions=2, client=self.client
        )
        self.portal.call(self.system.connect)
        self.host, group = self.portal.start_task(host)
        self.harness = self.portal.call(Harness, self.system, group, type(self).block_ms)
        self.portal.call(self.harness.start)
        self.model: dict[str, list[int]] = {actor: [] for actor in ACTORS}
        self.seq = itertools.count(1)

    async def _make_client(self) -> RedisClient:
        return type(self).client_factory()

    def _host_failure(self) -> None:
        """Raise what ended the host early: a node that failed other than by a planned crash."""
        if self.host.done() and not self.host.cancelled():
            self.host.result()

    def teardown(self) -> None:
        self.portal.call(self.harness.kill)
        self._host_failure()
        self.host.cancel()
        self.portal.call(self.client.aclose)
        self.portal_cm.__exit__(None, None, None)

    def _send(self, actor: str, *, idempotency_key: str | None = None, copies: int = 1) -> None:
        seq = next(self.seq)
        for _ in range(copies):
            self.portal.call(
                lambda: self.system.send(
                    Address("recorder", actor), Append(seq), idempotency_key=idempotency_key
                )
            )
        self.model[actor].append(seq)

    @rule(actor=st.sampled_from(ACTORS))
    def send(self, actor: str) -> None:
        self._send(actor)

    @rule(actor=st.sampled_from(ACTORS), copies=st.integers(2, 3))
    def duplicate_send(self, actor: str, copies: int) -> None:
        self._send(actor, idempotency_key=str(uuid.uuid4()), copies=copies)

    @rule(actor=st.sampled_from(ACTORS), point=st.sampled_from(CRASH_POINTS))
    def crash_while_handling(self, actor: str, point: str) -> None:
        self.harness.crash_at = point
        self._send(actor)

        async def died() -> bool:
            return self.harness.dead.is_set()

        self.portal.call(lambda: eventually(died))

    @rule(
        actors=st.lists(st.sampled_from(ACTORS), min_size=1, max_size=6),
        turns=st.integers(0, 40),
    )
    def kill_during_a_burst(self, actors: list[str], turns: int) -> None:
        for actor in actors:
            self._send(actor)

        async def kill_after_turns() -> None:
            for _ in range(turns):
                await anyio.lowlevel.checkpoint()
            await self.harness.kill()

        self.portal.call(kill_after_turns)

    @rule()
    def graceful_restart(self) -> None:
        async def restart() -> None:
            if self.harness.node is not None and not self.harness.dead.is_set():
                self.harness.node.stop()
                await self.harness.dead.wait()

        self.portal.call(restart)

    @rule()
    def lease_expires_and_a_new_node_takes_over(self) -> None:
        """The old node dies holding its leases; they expire; a node with another id starts."""

        async def take_over() -> None:
            await self.harness.kill()
            for number in range(2):
                await self.client.delete(self.system.keys.lease("recorder", number))
            self.harness.node_id = f"node-{uuid.uuid4().hex[:6]}"

        self.portal.call(take_over)

    @rule(actor=st.sampled_from(ACTORS))
    def redeliver_a_handled_message(self, actor: str) -> None:
        """The transport delivers a message that was already handled (same message id)."""
        address = Address("recorder", actor)

        async def redeliver() -> None:
            handled = await self.client.xrevrange(self.system.keys.handled(address), count=1)
            if handled:
                envelope = handled[0][1][b"m"]
                await self.client.xadd(self.system.keys.inbox_of(address), {b"m": envelope})

        self.portal.call(redeliver)

    @rule()
    def delete_snapshots(self) -> None:
        async def delete() -> None:
            for number in range(2):
                await self.client.delete(self.system.keys.snapshots("recorder", number))

        self.portal.call(delete)

    @invariant()
    def recovered_state_equals_the_model(self) -> None:
        self._host_failure()

        async def check() -> None:
            await self.harness.ensure_running()
            for actor, seqs in self.model.items():
                address = Address("recorder", actor)

                async def caught_up(address: Address = address, seqs: list[int] = seqs) -> bool:
                    return (await self.system.state_of(address)).version >= len(seqs)

                await eventually(caught_up, timeout=20)
                view = await self.system.state_of(address)
                assert view.state.seqs == seqs, f"{actor}: {view.state.seqs} != {seqs}"
                assert view.version == len(seqs)

        self.portal.call(check)


def machine(
    client_factory: Callable[[], RedisClient], *, block_ms: int | None
) -> type[NodeGuarantees]:
    attributes = {"client_factory": staticmethod(client_factory), "block_ms": block_ms}
    return type("Machine", (NodeGuarantees,), attributes)


def test_guarantees_on_fakeredis() -> None:
    server = fakeredis.FakeServer()
    # fakeredis's blocking reads do not survive cancellation (a killed node): poll instead.
    run = machine(lambda: fakeredis.FakeAsyncRedis(server=server), block_ms=None)
    run.TestCase.settings = settings(
        max_examples=40,
        stateful_step_count=15,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    run.TestCase().runTest()


@pytest.mark.integration
def test_guarantees_on_the_real_server(redis_url: str) -> None:
    run = machine(lambda: create_client(redis_url), block_ms=20)
    run.TestCase.settings = settings(
        max_examples=25,
        stateful_step_count=12,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    run.TestCase().runTest()
