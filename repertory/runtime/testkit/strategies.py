"""Hypothesis strategies for an actor's messages, envelopes around them, and malformed bytes.

Messages are built from the command handlers' type annotations (`Actor.command_types()`)
through `msgspec.inspect`, not `st.from_type`: `from_type` ignores `msgspec.Meta` constraints
(it draws `-22` for `Annotated[int, Meta(ge=0)]`), so handlers would see messages that
decoding would have refused.

`sample_message` draws the same shapes from a seeded `random.Random`, for the seeded
scheduler, which runs outside hypothesis.
"""

import datetime
import enum
import random
import string
import uuid
from collections.abc import Sequence
from typing import Any

import msgspec
import msgspec.inspect as mi
from hypothesis import strategies as st

from repertory.actors.model import Actor
from repertory.schemas import Codec, Envelope
from repertory.streams.keys import Address

INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1
MAX_SIZE = 5
"""Collections drawn for messages stay small: handlers are exercised by their shapes, not their
volume, and small examples shrink and print well."""


def _int_bounds(info: mi.IntType) -> tuple[int, int]:
    low = INT64_MIN if info.ge is None else info.ge
    if info.gt is not None:
        low = max(low, info.gt + 1)
    high = UINT64_MAX if info.le is None else info.le
    if info.lt is not None:
        high = min(high, info.lt - 1)
    return low, high


def _float_bounds(info: mi.FloatType) -> dict[str, Any]:
    bounds: dict[str, Any] = {"allow_nan": False}
    if info.ge is not None or info.gt is not None:
        bounds["min_value"] = info.ge if info.ge is not None else info.gt
        bounds["exclude_min"] = info.ge is None
    if info.le is not None or info.lt is not None:
        bounds["max_value"] = info.le if info.le is not None else info.lt
        bounds["exclude_max"] = info.le is None
    return bounds


def _sized(info: Any) -> tuple[int, int]:
    low = getattr(info, "min_length", None) or 0
    high = getattr(info, "max_length", None)
    return low, max(low, MAX_SIZE if high is None else high)


