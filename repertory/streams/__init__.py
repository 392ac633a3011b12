"""Everything that talks to Redis: client, keys, event store, inbox, dead letters, partitions,
task queue and the embedded server."""
