"""Which nodes are alive: each heartbeats with a TTL; a node that misses its expiry is gone."""

from repertory.streams.client import RedisClient
from repertory.streams.keys import KeyLayout
from repertory.streams.scripts import HEARTBEAT


class Membership:
    """Expiry is on the server's clock, unless a `now_ms` is given (a simulated clock)."""

    def __init__(self, client: RedisClient, keys: KeyLayout) -> None:
        self.client = client
        self.key = keys.nodes()

    async def heartbeat(self, node_id: str, ttl_ms: int, *, now_ms: int | None = None) -> list[str]:
        """Keep `node_id` a member for `ttl_ms` more; returns the live members, sorted."""
        if ttl_ms <= 0:
            raise ValueError(f"ttl_ms must be > 0, got {ttl_ms}")
        return await self._call(node_id, ttl_ms, now_ms)

    async def leave(self, node_id: str, *, now_ms: int | None = None) -> list[str]:
        """Stop being a member at once (a graceful stop); returns the members left."""
        return await self._call(node_id, 0, now_ms)

    async def _call(self, node_id: str, ttl_ms: int, now_ms: int | None) -> list[str]:
        args = [node_id, ttl_ms, "" if now_ms is None else now_ms]
        members = await HEARTBEAT(self.client, [self.key], args)
        return [member.decode() for member in members]
