"""An actor system: the kinds of an application, where they live, and the client API
(`send`, `ask`, `state_of`) that any process uses to talk to them."""

import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import anyio
import msgspec
from redis.exceptions import RedisError

from repertory.actors.model import Actor, Rejected
from repertory.schemas import Codec
from repertory.schemas.errors import DecodeError, RepertoryError
from repertory.streams.appender import StreamAppender
from repertory.streams.client import RedisClient, create_client
from repertory.streams.eventstore import EventStore, Loaded
from repertory.streams.keys import Address, KeyLayout
from repertory.streams.partition import Partition

REPLY_TTL_MS = 60_000


class AskTimeoutError(RepertoryError, TimeoutError):
    """No answer arrived within the `ask` timeout (the message may still be handled later)."""


class UnknownKindError(RepertoryError, LookupError):
    """A message for an actor kind this system does not host."""


class AskReply(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What a node sends back to an `ask` caller after committing (or rejecting) the message.

    Events and the reply are encoded event records, in whatever format the system's codec
    writes, carried as bytes so that this MessagePack reply can hold either format."""

    message_id: str
    version: int
    events: list[bytes] = []
    reply: bytes | None = None
    rejected: str | None = None
    code: str | None = None


class Answer(msgspec.Struct, frozen=True):
    """An `ask` result: the actor's version after the message, its events, and the handler's
    explicit reply if it gave one."""

    version: int
    events: list[msgspec.Struct]
    reply: msgspec.Struct | None


class ActorView(msgspec.Struct, frozen=True, gc=False):
    """An actor's state at a version. Not tracked by the garbage collector (it is never part
    of a reference cycle): a node keeps one per active actor, and full collections would
    otherwise walk them all."""

    version: int
    state: Any


class ActorSystem:
    """The actor kinds of one application namespace.

    With no `url`, an embedded valkey-server is started (or reused) in `data_dir`.
    """

    def __init__(
        self,
        *actors: Actor[Any],
        url: str | None = None,
        app: str = "rep",
        partitions: int = 16,
        data_dir: str | Path = ".repertory",
        codec: Codec | None = None,
        client: RedisClient | None = None,
    ) -> None:
        self.actors: dict[str, Actor[Any]] = {}
        for actor in actors:
            if actor.kind in self.actors:
                raise RepertoryError(f"two actors registered for kind {actor.kind!r}")
            self.actors[actor.kind] = actor
        self.url = url
        self.keys = KeyLayout(app, partitions=partitions)
        self.data_dir = Path(data_dir)
        self.codec = codec or Codec()
        self._client = client
        self._owns_client = client is None
        self._appender: StreamAppender | None = None

    @property
    def client(self) -> RedisClient:
        if self._client is None:
            raise RepertoryError("the actor system is not connected: use `async with system`")
        return self._client

    def _appends(self) -> StreamAppender:
        client = self.client
        if self._appender is None or self._appender.client is not client:
            self._appender = StreamAppender(client)
        return self._appender

    @property
    def store(self) -> EventStore:
        return EventStore(self.client, keys=self.keys, codec=self.codec)

    async def connect(self) -> Self:
        if self._client is None:
            url = self.url
            if url is None:
                from repertory.streams.embedded import EmbeddedServer

                server = EmbeddedServer(self.data_dir)
                await anyio.to_thread.run_sync(server.start)
                url = server.url
            self._client = create_client(url)
        return self

    async def close(self) -> None:
        if self._client is not None and self._owns_client:
            await self._client.aclose()
            self._client = None

    async def __aenter__(self) -> Self:
        return await self.connect()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def actor_of(self, address: Address) -> Actor[Any]:
        actor = self.actors.get(address.kind)
        if actor is None:
            raise UnknownKindError(f"no actor kind {address.kind!r} in this system")
        return actor

    def partition(self, kind: str, number: int) -> Partition:
        return Partition(self.client, self.keys, kind, number)

    async def send(
        self,
        target: Address | str,
        message: msgspec.Struct,
        *,
        idempotency_key: str | None = None,
        correlation_id: str | None = None,
        traceparent: str | None = None,
        reply_to: str | None = None,
    ) -> str:
        """Queue `message` for `target`; returns its message id once it is durably queued.

        Sends that share an `idempotency_key` take effect once, however often they are sent.
        Concurrent sends share round trips (`StreamAppender`).
        """
        address = Address.parse(target) if isinstance(target, str) else target
        self.actor_of(address)
        envelope = self.codec.envelope(
            str(address),
            message,
            idempotency_key=idempotency_key,
            correlation_id=correlation_id,
            traceparent=traceparent,
            reply_to=reply_to,
        )
        await self._appends().add(self.keys.inbox_of(address), self.codec.encode(envelope))
        return envelope.id

    async def ask(
        self, target: Address | str, message: msgspec.Struct, *, timeout: float = 5.0
    ) -> Answer:
        """Send `message` and wait for the actor's answer. Raises Rejected if the handler
        refused it and AskTimeoutError if no answer came in time."""
        reply_key = f"{{{self.keys.app}:reply:{uuid.uuid4()}}}"
        await self.send(target, message, reply_to=reply_key)
        data = await self._await_reply(reply_key, timeout)
        reply = msgspec.msgpack.decode(data, type=AskReply)
        if reply.rejected is not None:
            raise Rejected(reply.rejected, code=reply.code or "rejected")
        codec = self.codec
        return Answer(
            reply.version,
            [codec.event_of(codec.decode_event(record)) for record in reply.events],
            None if reply.reply is None else codec.event_of(codec.decode_event(reply.reply)),
        )

    async def _await_reply(self, reply_key: str, timeout: float) -> bytes:
        # Block in short slices: a blocking read must stay under the client's socket timeout.
        with anyio.move_on_after(timeout):
            while True:
                response = await self.client.xread({reply_key: b"0"}, count=1, block=1000)
                if response:
                    await self.client.delete(reply_key)
                    data: bytes = response[0][1][0][1][b"m"]
                    return data
        raise AskTimeoutError(f"no answer within {timeout} s (reply stream {reply_key})")

    async def state_of(self, target: Address | str) -> ActorView:
        """The actor's state rebuilt read-only from its snapshot and events."""
        address = Address.parse(target) if isinstance(target, str) else target
        return await rebuild(self.store, self.actor_of(address), address)


