"""The client factory: URL forms, TLS and cluster options (built without connecting), bad
configurations, ACL authentication, pooling, and reconnecting across a server crash."""

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import pytest
import redis.asyncio
import redis.asyncio.cluster
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import AuthenticationError, DataError
from redis.exceptions import TimeoutError as RedisTimeoutError

from repertory.schemas.errors import RepertoryError
from repertory.streams.client import (
    ClientConfig,
    ClientConfigError,
    FullJitterBackoff,
    RedisClient,
    create_client,
)
from repertory.streams.embedded import EmbeddedServer


def standalone(client: RedisClient) -> redis.asyncio.Redis:
    assert isinstance(client, redis.asyncio.Redis)
    return client


def cluster(client: RedisClient) -> redis.asyncio.cluster.RedisCluster:
    assert isinstance(client, redis.asyncio.cluster.RedisCluster)
    return client


def pool_options(client: RedisClient) -> dict[str, Any]:
    options: dict[str, Any] = standalone(client).connection_pool.connection_kwargs
    return options


@pytest.mark.parametrize(
    ("url", "connection_class", "expected"),
    [
        ("redis://cache.local:6380/2", Connection, {"host": "cache.local", "port": 6380, "db": 2}),
        ("redis://cache.local", Connection, {"host": "cache.local"}),
        ("rediss://cache.local:6380", SSLConnection, {"host": "cache.local", "port": 6380}),
        (
            "unix:///run/valkey/valkey.sock",
            UnixDomainSocketConnection,
            {"path": "/run/valkey/valkey.sock"},
        ),
        ("redis://cache.local?cluster=false", Connection, {"host": "cache.local"}),
        ("redis://cache.local?socket_timeout=3", Connection, {"socket_timeout": 3.0}),
        (
            "unix:///run/valkey/valkey.sock?socket_timeout=3",
            UnixDomainSocketConnection,
            {"path": "/run/valkey/valkey.sock", "socket_timeout": 3.0},
        ),
    ],
)
def test_standalone_url_forms(
    url: str, connection_class: type[Connection], expected: dict[str, Any]
) -> None:
    client = standalone(create_client(url))
    assert issubclass(client.connection_pool.connection_class, connection_class)
    options = pool_options(client)
    assert options.items() >= expected.items()
    assert options["decode_responses"] is False


@pytest.mark.parametrize(
    "args",
    [
        ("SET", "key", b"value"),
        ("EVALSHA", "a" * 40, 2, "k1", "é", 1.5, -3, 2**70, b"", memoryview(b"view")),
        ("CLIENT SETNAME", "name"),
        ("SET", "key", bytearray(b"value")),
        (b"XREADGROUP", b"GROUP", "g", "c", b"COUNT", 100, b"STREAMS", "s1", "s2", b">", b">"),
    ],
)
def test_commands_are_packed_as_redis_py_packs_them(args: tuple[Any, ...]) -> None:
    pool = standalone(create_client("redis://cache.local")).connection_pool
    packed = pool.make_connection().pack_command(*args)
    assert b"".join(packed) == b"".join(Connection(host="cache.local").pack_command(*args))


@pytest.mark.parametrize("argument", [None, True, object()])
def test_arguments_redis_py_rejects_are_rejected(argument: object) -> None:
    connection = standalone(create_client("redis://cache.local")).connection_pool.make_connection()
    with pytest.raises(DataError):
        connection.pack_command("SET", "key", argument)


@pytest.mark.parametrize(
    ("config", "tls"),
    [
        (ClientConfig(url="redis+cluster://node-1.local:7000"), False),
        (ClientConfig(url="rediss+cluster://node-1.local:7000"), True),
        (ClientConfig(url="redis://node-1.local:7000?cluster=true"), False),
        (ClientConfig(url="REDIS+CLUSTER://node-1.local:7000"), False),
        (ClientConfig(url="redis://node-1.local:7000", cluster=True), False),
    ],
)
def test_cluster_url_forms(config: ClientConfig, tls: bool) -> None:
    assert config.uses_cluster
    client = cluster(create_client(config))
    startup = client.nodes_manager.startup_nodes.values()
    assert [(node.host, node.port) for node in startup] == [("node-1.local", 7000)]
    options = client.nodes_manager.connection_kwargs
    assert (options.get("connection_class") is SSLConnection) is tls
    assert options["decode_responses"] is False


def test_the_cluster_flag_overrides_the_url() -> None:
    config = ClientConfig(url="redis+cluster://node-1.local:7000", cluster=False)
    assert not config.uses_cluster
    assert isinstance(create_client(config), redis.asyncio.Redis)


