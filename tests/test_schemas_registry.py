"""The type registry: registration rules, name validation and upcaster chains."""

from typing import Any, cast

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import repertory.schemas
from repertory.schemas import (
    Codec,
    DecodeError,
    Format,
    RegistrationError,
    RepertoryError,
    TypeInfo,
    TypeRegistry,
    UnknownTypeError,
    UnknownVersionError,
    UnregisteredTypeError,
    registry,
    schema,
    upcaster,
)

SETTINGS = settings(max_examples=100, deadline=None)


class Point(msgspec.Struct, frozen=True):
    x: int
    y: int


class Other(msgspec.Struct, frozen=True):
    x: int


# Registration rules.


def test_registering_records_name_version_and_class() -> None:
    types = TypeRegistry()
    assert types.register("geo.point", version=2)(Point) is Point
    info = TypeInfo("geo.point", 2, Point)
    assert types.info_for(Point) == info
    assert types.current("geo.point") == info
    assert "geo.point" in types
    assert "geo.other" not in types
    assert 42 not in types
    assert list(types) == [info]
    assert len(types) == 1


def test_registering_the_identical_class_again_is_idempotent() -> None:
    types = TypeRegistry()
    types.register("geo.point")(Point)
    assert types.register("geo.point")(Point) is Point
    assert list(types) == [TypeInfo("geo.point", 1, Point)]


def test_a_name_cannot_be_bound_to_a_second_class() -> None:
    types = TypeRegistry()
    types.register("geo.point")(Point)
    with pytest.raises(RegistrationError, match=r"'geo.point' is already registered to .*Point"):
        types.register("geo.point")(Other)
    with pytest.raises(RegistrationError):
        types.register("geo.point", version=2)(Other)
    assert types.current("geo.point").cls is Point


def test_a_class_cannot_have_two_names_or_two_versions() -> None:
    types = TypeRegistry()
    types.register("geo.point")(Point)
    with pytest.raises(RegistrationError, match=r"already registered as 'geo\.point' v1"):
        types.register("geo.place")(Point)
    with pytest.raises(RegistrationError):
        types.register("geo.point", version=2)(Point)
    assert "geo.place" not in types
    assert types.info_for(Point).version == 1


def test_registration_errors_are_repertory_errors() -> None:
    assert issubclass(RegistrationError, RepertoryError)
    assert issubclass(UnregisteredTypeError, RepertoryError)
    assert issubclass(UnregisteredTypeError, TypeError)
    assert not issubclass(UnregisteredTypeError, DecodeError)


@pytest.mark.parametrize(
    "name", ["", " ", "geo point", "geo.point ", "geo\tpoint", "geo\npoint", "geo\u3000p", "a\x00b"]
)
def test_names_must_be_non_empty_without_whitespace(name: str) -> None:
    with pytest.raises(RegistrationError, match="type name"):
        TypeRegistry().register(name)
    with pytest.raises(RegistrationError, match="type name"):
        TypeRegistry().upcaster(name, 1)


def test_names_must_be_strings() -> None:
    with pytest.raises(RegistrationError):
        TypeRegistry().register(cast(Any, 7))


@SETTINGS
@given(name=st.text(min_size=1, max_size=30))
def test_any_printable_name_without_whitespace_is_accepted(name: str) -> None:
    acceptable = name.isprintable() and not any(char.isspace() for char in name)
    types = TypeRegistry()
    if acceptable:
        types.register(name)(Point)
        assert types.current(name).cls is Point
    else:
        with pytest.raises(RegistrationError):
            types.register(name)(Point)
        assert name not in types


@pytest.mark.parametrize("version", [0, -1, True, 1.5, "2"])
def test_versions_must_be_ints_from_one(version: object) -> None:
    with pytest.raises(RegistrationError, match="version"):
        TypeRegistry().register("geo.point", version=cast(Any, version))
    with pytest.raises(RegistrationError, match="from_version"):
        TypeRegistry().upcaster("geo.point", cast(Any, version))


def test_only_map_encoded_structs_can_be_registered() -> None:
    class Row(msgspec.Struct, array_like=True):
        x: int

    class Plain:
        x: int

    with pytest.raises(RegistrationError, match="array_like"):
        TypeRegistry().register("geo.row")(Row)
    with pytest.raises(RegistrationError, match=r"msgspec\.Struct"):
        TypeRegistry().register("geo.plain")(cast(Any, Plain))


def test_unregistered_classes_are_a_type_error() -> None:
    with pytest.raises(
        UnregisteredTypeError, match=r"test_schemas_registry\.Other is not a registered"
    ):
        TypeRegistry().info_for(Other)


def test_unknown_names_are_an_unknown_type_decode_error() -> None:
    with pytest.raises(UnknownTypeError, match=r"'geo\.nowhere'") as error:
        TypeRegistry().current("geo.nowhere")
    assert error.value.reason == "unknown-type"
    with pytest.raises(UnknownTypeError):
        TypeRegistry().upcast("geo.nowhere", 1, {})


def test_names_are_listed_sorted() -> None:
    types = TypeRegistry()
    types.register("geo.point")(Point)
    types.register("geo.other")(Other)
    assert types.names() == ["geo.other", "geo.point"]
    assert {info.cls for info in types} == {Point, Other}


def test_the_module_level_decorators_use_the_default_registry() -> None:
    @schema("test.schemas.registry.default", version=2)
    class Defaulted(msgspec.Struct):
        label: str

    @upcaster("test.schemas.registry.default", 1)
    def rename(data: dict[str, Any]) -> dict[str, Any]:
        return {"label": data["name"]}

    assert registry.current("test.schemas.registry.default") == TypeInfo(
        "test.schemas.registry.default", 2, Defaulted
    )
    old = msgspec.msgpack.encode({"name": "kept"})
    assert Codec().decode_payload("test.schemas.registry.default", 1, old) == Defaulted("kept")
    assert repertory.schemas.registry is registry


