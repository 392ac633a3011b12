"""The Redis client factory: one URL or config gives a pooled, retrying asyncio client.

`redis://`, `rediss://` (TLS) and `unix:///path/to.sock` give a standalone client;
`redis+cluster://`, `rediss+cluster://` or the query `?cluster=true` give a Cluster client.
Connecting and every command are retried on connection errors and timeouts with exponential
backoff and full jitter, so a client rides out a server restart by itself: commands issued while
the server is down wait for it (until the retries are spent) and then succeed.

Retrying after a timeout can run a write twice (the server may have applied it before the reply
was lost); the event store's expected-version check turns such a repeat into a conflict.
"""

import asyncio
import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import hiredis
import redis.asyncio
import redis.asyncio.cluster
from redis.asyncio.connection import (
    URL_QUERY_ARGUMENT_PARSERS,
    AbstractConnection,
    BlockingConnectionPool,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.retry import Retry
from redis.backoff import AbstractBackoff
from redis.exceptions import AuthenticationError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from repertory.schemas.errors import RepertoryError

try:
    from redis.asyncio.observability.recorder import (
        _get_or_create_collector as _pool_metrics_collector,
    )
except ImportError:  # redis-py before 8 records no pool metrics

    def _pool_metrics_collector() -> None:
        return None


RedisClient: TypeAlias = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster


def is_cluster(client: RedisClient) -> bool:
    """Whether `client` talks to a Cluster, where one command or script reaches the keys of
    one slot only (one partition's), not every key."""
    return isinstance(client, redis.asyncio.cluster.RedisCluster)


T = TypeVar("T")

STANDALONE_SCHEMES = ("redis", "rediss", "unix")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
# Query options passed through to redis-py; `cluster` is ours and removed before that.
_QUERY_OPTIONS = frozenset(URL_QUERY_ARGUMENT_PARSERS) | {"client_name"}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
# 2**32 times any sensible base is far beyond any cap; the bound keeps the float finite.
_MAX_BACKOFF_EXPONENT = 32


class ClientConfigError(RepertoryError, ValueError):
    """A Redis URL or client setting that cannot work; the message says which and why."""


@dataclass(frozen=True, kw_only=True)
class ClientConfig:
    """How to reach Redis and how hard to try.

    `socket_timeout` bounds every read: it must exceed the longest `BLOCK` (in seconds) of any
    blocking stream read the runtime issues (they block for at most a second), or blocked reads
    would time out and be retried. None waits forever. Query options in the URL (for example
    `?socket_timeout=5`) win over the fields here, as in redis-py; `username`/`password` win over
    the URL's credentials. `pool_timeout` is how long a command waits for a free pooled
    connection once `max_connections` are in use.
    """

    url: str
    max_connections: int = 64
    pool_timeout: float | None = 20.0
    socket_timeout: float | None = 10.0
    connect_timeout: float = 5.0
    retries: int = 10
    backoff_base: float = 0.05
    backoff_cap: float = 2.0
    health_check_interval: float = 15.0
    username: str | None = None
    password: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_verify: bool = True
    cluster: bool | None = None
    client_name: str | None = None

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ClientConfigError(f"max_connections must be >= 1, not {self.max_connections}")
        if self.retries < 0:
            raise ClientConfigError(f"retries must be >= 0, not {self.retries}")
        if not 0 < self.backoff_base <= self.backoff_cap:
            raise ClientConfigError(
                f"need 0 < backoff_base <= backoff_cap, got {self.backoff_base} and "
                f"{self.backoff_cap}"
            )
        timeouts = {
            "socket_timeout": self.socket_timeout,
            "connect_timeout": self.connect_timeout,
            "pool_timeout": self.pool_timeout,
        }
        for name, value in timeouts.items():
            if value is not None and value <= 0:
                raise ClientConfigError(f"{name} must be > 0, not {value}")
        if self.health_check_interval < 0:
            raise ClientConfigError("health_check_interval must be >= 0")
        if self.tls_key_file is not None and self.tls_cert_file is None:
            raise ClientConfigError("tls_key_file needs tls_cert_file")

    @property
    def uses_cluster(self) -> bool:
        """The explicit `cluster` flag, else what the URL says."""
        if self.cluster is not None:
            return self.cluster
        return _parse_url(self.url).cluster


class FullJitterBackoff(AbstractBackoff):  # type: ignore[misc]  # redis is untyped to mypy
    """Sleep a uniform random time in [0, min(cap, base * 2**failures)] ("full jitter"), so
    clients that lost the same server do not all come back at the same instant."""

    def __init__(self, *, base: float, cap: float) -> None:
        self.base = base
        self.cap = cap

    def compute(self, failures: int) -> float:
        ceiling = min(self.cap, self.base * 2 ** min(failures, _MAX_BACKOFF_EXPONENT))
        return random.uniform(0.0, ceiling)


@dataclass(frozen=True)
class _ParsedUrl:
    """A URL split into what redis-py gets (`url`, without credentials or our options) and
    what we handle ourselves."""

    url: str
    scheme: str
    cluster: bool
    username: str | None
    password: str | None


def _parse_url(url: str) -> _ParsedUrl:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise ClientConfigError(f"malformed Redis URL {url!r}: {error}") from error
    scheme = parts.scheme.lower()
    if scheme not in STANDALONE_SCHEMES + CLUSTER_SCHEMES:
        raise ClientConfigError(
            f"unsupported URL scheme {parts.scheme!r} in {url!r}: use redis://, rediss://, "
            "unix:///path/to.sock, redis+cluster:// or rediss+cluster://"
        )
    cluster = scheme in CLUSTER_SCHEMES
    query: list[tuple[str, str]] = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name == "cluster":
            if value.lower() not in _TRUE + _FALSE:
                raise ClientConfigError(f"cluster={value!r} in {url!r} is not a boolean")
            cluster = cluster or value.lower() in _TRUE
        elif name in _QUERY_OPTIONS:
            query.append((name, value))
        else:
            raise ClientConfigError(
                f"unknown option {name!r} in {url!r}; known: cluster, "
                + ", ".join(sorted(_QUERY_OPTIONS))
            )
    base_scheme = scheme.removesuffix("+cluster")
    host = parts.netloc.rpartition("@")[2]
    if base_scheme == "unix":
        if not parts.path:
            raise ClientConfigError(f"{url!r} names no socket path: use unix:///path/to.sock")
        if cluster:
            raise ClientConfigError(f"{url!r}: a Cluster is reached over TCP, not a unix socket")
    elif not parts.hostname:
        raise ClientConfigError(f"{url!r} names no host")
    if cluster and parts.path.strip("/") not in ("", "0"):
        raise ClientConfigError(f"{url!r}: a Cluster has only database 0")
    if port == 0:
        raise ClientConfigError(f"{url!r}: port 0 cannot be connected to")
    # Spelled out rather than urlunsplit, which writes unix:/path for an empty host; redis-py
    # 8.2 takes only unix:///path.
    options = f"?{urlencode(query)}" if query else ""
    return _ParsedUrl(
        url=f"{base_scheme}://{host}{parts.path}{options}",
        scheme=base_scheme,
        cluster=cluster,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


def _authentication_error(error: BaseException) -> AuthenticationError | None:
    """The AuthenticationError behind `error`: redis-py wraps it in a ConnectionError when it
    happens while connecting."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, AuthenticationError):
            return cause
        cause = cause.__cause__
    return None


class ConnectionRetry(Retry):  # type: ignore[misc]  # redis is untyped to mypy (see pyproject)
    """redis-py's Retry, except that failed authentication is not retried (another attempt
    cannot fix wrong credentials) and surfaces as AuthenticationError itself."""

    async def call_with_retry(
        self,
        do: Callable[[], Awaitable[T]],
        fail: Callable[[Exception], Any] | Callable[[Exception, int], Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        def retryable(error: Exception) -> bool:
            if _authentication_error(error) is not None:
                return False
            return is_retryable is None or is_retryable(error)

        try:
            result: T = await super().call_with_retry(do, fail, retryable, with_failure_count)
            return result
        except RedisConnectionError as error:
            authentication = _authentication_error(error)
            if authentication is None or authentication is error:
                raise
            raise authentication from error


def _retry(config: ClientConfig) -> Retry:
    # The broad OSError (and builtin ConnectionError) catch socket failures that redis-py lets
    # through unwrapped on some paths (for example a unix socket that vanished mid-restart).
    errors: tuple[type[Exception], ...] = (
        RedisConnectionError,
        RedisTimeoutError,
        ConnectionError,
        OSError,
    )
    return ConnectionRetry(
        FullJitterBackoff(base=config.backoff_base, cap=config.backoff_cap),
        config.retries,
        supported_errors=errors,
    )


class _LeanConnection(AbstractConnection):  # type: ignore[misc]  # redis is untyped to mypy
    """A redis-py connection that costs less client CPU per command, with the same behaviour.

    - It packs commands with hiredis, as redis-py's synchronous client does. Its asyncio client
      packs in Python, at about 0.6 µs an argument: a group commit of 32 messages has ~400 of
      them, and packing was an eighth of a node's CPU. Arguments hiredis does not take (None,
      bool, bytearray) and multi-word command names go the Python way, which accepts or rejects
      them as redis-py always has.
    - It bounds each write with `asyncio.timeout` where redis-py uses `asyncio.wait_for`, which
      on Python 3.11 starts a task and goes once round the event loop for every command, even
      one the socket takes at once: 15-30 µs of a ~90 µs round trip here, and a third of the
      node's throughput with one actor. Errors are redis-py's: a write past `socket_timeout` is a
      TimeoutError, a failed socket a ConnectionError, and either drops the connection.
    """

    def pack_command(self, *args: Any) -> list[bytes]:
        name = args[0]
        if isinstance(name, bytes) or (isinstance(name, str) and " " not in name):
            try:
                return [hiredis.pack_command(args)]
            except TypeError:
                pass
        packed: list[bytes] = super().pack_command(*args)
        return packed

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        if not self.is_connected:
            await self.connect_check_health(check_health=False)
        if check_health:
            await self.check_health()
        if isinstance(command, str):
            command = command.encode()
        if isinstance(command, bytes):
            command = [command]
        try:
            async with asyncio.timeout(self.socket_timeout or None):
                await self._send_packed_command(command)
        except TimeoutError as error:
            await self.disconnect(nowait=True)
            if error.errno is not None:  # ETIMEDOUT from the OS: the connection is dead
                raise RedisConnectionError(
                    f"Error {error.errno} while writing to socket"
                ) from error
            raise RedisTimeoutError("Timeout writing to socket") from None
        except OSError as error:
            await self.disconnect(nowait=True)
            raise RedisConnectionError(f"Error while writing to socket: {error}") from error
        except BaseException:
            # A write cut short leaves the connection in an unknown state: it is not reused.
            await self.disconnect(nowait=True)
            raise


class _LeanConnectionPool(BlockingConnectionPool):  # type: ignore[misc]  # redis is untyped
    """A redis-py blocking pool whose uncontended get and release skip its condition, lock,
    timeout and metrics records: 2-3 µs a command against 13-16 µs for the two here, and a
    node makes ~0.2 commands a message (7 % less client CPU a message end to end, 1,000 actors).

    Anything else goes redis-py's way: no idle connection, another task inside the pool's lock
    or waiting for a connection (a release then wakes it), a maintenance window, redis-py's
    pool metrics switched on, a connection to reconnect or to re-authenticate. A connection
    taken is checked as redis-py checks it (connected, nothing left unread), and a check that
    fails returns it.
    """

    def _uncontended(self) -> bool:
        return (
            not self._lock.locked()
            and not self._condition._waiters
            and not getattr(self, "_in_maintenance", False)
            and _pool_metrics_collector() is None
        )

    async def get_connection(self, *args: Any, **options: Any) -> AbstractConnection:
        if not (self._available_connections and self._uncontended()):
            connection: AbstractConnection = await super().get_connection(*args, **options)
            return connection
        connection = self._available_connections.pop()
        self._in_use_connections.add(connection)
        try:
            await self.ensure_connection(connection)
        except BaseException:
            await self.release(connection)
            raise
        return connection

    async def release(self, connection: AbstractConnection) -> None:
        if (
            self._uncontended()
            and not connection.should_reconnect()
            and getattr(connection, "_re_auth_token", None) is None
        ):
            self._in_use_connections.remove(connection)
            self._available_connections.append(connection)
            return
        await super().release(connection)


_LEAN_CONNECTIONS: dict[type[AbstractConnection], type[AbstractConnection]] = {
    kind: type(f"Lean{kind.__name__}", (_LeanConnection, kind), {})
    for kind in (Connection, SSLConnection, UnixDomainSocketConnection)
}


def create_client(config: ClientConfig | str) -> RedisClient:
    """A client for `config`, or for a URL with the default settings. Nothing is connected
    until the first command. Raises ClientConfigError for a URL or setting that cannot work."""
    if isinstance(config, str):
        config = ClientConfig(url=config)
    parsed = _parse_url(config.url)
    cluster = config.uses_cluster
    if cluster and parsed.scheme == "unix":
        raise ClientConfigError(f"{config.url!r}: a Cluster is reached over TCP, not a socket")
    tls_files = (config.tls_ca_file, config.tls_cert_file, config.tls_key_file)
    if parsed.scheme != "rediss" and any(tls_files):
        raise ClientConfigError(f"TLS files were given but {config.url!r} is not rediss://")
    options: dict[str, Any] = {
        "socket_timeout": config.socket_timeout,
        "socket_connect_timeout": config.connect_timeout,
        "health_check_interval": config.health_check_interval,
        "retry": _retry(config),
        "decode_responses": False,
        "client_name": config.client_name,
        "username": config.username if config.username is not None else parsed.username,
        "password": config.password if config.password is not None else parsed.password,
    }
    if parsed.scheme == "rediss":
        options |= {
            "ssl_ca_certs": config.tls_ca_file,
            "ssl_certfile": config.tls_cert_file,
            "ssl_keyfile": config.tls_key_file,
            "ssl_cert_reqs": "required" if config.tls_verify else "none",
            "ssl_check_hostname": config.tls_verify,
        }
    try:
        if cluster:
            return redis.asyncio.cluster.RedisCluster.from_url(
                parsed.url, max_connections=config.max_connections, **options
            )
        pool = _LeanConnectionPool.from_url(
            parsed.url,
            max_connections=config.max_connections,
            timeout=config.pool_timeout,
            retry_on_error=[RedisConnectionError, RedisTimeoutError, OSError],
            **options,
        )
    except (ValueError, RedisError) as error:
        raise ClientConfigError(f"cannot use {config.url!r}: {error}") from error
    pool.connection_class = _LEAN_CONNECTIONS[pool.connection_class]
    return redis.asyncio.Redis.from_pool(pool)
