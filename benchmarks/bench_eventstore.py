"""Event store: append (single, concurrent, batched) and replay, against raw redis-py.

The raw variants send the same commands with no framework: the same Lua script text by its
SHA1, the same stream key, one msgspec pass to encode or decode a struct that mirrors the
event record with its payload typed. They check what the event store checks (a refused append,
the number of events read), so both sides do the same work apart from the framework. Both use
a client made by `create_client` (a bounded blocking pool, socket timeouts, retries), so the
ratios are the framework's own cost; the sequential append also runs on a default redis-py
client, to show what those production settings cost per command.
"""

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, cast

import msgspec
import redis.asyncio

from benchmarks.harness import (
    Benchmark,
    Environment,
    Sample,
    Variant,
    concurrent,
    sequential,
    timed,
)
from repertory.schemas import Envelope, new_message_id, schema
from repertory.streams.client import create_client
from repertory.streams.eventstore import EVENT_FIELD, EventStore
from repertory.streams.keys import Address, KeyLayout
from repertory.streams.scripts import APPEND

TARGET = 0.8
KIND = "account"
EVENT_TYPE = "bench.deposited"
BATCH_SIZE = 100
CONCURRENT_APPENDERS = 32
READ_BATCH = 1000
EVENT_POOL = 1000


@schema(EVENT_TYPE, version=1)
class Deposited(msgspec.Struct, frozen=True, gc=False):
    """A realistic small event."""

    amount: int
    account_id: str
    currency: str
    at: float


class RawEventRecord(msgspec.Struct, kw_only=True, omit_defaults=True, frozen=True, gc=False):
    """The event record's wire shape, written by hand, with the payload typed."""

    type: str
    schema_version: Annotated[int, msgspec.Meta(ge=1)]
    payload: Deposited
    recorded_at: Annotated[int, msgspec.Meta(ge=0)]
    causation_id: str | None = None
    correlation_id: str | None = None
    traceparent: str | None = None
    content_type: str = "application/msgpack"


def _events(count: int) -> list[Deposited]:
    return [
        Deposited(
            amount=index % 997 + 1,
            account_id=f"acct-{index % 89:04d}",
            currency="EUR",
            at=1_700_000_000.0 + index,
        )
        for index in range(count)
    ]


def _appended(key: str, expected: int, reply: list[int]) -> int:
    ok, version = reply
    if not ok:
        raise RuntimeError(f"{key}: expected version {expected}, actual {version}")
    return int(version)


class RawStore:
    """Append and replay written directly against redis-py."""

    def __init__(self, client: "redis.asyncio.Redis") -> None:
        self.client = client
        self.sha = ""
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder(RawEventRecord).decode

    async def load_script(self) -> None:
        self.sha = await self.client.script_load(APPEND.source)

    def _encoded(self, events: Sequence[Deposited]) -> list[bytes]:
        recorded_at = time.time_ns() // 1_000_000
        encode = self._encode
        return [
            encode(
                RawEventRecord(
                    type=EVENT_TYPE, schema_version=1, payload=event, recorded_at=recorded_at
                )
            )
            for event in events
        ]

    async def append(self, key: str, events: Sequence[Deposited], expected: int) -> int:
        reply = await self.client.evalsha(self.sha, 1, key, expected, *self._encoded(events))
        return _appended(key, expected, reply)

    async def append_pipelined(
        self, appends: Sequence[tuple[str, Sequence[Deposited], int]]
    ) -> None:
        """Several appends (key, events, expected version) in one round trip."""
        pipeline = self.client.pipeline(transaction=False)
        for key, events, expected in appends:
            pipeline.evalsha(self.sha, 1, key, expected, *self._encoded(events))
        replies = await pipeline.execute()
        for (key, _batch, expected), reply in zip(appends, replies, strict=True):
            _appended(key, expected, reply)

    async def replay(self, key: str) -> int:
        return await raw_replay(self.client, key)

    async def replay_parsed(self, key: str) -> int:
        return await raw_replay_parsed(self.client, key)


async def raw_replay(client: "redis.asyncio.Redis", key: str) -> int:
    """XRANGE in batches of READ_BATCH, one typed msgspec decode per entry; the number read.

    The replies are taken as the server sends them, [[id, [field, value]], ...], as the event
    store takes them: a command name given as bytes is not in redis-py's table of reply
    callbacks, whose XRANGE callback builds a dict per entry and costs about as much as reading
    the reply (see `raw_replay_parsed`).
    """
    decode = msgspec.msgpack.Decoder(RawEventRecord).decode
    count = 0
    lower = b"-"
    while True:
        entries = await client.execute_command(b"XRANGE", key, lower, b"+", b"COUNT", READ_BATCH)
        for _entry_id, fields in entries:
            decode(fields[1])  # the record is the entry's first field
        count += len(entries)
        if len(entries) < READ_BATCH:
            return count
        lower = b"(" + entries[-1][0]


