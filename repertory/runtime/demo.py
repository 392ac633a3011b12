"""`repertory demo`: a bank account actor run by a real node on the embedded server.

Commands go in through `ask` and `send`, one is refused, one is sent twice with the same
idempotency key (and takes effect once); then the account's log is printed as a table and its
state rebuilt from it. `repertory run repertory.runtime.demo:system` serves the same actors.
"""

import uuid
from pathlib import Path

import anyio
import msgspec
from rich.console import Console
from rich.table import Table

from repertory.actors.model import Actor, Context, Rejected, applier, command
from repertory.runtime import eventloop
from repertory.runtime.node import Node
from repertory.runtime.system import ActorSystem
from repertory.schemas import schema
from repertory.streams.embedded import EmbeddedServer
from repertory.streams.keys import Address


@schema("demo.account.deposit")
class Deposit(msgspec.Struct, frozen=True):
    amount: int


@schema("demo.account.withdraw")
class Withdraw(msgspec.Struct, frozen=True):
    amount: int


@schema("demo.account.deposited")
class Deposited(msgspec.Struct, frozen=True):
    amount: int


@schema("demo.account.withdrawn")
class Withdrawn(msgspec.Struct, frozen=True):
    amount: int


@schema("demo.account.balance")
class Balance(msgspec.Struct, frozen=True):
    balance: int = 0
    transactions: int = 0


class Account(Actor[Balance]):
    kind = "account"
    initial = Balance()
    snapshot_every = 3

    @command
    def deposit(self, state: Balance, cmd: Deposit, ctx: Context) -> Deposited:
        if cmd.amount <= 0:
            raise Rejected("a deposit must be positive", code="invalid-amount")
        return Deposited(cmd.amount)

    @command
    def withdraw(self, state: Balance, cmd: Withdraw, ctx: Context) -> Withdrawn:
        if cmd.amount > state.balance:
            raise Rejected(f"balance {state.balance} is less than {cmd.amount}", code="funds")
        return Withdrawn(cmd.amount)

    @applier
    def deposited(self, state: Balance, event: Deposited) -> Balance:
        return Balance(state.balance + event.amount, state.transactions + 1)

    @applier
    def withdrawn(self, state: Balance, event: Withdrawn) -> Balance:
        return Balance(state.balance - event.amount, state.transactions + 1)


system = ActorSystem(Account(), app="demo", partitions=4)


async def _run(system: ActorSystem, console: Console) -> None:
    account = Address("account", f"ada-{uuid.uuid4().hex[:6]}")
    async with system, anyio.create_task_group() as group:
        node = Node(system)
        await group.start(node.run)
        console.print(f"node {node.node_id} serving {account.kind}; account {account}")

        for amount in (100, 45):
            answer = await system.ask(account, Deposit(amount))
            console.print(f"deposit {amount}: committed at v{answer.version}")
        try:
            await system.ask(account, Withdraw(500))
        except Rejected as refusal:
            console.print(f"withdraw 500: refused ({refusal.code}: {refusal.reason})")
        key = f"transfer-{uuid.uuid4()}"
        for _ in range(2):
            await system.send(account, Withdraw(30), idempotency_key=key)
        console.print("withdraw 30: sent twice with one idempotency key")
        answer = await system.ask(account, Deposit(5))
        console.print(f"deposit 5: committed at v{answer.version}")

        table = Table(title=f"the log of {account}")
        for column in ("version", "event", "payload", "caused by message"):
            table.add_column(column)
        async for stored in system.store.read(account):
            table.add_row(
                str(stored.version),
                stored.record.type,
                msgspec.json.encode(stored.event).decode(),
                stored.record.causation_id or "",
            )
        console.print(table)
        view = await system.state_of(account)
        console.print(f"state rebuilt from the log: v{view.version} {view.state}")
        node.stop()
        await node.stopped.wait()
    if view.state != Balance(120, 4):
        raise SystemExit(f"expected Balance(balance=120, transactions=4), got {view.state}")


def run_demo(url: str | None, data_dir: Path) -> None:
    console = Console()
    if url is not None:
        eventloop.run(_run, ActorSystem(Account(), url=url, app="demo", partitions=4), console)
        return
    # The log stays in data_dir (AOF) for `repertory replay`; the server is stopped again only
    # if this run started it, so no process outlives the demo.
    with EmbeddedServer(data_dir) as server:
        console.print(f"embedded valkey-server at {server.url} (data in {data_dir})")
        demo_system = ActorSystem(Account(), url=server.url, app="demo", partitions=4)
        eventloop.run(_run, demo_system, console)