def test_defaults() -> None:
    config = ClientConfig(url="redis://cache.local")
    options = pool_options(create_client(config))
    assert options["socket_timeout"] == config.socket_timeout == 10.0
    assert options["socket_connect_timeout"] == config.connect_timeout
    assert options["health_check_interval"] == config.health_check_interval
    retry = options["retry"]
    assert retry.get_retries() == config.retries == 10
    assert isinstance(retry._backoff, FullJitterBackoff)
    pool = standalone(create_client(config)).connection_pool
    assert isinstance(pool, redis.asyncio.BlockingConnectionPool)
    assert pool.max_connections == config.max_connections


def test_tls_options() -> None:
    config = ClientConfig(
        url="rediss://cache.local:6380",
        tls_ca_file="/etc/ssl/ca.pem",
        tls_cert_file="/etc/ssl/client.pem",
        tls_key_file="/etc/ssl/client.key",
    )
    options = pool_options(create_client(config))
    assert options["ssl_ca_certs"] == "/etc/ssl/ca.pem"
    assert options["ssl_certfile"] == "/etc/ssl/client.pem"
    assert options["ssl_keyfile"] == "/etc/ssl/client.key"
    assert options["ssl_cert_reqs"] == "required"
    assert options["ssl_check_hostname"] is True

    unverified = ClientConfig(url="rediss+cluster://node-1.local:7000", tls_verify=False)
    cluster_options = cluster(create_client(unverified)).nodes_manager.connection_kwargs
    assert cluster_options["ssl_cert_reqs"] == "none"
    assert cluster_options["ssl_check_hostname"] is False


def test_credentials_from_the_url_and_from_the_config() -> None:
    options = pool_options(create_client("redis://alice:p%40ss%2Fword@cache.local:6380"))
    assert (options["username"], options["password"]) == ("alice", "p@ss/word")
    assert options["host"] == "cache.local"

    config = ClientConfig(url="redis://alice:old@cache.local", username="bob", password="new")
    options = pool_options(create_client(config))
    assert (options["username"], options["password"]) == ("bob", "new")

    config = ClientConfig(url="redis://alice:old@cache.local", password="new")
    options = pool_options(create_client(config))
    assert (options["username"], options["password"]) == ("alice", "new")


@pytest.mark.parametrize(
    "config",
    [
        ClientConfig(url="http://cache.local"),
        ClientConfig(url="cache.local:6379"),
        ClientConfig(url="redis://cache.local:notaport"),
        ClientConfig(url="redis://cache.local:0"),
        ClientConfig(url="redis://"),
        ClientConfig(url="unix://"),
        ClientConfig(url="redis+cluster://node-1.local:7000/3"),
        ClientConfig(url="unix:///run/valkey.sock?cluster=true"),
        ClientConfig(url="unix:///run/valkey.sock", cluster=True),
        ClientConfig(url="redis://cache.local?cluster=maybe"),
        ClientConfig(url="redis://cache.local?bogus=1"),
        ClientConfig(url="redis://cache.local?db=first"),
        ClientConfig(url="redis://cache.local", tls_ca_file="/etc/ssl/ca.pem"),
    ],
    ids=lambda config: config.url + (" cluster" if config.cluster else ""),
)
def test_bad_urls_are_rejected_clearly(config: ClientConfig) -> None:
    with pytest.raises(ClientConfigError) as caught:
        create_client(config)
    assert isinstance(caught.value, RepertoryError)
    assert str(caught.value)


@pytest.mark.parametrize(
    "settings",
    [
        {"retries": -1},
        {"max_connections": 0},
        {"backoff_base": 0.0},
        {"backoff_base": 3.0, "backoff_cap": 2.0},
        {"socket_timeout": 0.0},
        {"connect_timeout": -1.0},
        {"pool_timeout": 0.0},
        {"health_check_interval": -1.0},
        {"tls_key_file": "/etc/ssl/client.key"},
    ],
    ids=repr,
)
def test_bad_settings_are_rejected_clearly(settings: dict[str, Any]) -> None:
    with pytest.raises(ClientConfigError):
        ClientConfig(url="redis://cache.local", **settings)


def test_full_jitter_backoff_stays_within_its_bounds() -> None:
    random.seed(7)
    backoff = FullJitterBackoff(base=0.05, cap=2.0)
    for failures in range(1, 12):
        ceiling = min(2.0, 0.05 * 2**failures)
        delays = [backoff.compute(failures) for _ in range(50)]
        assert all(0.0 <= delay <= ceiling for delay in delays)
        assert len(set(delays)) > 1  # jittered, not a fixed schedule
    assert backoff.compute(10_000) <= 2.0  # no overflow for huge failure counts


