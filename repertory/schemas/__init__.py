"""Envelopes, records, the type registry and the codecs (the lowest layer)."""

from repertory.schemas.codec import Codec, Format
from repertory.schemas.errors import (
    DecodeError,
    PayloadTooLargeError,
    RegistrationError,
    RepertoryError,
    UnknownTypeError,
    UnknownVersionError,
    UnregisteredTypeError,
)
from repertory.schemas.records import (
    Envelope,
    EventRecord,
    SnapshotRecord,
    new_message_id,
    now_ms,
)
from repertory.schemas.registry import TypeInfo, TypeRegistry, registry, schema, upcaster

__all__ = [
    "Codec",
    "DecodeError",
    "Envelope",
    "EventRecord",
    "Format",
    "PayloadTooLargeError",
    "RegistrationError",
    "RepertoryError",
    "SnapshotRecord",
    "TypeInfo",
    "TypeRegistry",
    "UnknownTypeError",
    "UnknownVersionError",
    "UnregisteredTypeError",
    "new_message_id",
    "now_ms",
    "registry",
    "schema",
    "upcaster",
]
