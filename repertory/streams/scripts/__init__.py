"""Lua scripts, each in its own `.lua` file, loaded once and reloaded on NOSCRIPT."""

import hashlib
from importlib.resources import files
from typing import Any

from redis.exceptions import NoScriptError

from repertory.streams.client import RedisClient


class Script:
    """A server-side script called by its SHA1; a server that lost it (restart, SCRIPT FLUSH,
    another Cluster node) gets it again transparently."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.source = files(__package__).joinpath(f"{name}.lua").read_text(encoding="utf-8")
        self.sha = hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()

    async def __call__(self, client: RedisClient, keys: list[str], args: list[Any]) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await client.script_load(self.source)
            return await client.evalsha(self.sha, len(keys), *keys, *args)


ACTIVATE = Script("activate")
ADD_MESSAGES = Script("add_messages")
APPEND = Script("append")
APPEND_ONCE = Script("append_once")
COMMIT = Script("commit")
DEAD_LETTER = Script("dead_letter")
EXTEND = Script("extend")
HEARTBEAT = Script("heartbeat")
FIRE_TIMERS = Script("fire_timers")
LEASE = Script("lease")
RELEASE_LEASE = Script("release_lease")
REPLACE_FIELD = Script("replace_field")
REQUEUE = Script("requeue")
SETTLE = Script("settle")
SWAP_STREAM = Script("swap_stream")