# --- against the real embedded server --------------------------------------------------------


@pytest.fixture
async def acl_user(real_redis: RedisClient) -> AsyncIterator[tuple[str, str]]:
    """A user with a password and full rights on the session server, deleted afterwards."""
    name, password = f"user-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    await real_redis.execute_command("ACL", "SETUSER", name, "on", f">{password}", "~*", "+@all")
    try:
        yield name, password
    finally:
        await real_redis.execute_command("ACL", "DELUSER", name)


@pytest.mark.integration
@pytest.mark.anyio
async def test_acl_user_and_password(redis_url: str, acl_user: tuple[str, str]) -> None:
    name, password = acl_user
    client = create_client(ClientConfig(url=redis_url, username=name, password=password))
    try:
        assert await client.execute_command("ACL", "WHOAMI") == name.encode()
        await client.set(b"written-by-acl-user", b"yes")
    finally:
        await client.aclose()

    socket_path = redis_url.removeprefix("unix://")
    in_url = create_client(f"unix://{name}:{password}@{socket_path}")
    try:
        assert await in_url.execute_command("ACL", "WHOAMI") == name.encode()
    finally:
        await in_url.aclose()


@pytest.mark.integration
@pytest.mark.anyio
async def test_a_wrong_password_is_an_authentication_error(
    redis_url: str, acl_user: tuple[str, str]
) -> None:
    name, _ = acl_user
    client = create_client(ClientConfig(url=redis_url, username=name, password="wrong"))
    try:
        # Not retried: the error comes at once (well inside this bound), as itself.
        with anyio.fail_after(5), pytest.raises(AuthenticationError):
            await client.ping()
    finally:
        await client.aclose()


@pytest.mark.integration
@pytest.mark.anyio
async def test_the_pool_bounds_connections_and_waits_for_a_free_one(redis_url: str) -> None:
    name = f"pool-{uuid.uuid4().hex[:8]}"
    client = create_client(ClientConfig(url=redis_url, max_connections=2, client_name=name))
    observer = create_client(redis_url)
    try:
        replies: list[bytes] = []

        async def read_one(index: int) -> None:
            await client.set(f"pool:{index}".encode(), index)
            reply = await client.get(f"pool:{index}".encode())
            assert isinstance(reply, bytes)
            replies.append(reply)

        async with anyio.create_task_group() as group:
            for index in range(20):
                group.start_soon(read_one, index)
        assert sorted(replies) == sorted(str(index).encode() for index in range(20))
        connections = await observer.client_list()
        assert 1 <= sum(1 for entry in connections if entry["name"] == name) <= 2
    finally:
        await client.aclose()
        await observer.aclose()


class _CountingCondition(asyncio.Condition):
    def __init__(self) -> None:
        super().__init__()
        self.entered = 0

    async def __aenter__(self) -> None:
        self.entered += 1
        await super().__aenter__()


@pytest.mark.integration
@pytest.mark.anyio
async def test_commands_one_at_a_time_take_no_pool_lock(redis_url: str) -> None:
    """redis-py's blocking pool takes a condition, a lock and a timeout for every get and
    release (12 µs a command here); with a connection idle and no one waiting, none is needed."""
    client = standalone(create_client(redis_url))
    pool = client.connection_pool
    try:
        await client.ping()
        pool._condition = condition = _CountingCondition()
        for index in range(10):
            await client.set(b"lean-pool", index)
        assert await client.get(b"lean-pool") == b"9"
        assert condition.entered == 0
    finally:
        await client.aclose()


@pytest.mark.integration
@pytest.mark.anyio
async def test_a_released_connection_goes_to_the_task_waiting_for_one(redis_url: str) -> None:
    client = standalone(create_client(ClientConfig(url=redis_url, max_connections=1)))
    pool = client.connection_pool
    try:
        held = await pool.get_connection()
        answered = anyio.Event()

        async def waiting() -> None:
            assert await client.ping()
            answered.set()

        with anyio.fail_after(10):
            async with anyio.create_task_group() as group:
                group.start_soon(waiting)
                # Until it waits in the pool: the pool has no event to wait on.
                while not pool._condition._waiters:  # noqa: ASYNC110
                    await anyio.sleep(0.001)
                assert not answered.is_set()
                await pool.release(held)
                await answered.wait()
    finally:
        await client.aclose()


