"""Fixtures shared by the tests: one real embedded valkey-server per session (the test kit's
`repertory_server`, from the pytest plugin), a fresh fakeredis
per test, a local three-master Cluster, and `redis`, which runs a test on all three (ids
"fake", "real" and "cluster")."""

from collections.abc import AsyncIterator, Iterator

import fakeredis
import pytest

from repertory.runtime.eventloop import event_loop_name
from repertory.streams.client import RedisClient, create_client
from repertory.streams.embedded import EmbeddedServer
from tests.cluster import local_cluster


@pytest.fixture(scope="session")
def anyio_backend() -> tuple[str, dict[str, bool]]:
    # The loop the runtime's processes run on (REPERTORY_EVENT_LOOP=asyncio tests the other).
    return "asyncio", {"use_uvloop": event_loop_name() == "uvloop"}


@pytest.fixture(scope="session")
def embedded_server(repertory_server: EmbeddedServer) -> EmbeddedServer:
    """The session's server (the test kit's `repertory_server`). Tests that kill or restart a
    server start their own instead."""
    return repertory_server


@pytest.fixture(scope="session")
def redis_url(embedded_server: EmbeddedServer) -> str:
    return embedded_server.url


@pytest.fixture
async def real_redis(redis_url: str) -> AsyncIterator[RedisClient]:
    client = create_client(redis_url)
    await client.flushall()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def fake_redis() -> AsyncIterator[RedisClient]:
    client: RedisClient = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A local three-master Redis Cluster for the session (started on first use)."""
    with local_cluster(tmp_path_factory.mktemp("cluster")) as url:
        yield url


@pytest.fixture
async def cluster_redis(cluster_url: str) -> AsyncIterator[RedisClient]:
    client = create_client(cluster_url)
    await client.flushall()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(
    params=[
        "fake",
        pytest.param("real", marks=pytest.mark.integration),
        pytest.param("cluster", marks=pytest.mark.integration),
    ]
)
def redis(request: pytest.FixtureRequest) -> RedisClient:
    # Resolved by name at setup, so a "fake" test never starts the embedded server.
    client: RedisClient = request.getfixturevalue(f"{request.param}_redis")
    return client
