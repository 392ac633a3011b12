"""Many nodes on one simulated clock (G4, G6): hypothesis has nodes join, leave, crash, pause
and resume in random order while counter actors in every partition get messages; time passes
only when a rule says so, and leases and memberships lapse on the simulated clock.

At every step no two nodes commit for one partition: each commit carries the epoch its node
took, and no commit runs with an epoch older than one another node had taken before it (so a
node resumed after others took its partitions commits nothing); see the kit's `Ledger`. At the
end, with every node resumed and time gone by, every acknowledged send is handled exactly once
in effect: each counter's handled messages are those sent, in order, and its count their sum.
"""

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule

from repertory.runtime.testkit import (
    RunningNode,
    Simulation,
    SimulationMachine,
    run_machine,
)
from repertory.runtime.testkit.simulation import wait_for
from tests.counter_system import Add, Added, Count, Counter

ACTORS = tuple(f"c{number}" for number in range(8))  # two per partition
PARTITIONS = 4
MAX_NODES = 4
TTL_MS = 3000  # the simulation's lease TTL


def counter_model(state: Count, message: Add) -> tuple[Count, list[Added]]:
    return Count(state.total + message.amount), [Added(message.amount)]


def _node_ids(which: str) -> st.SearchStrategy[str]:
    return st.runner().flatmap(
        lambda machine: st.sampled_from([running.node_id for running in machine.nodes(which)])
    )


class ManyNodes(SimulationMachine):
    def make_simulation(self, seed: int) -> Simulation:
        return Simulation(
            Counter(),
            counter_model,
            ids=ACTORS,
            seed=seed,
            partitions=PARTITIONS,
        )

    def nodes(self, which: str) -> list[RunningNode]:
        """The nodes still up, all of them or those `running` or `paused`."""
        up = [running for running in self.simulation.nodes if not running.dead.is_set()]
        if which == "running":
            return [running for running in up if not running.paused]
        if which == "paused":
            return [running for running in up if running.paused]
        return up

    def node(self, node_id: str) -> RunningNode:
        (running,) = [running for running in self.nodes("up") if running.node_id == node_id]
        return running

    @initialize(seed=st.integers(0, 2**32 - 1), nodes=st.integers(1, MAX_NODES))
    def start(self, seed: int, nodes: int = 1) -> None:
        super().start(seed)
        for _ in range(nodes - 1):
            self.join()

    @precondition(lambda self: len(self.nodes("up")) < MAX_NODES)
    @rule()
    def join(self) -> None:
        self.call(self.simulation.start_node)

    @precondition(lambda self: self.nodes("running"))
    @rule(node=_node_ids("running"))
    def leave(self, node: str) -> None:
        self.call(lambda: self.simulation.stop_node(self.node(node)))

    @precondition(lambda self: self.nodes("up"))
    @rule(node=_node_ids("up"))
    def crash(self, node: str) -> None:
        self.call(lambda: self.simulation.kill(self.node(node)))

    @precondition(lambda self: self.nodes("running"))
    @rule(node=_node_ids("running"))
    def pause(self, node: str) -> None:
        self.call(lambda: self.simulation.pause(self.node(node)))

    @precondition(lambda self: self.nodes("paused"))
    @rule(node=_node_ids("paused"))
    def resume(self, node: str) -> None:
        self.call(lambda: self.simulation.resume(self.node(node)))

    @rule(ms=st.sampled_from([TTL_MS // 6, TTL_MS // 2, TTL_MS, 2 * TTL_MS]))
    def pass_time(self, ms: int) -> None:
        self.call(lambda: self.simulation.pass_time(ms))

    @rule(
        sends=st.lists(
            st.tuples(st.sampled_from(ACTORS), st.integers(1, 5)), min_size=1, max_size=8
        )
    )
    def send(self, sends: list[tuple[str, int]]) -> None:
        async def send_all() -> None:
            for actor, amount in sends:
                await self.simulation.send(actor, Add(amount))

        self.call(send_all)

    @invariant()
    def one_writer_per_partition(self) -> None:
        self.call(self.simulation.check_single_writer)

    def teardown(self) -> None:
        try:
            if self._simulation is not None and not self.failed:
                self.call(self._everything_handled_once)
        finally:
            super().teardown()

    async def _everything_handled_once(self) -> None:
        simulation = self.simulation
        if not self.nodes("running"):
            await simulation.start_node()
        # The leases and memberships of dead and paused nodes lapse; the running nodes take
        # every partition over, and with it every message sent, also those the paused nodes
        # hold in hand.
        await simulation.pass_time(3 * TTL_MS)
        await simulation.check()
        # The paused nodes wake up late; they commit nothing, and rejoin.
        for running in self.nodes("paused"):
            simulation.resume(running)
        await simulation.pass_time(3 * TTL_MS)
        await simulation.check()


def test_nodes_joining_leaving_crashing_and_pausing_never_share_a_partition() -> None:
    run_machine(ManyNodes)


@pytest.mark.anyio
async def test_a_node_paused_past_its_lease_reads_nothing_once_it_wakes() -> None:
    """Messages sent after another node took the paused node's partitions over are the new
    owner's: the paused node, woken, must not take them into its pending list, where nobody
    would claim them (it reads only while its lease surely holds)."""
    async with Simulation(Counter(), counter_model, ids=ACTORS, partitions=PARTITIONS) as sim:
        paused = sim.main
        sim.pause(paused)
        await sim.start_node()
        await sim.pass_time(2 * TTL_MS)
        system = sim.system
        assert system is not None
        for actor in ACTORS:
            await sim.send(actor, Add(1))
            # One message at a time, so that each is a new chance to go to the wrong reader.
            number = system.keys.partition_of(sim.address(actor))

            async def read_by_a_node(number: int = number) -> bool:
                return await system.partition("counter", number).inbox.lag() == 0

            assert await wait_for(read_by_a_node, timeout=10)
        sim.resume(paused)
        await sim.check()
        await sim.pass_time(2 * TTL_MS)
        await sim.check()
