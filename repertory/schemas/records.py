"""The three records that repertory writes to Redis: message envelopes, events, snapshots.

Each record names its payload's type and schema version and keeps the payload as
`msgspec.Raw` (the payload's encoded bytes, untouched), so a record always decodes even when
its payload's type is unknown here: the intact record can then be dead-lettered with a reason.
"""

import os
import time
from typing import Annotated

import msgspec

MSGPACK_CONTENT_TYPE = "application/msgpack"
JSON_CONTENT_TYPE = "application/json"

SchemaVersion = Annotated[int, msgspec.Meta(ge=1)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]


# gc=False: records hold only strings, ints and bytes, so they can never be part of a
# reference cycle, and untracked structs make decoding long event streams cheaper.
class Envelope(msgspec.Struct, kw_only=True, omit_defaults=True, frozen=True, gc=False):
    """A message on its way to an actor."""

    id: str
    """The message id (a UUID unless the sender chose one); dedupe falls back to it."""
    type: str
    """The registered name of the payload's type."""
    schema_version: SchemaVersion
    """The schema version the payload was written with."""
    target: str
    """The receiving actor's address, ``kind/id``."""
    payload: msgspec.Raw
    """The message, encoded in the record's format."""
    created_at: NonNegative
    """When the message was created, unix milliseconds."""
    idempotency_key: str | None = None
    """Sends sharing a key take effect once."""
    sender: str | None = None
    """The sending actor's address, if an actor sent it."""
    correlation_id: str | None = None
    """The id shared by every message and event of one conversation."""
    causation_id: str | None = None
    """The id of the message that caused this one."""
    traceparent: str | None = None
    """W3C trace context of the send."""
    reply_to: str | None = None
    """The stream a caller waits on for the answer (``ask``)."""
    content_type: str = MSGPACK_CONTENT_TYPE
    """The payload's encoding."""
    attempt: NonNegative = 0
    """How often delivery was tried before; bookkeeping, not part of the message's identity."""


class EventRecord(msgspec.Struct, kw_only=True, omit_defaults=True, frozen=True, gc=False):
    """One event in an actor's event stream. Its version is the stream entry id."""

    type: str
    schema_version: SchemaVersion
    payload: msgspec.Raw
    recorded_at: NonNegative
    """When the event was committed, unix milliseconds."""
    causation_id: str | None = None
    """The id of the message whose handling produced the event."""
    correlation_id: str | None = None
    traceparent: str | None = None
    content_type: str = MSGPACK_CONTENT_TYPE


class SnapshotRecord(msgspec.Struct, kw_only=True, omit_defaults=True, frozen=True, gc=False):
    """An actor's state folded up to `version`; only ever a shortcut over its events."""

    type: str
    schema_version: SchemaVersion
    version: NonNegative
    """The actor version (number of events) the state includes."""
    taken_at: NonNegative
    """When the snapshot was taken, unix milliseconds."""
    payload: msgspec.Raw
    content_type: str = MSGPACK_CONTENT_TYPE


def new_message_id() -> str:
    """A fresh random message id: a version-4 UUID, as `str(uuid.uuid4())` writes it, made
    from 16 random bytes directly (1 µs against 2.5-3.8 µs, and every send makes one)."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    hexed = raw.hex()
    return f"{hexed[:8]}-{hexed[8:12]}-{hexed[12:16]}-{hexed[16:20]}-{hexed[20:]}"


def now_ms() -> int:
    """The wall-clock time in unix milliseconds."""
    return time.time_ns() // 1_000_000