async def raw_replay_parsed(client: "redis.asyncio.Redis", key: str) -> int:
    """`raw_replay` through redis-py's `xrange()`, reply callback included: what a plain
    redis-py program does."""
    decode = msgspec.msgpack.Decoder(RawEventRecord).decode
    count = 0
    lower = b"-"
    while True:
        entries = cast(
            list[tuple[bytes, dict[bytes, bytes]]],
            await client.xrange(key, lower, "+", count=READ_BATCH),
        )
        for _entry_id, fields in entries:
            decode(fields[EVENT_FIELD])
        count += len(entries)
        if len(entries) < READ_BATCH:
            return count
        lower = b"(" + entries[-1][0]


def _check(what: str, actual: int, expected: int) -> None:
    # A benchmark that silently did less work than it claims would flatter itself.
    if actual != expected:
        raise RuntimeError(f"{what}: {actual}, expected {expected}")


@asynccontextmanager
async def suite(env: Environment) -> AsyncIterator[Sequence[Benchmark]]:
    client = create_client(env.url)
    raw_client = create_client(env.url)
    default_client = redis.asyncio.Redis.from_url(env.url)
    layout = KeyLayout()
    store = EventStore(client, keys=layout, read_batch=READ_BATCH)
    raw = RawStore(raw_client)
    default = RawStore(default_client)
    events = _events(EVENT_POOL)
    try:
        await raw.load_script()
        await default.load_script()
        yield [
            _append_sequential(env, store, raw, default, layout, events),
            _append_concurrent(env, store, raw, layout, events),
            _append_batched(env, store, raw, layout, events),
            _replay(env, store, raw, layout, events),
        ]
    finally:
        await client.aclose()
        await raw_client.aclose()
        await default_client.aclose()


def _append_sequential(
    env: Environment,
    store: EventStore,
    raw: RawStore,
    default: RawStore,
    layout: KeyLayout,
    events: list[Deposited],
) -> Benchmark:
    calls = env.size(5000, 40)

    async def repertory_round(round_index: int) -> Sample:
        address = Address(KIND, f"rep-seq-{round_index}")

        async def call(index: int) -> None:
            await store.append(address, [events[index % EVENT_POOL]], index)

        sample = await sequential(calls, call)
        _check(f"version of {address}", await store.version(address), calls)
        return sample

    def raw_round_on(client_store: RawStore, prefix: str) -> Callable[[int], Awaitable[Sample]]:
        async def raw_round(round_index: int) -> Sample:
            key = layout.events(Address(KIND, f"{prefix}-seq-{round_index}"))

            async def call(index: int) -> None:
                await client_store.append(key, [events[index % EVENT_POOL]], index)

            sample = await sequential(calls, call)
            _check(f"length of {key}", await client_store.client.xlen(key), calls)
            return sample

        return raw_round

    return Benchmark(
        name="append single, sequential",
        description=f"{calls:,} appends of one event each, awaited one after another",
        unit="events",
        latency_of="append call",
        variants=[
            Variant("raw redis-py", raw_round_on(raw, "raw"), baseline=True),
            Variant("repertory", repertory_round, target=TARGET),
            Variant("raw, default redis-py client", raw_round_on(default, "default")),
        ],
    )


def _append_concurrent(
    env: Environment, store: EventStore, raw: RawStore, layout: KeyLayout, events: list[Deposited]
) -> Benchmark:
    calls = env.size(1000, 4)

    async def repertory_round(round_index: int) -> Sample:
        addresses = [
            Address(KIND, f"rep-conc-{round_index}-{worker}")
            for worker in range(CONCURRENT_APPENDERS)
        ]

        async def call(worker: int, index: int) -> None:
            await store.append(addresses[worker], [events[index % EVENT_POOL]], index)

        sample = await concurrent(CONCURRENT_APPENDERS, calls, call)
        for address in addresses:
            _check(f"version of {address}", await store.version(address), calls)
        return sample

    async def raw_round(round_index: int) -> Sample:
        keys = [
            layout.events(Address(KIND, f"raw-conc-{round_index}-{worker}"))
            for worker in range(CONCURRENT_APPENDERS)
        ]

        async def call(worker: int, index: int) -> None:
            await raw.append(keys[worker], [events[index % EVENT_POOL]], index)

        sample = await concurrent(CONCURRENT_APPENDERS, calls, call)
        for key in keys:
            _check(f"length of {key}", await raw.client.xlen(key), calls)
        return sample

    async def pipelined_round(round_index: int) -> Sample:
        keys = [
            layout.events(Address(KIND, f"pipe-conc-{round_index}-{worker}"))
            for worker in range(CONCURRENT_APPENDERS)
        ]

        async def call(index: int) -> None:
            event = [events[index % EVENT_POOL]]
            await raw.append_pipelined([(key, event, index) for key in keys])

        pipelines = await sequential(calls, call, ops_per_call=CONCURRENT_APPENDERS)
        for key in keys:
            _check(f"length of {key}", await raw.client.xlen(key), calls)
        # Every append of a pipeline waits as long as the pipeline's round trip.
        latencies = [latency for latency in pipelines.latencies for _ in keys]
        return Sample(pipelines.ops, pipelines.seconds, latencies)

    return Benchmark(
        name=f"append single, {CONCURRENT_APPENDERS} concurrent",
        description=(
            f"{CONCURRENT_APPENDERS} appenders on different actors at once, each making "
            f"{calls:,} appends of one event; for reference, the same appends sent by hand "
            f"as one pipeline of {CONCURRENT_APPENDERS} per round trip"
        ),
        unit="events",
        latency_of="append call",
        variants=[
            Variant("raw redis-py", raw_round, baseline=True),
            Variant("repertory", repertory_round, target=TARGET),
            Variant("raw, pipelined", pipelined_round),
        ],
    )