# Upcaster registration.


def test_a_version_step_has_one_upcaster() -> None:
    types = TypeRegistry()

    def step(data: dict[str, Any]) -> dict[str, Any]:
        return data

    def another(data: dict[str, Any]) -> dict[str, Any]:
        return data

    assert types.upcaster("geo.point", 1)(step) is step
    assert types.upcaster("geo.point", 1)(step) is step  # the same function again is fine
    with pytest.raises(RegistrationError, match="already has an upcaster from v1"):
        types.upcaster("geo.point", 1)(another)
    assert types.upcaster("geo.point", 2)(another) is another


# Upcasting.


def chain_registry(current: int, calls: list[int], missing: int | None = None) -> TypeRegistry:
    """A registry whose "geo.point" is at `current`, with upcasters from every older version
    (but `missing`) that record their order and rename field ``x{v}`` to ``x{v + 1}``."""
    types = TypeRegistry()
    types.register("geo.point", version=current)(Point)
    for version in range(1, current):
        if version == missing:
            continue

        def step(data: dict[str, Any], version: int = version) -> dict[str, Any]:
            calls.append(version)
            renamed = dict(data)
            renamed[f"x{version + 1}"] = renamed.pop(f"x{version}")
            return renamed

        types.upcaster("geo.point", version)(step)
    return types


def test_upcasters_run_in_order_from_the_old_version_to_the_current() -> None:
    calls: list[int] = []
    types = chain_registry(3, calls)
    assert types.upcast("geo.point", 1, {"x1": 5}) == {"x3": 5}
    assert calls == [1, 2]
    calls.clear()
    assert types.upcast("geo.point", 2, {"x2": 5}) == {"x3": 5}
    assert calls == [2]
    calls.clear()
    assert types.upcast("geo.point", 3, {"x3": 5}) == {"x3": 5}
    assert calls == []


def test_a_missing_link_is_an_unknown_version_and_runs_no_upcaster() -> None:
    calls: list[int] = []
    types = chain_registry(4, calls, missing=3)
    with pytest.raises(UnknownVersionError, match="no upcaster from v3 to v4") as error:
        types.upcast("geo.point", 1, {"x1": 5})
    assert error.value.reason == "unknown-version"
    assert calls == []
    assert types.upcast("geo.point", 4, {"x4": 5}) == {"x4": 5}


@pytest.mark.parametrize("version", [4, 5, 0, -1])
def test_versions_newer_than_the_code_or_below_one_are_unknown(version: int) -> None:
    types = chain_registry(3, [])
    with pytest.raises(UnknownVersionError):
        types.upcast("geo.point", version, {})


def test_an_upcaster_that_raises_becomes_an_upcast_failed_decode_error() -> None:
    types = TypeRegistry()
    types.register("geo.point", version=2)(Point)

    @types.upcaster("geo.point", 1)
    def broken(data: dict[str, Any]) -> dict[str, Any]:
        return {"x": data["missing"]}

    with pytest.raises(DecodeError, match="from v1 to v2 failed") as error:
        types.upcast("geo.point", 1, {})
    assert error.value.reason == "upcast-failed"
    assert isinstance(error.value.__cause__, KeyError)


def test_an_upcaster_that_returns_no_dict_becomes_an_upcast_failed_decode_error() -> None:
    types = TypeRegistry()
    types.register("geo.point", version=2)(Point)
    types.upcaster("geo.point", 1)(cast(Any, lambda data: [data]))
    with pytest.raises(DecodeError, match="returned list, not a dict") as error:
        types.upcast("geo.point", 1, {})
    assert error.value.reason == "upcast-failed"


@SETTINGS
@given(
    current=st.integers(1, 8),
    data=st.data(),
    fmt=st.sampled_from(list(Format)),
    values=st.lists(st.integers(-(2**31), 2**31), min_size=8, max_size=8),
)
def test_chains_of_any_length_add_fields_in_order(
    current: int, data: st.DataObject, fmt: Format, values: list[int]
) -> None:
    """Version v of the type has fields f1..fv; the upcaster from v adds f(v+1) and records
    that it ran. Reading any old version gives the current class with every field, and runs
    exactly the upcasters from that version on, in order."""
    fields = [(f"f{index}", int) for index in range(1, current + 1)]
    current_class = msgspec.defstruct("Chained", [("steps", list[int]), *fields])
    types = TypeRegistry()
    types.register("test.chain", version=current)(current_class)
    calls: list[int] = []
    for version in range(1, current):

        def step(payload: dict[str, Any], version: int = version) -> dict[str, Any]:
            calls.append(version)
            return {
                **payload,
                "steps": [*payload["steps"], version],
                f"f{version + 1}": values[version],
            }

        types.upcaster("test.chain", version)(step)

    start = data.draw(st.integers(1, current))
    old = {"steps": [], **{f"f{index}": values[index - 1] for index in range(1, start + 1)}}
    encode = msgspec.json.encode if fmt is Format.JSON else msgspec.msgpack.encode
    decoded = Codec(types, fmt).decode_payload("test.chain", start, encode(old))

    assert isinstance(decoded, current_class)
    assert calls == list(range(start, current))
    assert msgspec.structs.asdict(decoded) == {
        "steps": list(range(start, current)),
        **{f"f{index}": values[index - 1] for index in range(1, current + 1)},
    }
