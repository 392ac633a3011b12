"""An actor system for the `repertory run` tests: each message takes half a second to handle,
so a SIGTERM arrives while messages are in flight."""

import anyio
import msgspec

from repertory.actors.model import Actor, Context, applier, command
from repertory.runtime.system import ActorSystem
from repertory.schemas import schema


@schema("test.sleepy.nap")
class Nap(msgspec.Struct, frozen=True):
    seconds: float


@schema("test.sleepy.napped")
class Napped(msgspec.Struct, frozen=True):
    seconds: float


@schema("test.sleepy.naps")
class Naps(msgspec.Struct, frozen=True):
    count: int = 0


class Sleeper(Actor[Naps]):
    kind = "sleeper"
    initial = Naps()

    @command
    async def nap(self, state: Naps, cmd: Nap, ctx: Context) -> Napped:
        await anyio.sleep(cmd.seconds)
        return Napped(cmd.seconds)

    @applier
    def napped(self, state: Naps, event: Napped) -> Naps:
        return Naps(state.count + 1)


system = ActorSystem(Sleeper(), app="sleepy", partitions=2)
