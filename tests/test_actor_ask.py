"""Request/reply between actors (`Context.ask`): the reply, a refusal and a timeout each come
back as a durable message, on fakeredis and on the real embedded server."""

from collections.abc import AsyncIterator

import anyio
import msgspec
import pytest

from repertory.actors.model import Actor, AskRejected, Context, Rejected, applier, command
from repertory.runtime.node import Node, NodeConfig
from repertory.runtime.system import ActorSystem
from repertory.schemas import schema
from repertory.streams.client import RedisClient
from repertory.streams.keys import Address
from tests.support import eventually

pytestmark = pytest.mark.anyio


@schema("test.ask.buy")
class Buy(msgspec.Struct, frozen=True):
    price: int
    bank: str = "bank/main"


@schema("test.ask.charge")
class Charge(msgspec.Struct, frozen=True):
    amount: int


@schema("test.ask.charged")
class Charged(msgspec.Struct, frozen=True):
    amount: int


@schema("test.ask.charge-timed-out")
class ChargeTimedOut(msgspec.Struct, frozen=True):
    request_id: str


@schema("test.ask.outcome")
class Outcome(msgspec.Struct, frozen=True):
    request_id: str
    result: str


@schema("test.ask.requested")
class Requested(msgspec.Struct, frozen=True):
    request_id: str


@schema("test.ask.orders")
class Orders(msgspec.Struct, frozen=True):
    open: list[str] = []
    outcomes: dict[str, str] = {}


@schema("test.ask.funds")
class Funds(msgspec.Struct, frozen=True):
    left: int = 100


class Shop(Actor[Orders]):
    kind = "shop"
    initial = Orders()

    @command
    def buy(self, state: Orders, cmd: Buy, ctx: Context) -> Requested:
        request_id = ctx.ask(cmd.bank, Charge(cmd.price), timeout_s=0.5, on_timeout=ChargeTimedOut)
        return Requested(request_id)

    @command
    def charged(self, state: Orders, reply: Charged, ctx: Context) -> Outcome | None:
        return self._settle(state, ctx.causation_id, f"charged {reply.amount}")

    @command
    def refused(self, state: Orders, reply: AskRejected, ctx: Context) -> Outcome | None:
        return self._settle(state, reply.request_id, f"refused: {reply.code}")

    @command
    def timed_out(self, state: Orders, timeout: ChargeTimedOut, ctx: Context) -> Outcome | None:
        return self._settle(state, timeout.request_id, "timed out")

    @staticmethod
    def _settle(state: Orders, request_id: str | None, result: str) -> Outcome | None:
        # The timeout arrives whatever happened: only the first answer to a request counts.
        if request_id is None or request_id not in state.open:
            return None
        return Outcome(request_id, result)

    @applier
    def requested(self, state: Orders, event: Requested) -> Orders:
        return Orders([*state.open, event.request_id], state.outcomes)

    @applier
    def settled(self, state: Orders, event: Outcome) -> Orders:
        open_ = [r for r in state.open if r != event.request_id]
        return Orders(open_, {**state.outcomes, event.request_id: event.result})


class Bank(Actor[Funds]):
    kind = "bank"
    initial = Funds()

    @command
    def charge(self, state: Funds, cmd: Charge, ctx: Context) -> Charged | None:
        if cmd.amount == 0:
            return None  # never answers: the asker's timeout decides
        if cmd.amount > state.left:
            raise Rejected("not enough funds", code="funds")
        ctx.reply(Charged(cmd.amount))
        return Charged(cmd.amount)

    @applier
    def charged(self, state: Funds, event: Charged) -> Funds:
        return Funds(state.left - event.amount)


@pytest.fixture
async def system(redis: RedisClient) -> AsyncIterator[ActorSystem]:
    async with ActorSystem(Shop(), Bank(), partitions=2, client=redis) as connected:
        node = Node(connected, NodeConfig(block_ms=50, retry_base_s=0.01, lease_ttl_ms=2000))
        async with anyio.create_task_group() as group:
            await group.start(node.run)
            yield connected
            node.stop()


async def outcomes_of(system: ActorSystem, shop: str) -> list[str]:
    state: Orders = (await system.state_of(shop)).state
    return sorted(state.outcomes.values())


async def test_a_reply_a_refusal_and_a_timeout_each_reach_the_asker(system: ActorSystem) -> None:
    for price in (30, 500, 0):
        await system.send("shop/s1", Buy(price))

    async def all_settled() -> bool:
        return len(await outcomes_of(system, "shop/s1")) == 3

    await eventually(all_settled)
    assert await outcomes_of(system, "shop/s1") == [
        "charged 30",
        "refused: funds",
        "timed out",
    ]
    assert (await system.state_of("bank/main")).state == Funds(70)

    # The timeouts of the answered requests arrive too, and change nothing.
    handled = system.keys.handled(Address("shop", "s1"))

    async def every_message_handled() -> bool:
        # 3 purchases, a reply, a refusal and 3 timeouts.
        return int(await system.client.xlen(handled)) == 8

    await eventually(every_message_handled)
    assert await outcomes_of(system, "shop/s1") == ["charged 30", "refused: funds", "timed out"]
    assert (await system.state_of("shop/s1")).state.open == []
