"""Counter actors for the multi-process tests: the final count of each must equal the sends
acknowledged to it, whatever nodes crashed meanwhile."""

import msgspec

from repertory.actors.model import Actor, Context, applier, command
from repertory.runtime.system import ActorSystem
from repertory.schemas import schema


@schema("test.counter.add")
class Add(msgspec.Struct, frozen=True):
    amount: int = 1


@schema("test.counter.added")
class Added(msgspec.Struct, frozen=True):
    amount: int


@schema("test.counter.count")
class Count(msgspec.Struct, frozen=True):
    total: int = 0


class Counter(Actor[Count]):
    kind = "counter"
    initial = Count()

    @command
    def add(self, state: Count, cmd: Add, ctx: Context) -> Added:
        return Added(cmd.amount)

    @applier
    def added(self, state: Count, event: Added) -> Count:
        return Count(state.total + event.amount)


PARTITIONS = 6
system = ActorSystem(Counter(), app="counters", partitions=PARTITIONS)
