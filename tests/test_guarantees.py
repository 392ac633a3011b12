"""G1-G5 and G8 with the test kit: `ActorMachine` drives a real node and a pure model with the
same random schedule of sends, duplicate sends, transport re-deliveries, crashes at chosen
points of handling (before the handler, after it, before the commit, after it) and at arbitrary
await points, graceful restarts, lease expiry and takeover, a paused node that must be fenced,
snapshot deletion, simulated time and undecodable inbox entries.

After every step the node is recovered (restarted if it died) and, once it has caught up, every
acknowledged send has been handled exactly once in effect, in send order per actor, and the
state and events rebuilt from the log equal the model's.
"""

import msgspec
import pytest

from repertory.actors.model import Actor, Context, applier, command
from repertory.runtime.testkit import ActorMachine, run_machine
from repertory.schemas import schema


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


class RecorderGuarantees(ActorMachine):
    actor = Recorder()

    def model(self, state: Log, message: Append) -> tuple[Log, list[Appended]]:
        return Log([*state.seqs, message.seq]), [Appended(message.seq)]


def test_guarantees_on_fakeredis() -> None:
    run_machine(RecorderGuarantees)


@pytest.mark.integration
def test_guarantees_on_the_real_server(redis_url: str) -> None:
    run_machine(RecorderGuarantees, url=redis_url)
