"""The codec: records round-trip in both formats, any input decodes or raises DecodeError,
size limits hold both ways, JSON output is plain JSON, old payloads are upcast on read."""

import datetime
import json
import uuid
from collections.abc import Callable
from typing import Any, TypeVar, cast

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repertory.schemas import (
    Codec,
    DecodeError,
    Envelope,
    EventRecord,
    Format,
    PayloadTooLargeError,
    RepertoryError,
    SnapshotRecord,
    TypeRegistry,
    UnknownTypeError,
    UnknownVersionError,
    UnregisteredTypeError,
    new_message_id,
)
from repertory.schemas.codec import decode_event_record

# No deadlines: a loaded CI machine must not fail a test on timing.
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_SETTINGS = settings(SETTINGS, max_examples=500)
T = TypeVar("T")
Record = Envelope | EventRecord | SnapshotRecord
REASONS = {"malformed", "oversized", "unknown-type", "unknown-version", "invalid", "upcast-failed"}

TYPES = TypeRegistry()


class Turn(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    role: str
    text: str
    tokens: int | None = None


@TYPES.register("test.schemas.session", version=3)
class Session(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    session_id: str
    state: str
    turns: list[Turn] = []
    scores: dict[str, float] = {}
    attachment: bytes = b""
    opened_at: datetime.datetime | None = None
    parent: str | None = None


@TYPES.register("test.schemas.reading")
class Reading(msgspec.Struct, frozen=True):
    value: float
    count: int
    labels: list[str]
    by_hour: dict[int, int]


@TYPES.upcaster("test.schemas.session", 1)
def session_v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    data["session_id"] = data.pop("id")
    return data


@TYPES.upcaster("test.schemas.session", 2)
def session_v2_to_v3(data: dict[str, Any]) -> dict[str, Any]:
    data["state"] = "closed" if data.pop("closed") else "open"
    return data


CODECS = {fmt: Codec(TYPES, fmt) for fmt in Format}
INT64 = st.integers(-(2**63), 2**63 - 1)
FLOATS = st.floats(allow_nan=False, allow_infinity=False)
TEXT = st.text(max_size=40)
OPTIONAL_TEXT = st.none() | TEXT
TIMESTAMPS = st.integers(0, 2**53)

TURNS = st.builds(
    Turn, role=st.sampled_from(["user", "assistant", "tool"]), text=TEXT, tokens=st.none() | INT64
)
SESSIONS = st.builds(
    Session,
    session_id=TEXT,
    state=st.sampled_from(["open", "waiting", "closed"]),
    turns=st.lists(TURNS, max_size=5),
    scores=st.dictionaries(TEXT, FLOATS, max_size=4),
    attachment=st.binary(max_size=40),
    opened_at=st.none() | st.datetimes(timezones=st.just(datetime.UTC)),
    parent=OPTIONAL_TEXT,
)
READINGS = st.builds(
    Reading,
    value=FLOATS,
    count=INT64,
    labels=st.lists(TEXT, max_size=5),
    by_hour=st.dictionaries(st.integers(0, 23), INT64, max_size=5),
)
PAYLOADS: st.SearchStrategy[msgspec.Struct] = st.one_of(SESSIONS, READINGS)
ENVELOPE_OPTIONS: st.SearchStrategy[dict[str, Any]] = st.fixed_dictionaries(
    {},
    optional={
        "sender": TEXT,
        "idempotency_key": TEXT,
        "correlation_id": TEXT,
        "causation_id": TEXT,
        "traceparent": TEXT,
        "reply_to": TEXT,
        "message_id": TEXT,
        "created_at": TIMESTAMPS,
    },
)
EVENT_OPTIONS: st.SearchStrategy[dict[str, Any]] = st.fixed_dictionaries(
    {},
    optional={
        "causation_id": TEXT,
        "correlation_id": TEXT,
        "traceparent": TEXT,
        "recorded_at": TIMESTAMPS,
    },
)


@st.composite
def encoded_records(draw: st.DrawFn) -> bytes:
    """The encoding of any valid envelope, event record or snapshot, in either format."""
    codec = CODECS[draw(st.sampled_from(list(Format)))]
    message = draw(PAYLOADS)
    kind = draw(st.sampled_from(["envelope", "event", "snapshot"]))
    record: Envelope | EventRecord | SnapshotRecord
    if kind == "envelope":
        record = codec.envelope("session/1", message, **draw(ENVELOPE_OPTIONS))
    elif kind == "event":
        record = codec.event(message, **draw(EVENT_OPTIONS))
    else:
        record = codec.snapshot(message, draw(st.integers(0, 10**9)))
    return codec.encode(record)


def json_values() -> st.SearchStrategy[Any]:
    scalars = st.none() | st.booleans() | INT64 | FLOATS | TEXT
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
        max_leaves=12,
    )


RECORD_FIELDS = {
    "envelope": ["id", "type", "schema_version", "target", "payload", "created_at"],
    "event": ["type", "schema_version", "payload", "recorded_at"],
    "snapshot": ["type", "schema_version", "version", "taken_at", "payload"],
}
OPTIONAL_FIELDS = ["sender", "correlation_id", "traceparent", "reply_to", "content_type", "attempt"]
COUNT_FIELDS = {"created_at", "recorded_at", "version", "taken_at", "attempt"}
SESSION_V1 = st.fixed_dictionaries({"id": TEXT, "closed": st.booleans()})
SESSION_V2 = st.fixed_dictionaries({"session_id": TEXT, "closed": st.booleans()})
# Type, schema version and payload that belong together (current or old) or do not.
TYPED_PAYLOADS: st.SearchStrategy[tuple[str, int, Any]] = st.one_of(
    PAYLOADS.map(lambda m: (TYPES.info_for(type(m)).name, TYPES.info_for(type(m)).version, m)),
    SESSION_V1.map(lambda payload: ("test.schemas.session", 1, payload)),
    SESSION_V2.map(lambda payload: ("test.schemas.session", 2, payload)),
    st.tuples(
        st.sampled_from([*TYPES.names(), "no.such.type"]),
        st.integers(-1, 5),
        st.one_of(PAYLOADS, SESSION_V1, SESSION_V2, json_values()),
    ),
)


@st.composite
def record_shaped(draw: st.DrawFn) -> bytes:
    """Well-formed documents shaped like records, most fields plausible, some dropped or
    replaced by any JSON value: decodes must tell valid records (and payloads, current or
    old) from valid syntax with a wrong shape."""
    type_name, schema_version, payload = draw(TYPED_PAYLOADS)
    plausible = {"type": type_name, "schema_version": schema_version, "payload": payload}
    kind = draw(st.sampled_from(sorted(RECORD_FIELDS)))
    extra = draw(st.lists(st.sampled_from(OPTIONAL_FIELDS), unique=True, max_size=3))
    document: dict[str, Any] = {}
    for name in RECORD_FIELDS[kind] + extra:
        change = draw(st.integers(0, 19))
        if change == 0:
            continue
        if change == 1:
            document[name] = draw(json_values())
        elif name in COUNT_FIELDS:
            document[name] = draw(st.integers(-2, 2**40))
        elif name in plausible:
            document[name] = plausible[name]
        else:
            document[name] = draw(TEXT)
    if draw(st.booleans()):
        return msgspec.json.encode(document)
    return msgspec.msgpack.encode(document)


@st.composite
def mutations(draw: st.DrawFn, original: bytes) -> bytes:
    """`original` with a few bits flipped, bytes deleted or inserted, or its tail cut off."""
    mutated = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        if not mutated:
            break
        index = draw(st.integers(0, len(mutated) - 1))
        mutation = draw(st.sampled_from(["flip", "truncate", "delete", "insert"]))
        if mutation == "flip":
            mutated[index] ^= 1 << draw(st.integers(0, 7))
        elif mutation == "truncate":
            del mutated[index:]
        elif mutation == "delete":
            del mutated[index]
        else:
            mutated.insert(index, draw(st.integers(0, 255)))
    return bytes(mutated)


def outcome(decode: Callable[..., T], *args: Any) -> T | DecodeError:
    """What a decode returned, or the DecodeError it raised; any other exception propagates."""
    try:
        return decode(*args)
    except DecodeError as error:
        return error


def decodes_or_raises_decode_error(codec: Codec, data: Any) -> None:
    """Each record decoder returns a record (whose payload decodes to a registered struct or
    raises DecodeError) or raises DecodeError with a documented reason; nothing else."""
    decoders: list[tuple[Callable[[Any], Record], type[Record]]] = [
        (codec.decode_envelope, Envelope),
        (codec.decode_event, EventRecord),
        (codec.decode_snapshot, SnapshotRecord),
    ]
    for decode, record_type in decoders:
        record = outcome(decode, data)
        if isinstance(record, DecodeError):
            assert record.reason in REASONS
            continue
        assert isinstance(record, record_type)
        payload_decodes_or_raises_decode_error(
            codec, record.type, record.schema_version, record.payload
        )
    # Under the size limit, the codec's own event records and the limitless decoder (what a
    # stored event's record is decoded with) agree.
    expected, record = outcome(codec.decode_event, data), outcome(decode_event_record, data)
    if isinstance(expected, DecodeError):
        assert isinstance(record, DecodeError)
        assert record.reason in REASONS
    else:
        assert record == expected


def payload_decodes_or_raises_decode_error(codec: Codec, name: str, version: int, raw: Any) -> None:
    value = outcome(codec.decode_payload, name, version, raw)
    if isinstance(value, DecodeError):
        assert value.reason in REASONS
    else:
        assert TYPES.info_for(type(value)).name == name


# Round trips.


@pytest.mark.parametrize("fmt", list(Format))
@SETTINGS
@given(message=PAYLOADS, options=ENVELOPE_OPTIONS, attempt=st.integers(0, 1000))
def test_every_envelope_round_trips(
    fmt: Format, message: msgspec.Struct, options: dict[str, Any], attempt: int
) -> None:
    codec = CODECS[fmt]
    envelope = msgspec.structs.replace(
        codec.envelope("session/s-1", message, **options), attempt=attempt
    )
    data = codec.encode(envelope)

    for reader in CODECS.values():  # any reader decodes whatever format wrote the stream
        decoded = reader.decode_envelope(data)
        assert decoded == envelope
        assert reader.message_of(decoded) == message
        assert reader.encode(decoded) == data
    assert envelope.content_type == f"application/{fmt}"
    assert envelope.schema_version == TYPES.info_for(type(message)).version


@pytest.mark.parametrize("fmt", list(Format))
@SETTINGS
@given(event=PAYLOADS, options=EVENT_OPTIONS)
def test_every_event_record_round_trips(
    fmt: Format, event: msgspec.Struct, options: dict[str, Any]
) -> None:
    codec = CODECS[fmt]
    record = codec.event(event, **options)
    data = codec.encode(record)

    for reader in CODECS.values():
        decoded = reader.decode_event(data)
        assert decoded == record
        assert reader.event_of(decoded) == event
        assert reader.encode(decoded) == data


@pytest.mark.parametrize("fmt", list(Format))
@SETTINGS
@given(state=PAYLOADS, version=st.integers(0, 2**40), taken_at=TIMESTAMPS)
def test_every_snapshot_round_trips(
    fmt: Format, state: msgspec.Struct, version: int, taken_at: int
) -> None:
    codec = CODECS[fmt]
    record = codec.snapshot(state, version, taken_at=taken_at)
    data = codec.encode(record)

    for reader in CODECS.values():
        decoded = reader.decode_snapshot(data)
        assert decoded == record
        assert (decoded.version, decoded.taken_at) == (version, taken_at)
        assert reader.state_of(decoded) == state


def test_records_carry_the_given_metadata_and_defaults() -> None:
    codec = CODECS[Format.MSGPACK]
    message = Reading(1.5, 2, ["a"], {})
    envelope = codec.envelope(
        "sensor/7",
        message,
        sender="hub/1",
        idempotency_key="k",
        correlation_id="c",
        causation_id="m0",
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        message_id="m1",
        created_at=1234,
    )
    assert (envelope.id, envelope.target, envelope.type, envelope.schema_version) == (
        "m1",
        "sensor/7",
        "test.schemas.reading",
        1,
    )
    assert (envelope.sender, envelope.idempotency_key, envelope.correlation_id) == (
        "hub/1",
        "k",
        "c",
    )
    assert (envelope.causation_id, envelope.created_at, envelope.attempt) == ("m0", 1234, 0)
    fresh = codec.envelope("sensor/7", message)
    other = codec.envelope("sensor/7", message)
    assert fresh.id != other.id
    assert fresh.created_at > 1_600_000_000_000
    assert codec.event(message).recorded_at > 1_600_000_000_000
    with pytest.raises(ValueError, match="snapshot version"):
        codec.snapshot(message, -1)


def test_default_fields_are_left_out_of_the_encoding() -> None:
    codec = CODECS[Format.JSON]
    document = json.loads(codec.encode(codec.event(Reading(0.0, 0, [], {}), recorded_at=5)))
    assert set(document) == {"type", "schema_version", "payload", "recorded_at", "content_type"}


def test_unregistered_payloads_are_refused() -> None:
    class Stray(msgspec.Struct):
        x: int

    with pytest.raises(UnregisteredTypeError, match="Stray"):
        CODECS[Format.MSGPACK].envelope("a/b", Stray(1))
    with pytest.raises(UnregisteredTypeError):
        CODECS[Format.JSON].payload(Stray(1))


# Bad input gives DecodeError, never anything else.


@FUZZ_SETTINGS
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_decode_or_raise_decode_error(data: bytes) -> None:
    for codec in CODECS.values():
        decodes_or_raises_decode_error(codec, data)


@FUZZ_SETTINGS
@given(data=record_shaped())
def test_well_formed_documents_of_any_shape_decode_or_raise_decode_error(data: bytes) -> None:
    for codec in CODECS.values():
        decodes_or_raises_decode_error(codec, data)


@FUZZ_SETTINGS
@given(data=st.data(), original=encoded_records())
def test_mutated_encodings_decode_or_raise_decode_error(
    data: st.DataObject, original: bytes
) -> None:
    mutated = data.draw(mutations(original))
    for codec in CODECS.values():
        decodes_or_raises_decode_error(codec, mutated)
        decodes_or_raises_decode_error(codec, memoryview(mutated))


@FUZZ_SETTINGS
@given(data=st.data(), typed=TYPED_PAYLOADS)
def test_any_payload_bytes_decode_or_raise_decode_error(
    data: st.DataObject, typed: tuple[str, int, Any]
) -> None:
    name, version, payload = typed
    encode = data.draw(st.sampled_from([msgspec.msgpack.encode, msgspec.json.encode]))
    raw = data.draw(st.just(encode(payload)) | mutations(encode(payload)) | st.binary(max_size=200))
    for codec in CODECS.values():
        payload_decodes_or_raises_decode_error(codec, name, version, raw)
        payload_decodes_or_raises_decode_error(codec, name, version, msgspec.Raw(raw))


@st.composite
def event_batches(draw: st.DrawFn) -> list[bytes]:
    """Event records as a replay reads them: mostly valid ones in either format, sometimes an
    old schema version, a mutated record or a document of the wrong shape."""

    def valid(fmt: Format) -> bytes:
        codec = CODECS[fmt]
        return codec.encode(codec.event(draw(PAYLOADS)))

    def old_version(fmt: Format) -> bytes:
        # Also a valid current payload, so only the schema version says it must be upcast.
        payload = {"session_id": draw(TEXT), "state": "stale", "closed": draw(st.booleans())}
        encode = msgspec.json.encode if fmt is Format.JSON else msgspec.msgpack.encode
        record = EventRecord(
            type="test.schemas.session",
            schema_version=2,
            payload=msgspec.Raw(encode(payload)),
            recorded_at=0,
        )
        return CODECS[fmt].encode(record)

    def bad_metadata(fmt: Format) -> bytes:
        # A valid payload in a record whose other fields are not: still an error.
        message = draw(PAYLOADS)
        info = TYPES.info_for(type(message))
        encode = msgspec.json.encode if fmt is Format.JSON else msgspec.msgpack.encode
        document = {
            "type": info.name,
            "schema_version": info.version,
            "payload": message,
            "recorded_at": draw(st.sampled_from([-1, "soon", None])),
        }
        return encode(document)

    formats = st.sampled_from(list(Format))
    item = formats.map(valid)
    odd = st.one_of(
        formats.map(old_version),
        formats.map(bad_metadata),
        record_shaped(),
        encoded_records().flatmap(mutations),
    )
    return draw(st.lists(st.one_of(item, item, item, odd), max_size=8))


def codec_that_met_one_type(fmt: Format) -> Codec:
    """A new codec whose folding decoder knows one event type (the shared CODECS soon know
    every type of these tests)."""
    codec = Codec(TYPES, fmt)
    reading = Reading(1.0, 1, [], {})
    assert codec.decode_event_payloads([codec.encode(codec.event(reading))]) == [reading]
    return codec


@FUZZ_SETTINGS
@given(batch=event_batches())
def test_decoding_a_batch_of_events_equals_decoding_each(batch: list[bytes]) -> None:
    for codec in [*CODECS.values(), *map(codec_that_met_one_type, Format)]:
        expected = [outcome(codec.decode_event, data) for data in batch]
        each = [
            record
            if isinstance(record, DecodeError)
            else outcome(
                lambda r, c=codec: (r, c.decode_payload(r.type, r.schema_version, r.payload)),
                record,
            )
            for record in expected
        ]
        errors = [item for item in each if isinstance(item, DecodeError)]
        decoded = [item for item in each if not isinstance(item, DecodeError)]
        first_error = errors[0] if errors else None
        if first_error is None:
            assert codec.decode_event_payloads(batch) == [event for _, event in decoded]
        else:
            with pytest.raises(DecodeError) as raised:
                codec.decode_event_payloads(batch)
            assert str(raised.value) == str(first_error)


@pytest.mark.parametrize("fmt", list(Format))
def test_a_record_without_its_type_is_refused_when_its_payload_would_fit(fmt: Format) -> None:
    """Folding decodes records of the types it has met in one pass; a record that names no
    type is still refused, with one type met and with several."""
    codec = codec_that_met_one_type(fmt)
    encode = msgspec.json.encode if fmt is Format.JSON else msgspec.msgpack.encode
    reading = Reading(2.0, 3, ["x"], {})
    typeless = encode({"schema_version": 1, "payload": reading, "recorded_at": 0})
    with pytest.raises(DecodeError, match="type"):
        codec.decode_event_payloads([typeless])
    session = Session(session_id="s", state="open")
    assert codec.decode_event_payloads([codec.encode(codec.event(session))]) == [session]
    with pytest.raises(DecodeError, match="type"):
        codec.decode_event_payloads([typeless])


@pytest.mark.parametrize("data", [None, "{}", 42, [1, 2], b"", bytearray(), object()])
def test_values_that_are_not_bytes_raise_decode_error(data: object) -> None:
    codec = CODECS[Format.MSGPACK]
    for decode in (
        codec.decode_envelope,
        codec.decode_event,
        codec.decode_snapshot,
        decode_event_record,
    ):
        with pytest.raises(DecodeError):
            decode(cast(Any, data))
    with pytest.raises(DecodeError):
        codec.decode_payload("test.schemas.reading", 1, cast(Any, data))


def test_decode_errors_say_why() -> None:
    codec = CODECS[Format.MSGPACK]
    with pytest.raises(DecodeError) as malformed:
        codec.decode_envelope(b"\xc1 not msgpack")
    assert malformed.value.reason == "malformed"
    assert isinstance(malformed.value.__cause__, msgspec.DecodeError)

    with pytest.raises(DecodeError) as invalid:
        codec.decode_envelope(b'{"id": "m1", "type": "x"}')
    assert invalid.value.reason == "invalid"
    assert "target" in str(invalid.value) or "schema_version" in str(invalid.value)

    zero_version = msgspec.json.encode(
        {"type": "t", "schema_version": 0, "payload": {}, "recorded_at": 1}
    )
    with pytest.raises(DecodeError) as bad_version:
        codec.decode_event(zero_version)
    assert bad_version.value.reason == "invalid"

    envelope = codec.envelope("a/b", Reading(1.0, 1, [], {}))
    stranger = msgspec.structs.replace(envelope, type="nobody.knows.this")
    decoded = codec.decode_envelope(codec.encode(stranger))  # the envelope itself stays intact
    assert decoded == stranger
    with pytest.raises(UnknownTypeError) as unknown:
        codec.message_of(decoded)
    assert unknown.value.reason == "unknown-type"
    assert isinstance(unknown.value, DecodeError)
    assert isinstance(unknown.value, RepertoryError)

    with pytest.raises(DecodeError) as wrong_payload:
        codec.decode_payload("test.schemas.reading", 1, msgspec.msgpack.encode({"value": "high"}))
    assert wrong_payload.value.reason == "invalid"


# Size limits.


def test_payloads_over_the_limit_are_refused_when_built() -> None:
    codec = Codec(TYPES, max_size=100)
    big = Reading(1.0, 1, ["x" * 100], {})
    with pytest.raises(PayloadTooLargeError) as error:
        codec.envelope("a/b", big)
    assert error.value.limit == 100
    assert error.value.size > 100
    with pytest.raises(PayloadTooLargeError):
        codec.event(big)
    with pytest.raises(PayloadTooLargeError):
        codec.snapshot(big, 1)


@pytest.mark.parametrize("fmt", list(Format))
def test_records_over_the_limit_are_refused_when_encoded(fmt: Format) -> None:
    record = CODECS[fmt].event(Reading(1.0, 1, ["x" * 60], {}), recorded_at=1)
    size = len(CODECS[fmt].encode(record))
    assert Codec(TYPES, fmt, max_size=size).encode(record)  # exactly at the limit is fine
    with pytest.raises(PayloadTooLargeError) as error:
        Codec(TYPES, fmt, max_size=size - 1).encode(record)
    assert (error.value.size, error.value.limit) == (size, size - 1)


@pytest.mark.parametrize("fmt", list(Format))
def test_input_over_the_limit_is_refused_before_parsing(fmt: Format) -> None:
    writer = CODECS[fmt]
    data = writer.encode(writer.snapshot(Reading(2.0, 3, ["y" * 50], {1: 2}), 9))
    at_limit = Codec(TYPES, fmt, max_size=len(data))
    assert at_limit.state_of(at_limit.decode_snapshot(data)) == Reading(2.0, 3, ["y" * 50], {1: 2})

    below = Codec(TYPES, fmt, max_size=len(data) - 1)
    for decode in (below.decode_envelope, below.decode_event, below.decode_snapshot):
        with pytest.raises(DecodeError) as error:
            decode(data)
        assert error.value.reason == "oversized"
    with pytest.raises(DecodeError) as garbage:
        below.decode_event(b"\xc1" * len(data))  # would be malformed, if it were parsed
    assert garbage.value.reason == "oversized"

    payload = at_limit.decode_snapshot(data).payload
    tight = Codec(TYPES, fmt, max_size=len(payload) - 1)
    with pytest.raises(DecodeError) as payload_error:
        tight.decode_payload("test.schemas.reading", 1, payload)
    assert payload_error.value.reason == "oversized"


def test_max_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_size"):
        Codec(TYPES, max_size=0)


# Readable encodings.


def test_json_records_are_plain_readable_json() -> None:
    codec = CODECS[Format.JSON]
    session = Session(
        session_id="s-1",
        state="open",
        turns=[Turn(role="user", text="héllo ✓")],
        attachment=b"\x00\x01",
    )
    data = codec.encode(codec.envelope("session/s-1", session, message_id="m-1", created_at=7))
    document = json.loads(data)
    assert document == {
        "id": "m-1",
        "type": "test.schemas.session",
        "schema_version": 3,
        "target": "session/s-1",
        "payload": {
            "session_id": "s-1",
            "state": "open",
            "turns": [{"role": "user", "text": "héllo ✓"}],
            "attachment": "AAE=",
        },
        "created_at": 7,
        "content_type": "application/json",
    }


def test_msgpack_records_are_plain_maps_for_any_msgpack_reader() -> None:
    codec = CODECS[Format.MSGPACK]
    data = codec.encode(codec.event(Reading(0.5, 2, ["a"], {3: 4}), recorded_at=11))
    assert msgspec.msgpack.decode(data) == {
        "type": "test.schemas.reading",
        "schema_version": 1,
        "payload": {"value": 0.5, "count": 2, "labels": ["a"], "by_hour": {3: 4}},
        "recorded_at": 11,
    }


def test_a_record_keeps_its_payloads_format_whatever_codec_encodes_it() -> None:
    json_record = CODECS[Format.JSON].event(Reading(1.0, 1, [], {}), recorded_at=1)
    data = CODECS[Format.MSGPACK].encode(json_record)
    assert json.loads(data)["payload"] == {"value": 1.0, "count": 1, "labels": [], "by_hour": {}}
    with pytest.raises(ValueError, match="empty payload"):
        CODECS[Format.JSON].encode(msgspec.structs.replace(json_record, payload=msgspec.Raw(b"")))


# Upcasting on read.


@pytest.mark.parametrize("fmt", list(Format))
def test_old_payloads_are_upcast_to_the_current_class(fmt: Format) -> None:
    codec = CODECS[fmt]
    encode = msgspec.json.encode if fmt is Format.JSON else msgspec.msgpack.encode
    v1 = encode({"id": "s-9", "closed": True, "attachment": b"\x07"})
    record = EventRecord(
        type="test.schemas.session", schema_version=1, payload=msgspec.Raw(v1), recorded_at=1
    )
    # bytes in a JSON v1 payload are base64 text and come back as bytes after upcasting.
    assert codec.event_of(codec.decode_event(codec.encode(record))) == Session(
        session_id="s-9", state="closed", attachment=b"\x07"
    )
    v2 = encode({"session_id": "s-9", "closed": False, "turns": [{"role": "user", "text": "hi"}]})
    assert codec.decode_payload("test.schemas.session", 2, v2) == Session(
        session_id="s-9", state="open", turns=[Turn(role="user", text="hi")]
    )


@pytest.mark.parametrize("version", [0, -3, 4, 99])
def test_versions_without_a_chain_to_the_current_one_are_unknown(version: int) -> None:
    raw = msgspec.msgpack.encode({"session_id": "s", "state": "open"})
    with pytest.raises(UnknownVersionError) as error:
        CODECS[Format.MSGPACK].decode_payload("test.schemas.session", version, raw)
    assert error.value.reason == "unknown-version"


def test_old_payloads_that_are_not_objects_or_do_not_fit_after_upcasting_are_invalid() -> None:
    codec = CODECS[Format.MSGPACK]
    with pytest.raises(DecodeError) as not_object:
        codec.decode_payload("test.schemas.session", 2, msgspec.msgpack.encode([1, 2]))
    assert not_object.value.reason == "invalid"
    with pytest.raises(DecodeError) as missing_field:
        codec.decode_payload("test.schemas.session", 2, msgspec.msgpack.encode({"closed": True}))
    assert missing_field.value.reason == "invalid"
    with pytest.raises(DecodeError) as upcaster_failed:
        codec.decode_payload("test.schemas.session", 1, msgspec.msgpack.encode({"closed": True}))
    assert upcaster_failed.value.reason == "upcast-failed"
    assert isinstance(upcaster_failed.value.__cause__, KeyError)


def test_upcasters_whose_output_cannot_be_encoded_fail_as_decode_errors() -> None:
    types = TypeRegistry()

    @types.register("test.schemas.opaque", version=2)
    class Opaque(msgspec.Struct):
        value: int

    @types.upcaster("test.schemas.opaque", 1)
    def unencodable(data: dict[str, Any]) -> dict[str, Any]:
        return {"value": object()}

    with pytest.raises(DecodeError) as error:
        Codec(types).decode_payload("test.schemas.opaque", 1, msgspec.msgpack.encode({"value": 1}))
    assert error.value.reason == "upcast-failed"


def test_records_written_by_other_clients_are_read() -> None:
    """Hand-written JSON with whitespace and a field this code does not know yet decodes with
    any codec: readers sniff JSON by its first byte, and unknown fields are ignored."""
    written_elsewhere = b"""
      {
        "id": "m-1", "type": "test.schemas.reading", "schema_version": 1, "target": "a/b",
        "payload": {"value": 1.5, "count": 2, "labels": [], "by_hour": {"7": 1}},
        "created_at": 5, "priority": "high"
      }"""
    for codec in CODECS.values():
        envelope = codec.decode_envelope(written_elsewhere)
        assert (envelope.id, envelope.target, envelope.content_type) == (
            "m-1",
            "a/b",
            "application/msgpack",  # the default: content_type is informational only
        )
        assert codec.message_of(envelope) == Reading(1.5, 2, [], {7: 1})


def test_message_ids_are_distinct_version_4_uuids_written_as_uuid_writes_them() -> None:
    ids = [new_message_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for message_id in ids:
        parsed = uuid.UUID(message_id)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == message_id
