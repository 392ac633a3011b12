"""Messages added to streams by many concurrent callers, sharing round trips.

A caller alone sends its XADD at once and waits one round trip, as with a plain XADD. Callers
that arrive while a round trip is out queue, and the first of them sends them all together
when it returns: one script call (`add_messages.lua`), or on a Cluster, whose scripts reach one
slot each, one pipeline. Under load a send then costs a share of a round trip: 8 µs of client
CPU per message in batches of 16, against 18 µs in a redis-py pipeline (it reads each reply
under a timeout of its own). The runtime benchmarks' row *sends* measures the rates.

No task runs in the background: the caller at the head of the queue sends the batch (its
round trip shielded from cancellation, so the others always get their answer) and hands the
lead to the next queued caller.

A waiting caller waits on an asyncio future of its own: anyio's Event looks up the running
async library each time one is made (a tenth of a send's CPU when every send makes one), an
asyncio Event adds a lookup of its loop to each wait, and the client is asyncio's anyway.
"""

import asyncio
from collections import deque
from typing import Any

import anyio

from repertory.streams.client import RedisClient, is_cluster
from repertory.streams.inbox import MESSAGE_FIELD
from repertory.streams.scripts import ADD_MESSAGES

MAX_BATCH = 128
"""Messages in one call at most."""


class _Add:
    __slots__ = ("entry_id", "error", "leads", "message", "stream", "woken")

    def __init__(self, stream: str, message: bytes) -> None:
        self.stream = stream
        self.message = message
        self.woken: asyncio.Future[None] | None = None
        """Done when its batch is answered or its turn to send came; only a caller that
        queued behind a batch in flight waits for it."""
        self.leads = False
        self.entry_id: bytes | None = None
        self.error: BaseException | None = None

    def wake(self) -> None:
        # Its caller may have been cancelled meanwhile (then the future is cancelled too).
        if self.woken is not None and not self.woken.done():
            self.woken.set_result(None)

    def outcome(self) -> bytes:
        if self.error is not None:
            raise self.error
        assert self.entry_id is not None
        return self.entry_id


class StreamAppender:
    """XADD of one message field for concurrent callers of one client, in as few round trips
    as the replies allow."""

    def __init__(self, client: RedisClient, *, max_batch: int = MAX_BATCH) -> None:
        self.client = client
        self.max_batch = max_batch
        self._queued: deque[_Add] = deque()
        self._sending = False
        self._crowded = False
        """The last batch had more than one caller."""

    @property
    def queued(self) -> int:
        """Callers waiting for the batch in flight to return."""
        return len(self._queued)

    async def add(self, stream: str, message: bytes) -> bytes:
        """Add `message` to `stream` (as its field `m`); returns the entry id once the server
        has it. Raises what its XADD raised; a batch shares a connection error. A caller
        cancelled while its message is out still gets the id: the message was written."""
        add = _Add(stream, message)
        self._queued.append(add)
        try:
            if self._sending:
                add.woken = asyncio.get_running_loop().create_future()
                await add.woken
            else:
                self._sending = add.leads = True
                if self._crowded:
                    # Let callers ready to run join this batch: those a batch just answered
                    # come back together, and would otherwise alternate between batches of
                    # one and of the rest. A caller alone goes at once.
                    await asyncio.sleep(0)
        except BaseException:
            self._withdraw(add)
            raise
        if add.leads:
            await self._send_batch()
        return add.outcome()

    def _withdraw(self, add: _Add) -> None:
        """A queued caller cancelled: its message is not sent, and if it was to send the next
        batch, the next caller queued does."""
        if add in self._queued:
            self._queued.remove(add)
            if add.leads:
                self._hand_over()

    async def _send_batch(self) -> None:
        batch = [self._queued.popleft() for _ in range(min(self.max_batch, len(self._queued)))]
        self._crowded = len(batch) > 1
        try:
            with anyio.CancelScope(shield=True):
                replies = await self._send(batch)
        except BaseException as error:  # the batch's callers, this one included, raise it
            replies = [error] * len(batch)
        self._hand_over()
        for add, reply in zip(batch, replies, strict=True):
            if isinstance(reply, BaseException):
                add.error = reply
            else:
                add.entry_id = reply
            add.wake()

    async def _send(self, batch: list[_Add]) -> list[Any]:
        if len(batch) == 1:
            return [await self.client.xadd(batch[0].stream, {MESSAGE_FIELD: batch[0].message})]
        if is_cluster(self.client):
            pipe = self.client.pipeline(transaction=False)
            for add in batch:
                pipe.xadd(add.stream, {MESSAGE_FIELD: add.message})
            replies: list[Any] = await pipe.execute(raise_on_error=False)
            return replies
        streams = [add.stream for add in batch]
        return list(await ADD_MESSAGES(self.client, streams, [add.message for add in batch]))

    def _hand_over(self) -> None:
        if self._queued:
            head = self._queued[0]
            head.leads = True
            head.wake()
        else:
            self._sending = False
