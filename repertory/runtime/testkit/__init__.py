"""The test kit: pytest fixtures, hypothesis strategies for actors' messages, and a
fault-injecting simulation with a stateful test base (`ActorMachine`).

Importing `repertory` does not import this package (nor pytest or hypothesis); pytest loads
`repertory.runtime.testkit.plugin` through the `pytest11` entry point.
"""

from repertory.runtime.testkit.machine import (
    ALL_FAULTS,
    ActorMachine,
    find_violation,
    machine_settings,
    run_machine,
)
from repertory.runtime.testkit.simulation import (
    CRASH_POINTS,
    STATS,
    AdvanceClock,
    Crash,
    DeleteSnapshots,
    DuplicateSend,
    ExpireLeases,
    GuaranteeViolation,
    InjectGarbage,
    KillDuringBurst,
    Outcome,
    Pause,
    Redeliver,
    Restart,
    Send,
    SimulatedClock,
    SimulatedCrash,
    Simulation,
    Step,
    random_schedule,
    replay,
    run_schedule,
    simulate,
)
from repertory.runtime.testkit.strategies import (
    envelopes,
    malformed_bytes,
    messages,
    sample_message,
    structs,
)

__all__ = [
    "ALL_FAULTS",
    "CRASH_POINTS",
    "STATS",
    "ActorMachine",
    "AdvanceClock",
    "Crash",
    "DeleteSnapshots",
    "DuplicateSend",
    "ExpireLeases",
    "GuaranteeViolation",
    "InjectGarbage",
    "KillDuringBurst",
    "Outcome",
    "Pause",
    "Redeliver",
    "Restart",
    "Send",
    "SimulatedClock",
    "SimulatedCrash",
    "Simulation",
    "Step",
    "envelopes",
    "find_violation",
    "machine_settings",
    "malformed_bytes",
    "messages",
    "random_schedule",
    "replay",
    "run_machine",
    "run_schedule",
    "sample_message",
    "simulate",
    "structs",
]
