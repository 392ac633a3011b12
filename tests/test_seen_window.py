"""The seen-set that dedupes re-sent messages is bounded (`SeenWindow`): by age and by size,
pruned by a partition's commits at most once per `trim_every_ms`."""

import pytest

from repertory.streams.client import RedisClient
from repertory.streams.keys import Address, KeyLayout
from repertory.streams.partition import Commit, CommitStatus, Partition, SeenWindow

pytestmark = pytest.mark.anyio

ACTOR = Address("counter", "c")


def partition_of(redis: RedisClient, app: str) -> Partition:
    layout = KeyLayout(app, partitions=1)
    return Partition(redis, layout, ACTOR.kind, 0)


async def commit(
    partition: Partition, version: int, dedupe_id: str, *, at: int, seen: SeenWindow
) -> CommitStatus:
    handled = Commit(dedupe_id=dedupe_id, handled=b"message", handled_at=at, events=[b"event"])
    result = await partition.commit(ACTOR, version, [handled], epoch=None, now_ms=at, seen=seen)
    return result.status


async def remembered(redis: RedisClient, partition: Partition) -> list[str]:
    ids = await redis.zrange(partition.seen_key, 0, -1)
    return sorted(member.decode() for member in ids)


async def test_beyond_its_limit_the_oldest_ids_are_forgotten_at_the_next_pruning(
    redis: RedisClient,
) -> None:
    partition = partition_of(redis, "seenlimit")
    seen = SeenWindow(limit=3, trim_every_ms=1000)
    for version, at in enumerate((0, 10, 20, 30)):
        assert await commit(partition, version, f"m{version + 1}", at=at, seen=seen) is (
            CommitStatus.COMMITTED
        )
    # Pruned at 0 only: within a second of that, the set grows past its limit.
    assert await remembered(redis, partition) == ["m1", "m2", "m3", "m4"]

    assert await commit(partition, 4, "m5", at=1000, seen=seen) is CommitStatus.COMMITTED
    assert await remembered(redis, partition) == ["m3", "m4", "m5"]
    assert await commit(partition, 5, "m4", at=1001, seen=seen) is CommitStatus.DUPLICATE
    # m1 was forgotten: sent again, it is a new message.
    assert await commit(partition, 5, "m1", at=1002, seen=seen) is CommitStatus.COMMITTED


async def test_ids_older_than_the_window_are_forgotten_when_a_commit_prunes(
    redis: RedisClient,
) -> None:
    partition = partition_of(redis, "seenwindow")
    seen = SeenWindow(window_ms=100, trim_every_ms=1000)
    assert await commit(partition, 0, "m1", at=0, seen=seen) is CommitStatus.COMMITTED
    assert await commit(partition, 1, "m2", at=150, seen=seen) is CommitStatus.COMMITTED
    # Not pruned since 0: m1, older than the window, is still remembered (deduped).
    assert await commit(partition, 2, "m1", at=160, seen=seen) is CommitStatus.DUPLICATE

    assert await commit(partition, 2, "m3", at=1000, seen=seen) is CommitStatus.COMMITTED
    assert await remembered(redis, partition) == ["m3"]
    assert await commit(partition, 3, "m1", at=1010, seen=seen) is CommitStatus.COMMITTED


async def test_pruning_every_commit_keeps_the_set_within_its_bounds_at_all_times(
    redis: RedisClient,
) -> None:
    partition = partition_of(redis, "seenalways")
    seen = SeenWindow(window_ms=50, limit=2, trim_every_ms=0)
    for version in range(6):
        at = version * 10
        assert await commit(partition, version, f"m{version}", at=at, seen=seen) is (
            CommitStatus.COMMITTED
        )
        assert len(await remembered(redis, partition)) <= 2
    assert await remembered(redis, partition) == ["m4", "m5"]
