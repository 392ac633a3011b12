"""No append that reported success is lost when the server is killed (SIGKILL) mid-stream and
restarted, with AOF fsync `always`; the same clients carry on after the restart by themselves."""

from collections.abc import Iterator
from pathlib import Path

import anyio
import msgspec
import pytest

from repertory.schemas import schema
from repertory.streams.client import create_client
from repertory.streams.embedded import EmbeddedServer
from repertory.streams.eventstore import ConflictError, EventStore
from repertory.streams.keys import Address

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


@schema("test.durability.tick")
class Tick(msgspec.Struct, frozen=True):
    writer: int
    number: int


@pytest.fixture
def crash_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    server = EmbeddedServer(tmp_path / "data", appendfsync="always")
    server.start()
    yield server
    server.stop()


async def test_no_successful_append_is_lost_across_a_kill_and_restart(
    crash_server: EmbeddedServer,
) -> None:
    client = create_client(crash_server.url)
    store = EventStore(client)
    actors = [Address("ticker", f"t{n}") for n in range(4)]
    succeeded: dict[Address, dict[int, Tick]] = {actor: {} for actor in actors}
    appends_each = 60
    killed = anyio.Event()
    halfway = anyio.Event()
    done = 0

    async def writer(number: int, actor: Address) -> None:
        nonlocal done
        version = 0
        for index in range(appends_each):
            tick = Tick(number, index)
            try:
                version = await store.append(actor, [tick], expected_version=version)
            except ConflictError as conflict:
                # A retried append whose first try was applied before the crash: its outcome
                # was never reported as a success, so it may or may not be in the log.
                version = conflict.actual
                continue
            succeeded[actor][version] = tick
            done += 1
            if done == len(actors) * appends_each // 2:
                halfway.set()

    async def crash() -> None:
        await halfway.wait()
        crash_server.kill()
        killed.set()
        assert await anyio.to_thread.run_sync(crash_server.start) is True

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(crash)
            for number, actor in enumerate(actors):
                group.start_soon(writer, number, actor)
        assert killed.is_set()
        for actor in actors:
            stored = [event async for event in store.read(actor)]
            assert [event.version for event in stored] == list(range(1, len(stored) + 1))
            in_log = {event.version: event.event for event in stored}
            for version, tick in succeeded[actor].items():
                assert in_log.get(version) == tick, f"{actor} v{version} lost"
            # Every tick is in the log at most once.
            assert len(set(in_log.values())) == len(in_log)
    finally:
        await client.aclose()
