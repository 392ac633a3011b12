"""repertory: an event-sourced actor runtime on Redis Streams.

The public API, layer by layer: schemas (envelopes, records, codecs), streams (client, event
store, inboxes, task queue, embedded server), actors (the programming model) and runtime (the
actor system, its nodes and workers).
"""

from importlib.metadata import PackageNotFoundError, version

from repertory.actors.model import (
    Actor,
    ActorDefinitionError,
    AskRejected,
    Context,
    Rejected,
    applier,
    command,
)
from repertory.runtime.node import Node, NodeConfig
from repertory.runtime.runner import serve
from repertory.runtime.system import (
    ActorSystem,
    ActorView,
    Answer,
    AskTimeoutError,
    UnknownKindError,
)
from repertory.runtime.worker import Worker, WorkerConfig
from repertory.schemas import (
    Codec,
    DecodeError,
    Envelope,
    EventRecord,
    Format,
    PayloadTooLargeError,
    RepertoryError,
    SnapshotRecord,
    UnknownTypeError,
    UnknownVersionError,
    UnregisteredTypeError,
    schema,
    upcaster,
)
from repertory.streams.client import ClientConfig, create_client
from repertory.streams.deadletters import DeadLetter, DeadLetters
from repertory.streams.embedded import EmbeddedServer, EmbeddedServerError
from repertory.streams.eventstore import ConflictError, EventStore, Snapshot, StoredEvent
from repertory.streams.keys import Address, KeyLayout
from repertory.streams.taskqueue import TaskQueue, TaskResult

try:
    __version__ = version("repertory")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = [
    "Actor",
    "ActorDefinitionError",
    "ActorSystem",
    "ActorView",
    "Address",
    "Answer",
    "AskRejected",
    "AskTimeoutError",
    "ClientConfig",
    "Codec",
    "ConflictError",
    "Context",
    "DeadLetter",
    "DeadLetters",
    "DecodeError",
    "EmbeddedServer",
    "EmbeddedServerError",
    "Envelope",
    "EventRecord",
    "EventStore",
    "Format",
    "KeyLayout",
    "Node",
    "NodeConfig",
    "PayloadTooLargeError",
    "Rejected",
    "RepertoryError",
    "Snapshot",
    "SnapshotRecord",
    "StoredEvent",
    "TaskQueue",
    "TaskResult",
    "UnknownKindError",
    "UnknownTypeError",
    "UnknownVersionError",
    "UnregisteredTypeError",
    "Worker",
    "WorkerConfig",
    "__version__",
    "applier",
    "command",
    "create_client",
    "schema",
    "serve",
    "upcaster",
]
