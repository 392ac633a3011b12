"""The test kit finds planted bugs and shrinks each to a schedule of a few steps; a seed gives
the same schedule and outcome twice; strategies respect the message types' constraints; the
fixtures give isolated and simulated systems."""

import functools
import subprocess
import sys
import time
from collections import Counter
from typing import Annotated, Any

import msgspec
import pytest
from hypothesis import given

from repertory.actors.model import Actor, Context, Rejected, applier, command
from repertory.runtime.system import ActorSystem
from repertory.runtime.testkit import (
    ActorMachine,
    Crash,
    GuaranteeViolation,
    InjectGarbage,
    Send,
    Simulation,
    envelopes,
    find_violation,
    malformed_bytes,
    messages,
    random_schedule,
    run_machine,
    simulate,
)
from repertory.runtime.testkit.simulation import wait_for
from repertory.schemas import Codec, DecodeError, schema
from repertory.streams.keys import Address

Amount = Annotated[int, msgspec.Meta(ge=1, le=100)]


@schema("test.kit.deposit")
class Deposit(msgspec.Struct, frozen=True):
    amount: Amount


@schema("test.kit.withdraw")
class Withdraw(msgspec.Struct, frozen=True):
    amount: Amount


@schema("test.kit.deposited")
class Deposited(msgspec.Struct, frozen=True):
    amount: int


@schema("test.kit.withdrawn")
class Withdrawn(msgspec.Struct, frozen=True):
    amount: int


@schema("test.kit.balance")
class Balance(msgspec.Struct, frozen=True):
    balance: int = 0


class Account(Actor[Balance]):
    kind = "account"
    initial = Balance()
    snapshot_every = 3

    @command
    def deposit(self, state: Balance, cmd: Deposit, ctx: Context) -> Deposited:
        return Deposited(cmd.amount)

    @command
    def withdraw(self, state: Balance, cmd: Withdraw, ctx: Context) -> Withdrawn:
        if cmd.amount > state.balance:
            raise Rejected("insufficient funds")
        return Withdrawn(cmd.amount)

    @applier
    def deposited(self, state: Balance, event: Deposited) -> Balance:
        return Balance(state.balance + event.amount)

    @applier
    def withdrawn(self, state: Balance, event: Withdrawn) -> Balance:
        return Balance(state.balance - event.amount)


def account_model(state: Balance, message: Deposit | Withdraw) -> Balance:
    if isinstance(message, Deposit):
        return Balance(state.balance + message.amount)
    if message.amount > state.balance:
        raise Rejected("insufficient funds")
    return Balance(state.balance - message.amount)


class AccountMachine(ActorMachine):
    actor = Account()

    def model(self, state: Balance, message: Deposit | Withdraw) -> Balance:
        return account_model(state, message)


def test_a_correct_actor_passes_every_fault() -> None:
    run_machine(AccountMachine)


# Planted bug 1: an external side effect in a handler, not idempotent under re-delivery.

CHARGED: Counter[str] = Counter()
"""What a payment gateway outside the event log was asked to charge, per account."""


class Wallet(Actor[Balance]):
    kind = "wallet"
    initial = Balance()

    @command
    def deposit(self, state: Balance, cmd: Deposit, ctx: Context) -> Deposited:
        CHARGED[ctx.address.id] += cmd.amount  # the bug: the gateway call has no idempotency key
        return Deposited(cmd.amount)

    @applier
    def deposited(self, state: Balance, event: Deposited) -> Balance:
        return Balance(state.balance + event.amount)


class WalletMachine(ActorMachine):
    actor = Wallet()

    def __init__(self) -> None:
        super().__init__()
        CHARGED.clear()

    def model(self, state: Balance, message: Deposit) -> Balance:
        return Balance(state.balance + message.amount)

    def check_effects(self) -> None:
        for actor_id in self.ids:
            balance = self.simulation.expected[actor_id].state.balance
            assert CHARGED[actor_id] == balance, f"charged {CHARGED[actor_id]} for {balance}"


def test_the_kit_finds_a_handler_that_is_not_idempotent_under_redelivery() -> None:
    violation = find_violation(WalletMachine)
    assert "check_effects: charged" in violation.detail
    assert len(violation.schedule) <= 2, violation


# Planted bug 2: an applier that reads the wall clock.


@schema("test.kit.touch")
class Touch(msgspec.Struct, frozen=True):
    pass


@schema("test.kit.touched")
class Touched(msgspec.Struct, frozen=True):
    at: int


@schema("test.kit.presence")
class Presence(msgspec.Struct, frozen=True):
    last_seen: int = 0
    visits: int = 0


