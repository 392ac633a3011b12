"""The error types of repertory. Every error the product raises derives from `RepertoryError`."""


class RepertoryError(Exception):
    """Base class of every error raised by repertory."""


class DecodeError(RepertoryError, ValueError):
    """Bytes that cannot become a value: malformed, oversized, of an unknown type or version.

    This is the only error a decode raises, whatever the input. `reason` is a short
    machine-readable word (``malformed``, ``oversized``, ``unknown-type``,
    ``unknown-version``, ``invalid``, ``upcast-failed``) that dead letters record.
    """

    def __init__(self, message: str, *, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class UnknownTypeError(DecodeError):
    """A message or event names a type that no registry knows."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="unknown-type")


class UnknownVersionError(DecodeError):
    """A schema version that is newer than the code, or has no upcaster chain to the current one."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="unknown-version")


class PayloadTooLargeError(RepertoryError, ValueError):
    """An encoded value is larger than the codec's configured limit."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"encoded size {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class UnregisteredTypeError(RepertoryError, TypeError):
    """A value's class was never registered with the type registry (a programming error)."""


class RegistrationError(RepertoryError, ValueError):
    """A schema or upcaster registration breaks the registry's rules (a programming error)."""
