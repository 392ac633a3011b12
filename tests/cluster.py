"""A local three-master Redis Cluster made of embedded valkey-server processes on loopback ports,
for the tests that run the runtime unchanged on Cluster."""

import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import redis

from repertory.streams.embedded import server_binary

SLOT_RANGES = [(0, 5460), (5461, 10922), (10923, 16383)]


def _free_port() -> int:
    # The cluster bus listens on port + 10000, so the port must stay below 55536.
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        if port < 55536:
            return port


def _await(condition: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"local cluster: {condition} not reached in {timeout} s")
        time.sleep(0.05)


@contextmanager
def local_cluster(folder: Path) -> Iterator[str]:
    """Start three masters sharing the 16,384 slots; yields a `redis+cluster://` URL."""
    binary = server_binary()
    ports = [_free_port() for _ in SLOT_RANGES]
    processes = []
    try:
        for port in ports:
            data = folder / str(port)
            data.mkdir(parents=True)
            command = [str(binary), "--port", str(port), "--bind", "127.0.0.1"]
            command += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            command += ["--dir", str(data), "--save", "", "--appendonly", "no"]
            processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL))
        clients = [redis.Redis(host="127.0.0.1", port=port) for port in ports]
        for client in clients:
            _await("ping", partial(_answers, client))
        for client, (first, last) in zip(clients, SLOT_RANGES, strict=True):
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
        for client in clients[1:]:
            client.execute_command("CLUSTER", "MEET", "127.0.0.1", ports[0])
        _await(
            "cluster_state:ok on every master",
            lambda: all(
                b"cluster_state:ok" in c.execute_command("CLUSTER", "INFO") for c in clients
            ),
        )
        for client in clients:
            client.close()
        yield f"redis+cluster://127.0.0.1:{ports[0]}"
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(10)


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
