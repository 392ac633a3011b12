"""Dead letters: messages given up on, kept with the reason, readable by any Redis client."""

import msgspec

from repertory.schemas.records import now_ms
from repertory.streams.client import RedisClient
from repertory.streams.inbox import as_text
from repertory.streams.scripts import DEAD_LETTER


class DeadLetter(msgspec.Struct, frozen=True):
    """A message that could not be handled, with why and where it came from.

    `data` is the message exactly as it was received (possibly undecodable), so it can be
    inspected, fixed and requeued without loss.
    """

    id: bytes
    data: bytes
    reason: str
    detail: str
    source_stream: str
    source_id: str
    attempts: int
    dead_at: int


class DeadLetters:
    """The dead-letter stream of one partition."""

    def __init__(self, client: RedisClient, stream: str) -> None:
        self.client = client
        self.stream = stream

    async def add(
        self,
        data: bytes,
        *,
        reason: str,
        source_stream: str,
        source_id: bytes | str,
        attempts: int,
        detail: str = "",
    ) -> bytes:
        fields = _fields(data, reason, detail, source_stream, source_id, attempts)
        entry_id: bytes = await self.client.xadd(self.stream, fields)
        return entry_id

    async def move_from_inbox(
        self,
        inbox_stream: str,
        group: str,
        entry_id: bytes | str,
        data: bytes,
        *,
        reason: str,
        attempts: int,
        detail: str = "",
        epoch_key: str,
        epoch: int | None = None,
    ) -> bytes | None:
        """Dead-letter an inbox entry and ack it in one atomic step: it is neither lost nor
        delivered again. The inbox, this stream and the epoch key share a partition (hash
        slot). Returns None, writing nothing, when `epoch` is no longer the partition's."""
        fields = _fields(data, reason, detail, inbox_stream, entry_id, attempts)
        args: list[bytes | str | int] = [group, entry_id, "" if epoch is None else epoch]
        for name, value in fields.items():
            args.extend((name, value))
        dead_id: bytes | None = await DEAD_LETTER(
            self.client, [inbox_stream, self.stream, epoch_key], args
        )
        return dead_id

    async def list(self, *, count: int = 100, after: bytes | str = "-") -> list[DeadLetter]:
        lower = after if after == "-" else f"({as_text(after)}"
        entries = await self.client.xrange(self.stream, lower, "+", count=count)
        return [_dead_letter(entry_id, fields) for entry_id, fields in entries]

    async def get(self, entry_id: bytes | str) -> DeadLetter | None:
        entries = await self.client.xrange(self.stream, entry_id, entry_id)
        return _dead_letter(*entries[0]) if entries else None

    async def remove(self, *ids: bytes | str) -> int:
        if not ids:
            return 0
        return int(await self.client.xdel(self.stream, *ids))

    async def count(self) -> int:
        return int(await self.client.xlen(self.stream))


def _fields(
    data: bytes,
    reason: str,
    detail: str,
    source_stream: str,
    source_id: bytes | str,
    attempts: int,
) -> dict[str, bytes | str | int]:
    return {
        "data": data,
        "reason": reason,
        "detail": detail,
        "source_stream": source_stream,
        "source_id": source_id,
        "attempts": attempts,
        "dead_at": now_ms(),
    }


def _dead_letter(entry_id: bytes, fields: dict[bytes, bytes]) -> DeadLetter:
    return DeadLetter(
        id=entry_id,
        data=fields.get(b"data", b""),
        reason=fields.get(b"reason", b"").decode(errors="replace"),
        detail=fields.get(b"detail", b"").decode(errors="replace"),
        source_stream=fields.get(b"source_stream", b"").decode(errors="replace"),
        source_id=fields.get(b"source_id", b"").decode(errors="replace"),
        attempts=int(fields.get(b"attempts", b"0")),
        dead_at=int(fields.get(b"dead_at", b"0")),
    )