def _append_batched(
    env: Environment, store: EventStore, raw: RawStore, layout: KeyLayout, events: list[Deposited]
) -> Benchmark:
    calls = env.size(1000, 4)
    batches = [events[start : start + BATCH_SIZE] for start in range(0, EVENT_POOL, BATCH_SIZE)]

    async def repertory_round(round_index: int) -> Sample:
        address = Address(KIND, f"rep-batch-{round_index}")

        async def call(index: int) -> None:
            await store.append(address, batches[index % len(batches)], index * BATCH_SIZE)

        sample = await sequential(calls, call, ops_per_call=BATCH_SIZE)
        _check(f"version of {address}", await store.version(address), calls * BATCH_SIZE)
        return sample

    async def raw_round(round_index: int) -> Sample:
        key = layout.events(Address(KIND, f"raw-batch-{round_index}"))

        async def call(index: int) -> None:
            await raw.append(key, batches[index % len(batches)], index * BATCH_SIZE)

        sample = await sequential(calls, call, ops_per_call=BATCH_SIZE)
        _check(f"length of {key}", await raw.client.xlen(key), calls * BATCH_SIZE)
        return sample

    return Benchmark(
        name=f"append batched, {BATCH_SIZE} per call",
        description=f"{calls:,} appends of {BATCH_SIZE} events each, awaited one after another",
        unit="events",
        latency_of=f"append call of {BATCH_SIZE} events",
        variants=[
            Variant("raw redis-py", raw_round, baseline=True),
            Variant("repertory", repertory_round, target=TARGET),
        ],
    )


def _replay(
    env: Environment, store: EventStore, raw: RawStore, layout: KeyLayout, events: list[Deposited]
) -> Benchmark:
    total = env.size(100_000, 2_500)
    address = Address(KIND, "replayed")
    key = layout.events(address)

    inline_key = layout.events(Address(KIND, "replayed-with-messages"))
    handled = msgspec.msgpack.encode(
        Envelope(
            id=new_message_id(),
            type="bench.deposit",
            schema_version=1,
            target=str(address),
            payload=msgspec.Raw(msgspec.msgpack.encode(events[0])),
            created_at=int(time.time() * 1000),
            correlation_id=new_message_id(),
        )
    )

    async def prepare() -> None:
        written = 0
        while written < total:
            count = min(EVENT_POOL, total - written)
            written = await store.append(address, events[:count], written)
        # The same events, each entry also holding the message that caused it: the layout
        # that would spare a commit its per-actor stream of handled messages.
        lower = b"-"
        while entries := await raw.client.execute_command(
            b"XRANGE", key, lower, b"+", b"COUNT", READ_BATCH
        ):
            pipeline = raw.client.pipeline(transaction=False)
            for entry_id, fields in entries:
                inline = {EVENT_FIELD: fields[1], "m": handled, "at": 0, "n": 1}
                pipeline.xadd(inline_key, inline, id=entry_id)
            await pipeline.execute()
            lower = b"(" + entries[-1][0]

    async def repertory_round(round_index: int) -> Sample:
        async def body() -> None:
            count = 0
            async for _stored in store.read(address):
                count += 1
            _check(f"events read from {address}", count, total)

        return await timed(total, body)

    async def raw_round(round_index: int) -> Sample:
        async def body() -> None:
            _check(f"entries read from {key}", await raw.replay(key), total)

        return await timed(total, body)

    async def parsed_round(round_index: int) -> Sample:
        async def body() -> None:
            _check(f"entries read from {key}", await raw.replay_parsed(key), total)

        return await timed(total, body)

    async def inline_round(round_index: int) -> Sample:
        async def body() -> None:
            _check(f"entries read from {inline_key}", await raw.replay(inline_key), total)

        return await timed(total, body)

    return Benchmark(
        name=f"replay {total:,} events",
        description=(
            f"one actor's {total:,}-event stream read with XRANGE in batches of {READ_BATCH:,}, "
            "each event decoded into its typed struct; for reference, the same through "
            "redis-py's xrange() and its reply callback, and the same events stored with the "
            f"{len(handled)}-byte message that caused each"
        ),
        unit="events",
        prepare=prepare,
        variants=[
            Variant("raw redis-py", raw_round, baseline=True),
            Variant("repertory", repertory_round, target=TARGET),
            Variant("raw, redis-py xrange()", parsed_round),
            Variant("raw, each event with its handled message", inline_round),
        ],
    )