class Visitor(Actor[Presence]):
    kind = "visitor"
    initial = Presence()

    @command
    def touch(self, state: Presence, cmd: Touch, ctx: Context) -> Touched:
        return Touched(ctx.now_ms)

    @applier
    def touched(self, state: Presence, event: Touched) -> Presence:
        # The bug: the time of folding, not the time recorded in the event.
        return Presence(time.time_ns() // 1_000_000, state.visits + 1)


class VisitorMachine(ActorMachine):
    actor = Visitor()

    def model(self, state: Presence, message: Touch) -> Presence:
        return Presence(self.now_ms, state.visits + 1)


def test_the_kit_finds_an_applier_that_depends_on_the_wall_clock() -> None:
    violation = find_violation(VisitorMachine)
    assert "state Presence(last_seen=" in violation.detail
    assert len(violation.schedule) <= 2, violation


# Planted bug 3: the model and the actor disagree (the model forgot the overdraft rule).


class LenientModelMachine(AccountMachine):
    def model(self, state: Balance, message: Deposit | Withdraw) -> Balance:
        delta = message.amount if isinstance(message, Deposit) else -message.amount
        return Balance(state.balance + delta)


@functools.cache
def lenient_model_violation() -> GuaranteeViolation:
    return find_violation(LenientModelMachine)


def test_the_kit_finds_a_model_mismatch_and_shrinks_it() -> None:
    violation = lenient_model_violation()
    assert "!= model Balance(balance=-1)" in violation.detail
    # One withdrawal from an empty account, the simplest counterexample there is.
    assert len(violation.schedule) == 1, violation
    assert "Withdraw(amount=1)" in repr(violation.schedule[0])


def test_a_printed_failure_replays() -> None:
    violation = lenient_model_violation()
    with pytest.raises(GuaranteeViolation) as replayed:
        LenientModelMachine.replay(seed=violation.seed, schedule=violation.schedule)
    assert replayed.value.detail == violation.detail
    assert f"LenientModelMachine.replay(seed={violation.seed}" in str(violation)


# Determinism: the seeded scheduler.


def test_one_seed_gives_the_same_schedule_and_outcome_twice() -> None:
    assert random_schedule(7, Account(), steps=12) == random_schedule(7, Account(), steps=12)
    assert random_schedule(7, Account(), steps=12) != random_schedule(8, Account(), steps=12)
    first = simulate(Account(), account_model, seed=7, steps=12)
    second = simulate(Account(), account_model, seed=7, steps=12)
    assert first == second
    assert len(first.schedule) == 12
    assert sum(first.faults.values()) > 0


# Strategies.


@given(message=messages(Account()))
def test_messages_satisfy_their_types_constraints(message: msgspec.Struct) -> None:
    assert isinstance(message, Deposit | Withdraw)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(message), type=type(message)) == message


@given(envelope=envelopes(Account()))
def test_envelopes_decode_to_the_message_they_carry(envelope: Any) -> None:
    codec = Codec()
    decoded = codec.decode_envelope(codec.encode(envelope))
    assert Address.parse(decoded.target).kind == "account"
    assert isinstance(codec.message_of(decoded), Deposit | Withdraw)


@given(data=malformed_bytes(Account()))
def test_malformed_bytes_never_decode_to_a_message(data: bytes) -> None:
    codec = Codec()
    with pytest.raises(DecodeError):
        codec.message_of(codec.decode_envelope(data))


# Fixtures.


@schema("test.kit.remind")
class Remind(msgspec.Struct, frozen=True):
    pass


@schema("test.kit.reminded")
class Reminded(msgspec.Struct, frozen=True):
    at: int


@schema("test.kit.reminders")
class Reminders(msgspec.Struct, frozen=True):
    fired: list[int] = []


@schema("test.kit.set-reminder")
class SetReminder(msgspec.Struct, frozen=True):
    after_s: Annotated[int, msgspec.Meta(ge=1)]


class Alarm(Actor[Reminders]):
    kind = "alarm"
    initial = Reminders()

    @command
    def set_reminder(self, state: Reminders, cmd: SetReminder, ctx: Context) -> None:
        ctx.schedule(cmd.after_s, Remind())

    @command
    def remind(self, state: Reminders, cmd: Remind, ctx: Context) -> Reminded:
        return Reminded(ctx.now_ms)

    @applier
    def reminded(self, state: Reminders, event: Reminded) -> Reminders:
        return Reminders([*state.fired, event.at])


@pytest.mark.anyio
async def test_the_simulated_clock_drives_timers(simulated_system: Any) -> None:
    simulation: Simulation
    async with simulated_system(Alarm(), seed=3) as simulation:
        start = simulation.clock.now_ms()
        await simulation.send("a", SetReminder(60))
        await simulation.settle()
        await simulation.apply(Crash("a", SetReminder(3600), "after-commit"))
        await simulation.settle()
        assert (await simulation.system.state_of("alarm/a")).state.fired == []  # type: ignore[union-attr]

        await simulation.pass_time(60_000)

        async def fired() -> bool:
            view = await simulation.system.state_of("alarm/a")  # type: ignore[union-attr]
            return bool(view.state.fired)

        assert await wait_for(fired, timeout=10)
        view = await simulation.system.state_of("alarm/a")  # type: ignore[union-attr]
        assert view.state.fired == [start + 60_000]


@pytest.mark.anyio
async def test_garbage_in_an_inbox_is_dead_lettered_and_the_node_serves_on(
    simulated_system: Any,
) -> None:
    async with simulated_system(Account(), account_model, seed=1) as simulation:
        await simulation.apply(InjectGarbage("a", b"\x00not an envelope"))
        await simulation.apply(Send("a", Deposit(5)))
        await simulation.check()
        assert (await simulation.system.state_of("account/a")).state == Balance(5)


@pytest.fixture
def repertory_actors() -> tuple[Actor[Any], ...]:
    return (Account(),)


@pytest.mark.anyio
@pytest.mark.integration
async def test_isolated_systems_have_their_own_namespace(
    isolated_system: ActorSystem, actor_system_factory: Any
) -> None:
    other: ActorSystem = actor_system_factory(Account())
    assert isolated_system.keys.app != other.keys.app
    async with isolated_system, other:
        await isolated_system.send("account/a", Deposit(3))
        assert (
            await isolated_system.client.xlen(
                isolated_system.keys.inbox_of(Address("account", "a"))
            )
            == 1
        )
        assert await other.client.xlen(other.keys.inbox_of(Address("account", "a"))) == 0


def test_importing_repertory_imports_neither_pytest_nor_hypothesis() -> None:
    code = "import repertory, sys; print(sorted({'pytest', 'hypothesis'} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
