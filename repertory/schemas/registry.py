"""The type registry: every message, event and state type has a name and a schema version.

Records on the wire carry the name and version, never a Python class path, so classes can be
moved or renamed freely. Only the current version of a type is a class; older versions exist
as upcasters that turn the plain-dict payload of version n into version n + 1.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from repertory.schemas.errors import (
    DecodeError,
    RegistrationError,
    UnknownTypeError,
    UnknownVersionError,
    UnregisteredTypeError,
)

S = TypeVar("S", bound=msgspec.Struct)
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
U = TypeVar("U", bound=Upcaster)


@dataclass(frozen=True, slots=True)
class TypeInfo:
    """A registered type: its wire name, its current schema version and its class."""

    name: str
    version: int
    cls: type[msgspec.Struct]


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise RegistrationError(f"a type name must be a non-empty string, got {name!r}")
    if not name.isprintable() or any(char.isspace() for char in name):
        raise RegistrationError(
            f"a type name must not contain whitespace or control characters, got {name!r}"
        )
    return name


def _check_version(version: object, what: str) -> int:
    # bool is an int subclass; True as a version is always a mistake.
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise RegistrationError(f"{what} must be an int >= 1, got {version!r}")
    return version


class TypeRegistry:
    """Maps type names to their current class and version, and holds the upcaster chains."""

    def __init__(self) -> None:
        self._by_name: dict[str, TypeInfo] = {}
        self._by_class: dict[type, TypeInfo] = {}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}

    def register(self, name: str, version: int = 1) -> Callable[[type[S]], type[S]]:
        """Class decorator: register a msgspec Struct as the current `version` of `name`.

        Registering the identical class again with the same name and version does nothing.
        A name bound to another class, or a class already registered under another name or
        version, raises RegistrationError.
        """
        _check_name(name)
        _check_version(version, "a schema version")

        def decorate(cls: type[S]) -> type[S]:
            self._add(TypeInfo(name, version, cls))
            return cls

        return decorate

    def _add(self, info: TypeInfo) -> None:
        cls = info.cls
        if not (isinstance(cls, type) and issubclass(cls, msgspec.Struct)):
            raise RegistrationError(f"{info.name!r}: only msgspec.Struct classes can be registered")
        # Upcasters work on plain dicts, which needs the payload to be encoded as a map.
        if cls.__struct_config__.array_like:
            raise RegistrationError(
                f"{info.name!r}: {cls.__qualname__} is array_like; registered types must be "
                "encoded as maps so that old versions can be upcast field by field"
            )
        known = self._by_name.get(info.name)
        if known is not None and known.cls is not cls:
            raise RegistrationError(
                f"type name {info.name!r} is already registered to "
                f"{known.cls.__module__}.{known.cls.__qualname__}; "
                "never reuse a name for a different type"
            )
        previous = self._by_class.get(cls)
        if previous is not None and previous != info:
            raise RegistrationError(
                f"{cls.__module__}.{cls.__qualname__} is already registered as "
                f"{previous.name!r} v{previous.version}, cannot also be {info.name!r} "
                f"v{info.version}"
            )
        self._by_name[info.name] = info
        self._by_class[cls] = info

    def upcaster(self, name: str, from_version: int) -> Callable[[U], U]:
        """Function decorator: register the step that turns the plain-dict payload of
        `name` at `from_version` into the payload at `from_version + 1`."""
        _check_name(name)
        _check_version(from_version, "an upcaster's from_version")

        def decorate(step: U) -> U:
            known = self._upcasters.get((name, from_version))
            if known is not None and known is not step:
                raise RegistrationError(
                    f"{name!r} already has an upcaster from v{from_version} "
                    f"({getattr(known, '__qualname__', known)!r})"
                )
            self._upcasters[(name, from_version)] = step
            return step

        return decorate

    def info_for(self, cls: type) -> TypeInfo:
        """The registration of `cls`; raises UnregisteredTypeError if it has none."""
        try:
            return self._by_class[cls]
        except KeyError:
            raise UnregisteredTypeError(
                f"{cls.__module__}.{cls.__qualname__} is not a registered type; decorate it "
                "with @schema(name) (or @registry.register(name)) before encoding it"
            ) from None

    def current(self, name: str) -> TypeInfo:
        """The current registration of `name`; raises UnknownTypeError if it has none."""
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownTypeError(f"unknown type {name!r}") from None

    def upcast(self, name: str, from_version: int, data: dict[str, Any]) -> dict[str, Any]:
        """Apply the upcasters of `name` from `from_version` up to the current version, in order.

        Raises UnknownTypeError for an unknown name, UnknownVersionError for a version newer
        than the current one or one without a complete upcaster chain, and
        DecodeError(reason="upcast-failed") when an upcaster raises or returns a non-dict.
        """
        current = self.current(name).version
        if from_version > current:
            raise UnknownVersionError(
                f"{name!r} v{from_version} is newer than this code's v{current}"
            )
        if from_version < 1:
            raise UnknownVersionError(f"{name!r} v{from_version} is not a valid schema version")
        # Find every step before running any, so a broken chain fails without side effects.
        steps: list[Upcaster] = []
        for version in range(from_version, current):
            step = self._upcasters.get((name, version))
            if step is None:
                raise UnknownVersionError(
                    f"{name!r} v{from_version} cannot be read: no upcaster from v{version} "
                    f"to v{version + 1}"
                )
            steps.append(step)
        for version, step in enumerate(steps, start=from_version):
            try:
                # Typed as object: an upcaster is user code and may break its own signature.
                upcast: object = step(data)
            except Exception as exc:
                raise DecodeError(
                    f"upcasting {name!r} from v{version} to v{version + 1} failed: {exc!r}",
                    reason="upcast-failed",
                ) from exc
            if not isinstance(upcast, dict):
                raise DecodeError(
                    f"the upcaster of {name!r} from v{version} returned "
                    f"{type(upcast).__name__}, not a dict",
                    reason="upcast-failed",
                )
            data = upcast
        return data

    def names(self) -> list[str]:
        """The registered type names, sorted."""
        return sorted(self._by_name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._by_name

    def __iter__(self) -> Iterator[TypeInfo]:
        return iter(list(self._by_name.values()))

    def __len__(self) -> int:
        return len(self._by_name)


registry = TypeRegistry()
"""The default registry, used by `schema`, `upcaster` and `Codec()`."""


def schema(name: str, version: int = 1) -> Callable[[type[S]], type[S]]:
    """Register a msgspec Struct in the default registry as the current `version` of `name`."""
    return registry.register(name, version)


def upcaster(name: str, from_version: int) -> Callable[[U], U]:
    """Register an upcaster from `from_version` to `from_version + 1` in the default registry."""
    return registry.upcaster(name, from_version)
