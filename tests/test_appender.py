"""Concurrent sends share round trips (`StreamAppender`) without mixing up their outcomes: each
caller gets its own entry id or error, in its own order, and a cancelled caller neither hangs
the others nor loses their messages."""

from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from anyio.abc import TaskGroup
from redis.exceptions import ResponseError

from repertory.streams.appender import StreamAppender
from repertory.streams.client import RedisClient, create_client
from repertory.streams.scripts import ADD_MESSAGES
from tests.support import eventually

pytestmark = pytest.mark.anyio


async def entries(client: RedisClient, stream: str) -> list[tuple[bytes, bytes]]:
    return [(entry_id, fields[b"m"]) for entry_id, fields in await client.xrange(stream)]


async def test_concurrent_callers_get_their_own_ids_in_their_own_order(
    redis: RedisClient,
) -> None:
    appender = StreamAppender(redis)
    returned: dict[bytes, bytes] = {}

    async def caller(number: int) -> None:
        for sequence in range(25):
            message = f"{number}:{sequence}".encode()
            returned[message] = await appender.add(f"{{s}}:{number % 4}", message)

    async with anyio.create_task_group() as group:
        for number in range(20):
            group.start_soon(caller, number)

    written: dict[bytes, bytes] = {}
    for stream in range(4):
        order: dict[str, list[int]] = {}
        for entry_id, message in await entries(redis, f"{{s}}:{stream}"):
            written[message] = entry_id
            caller_number, sequence = message.decode().split(":")
            order.setdefault(caller_number, []).append(int(sequence))
        assert all(sequences == list(range(25)) for sequences in order.values())
    assert written == returned
    assert len(written) == 500
    assert appender.queued == 0


async def test_callers_that_arrive_together_share_one_round_trip(real_redis: RedisClient) -> None:
    await real_redis.script_load(ADD_MESSAGES.source)  # no NOSCRIPT round trip to count
    appender = StreamAppender(real_redis)
    round_trips = 0
    execute = real_redis.execute_command

    async def counted(*args: Any, **options: Any) -> Any:
        nonlocal round_trips
        round_trips += 1
        return await execute(*args, **options)

    real_redis.execute_command = counted
    async with anyio.create_task_group() as group:
        for number in range(64):
            group.start_soon(appender.add, f"inbox:{number % 16}", b"m")

    assert round_trips == 2  # the first caller goes alone, the 63 others in one more call
    assert sum([await real_redis.xlen(f"inbox:{number}") for number in range(16)]) == 64


async def test_a_failed_add_fails_alone(redis: RedisClient) -> None:
    await redis.set("{s}:not-a-stream", "x")
    appender = StreamAppender(redis)
    failures: list[BaseException] = []

    async def caller(stream: str) -> None:
        try:
            await appender.add(stream, stream.encode())
        except ResponseError as error:
            failures.append(error)

    async with anyio.create_task_group() as group:
        for number in range(10):
            group.start_soon(caller, "{s}:not-a-stream" if number == 5 else f"{{s}}:{number}")

    assert [str(error).split()[0] for error in failures] == ["WRONGTYPE"]
    assert [await redis.xlen(f"{{s}}:{number}") for number in range(10) if number != 5] == [1] * 9


class Paused:
    """Writes held by the server until `unpause`, so that a batch stays in flight while callers
    queue behind it."""

    def __init__(self, client: RedisClient, admin: RedisClient) -> None:
        self.client = client
        self.admin = admin
        self.appender = StreamAppender(client)
        self.outcomes: dict[str, bytes] = {}

    async def blocked(self) -> int:
        return int((await self.admin.info("clients"))["blocked_clients"])

    async def caller(self, name: str, scope: anyio.CancelScope) -> None:
        with scope:
            self.outcomes[name] = await self.appender.add("inbox", name.encode())

    async def start(self, group: TaskGroup, name: str, queued: int) -> anyio.CancelScope:
        """Start a caller and wait until it is held: sending (by the server) or queued."""
        scope = anyio.CancelScope()
        blocked = await self.blocked()
        group.start_soon(self.caller, name, scope)
        if queued:
            await eventually(lambda: self.queued(queued))
        else:
            await eventually(lambda: self.blocking(blocked + 1))
        return scope

    async def queued(self, count: int) -> bool:
        return self.appender.queued == count

    async def blocking(self, count: int) -> bool:
        return await self.blocked() == count

    async def unpause(self) -> None:
        await self.admin.execute_command("CLIENT", "UNPAUSE")

    async def written(self) -> list[bytes]:
        return [message for _, message in await entries(self.client, "inbox")]


