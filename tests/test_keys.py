"""The key layout: one hash slot per partition, stable partitions, validated names."""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

from repertory.streams.keys import Address, KeyLayout, KeyLayoutError

actor_ids = st.text(min_size=1, max_size=40)


@given(actor_id=actor_ids)
def test_every_key_of_an_actor_partition_shares_one_cluster_slot(actor_id: str) -> None:
    keys = KeyLayout("app", partitions=8)
    address = Address("account", actor_id)
    partition = keys.partition_of(address)
    per_partition = [
        keys.snapshots("account", partition),
        keys.inbox("account", partition),
        keys.dead_letters("account", partition),
        keys.outbox("account", partition),
        keys.lease("account", partition),
        keys.epoch("account", partition),
        keys.timers("account", partition),
        keys.seen("account", partition),
        keys.snapshots_of(address),
        keys.inbox_of(address),
    ]
    slots = {
        key_slot(key.encode())
        for key in [keys.events(address), keys.handled(address), *per_partition]
    }
    assert len(slots) == 1


@given(actor_id=actor_ids)
def test_partition_is_stable_and_in_range(actor_id: str) -> None:
    keys = KeyLayout(partitions=5, per_kind={"big": 64})
    small = keys.partition_of(Address("small", actor_id))
    big = keys.partition_of(Address("big", actor_id))
    assert 0 <= small < 5
    assert 0 <= big < 64
    assert small == KeyLayout(partitions=5).partition_of(Address("small", actor_id))


def test_partitions_spread_actors() -> None:
    keys = KeyLayout(partitions=16)
    counts = [0] * 16
    for i in range(16_000):
        counts[keys.partition_of(Address("a", f"actor-{i}"))] += 1
    assert min(counts) > 800
    assert max(counts) < 1200


def test_address_round_trip() -> None:
    address = Address.parse("session/3f1c/with/slashes")
    assert address == Address("session", "3f1c/with/slashes")
    assert str(address) == "session/3f1c/with/slashes"


@pytest.mark.parametrize("text", ["no-slash", "kind/", "/id", "ki{nd}/id", "ki:nd/x"])
def test_bad_addresses_are_refused(text: str) -> None:
    with pytest.raises(KeyLayoutError):
        Address.parse(text)


@pytest.mark.parametrize("app", ["", "a b", "a{b", "a:b"])
def test_bad_app_names_are_refused(app: str) -> None:
    with pytest.raises(KeyLayoutError):
        KeyLayout(app)


def test_bad_partition_counts_are_refused() -> None:
    with pytest.raises(KeyLayoutError):
        KeyLayout(partitions=0)
    with pytest.raises(KeyLayoutError):
        KeyLayout(per_kind={"x": 0})


def test_key_names_are_readable() -> None:
    keys = KeyLayout("shop", partitions=4)
    address = Address("cart", "c-1")
    partition = keys.partition_of(address)
    assert keys.events(address) == f"{{shop:cart:{partition}}}:ev:c-1"
    assert keys.inbox("cart", 2) == "{shop:cart:2}:inbox"
    assert keys.group("cart") == "shop:cart"
