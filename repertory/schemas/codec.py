"""Encoding and decoding of records and their payloads, in MessagePack or JSON.

A codec writes in one format (MessagePack by default, JSON where humans or non-Python
clients read the stream) and reads both: the format of any record or payload is told by its
first byte. Every decode raises DecodeError (or a subclass) for bad input, never anything else.
"""

import enum
import functools
import operator
from collections.abc import Sequence
from typing import Any, Generic, Literal, TypeVar

import msgspec

from repertory.schemas.errors import DecodeError, PayloadTooLargeError, UnknownVersionError
from repertory.schemas.records import (
    JSON_CONTENT_TYPE,
    MSGPACK_CONTENT_TYPE,
    Envelope,
    EventRecord,
    SnapshotRecord,
    new_message_id,
    now_ms,
)
from repertory.schemas.registry import TypeInfo, TypeRegistry
from repertory.schemas.registry import registry as default_registry

R = TypeVar("R")
Record = Envelope | EventRecord | SnapshotRecord
Buffer = bytes | bytearray | memoryview | msgspec.Raw

DEFAULT_MAX_SIZE = 1_048_576

# JSON text starts with an object or an array, perhaps after whitespace. In MessagePack these
# bytes are positive fixints, which never begin an encoded record or payload (both are maps,
# which start with a byte >= 0x80); and no JSON text starts with a byte >= 0x80.
_JSON_LEAD_BYTES = frozenset(b"{[ \t\r\n")
# Literal subscripted with values known only at run time (mypy accepts only literals there).
_literal: Any = Literal


class Format(enum.StrEnum):
    """The encoding a codec writes."""

    MSGPACK = "msgpack"
    JSON = "json"

    @property
    def content_type(self) -> str:
        return JSON_CONTENT_TYPE if self is Format.JSON else MSGPACK_CONTENT_TYPE


def _first_byte(data: Buffer) -> int:
    return data[0] if isinstance(data, bytes) else memoryview(data)[0]


class _Decoders(Generic[R]):
    """The decoders of one type in both formats, and the one in the codec's own format."""

    __slots__ = ("json", "msgpack", "own")

    def __init__(self, target: type[R], own_format: Format) -> None:
        self.msgpack = msgspec.msgpack.Decoder(target)
        self.json = msgspec.json.Decoder(target)
        self.own: msgspec.msgpack.Decoder[R] | msgspec.json.Decoder[R] = (
            self.json if own_format is Format.JSON else self.msgpack
        )


class _PayloadDecoders(_Decoders[msgspec.Struct]):
    __slots__ = ("info", "version")

    def __init__(self, info: TypeInfo, own_format: Format) -> None:
        super().__init__(info.cls, own_format)
        self.info = info
        self.version = info.version


def _typed_record_decoder(
    types: Sequence[TypeInfo], own_format: Format
) -> msgspec.msgpack.Decoder[Any] | msgspec.json.Decoder[Any]:
    """A decoder of event records of `types` only, each at its current version, with the
    payload typed: EventRecord's fields and constraints, but `type` and `schema_version` fixed
    to one of `types` and the payload decoded as that type's class, all in one msgspec pass.
    Any other record (another type, an older version, a bad field) fails to decode."""
    # A union of structs needs a tag, and requires it; a lone tagged struct would not, so a
    # single type keeps `type` as a field that must equal its name.
    union = len(types) > 1
    shapes: list[Any] = []
    for info in types:
        fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
        for field in msgspec.structs.fields(EventRecord):
            kind: Any = {
                "type": _literal[info.name],
                "schema_version": _literal[info.version],
                "payload": info.cls,
            }.get(field.name, field.type)
            if field.name == "type" and union:
                continue  # the union's tag
            if field.required:
                fields.append((field.name, kind))
            else:
                fields.append((field.name, kind, field.default))
        tag = info.name if union else None
        tag_field = "type" if union else None
        shapes.append(
            msgspec.defstruct(
                "TypedEventRecord", fields, kw_only=True, gc=False, tag=tag, tag_field=tag_field
            )
        )
    target: Any = functools.reduce(operator.or_, shapes)
    if own_format is Format.JSON:
        return msgspec.json.Decoder(target)
    return msgspec.msgpack.Decoder(target)