def strategy_for(info: mi.Type) -> st.SearchStrategy[Any]:
    """A strategy drawing values of the msgspec type `info` that satisfy its constraints."""
    if isinstance(info, mi.StructType):
        return structs(info.cls)
    if isinstance(info, mi.IntType):
        low, high = _int_bounds(info)
        ints = st.integers(low, high)
        if info.multiple_of:
            step = info.multiple_of
            ints = st.integers(-(-low // step), high // step).map(lambda n: n * step)
        return ints
    if isinstance(info, mi.FloatType):
        return st.floats(**_float_bounds(info))
    if isinstance(info, mi.StrType):
        if info.pattern is not None:
            return st.from_regex(info.pattern, fullmatch=True)
        low, high = _sized(info)
        return st.text(min_size=low, max_size=high)
    if isinstance(info, mi.BoolType):
        return st.booleans()
    if isinstance(info, mi.NoneType):
        return st.none()
    if isinstance(info, mi.BytesType | mi.ByteArrayType):
        low, high = _sized(info)
        return st.binary(min_size=low, max_size=high)
    if isinstance(info, mi.ListType):
        low, high = _sized(info)
        return st.lists(strategy_for(info.item_type), min_size=low, max_size=high)
    if isinstance(info, mi.SetType | mi.FrozenSetType):
        kind = frozenset if isinstance(info, mi.FrozenSetType) else set
        low, high = _sized(info)
        return st.sets(strategy_for(info.item_type), min_size=low, max_size=high).map(kind)
    if isinstance(info, mi.VarTupleType):
        low, high = _sized(info)
        items = st.lists(strategy_for(info.item_type), min_size=low, max_size=high)
        return items.map(tuple)
    if isinstance(info, mi.TupleType):
        return st.tuples(*(strategy_for(item) for item in info.item_types))
    if isinstance(info, mi.DictType):
        keys, values = strategy_for(info.key_type), strategy_for(info.value_type)
        low, high = _sized(info)
        return st.dictionaries(keys, values, min_size=low, max_size=high)
    if isinstance(info, mi.UnionType):
        return st.one_of(*(strategy_for(member) for member in info.types))
    if isinstance(info, mi.LiteralType):
        return st.sampled_from(info.values)
    if isinstance(info, mi.EnumType):
        return st.sampled_from(list(info.cls))
    if isinstance(info, mi.UUIDType):
        return st.uuids()
    if isinstance(info, mi.DateTimeType):
        return st.datetimes(timezones=st.just(datetime.UTC))
    if isinstance(info, mi.AnyType):
        return st.integers() | st.text() | st.booleans() | st.none()
    return st.from_type(_python_type(info))


def _python_type(info: mi.Type) -> type:
    cls = getattr(info, "cls", None)
    if isinstance(cls, type):
        return cls
    raise TypeError(f"no strategy for {info!r}: pass your own strategy for this message type")


def structs(cls: type[msgspec.Struct]) -> st.SearchStrategy[msgspec.Struct]:
    """Instances of a msgspec Struct; optional fields are sometimes left at their default."""
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    fields: dict[str, st.SearchStrategy[Any]] = {}
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for field in info.fields:
        (fields if field.required else optional)[field.name] = strategy_for(field.type)
    return st.fixed_dictionaries(fields, optional=optional).map(lambda values: cls(**values))


def messages(
    actor: Actor[Any] | type[Actor[Any]], *only: type[msgspec.Struct]
) -> st.SearchStrategy[msgspec.Struct]:
    """Messages for an actor kind: any of its command types (or only those in `only`)."""
    types = only or actor.command_types()
    if not types:
        raise TypeError(f"{actor!r} has no command handlers")
    return st.one_of(*(structs(cls) for cls in types))


def envelopes(
    actor: Actor[Any], ids: Sequence[str] = ("a", "b", "c"), codec: Codec | None = None
) -> st.SearchStrategy[Envelope]:
    """Envelopes carrying the actor's messages to one of `ids`, as a sender would build them."""
    encoder = codec or Codec()
    return st.builds(
        lambda target, message, key: encoder.envelope(
            str(Address(actor.kind, target)), message, idempotency_key=key
        ),
        st.sampled_from(list(ids)),
        messages(actor),
        st.none() | st.uuids().map(str),
    )


def malformed_bytes(
    actor: Actor[Any] | None = None, ids: Sequence[str] = ("a", "b", "c")
) -> st.SearchStrategy[bytes]:
    """Inbox entries that no handler may ever see: noise, truncated or non-envelope MessagePack,
    and (given an actor) envelopes to it with an unknown type, an unknown schema version or an
    undecodable payload. A node must dead-letter each with a reason and keep serving (G8)."""
    codec = Codec()
    noise = st.binary(max_size=64)
    not_an_envelope = st.builds(
        msgspec.msgpack.encode,
        st.dictionaries(st.text(max_size=4), st.integers(-(2**63), 2**63 - 1), max_size=3),
    )
    variants = [noise, not_an_envelope, st.just(b"\x91"), st.just(b"{")]
    if actor is not None:
        valid = envelopes(actor, ids, codec)
        variants += [
            valid.map(codec.encode).flatmap(
                lambda data: st.integers(1, len(data) - 1).map(lambda cut: data[:cut])
            ),
            valid.map(lambda env: codec.encode(msgspec.structs.replace(env, type="no.such.type"))),
            valid.map(lambda env: codec.encode(msgspec.structs.replace(env, schema_version=999))),
            valid.map(
                lambda env: codec.encode(msgspec.structs.replace(env, payload=msgspec.Raw(b"\xc1")))
            ),
        ]
    return st.one_of(*variants)


# Seeded sampling, for the scheduler that runs outside hypothesis.

_ALPHABET = string.ascii_letters + string.digits + " -_é"


def _length(rng: random.Random, info: Any) -> int:
    return rng.randint(*_sized(info))


def sample(rng: random.Random, info: mi.Type) -> Any:
    """A value of the msgspec type `info` drawn from `rng` (small, mostly near zero)."""
    if isinstance(info, mi.StructType):
        return sample_struct(rng, info.cls)
    if isinstance(info, mi.IntType):
        low, high = _int_bounds(info)
        step = info.multiple_of or 1
        first, last = -(-low // step), high // step
        # Mostly small numbers around zero, as hand-written tests would use.
        center = min(max(0, first), last)
        return min(max(center + rng.randint(-10, 10), first), last) * step
    if isinstance(info, mi.FloatType):
        bounds = _float_bounds(info)
        low, high = bounds.get("min_value", -1000.0), bounds.get("max_value", 1000.0)
        return rng.uniform(low, high)
    if isinstance(info, mi.StrType) and info.pattern is None:
        return "".join(rng.choice(_ALPHABET) for _ in range(_length(rng, info)))
    if isinstance(info, mi.BoolType):
        return rng.random() < 0.5
    if isinstance(info, mi.NoneType):
        return None
    if isinstance(info, mi.BytesType):
        return rng.randbytes(_length(rng, info))
    if isinstance(info, mi.ListType | mi.VarTupleType | mi.SetType | mi.FrozenSetType):
        items = [sample(rng, info.item_type) for _ in range(_length(rng, info))]
        kinds = {mi.ListType: list, mi.VarTupleType: tuple, mi.SetType: set}
        return kinds.get(type(info), frozenset)(items)
    if isinstance(info, mi.TupleType):
        return tuple(sample(rng, item) for item in info.item_types)
    if isinstance(info, mi.DictType):
        count = _length(rng, info)
        return {sample(rng, info.key_type): sample(rng, info.value_type) for _ in range(count)}
    if isinstance(info, mi.UnionType):
        return sample(rng, rng.choice(info.types))
    if isinstance(info, mi.LiteralType):
        return rng.choice(info.values)
    if isinstance(info, mi.EnumType):
        members: list[enum.Enum] = list(info.cls)
        return rng.choice(members)
    if isinstance(info, mi.UUIDType):
        return uuid.UUID(int=rng.getrandbits(128), version=4)
    raise TypeError(f"cannot sample {info!r}: give the scheduler a `messages` function")


def sample_struct(rng: random.Random, cls: type[msgspec.Struct]) -> msgspec.Struct:
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    values = {
        field.name: sample(rng, field.type)
        for field in info.fields
        if field.required or rng.random() < 0.5
    }
    return cls(**values)


def sample_message(rng: random.Random, actor: Actor[Any]) -> msgspec.Struct:
    """One of the actor's messages, drawn from `rng`."""
    return sample_struct(rng, rng.choice(actor.command_types()))
