"""Concurrent appenders with random, often stale, expected versions never leave a gap and the
stream holds exactly the appends that reported success."""

import uuid
from collections.abc import Awaitable, Callable

import anyio
import fakeredis
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repertory.schemas import schema
from repertory.streams.client import RedisClient, create_client
from repertory.streams.eventstore import ConflictError, EventStore
from repertory.streams.keys import Address


@schema("test.concurrency.marker")
class Marker(msgspec.Struct, frozen=True):
    writer: int
    attempt: int
    index: int


# One attempt: how far behind the observed version the writer claims to be (None: no
# expectation), how many events it appends, and how many scheduler turns it waits between
# reading the version and appending (so other writers interleave).
attempt_plan = st.tuples(
    st.one_of(st.none(), st.integers(min_value=0, max_value=2)),
    st.integers(min_value=1, max_value=3),
    st.integers(min_value=0, max_value=3),
)
writers_plan = st.lists(st.lists(attempt_plan, min_size=1, max_size=5), min_size=2, max_size=5)


async def run_appenders(
    client: RedisClient, plans: list[list[tuple[int | None, int, int]]]
) -> None:
    store = EventStore(client)
    address = Address("counter", str(uuid.uuid4()))
    succeeded: dict[int, list[Marker]] = {}  # new version -> the events that append wrote
    conflicts: list[ConflictError] = []

    async def writer(number: int, plan: list[tuple[int | None, int, int]]) -> None:
        for attempt, (lag, count, turns) in enumerate(plan):
            observed = await store.version(address)
            for _ in range(turns):
                await anyio.lowlevel.checkpoint()
            expected = None if lag is None else max(observed - lag, 0)
            events = [Marker(number, attempt, i) for i in range(count)]
            try:
                version = await store.append(address, events, expected_version=expected)
            except ConflictError as conflict:
                conflicts.append(conflict)
                continue
            succeeded[version] = events

    async with anyio.create_task_group() as group:
        for number, plan in enumerate(plans):
            group.start_soon(writer, number, plan)

    assert all(conflict.actual != conflict.expected for conflict in conflicts)
    stored = [s async for s in store.read(address)]
    assert [s.version for s in stored] == list(range(1, len(stored) + 1))
    expected_stream: list[Marker] = []
    for version in sorted(succeeded):
        events = succeeded[version]
        assert version == len(expected_stream) + len(events)
        expected_stream.extend(events)
    assert [s.event for s in stored] == expected_stream


def run(
    factory: Callable[[], RedisClient], scenario: Callable[[RedisClient], Awaitable[None]]
) -> None:
    async def main() -> None:
        client = factory()
        try:
            await scenario(client)
        finally:
            await client.aclose()

    anyio.run(main)


@settings(max_examples=60, deadline=None)
@given(plans=writers_plan)
def test_concurrent_appenders_on_fakeredis(plans: list[list[tuple[int | None, int, int]]]) -> None:
    run(fakeredis.FakeAsyncRedis, lambda client: run_appenders(client, plans))


@pytest.mark.integration
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(plans=writers_plan)
def test_concurrent_appenders_on_the_real_server(
    redis_url: str, plans: list[list[tuple[int | None, int, int]]]
) -> None:
    run(lambda: create_client(redis_url), lambda client: run_appenders(client, plans))
