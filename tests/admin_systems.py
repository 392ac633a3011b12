"""Actor systems for the admin tests, importable as MODULE:SYSTEM by the command line.

- `system`: a wallet whose `charge` handler fails while `BROKEN["charge"]` is set (its
  messages are dead-lettered after two attempts; requeued once the handler is fixed);
- `old_tallies` / `tallies`: the same tally kind written by old code (event and state at
  schema version 1) and read by today's code (version 2, with upcasters), in registries of
  their own, for migrations.
"""

from typing import Any

import msgspec

from repertory.actors.model import Actor, Context, applier, command
from repertory.runtime.system import ActorSystem
from repertory.schemas import Codec, TypeRegistry, schema

APP = "admintest"
BROKEN = {"charge": True}


@schema("test.admin.charge")
class Charge(msgspec.Struct, frozen=True):
    amount: int


@schema("test.admin.charged")
class Charged(msgspec.Struct, frozen=True):
    amount: int


@schema("test.admin.wallet")
class Wallet(msgspec.Struct, frozen=True):
    spent: int = 0
    charges: int = 0


class WalletActor(Actor[Wallet]):
    kind = "wallet"
    initial = Wallet()
    max_deliveries = 2

    @command
    def charge(self, state: Wallet, cmd: Charge, ctx: Context) -> Charged:
        if BROKEN["charge"]:
            raise RuntimeError("the payment provider is down")
        return Charged(cmd.amount)

    @applier
    def charged(self, state: Wallet, event: Charged) -> Wallet:
        return Wallet(state.spent + event.amount, state.charges + 1)


system = ActorSystem(WalletActor(), app=APP, partitions=2)

# Migrations: the same wire names at two schema versions.

MIGRATE_APP = "migratetest"
OLD = TypeRegistry()
NEW = TypeRegistry()


@OLD.register("test.migrate.added", 1)
class AddedV1(msgspec.Struct, frozen=True):
    amount: int


@OLD.register("test.migrate.tally", 1)
class TallyV1(msgspec.Struct, frozen=True):
    total: int = 0


class OldTally(Actor[TallyV1]):
    kind = "tally"
    initial = TallyV1()
    snapshot_every = 2

    @applier
    def added(self, state: TallyV1, event: AddedV1) -> TallyV1:
        return TallyV1(state.total + event.amount)


@NEW.register("test.migrate.added", 2)
class Added(msgspec.Struct, frozen=True):
    cents: int
    note: str = ""


@NEW.register("test.migrate.tally", 2)
class Tally(msgspec.Struct, frozen=True):
    total_cents: int = 0


@NEW.upcaster("test.migrate.added", 1)
def added_v1(data: dict[str, Any]) -> dict[str, Any]:
    return {"cents": data["amount"] * 100, "note": "migrated"}


@NEW.upcaster("test.migrate.tally", 1)
def tally_v1(data: dict[str, Any]) -> dict[str, Any]:
    return {"total_cents": data["total"] * 100}


class TallyActor(Actor[Tally]):
    kind = "tally"
    initial = Tally()
    snapshot_every = 2

    @applier
    def added(self, state: Tally, event: Added) -> Tally:
        return Tally(state.total_cents + event.cents)


old_tallies = ActorSystem(OldTally(), app=MIGRATE_APP, partitions=2, codec=Codec(OLD))
tallies = ActorSystem(TallyActor(), app=MIGRATE_APP, partitions=2, codec=Codec(NEW))
