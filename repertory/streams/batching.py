"""Calls of many concurrent callers that share round trips.

A caller alone makes its call at once and waits one round trip. Callers that arrive while a
round trip is out queue, and the first of them makes one call for all of them when it returns
(`send`, given the batch, returns each caller's result or exception in its place). Under load a
call then costs a share of a round trip.

No task runs in the background: the caller at the head of the queue sends the batch (its round
trip shielded from cancellation, so the others always get their answer) and hands the lead to
the next queued caller; a caller cancelled while queued is left out.

A waiting caller waits on an asyncio future of its own: anyio's Event looks up the running
async library each time one is made (a tenth of a send's CPU when every send makes one), an
asyncio Event adds a lookup of its loop to each wait, and the client is asyncio's anyway.
"""

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import anyio

Item = TypeVar("Item")
Result = TypeVar("Result")

MAX_BATCH = 128
"""Items in one call at most."""


class _Call(Generic[Item, Result]):
    __slots__ = ("error", "item", "leads", "result", "woken")

    def __init__(self, item: Item) -> None:
        self.item = item
        self.woken: asyncio.Future[None] | None = None
        """Done when its batch is answered or its turn to send came; only a caller that
        queued behind a batch in flight waits for it."""
        self.leads = False
        self.result: Result | None = None
        self.error: BaseException | None = None

    def wake(self) -> None:
        # Its caller may have been cancelled meanwhile (then the future is cancelled too).
        if self.woken is not None and not self.woken.done():
            self.woken.set_result(None)

    def outcome(self) -> Result:
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]  # set with the batch's replies


class Batcher(Generic[Item, Result]):
    """Calls `send` for concurrent callers of `submit`, in as few round trips as the replies
    allow, at most `max_batch` items a call."""

    def __init__(
        self,
        send: Callable[[list[Item]], Awaitable[Sequence[Result | BaseException]]],
        *,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self.send = send
        self.max_batch = max_batch
        self._queued: deque[_Call[Item, Result]] = deque()
        self._sending = False
        self._crowded = False
        """The last batch had more than one caller."""

    @property
    def queued(self) -> int:
        """Callers waiting for the batch in flight to return."""
        return len(self._queued)

    async def submit(self, item: Item) -> Result:
        """`item`'s result once its batch is answered. Raises what its call raised (a batch's
        callers share a failed round trip). A caller cancelled while its batch is out still
        gets its result: the call was made."""
        call: _Call[Item, Result] = _Call(item)
        self._queued.append(call)
        try:
            if self._sending:
                call.woken = asyncio.get_running_loop().create_future()
                await call.woken
            else:
                self._sending = call.leads = True
                if self._crowded:
                    # Let callers ready to run join this batch: those a batch just answered
                    # come back together, and would otherwise alternate between batches of
                    # one and of the rest. A caller alone goes at once.
                    await asyncio.sleep(0)
        except BaseException:
            self._withdraw(call)
            raise
        if call.leads:
            await self._send_batch()
        return call.outcome()

    def _withdraw(self, call: _Call[Item, Result]) -> None:
        """A queued caller cancelled: its item is not sent, and if it was to send the next
        batch, the next caller queued does."""
        if call in self._queued:
            self._queued.remove(call)
            if call.leads:
                self._hand_over()

    async def _send_batch(self) -> None:
        batch = [self._queued.popleft() for _ in range(min(self.max_batch, len(self._queued)))]
        self._crowded = len(batch) > 1
        replies: Sequence[Result | BaseException]
        try:
            with anyio.CancelScope(shield=True):
                replies = await self.send([call.item for call in batch])
        except BaseException as error:  # the batch's callers, this one included, raise it
            replies = [error] * len(batch)
        self._hand_over()
        for call, reply in zip(batch, replies, strict=True):
            if isinstance(reply, BaseException):
                call.error = reply
            else:
                call.result = reply
            call.wake()

    def _hand_over(self) -> None:
        if self._queued:
            head = self._queued[0]
            head.leads = True
            head.wake()
        else:
            self._sending = False
