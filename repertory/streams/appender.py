"""Messages added to streams by many concurrent callers, sharing round trips (`Batcher`).

A caller alone sends its XADD at once and waits one round trip, as with a plain XADD. Callers
that arrive while a round trip is out queue, and the first of them sends them all together
when it returns: one script call (`add_messages.lua`), or on a Cluster, whose scripts reach one
slot each, one pipeline. Under load a send then costs a share of a round trip: 8 µs of client
CPU per message in batches of 16, against 18 µs in a redis-py pipeline (it reads each reply
under a timeout of its own). The runtime benchmarks' row *sends* measures the rates.
"""

from typing import Any

from repertory.streams.batching import MAX_BATCH, Batcher
from repertory.streams.client import RedisClient, is_cluster
from repertory.streams.inbox import MESSAGE_FIELD
from repertory.streams.scripts import ADD_MESSAGES


class StreamAppender:
    """XADD of one message field for concurrent callers of one client, in as few round trips
    as the replies allow."""

    def __init__(self, client: RedisClient, *, max_batch: int = MAX_BATCH) -> None:
        self.client = client
        self._batcher: Batcher[tuple[str, bytes], bytes] = Batcher(self._send, max_batch=max_batch)

    @property
    def queued(self) -> int:
        """Callers waiting for the batch in flight to return."""
        return self._batcher.queued

    async def add(self, stream: str, message: bytes) -> bytes:
        """Add `message` to `stream` (as its field `m`); returns the entry id once the server
        has it. Raises what its XADD raised; a batch shares a connection error. A caller
        cancelled while its message is out still gets the id: the message was written."""
        return await self._batcher.submit((stream, message))

    async def _send(self, batch: list[tuple[str, bytes]]) -> list[Any]:
        if len(batch) == 1:
            ((stream, message),) = batch
            return [await self.client.xadd(stream, {MESSAGE_FIELD: message})]
        if is_cluster(self.client):
            pipe = self.client.pipeline(transaction=False)
            for stream, message in batch:
                pipe.xadd(stream, {MESSAGE_FIELD: message})
            replies: list[Any] = await pipe.execute(raise_on_error=False)
            return replies
        streams = [stream for stream, _ in batch]
        return list(await ADD_MESSAGES(self.client, streams, [message for _, message in batch]))