def _parse_error(what: str, exc: Exception) -> DecodeError:
    if isinstance(exc, msgspec.ValidationError):
        return DecodeError(f"invalid {what}: {exc}", reason="invalid")
    detail = str(exc) if isinstance(exc, msgspec.DecodeError) else f"{type(exc).__name__}: {exc}"
    return DecodeError(f"malformed {what}: {detail}", reason="malformed")


_EVENT_RECORDS = _Decoders(EventRecord, Format.MSGPACK)


def decode_event_record(data: Buffer) -> EventRecord:
    """An event record from bytes in either format, with no size limit: for records that a
    codec has read already (`StoredEvent.record`). Raises DecodeError for anything else."""
    try:
        json = _first_byte(data) in _JSON_LEAD_BYTES
        return (_EVENT_RECORDS.json if json else _EVENT_RECORDS.msgpack).decode(data)
    except Exception as exc:
        raise _parse_error("event record", exc) from exc


class Codec:
    """Builds records from registered msgspec Structs, encodes them, and decodes them back.

    `format` is what this codec writes; it reads records and payloads in either format.
    Encoded records and payloads larger than `max_size` bytes are refused both ways.
    """

    def __init__(
        self,
        registry: TypeRegistry = default_registry,
        format: Format = Format.MSGPACK,
        max_size: int = DEFAULT_MAX_SIZE,
    ) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        self.registry = registry
        self.format = Format(format)
        self.max_size = max_size
        self.content_type = self.format.content_type
        self._msgpack_encoder = msgspec.msgpack.Encoder()
        self._json_encoder = msgspec.json.Encoder()
        self._encoder = self._json_encoder if self.format is Format.JSON else self._msgpack_encoder
        self._envelopes = _Decoders(Envelope, self.format)
        self._events = _Decoders(EventRecord, self.format)
        self._snapshots = _Decoders(SnapshotRecord, self.format)
        self._any_msgpack = msgspec.msgpack.Decoder()
        self._any_json = msgspec.json.Decoder()
        self._payloads: dict[str, _PayloadDecoders] = {}
        # The event types met at their current version while folding, and one decoder for
        # records of any of them (see decode_event_payloads).
        self._folded_types: dict[str, TypeInfo] = {}
        self._typed_records: msgspec.msgpack.Decoder[Any] | msgspec.json.Decoder[Any] | None = None

    # Building records.

    def payload(self, obj: msgspec.Struct) -> tuple[TypeInfo, msgspec.Raw]:
        """Encode a registered struct in this codec's format.

        Raises UnregisteredTypeError for an unregistered class and PayloadTooLargeError over
        `max_size`.
        """
        info = self.registry.info_for(type(obj))
        data = self._encoder.encode(obj)
        if len(data) > self.max_size:
            raise PayloadTooLargeError(len(data), self.max_size)
        return info, msgspec.Raw(data)

    def envelope(
        self,
        target: str,
        message: msgspec.Struct,
        *,
        sender: str | None = None,
        idempotency_key: str | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        traceparent: str | None = None,
        reply_to: str | None = None,
        message_id: str | None = None,
        created_at: int | None = None,
    ) -> Envelope:
        """An envelope carrying `message` to the actor at `target` (``kind/id``)."""
        info, raw = self.payload(message)
        return Envelope(
            id=new_message_id() if message_id is None else message_id,
            type=info.name,
            schema_version=info.version,
            target=target,
            payload=raw,
            created_at=now_ms() if created_at is None else created_at,
            idempotency_key=idempotency_key,
            sender=sender,
            correlation_id=correlation_id,
            causation_id=causation_id,
            traceparent=traceparent,
            reply_to=reply_to,
            content_type=self.content_type,
        )

    def event(
        self,
        event: msgspec.Struct,
        *,
        causation_id: str | None = None,
        correlation_id: str | None = None,
        traceparent: str | None = None,
        recorded_at: int | None = None,
    ) -> EventRecord:
        """An event record for `event`."""
        info, raw = self.payload(event)
        return EventRecord(
            type=info.name,
            schema_version=info.version,
            payload=raw,
            recorded_at=now_ms() if recorded_at is None else recorded_at,
            causation_id=causation_id,
            correlation_id=correlation_id,
            traceparent=traceparent,
            content_type=self.content_type,
        )

    def snapshot(
        self, state: msgspec.Struct, version: int, *, taken_at: int | None = None
    ) -> SnapshotRecord:
        """A snapshot record of `state` folded up to actor version `version`."""
        if version < 0:
            raise ValueError(f"a snapshot version must be >= 0, got {version}")
        info, raw = self.payload(state)
        return SnapshotRecord(
            type=info.name,
            schema_version=info.version,
            version=version,
            taken_at=now_ms() if taken_at is None else taken_at,
            payload=raw,
            content_type=self.content_type,
        )

    # Encoding.

    def encode(self, record: Record) -> bytes:
        """The record's bytes. Raises PayloadTooLargeError over `max_size`.

        A record is written in the format of its payload (embedding a payload of one format in
        a record of the other would corrupt it). For records this codec built that is its own
        format; a record decoded from elsewhere keeps the format it came in.
        """
        payload = record.payload
        if len(payload) == 0:
            raise ValueError(f"{type(record).__name__} has an empty payload")
        json = _first_byte(payload) in _JSON_LEAD_BYTES
        data = (self._json_encoder if json else self._msgpack_encoder).encode(record)
        if len(data) > self.max_size:
            raise PayloadTooLargeError(len(data), self.max_size)
        return data

    # Decoding. Each decode first tries this codec's own format directly, the common case, at
    # the cost of a single msgspec call. Anything else (the other format, oversized or bad
    # input) takes the careful path, which sniffs the format and says precisely what is wrong.
    # Neither format can pass for the other (see _JSON_LEAD_BYTES), so trying one first never
    # changes the result.

    def decode_envelope(self, data: Buffer) -> Envelope:
        """An envelope from bytes in either format; raises DecodeError for anything else."""
        return self._decode_record(data, self._envelopes, "envelope")

    def decode_event(self, data: Buffer) -> EventRecord:
        """An event record from bytes in either format; raises DecodeError for anything else."""
        return self._decode_record(data, self._events, "event record")

    def decode_event_payloads(self, batch: Sequence[Buffer]) -> list[msgspec.Struct]:
        """The payloads of event records, as today's types: the replay and folding path.

        Same results and errors as `decode_event` then `decode_payload` on each item, the first
        error raised. Records in this codec's format, of types met before, at their current
        versions (the common case) decode in one msgspec pass each, straight into their
        payload's class, with a decoder that accepts nothing else; a batch of only such
        records costs no Python work per record.
        """
        typed = self._typed_records
        if typed is not None:
            try:
                if max(map(len, batch), default=0) <= self.max_size:
                    return [record.payload for record in map(typed.decode, batch)]
            except Exception:
                pass  # something else in the batch: record by record below
        return self._decode_event_payloads_each(batch)

    def _decode_event_payloads_each(self, batch: Sequence[Buffer]) -> list[msgspec.Struct]:
        events: list[msgspec.Struct] = []
        max_size = self.max_size
        for data in batch:
            typed = self._typed_records
            if typed is not None:
                try:
                    if len(data) <= max_size:
                        events.append(typed.decode(data).payload)
                        continue
                except Exception:
                    pass  # not a type met yet, or not valid: the careful path decides
            record, event = self._decode_event_and_payload(data)
            events.append(event)
            self._meet_event_type(record.type, record.schema_version)
        return events

    def _meet_event_type(self, type_name: str, version: int) -> None:
        """Let the one-pass decoder take records of `type_name` too, if `version` is current."""
        if type_name in self._folded_types:
            return
        decoders = self._payloads.get(type_name)
        if decoders is None or decoders.version != version:
            return
        self._folded_types[type_name] = decoders.info
        self._typed_records = _typed_record_decoder(list(self._folded_types.values()), self.format)

    def _decode_event_and_payload(self, data: Buffer) -> tuple[EventRecord, msgspec.Struct]:
        record = self.decode_event(data)
        return record, self.decode_payload(record.type, record.schema_version, record.payload)

    def decode_snapshot(self, data: Buffer) -> SnapshotRecord:
        """A snapshot record from bytes in either format; raises DecodeError for anything else."""
        return self._decode_record(data, self._snapshots, "snapshot record")

    def _decode_record(self, data: Buffer, decoders: _Decoders[R], what: str) -> R:
        try:
            if len(data) <= self.max_size:
                return decoders.own.decode(data)
        except Exception:
            pass  # the careful path below finds out what is wrong and says so
        json = self._sniff(data, what)
        try:
            return decoders.json.decode(data) if json else decoders.msgpack.decode(data)
        except Exception as exc:
            raise _parse_error(what, exc) from exc

    def _sniff(self, data: Buffer, what: str) -> bool:
        """Check the size limit, then tell whether `data` is JSON (else MessagePack)."""
        try:
            size = len(data)
            lead = _first_byte(data)
        except Exception as exc:
            raise DecodeError(f"{what} is empty or not bytes", reason="malformed") from exc
        if size > self.max_size:
            raise DecodeError(
                f"{what} of {size} bytes exceeds the limit of {self.max_size} bytes",
                reason="oversized",
            )
        return lead in _JSON_LEAD_BYTES

    def decode_payload(self, type_name: str, schema_version: int, raw: Buffer) -> msgspec.Struct:
        """The payload as an instance of the current class of `type_name`.

        A payload of an older schema version is decoded to a plain dict, upcast version by
        version, and then validated as the current class. Raises DecodeError (UnknownTypeError,
        UnknownVersionError, or reason ``oversized``, ``malformed``, ``invalid``,
        ``upcast-failed``) for anything that is not a valid payload.
        """
        decoders = self._payloads.get(type_name)
        if decoders is not None and schema_version == decoders.version:
            try:
                if len(raw) <= self.max_size:
                    return decoders.own.decode(raw)
            except Exception:
                pass  # the careful path below finds out what is wrong and says so
        elif decoders is None:
            decoders = self._payloads[type_name] = _PayloadDecoders(
                self.registry.current(type_name), self.format
            )
        json = self._sniff(raw, f"{type_name!r} payload")
        if schema_version == decoders.version:
            try:
                return decoders.json.decode(raw) if json else decoders.msgpack.decode(raw)
            except Exception as exc:
                raise _parse_error(f"{type_name!r} payload", exc) from exc
        return self._decode_old_payload(decoders, schema_version, raw, json)

    def _decode_old_payload(
        self, decoders: _PayloadDecoders, schema_version: int, raw: Buffer, json: bool
    ) -> msgspec.Struct:
        info = decoders.info
        what = f"{info.name!r} payload v{schema_version}"
        if not 1 <= schema_version < info.version:
            raise UnknownVersionError(
                f"{info.name!r} v{schema_version} cannot be read by this code (current "
                f"v{info.version})"
            )
        try:
            data = (self._any_json if json else self._any_msgpack).decode(raw)
        except Exception as exc:
            raise _parse_error(what, exc) from exc
        if not isinstance(data, dict):
            raise DecodeError(
                f"{what} is a {type(data).__name__}, not an object",
                reason="invalid",
            )
        upcast = self.registry.upcast(info.name, schema_version, data)
        # Re-encoding in the payload's own format validates the upcast payload exactly as a
        # current one in that format would be (base64 bytes and string keys in JSON, say).
        try:
            encoded = (self._json_encoder if json else self._msgpack_encoder).encode(upcast)
        except Exception as exc:
            raise DecodeError(
                f"the upcasters of {info.name!r} produced a value that cannot be encoded: {exc!r}",
                reason="upcast-failed",
            ) from exc
        try:
            return (decoders.json if json else decoders.msgpack).decode(encoded)
        except Exception as exc:
            raise _parse_error(f"{what} upcast to v{info.version}", exc) from exc

    def plain(self, raw: Buffer) -> object:
        """A payload as plain data (dicts, lists, strings, numbers), whatever its type: for tools
        that show what is stored without needing today's classes. Raises DecodeError."""
        json = self._sniff(raw, "payload")
        try:
            return self._any_json.decode(raw) if json else self._any_msgpack.decode(raw)
        except Exception as exc:
            raise _parse_error("payload", exc) from exc

    def message_of(self, env: Envelope) -> msgspec.Struct:
        """The message an envelope carries."""
        return self.decode_payload(env.type, env.schema_version, env.payload)

    def event_of(self, rec: EventRecord) -> msgspec.Struct:
        """The event a record holds."""
        return self.decode_payload(rec.type, rec.schema_version, rec.payload)

    def state_of(self, snap: SnapshotRecord) -> msgspec.Struct:
        """The state a snapshot holds."""
        return self.decode_payload(snap.type, snap.schema_version, snap.payload)