async def rebuild(store: EventStore, actor: Actor[Any], address: Address) -> ActorView:
    """Fold the actor's events onto its latest snapshot (or its initial state): activation,
    one round trip for a new actor or a short log (`EventStore.load`)."""
    return await _fold(actor, await store.load(address))


async def rebuild_many(
    store: EventStore, actor: Actor[Any], addresses: Sequence[Address]
) -> list[ActorView | Exception]:
    """`rebuild` for several actors of one kind, one round trip for all those that are new or
    have a short log (`EventStore.load_many`). An actor that cannot be rebuilt (a snapshot or
    an event that cannot be decoded, an applier that raises) gets its error in its place."""
    views: list[ActorView | Exception] = []
    for loaded in await store.load_many(addresses):
        if isinstance(loaded, DecodeError):
            views.append(loaded)
            continue
        try:
            views.append(await _fold(actor, loaded))
        except (RedisError, OSError):
            raise
        except Exception as error:
            views.append(error)
    return views


async def _fold(actor: Actor[Any], loaded: Loaded) -> ActorView:
    snapshot, first, more = loaded
    state, version = (actor.initial, 0) if snapshot is None else (snapshot.state, snapshot.version)
    if first is not None:
        version, events = first
        state = actor.fold(state, events)
    if more is not None:
        async for last_version, events in more:
            state = actor.fold(state, events)
            version = last_version
    return ActorView(version, state)