@pytest.mark.integration
@pytest.mark.anyio
async def test_a_connection_the_server_closed_is_replaced_when_taken(redis_url: str) -> None:
    client = create_client(ClientConfig(url=redis_url, retries=0))
    observer = create_client(redis_url)
    try:
        first = await client.client_id()
        assert await observer.client_kill_filter(_id=first) == 1
        with anyio.fail_after(10):
            # Until the server has closed it: it tells no one.
            while first in [int(entry["id"]) for entry in await observer.client_list()]:  # noqa: ASYNC110
                await anyio.sleep(0.001)
        # No retries: the idle connection is found closed when taken, not when used.
        assert await client.client_id() != first
    finally:
        await client.aclose()
        await observer.aclose()


async def append(client: RedisClient, value: bytes) -> bytes:
    entry_id = await client.xadd(b"log", {b"n": value})
    assert isinstance(entry_id, bytes)
    return entry_id


@pytest.fixture
def crash_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    """A server of its own (never the session one): the test kills it."""
    server = EmbeddedServer(tmp_path / "data", appendfsync="always")
    server.start()
    yield server
    server.stop()


@pytest.mark.integration
@pytest.mark.anyio
async def test_the_client_rides_out_a_crash_and_loses_no_acknowledged_entry(
    crash_server: EmbeddedServer,
) -> None:
    client = create_client(crash_server.url)
    try:
        acknowledged = [await append(client, str(n).encode()) for n in range(100)]
        await client.set(b"before", b"crash")

        crash_server.kill()
        issued_while_down: list[bytes] = []

        async def append_while_down() -> None:
            issued_while_down.append(await append(client, b"while-down"))

        async with anyio.create_task_group() as group:
            group.start_soon(append_while_down)
            # The append above is retrying against a dead server while this restarts it.
            assert await anyio.to_thread.run_sync(crash_server.start) is True

        # The same client object, no reconnect by hand.
        assert await client.get(b"before") == b"crash"
        entries = [entry_id for entry_id, _ in await client.xrange(b"log") or []]
        assert entries == [*acknowledged, *issued_while_down]
        assert await client.xlen(b"log") == len(acknowledged) + 1
    finally:
        await client.aclose()


@pytest.mark.integration
@pytest.mark.anyio
async def test_a_command_starts_no_task(redis_url: str) -> None:
    """Writes are bounded by a timeout context, not by `asyncio.wait_for`, which on Python
    3.11 starts a task for every command (a third of a node's throughput with one actor)."""
    client = create_client(redis_url)
    loop = asyncio.get_running_loop()
    started: list[object] = []
    default_factory = loop.get_task_factory()

    def counting_factory(loop: asyncio.AbstractEventLoop, coro: Any, **options: Any) -> Any:
        started.append(coro)
        if default_factory is not None:
            return default_factory(loop, coro, **options)
        return asyncio.Task(coro, loop=loop, **options)

    try:
        await client.ping()  # connected beforehand: connecting is not what is counted
        loop.set_task_factory(counting_factory)
        try:
            assert await client.set(b"no-task", b"1")
            assert await client.get(b"no-task") == b"1"
        finally:
            loop.set_task_factory(default_factory)
        assert started == []
    finally:
        await client.aclose()


@pytest.mark.integration
@pytest.mark.anyio
async def test_a_write_the_server_does_not_take_times_out_and_drops_the_connection(
    redis_url: str, tmp_path: Path
) -> None:
    """A proxy in front of the server stops reading from the client once it is connected:
    when the socket's buffers are full the write waits, and past `socket_timeout` it fails
    as redis-py's TimeoutError, the connection closed rather than reused half-written."""
    server_path = urlsplit(redis_url).path
    stalled = asyncio.Event()
    pumps: list[asyncio.Task[None]] = []

    async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, up: bool) -> None:
        while data := await source.read(65536):
            if up and stalled.is_set():
                return  # reads nothing more from the client
            sink.write(data)
            await sink.drain()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_unix_connection(server_path)
        pumps.append(asyncio.create_task(pump(reader, server_writer, up=True)))
        pumps.append(asyncio.create_task(pump(server_reader, writer, up=False)))

    proxy_path = tmp_path / "proxy.sock"
    proxy = await asyncio.start_unix_server(accept, path=str(proxy_path))
    client = create_client(ClientConfig(url=f"unix://{proxy_path}?socket_timeout=0.3", retries=0))
    pool = standalone(client).connection_pool
    connection = await pool.get_connection()
    try:
        stalled.set()
        with pytest.raises(RedisTimeoutError, match="writing"):
            await connection.send_packed_command([b"x" * (64 << 20)], check_health=False)
        assert not connection.is_connected
    finally:
        await pool.release(connection)
        await client.aclose()
        proxy.close()
        for task in pumps:
            task.cancel()
