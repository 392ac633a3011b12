"""Actor systems for the replay tests, importable as MODULE:SYSTEM by the command line: a ledger,
and the same ledger with a deliberately changed withdraw handler (it charges a fee of 1)."""

import msgspec

from repertory.actors.model import Actor, Context, Rejected, applier, command
from repertory.runtime.system import ActorSystem
from repertory.schemas import schema

APP = "replaytest"


@schema("test.replay.deposit")
class Deposit(msgspec.Struct, frozen=True):
    amount: int


@schema("test.replay.withdraw")
class Withdraw(msgspec.Struct, frozen=True):
    amount: int


@schema("test.replay.stamp")
class Stamp(msgspec.Struct, frozen=True):
    pass


@schema("test.replay.deposited")
class Deposited(msgspec.Struct, frozen=True):
    amount: int


@schema("test.replay.stamped")
class Stamped(msgspec.Struct, frozen=True):
    at_ms: int
    message_id: str


@schema("test.replay.withdrawn")
class Withdrawn(msgspec.Struct, frozen=True):
    amount: int


@schema("test.replay.ledger")
class Ledger(msgspec.Struct, frozen=True):
    balance: int = 0
    entries: list[int] = []


class LedgerActor(Actor[Ledger]):
    kind = "ledger"
    initial = Ledger()
    snapshot_every = 2

    @command
    def deposit(self, state: Ledger, cmd: Deposit, ctx: Context) -> Deposited:
        if cmd.amount <= 0:
            raise Rejected("a deposit must be positive")
        return Deposited(cmd.amount)

    @command
    def stamp(self, state: Ledger, cmd: Stamp, ctx: Context) -> Stamped:
        # Reads the clock and the message id: a replay reproduces it only if it sees both as
        # they were when the message was handled.
        return Stamped(ctx.now_ms, ctx.message_id)

    @command
    def withdraw(self, state: Ledger, cmd: Withdraw, ctx: Context) -> Withdrawn:
        if cmd.amount > state.balance:
            raise Rejected(f"balance {state.balance} is less than {cmd.amount}")
        return Withdrawn(cmd.amount)

    @applier
    def deposited(self, state: Ledger, event: Deposited) -> Ledger:
        return Ledger(state.balance + event.amount, [*state.entries, event.amount])

    @applier
    def stamped(self, state: Ledger, event: Stamped) -> Ledger:
        return state

    @applier
    def withdrawn(self, state: Ledger, event: Withdrawn) -> Ledger:
        return Ledger(state.balance - event.amount, [*state.entries, -event.amount])


class LedgerWithFee(LedgerActor):
    """The changed code: a withdrawal now also takes a fee of 1."""

    @command
    def withdraw(self, state: Ledger, cmd: Withdraw, ctx: Context) -> Withdrawn:
        if cmd.amount > state.balance:
            raise Rejected(f"balance {state.balance} is less than {cmd.amount}")
        return Withdrawn(cmd.amount + 1)


system = ActorSystem(LedgerActor(), app=APP, partitions=4)
changed = ActorSystem(LedgerWithFee(), app=APP, partitions=4)