@pytest.fixture
async def paused(redis_url: str) -> AsyncIterator[Paused]:
    client, admin = create_client(redis_url), create_client(redis_url)
    await admin.flushall()
    await admin.execute_command("CLIENT", "PAUSE", 20_000, "WRITE")
    try:
        yield Paused(client, admin)
    finally:
        await admin.execute_command("CLIENT", "UNPAUSE")
        await admin.aclose()
        await client.aclose()


@pytest.mark.integration
async def test_a_caller_cancelled_in_the_queue_is_not_sent_and_the_rest_go_on(
    paused: Paused,
) -> None:
    async with anyio.create_task_group() as group:
        await paused.start(group, "first", queued=0)
        next_in_line = await paused.start(group, "second", queued=1)  # sends the next batch
        await paused.start(group, "third", queued=2)
        next_in_line.cancel()
        await eventually(lambda: paused.queued(1))
        await paused.unpause()

    assert set(paused.outcomes) == {"first", "third"}
    assert await paused.written() == [b"first", b"third"]


@pytest.mark.integration
async def test_a_sender_cancelled_in_flight_finishes_and_answers_the_callers_behind_it(
    paused: Paused,
) -> None:
    async with anyio.create_task_group() as group:
        sender = await paused.start(group, "first", queued=0)
        await paused.start(group, "second", queued=1)
        await paused.start(group, "third", queued=2)
        sender.cancel()  # its round trip is shielded: it ends once the server answers
        await paused.unpause()

    # The first message was written, so its caller gets its id rather than a cancellation.
    assert set(paused.outcomes) == {"first", "second", "third"}
    assert await paused.written() == [b"first", b"second", b"third"]


class GatedClient:
    """A client whose replies wait for the test to release them, one round trip at a time."""

    def __init__(self) -> None:
        self.gate = anyio.Event()
        self.sent: list[list[bytes]] = []

    def release(self) -> None:
        self.gate.set()
        self.gate = anyio.Event()

    async def reply(self, messages: list[bytes]) -> list[bytes]:
        self.sent.append(messages)
        await self.gate.wait()
        return [f"{len(self.sent)}-{index}".encode() for index in range(len(messages))]

    async def xadd(self, stream: str, fields: dict[bytes, bytes]) -> bytes:
        return (await self.reply([fields[b"m"]]))[0]

    async def evalsha(self, sha: str, keys: int, *args: Any) -> list[bytes]:
        return await self.reply(list(args[keys:]))


async def test_a_caller_cancelled_as_its_turn_to_send_comes_hands_the_turn_on() -> None:
    client = GatedClient()
    appender = StreamAppender(client)
    outcomes: dict[str, bytes] = {}
    scopes = {name: anyio.CancelScope() for name in ("first", "second", "third")}

    async def caller(name: str) -> None:
        with scopes[name]:
            outcomes[name] = await appender.add("inbox", name.encode())

    async def sent(batches: int) -> bool:
        return len(client.sent) == batches

    async def queued() -> bool:
        return appender.queued == 2

    async with anyio.create_task_group() as group:
        group.start_soon(caller, "first")
        await eventually(lambda: sent(1))
        for name in ("second", "third"):
            group.start_soon(caller, name)
        await eventually(queued)
        # The first batch returns and hands the next to "second", which is cancelled before
        # it runs: "third" must send it instead of waiting forever.
        client.release()
        scopes["second"].cancel()
        await eventually(lambda: sent(2))
        client.release()

    assert client.sent == [[b"first"], [b"third"]]
    assert set(outcomes) == {"first", "third"}
