"""Which nodes are alive: each heartbeats with a TTL; a node that misses its expiry is gone."""

from repertory.streams.client import RedisClient
from repertory.streams.keys import KeyLayout
from repertory.streams.scripts import HEARTBEAT


class Membership:
    def __init__(self, client: RedisClient, keys: KeyLayout) -> None:
        self.client = client
        self.key = keys.nodes()

    async def heartbeat(self, node_id: str, ttl_ms: int) -> list[str]:
        """Keep `node_id` a member for `ttl_ms` more; returns the live members, sorted."""
        if ttl_ms <= 0:
            raise ValueError(f"ttl_ms must be > 0, got {ttl_ms}")
        members = await HEARTBEAT(self.client, [self.key], [node_id, ttl_ms])
        return [member.decode() for member in members]

    async def leave(self, node_id: str) -> list[str]:
        """Stop being a member at once (a graceful stop); returns the members left."""
        members = await HEARTBEAT(self.client, [self.key], [node_id, 0])
        return [member.decode() for member in members]
