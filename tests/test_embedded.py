"""The embedded valkey-server: start, reuse, concurrent starts, stop, errors, stale files, AOF.

Every test runs its own server in its own folder (never the session one), stopped at teardown.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from repertory.schemas.errors import RepertoryError
from repertory.streams import embedded
from repertory.streams.embedded import EmbeddedServer, EmbeddedServerError, Fsync, ensure_server

pytestmark = pytest.mark.integration

MakeServer = Callable[..., EmbeddedServer]


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[MakeServer]:
    """Build servers (default folder: tmp_path/"data") and stop whatever runs at teardown."""
    created: list[EmbeddedServer] = []

    def make(
        data_dir: Path | None = None,
        *,
        port: int | None = None,
        appendfsync: Fsync = "everysec",
        startup_timeout: float = 10.0,
    ) -> EmbeddedServer:
        server = EmbeddedServer(
            data_dir or tmp_path / "data",
            port=port,
            appendfsync=appendfsync,
            startup_timeout=startup_timeout,
        )
        created.append(server)
        return server

    yield make
    for server in created:
        server.stop()


def connect(server: EmbeddedServer) -> "redis.Redis":
    return redis.Redis(unix_socket_path=server.socket_path, socket_timeout=10)


def is_running(pid: int) -> bool:
    """Alive and not a zombie (Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # gone before the open, or during the read
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{condition} still false after {timeout} s"
        time.sleep(0.02)


def test_start_status_and_stop(make_server: MakeServer) -> None:
    server = make_server(appendfsync="always")
    assert server.start() is True
    status = server.status()
    assert status is not None
    assert status.appendfsync == "always"
    assert status.aof_enabled is True
    assert status.url == server.url == f"unix://{server.socket_path}"
    assert status.data_dir == str(server.data_dir)
    assert status.port is None
    assert status.used_memory_bytes > 0
    recorded = json.loads(server.state_path.read_text())
    assert recorded["pid"] == status.pid
    assert recorded["url"] == server.url
    with connect(server) as client:
        assert client.ping() is True
        assert client.config_get("dir")["dir"] == str(server.data_dir.resolve())

    assert server.stop() is True
    assert server.status() is None
    assert not server.state_path.exists()
    assert not Path(server.socket_path).exists()
    assert not is_running(status.pid)
    assert server.stop() is False


def test_second_instance_reuses_the_running_server(make_server: MakeServer) -> None:
    first = make_server()
    assert first.start() is True
    second = make_server(first.data_dir)
    assert second.start() is False
    first_status, second_status = first.status(), second.status()
    assert first_status is not None
    assert second_status is not None
    assert second_status.pid == first_status.pid

    # A context manager that only reused the server leaves it running.
    with make_server(first.data_dir) as third:
        assert third.started_here is False
    assert first.status() is not None


def test_context_manager_stops_the_server_it_started(make_server: MakeServer) -> None:
    with make_server() as server:
        status = server.status()
        assert status is not None
    assert server.status() is None
    assert not is_running(status.pid)


STARTER = textwrap.dedent(
    """
    import json, sys
    from repertory.streams.embedded import EmbeddedServer

    server = EmbeddedServer(sys.argv[1])
    print("ready", flush=True)
    sys.stdin.readline()  # the go signal, so both processes start together
    started = server.start()
    status = server.status()
    print(json.dumps({"started": started, "pid": status.pid if status else None}), flush=True)
    """
)


def test_concurrent_starts_from_two_processes_make_one_server(make_server: MakeServer) -> None:
    server = make_server()
    starters = [
        subprocess.Popen(
            [sys.executable, "-c", STARTER, str(server.data_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for starter in starters:
        assert starter.stdout is not None
        assert starter.stdout.readline().strip() == "ready"
    for starter in starters:
        assert starter.stdin is not None
        starter.stdin.write("go\n")
        starter.stdin.flush()
    reports = []
    for starter in starters:
        output, _ = starter.communicate(timeout=60)
        assert starter.returncode == 0
        reports.append(json.loads(output.strip().splitlines()[-1]))

    assert sorted(report["started"] for report in reports) == [False, True]
    assert reports[0]["pid"] == reports[1]["pid"]
    # Both starting processes have exited; the server outlives them.
    status = server.status()
    assert status is not None
    assert status.pid == reports[0]["pid"]


def test_a_file_in_the_way_is_a_clear_error(tmp_path: Path, make_server: MakeServer) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for data_dir in (blocker, blocker / "below"):
        with pytest.raises(EmbeddedServerError, match="cannot be used"):
            make_server(data_dir).start()


def test_a_port_in_use_is_a_clear_error(make_server: MakeServer) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        server = make_server(port=port)
        with pytest.raises(EmbeddedServerError, match=f"port {port} .* already in use"):
            server.start()
    assert server.status() is None


def test_a_port_also_serves_tcp(make_server: MakeServer) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = make_server(port=port)
    server.start()
    assert server.tcp_url == f"redis://127.0.0.1:{port}"
    with redis.Redis.from_url(server.tcp_url) as client:
        assert client.ping() is True
    status = server.status()
    assert status is not None
    assert status.port == port


def test_invalid_settings_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(EmbeddedServerError, match="appendfsync"):
        EmbeddedServer(tmp_path, appendfsync="sometimes")  # type: ignore[arg-type]
    with pytest.raises(EmbeddedServerError, match="port"):
        EmbeddedServer(tmp_path, port=70000)


def test_a_missing_binary_is_a_clear_error(
    make_server: MakeServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(embedded, "get_binary_path", lambda: tmp_path / "no-such-binary")
    with pytest.raises(EmbeddedServerError, match="missing or not executable"):
        make_server().start()


def fake_binary(folder: Path, script: str) -> Path:
    path = folder / "fake-valkey-server"
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o755)
    return path


def test_a_server_dying_at_startup_reports_its_log(
    make_server: MakeServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    binary = fake_binary(tmp_path, 'echo "FATAL: bad configuration line" >&2\nexit 3')
    monkeypatch.setattr(embedded, "get_binary_path", lambda: binary)
    with pytest.raises(EmbeddedServerError, match="code 3") as caught:
        make_server().start()
    assert "FATAL: bad configuration line" in str(caught.value)
    assert isinstance(caught.value, RepertoryError)


def test_a_server_that_never_answers_times_out(
    make_server: MakeServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pid_file = tmp_path / "silent.pid"
    binary = fake_binary(tmp_path, f'echo $$ > "{pid_file}"\nexec sleep 60')
    monkeypatch.setattr(embedded, "get_binary_path", lambda: binary)
    with pytest.raises(EmbeddedServerError, match="did not answer within"):
        make_server(startup_timeout=0.5).start()
    # The silent process was killed, not left behind.
    silent_pid = int(pid_file.read_text())
    wait_for(lambda: not is_running(silent_pid))


def test_a_process_that_exits_while_its_stat_is_read_is_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Linux answers a read of /proc/PID/stat with ESRCH when the process exits after the open.
    def exited_during_read(self: Path, *args: object, **kwargs: object) -> str:
        raise ProcessLookupError(3, "No such process")

    monkeypatch.setattr(Path, "read_text", exited_during_read)
    assert embedded._process_name(os.getpid()) is None


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.parametrize(
    "recorded_pid",
    [pytest.param(dead_pid, id="dead-pid"), pytest.param(os.getpid, id="pid-reused")],
)
def test_stale_files_are_cleaned_up(
    make_server: MakeServer, recorded_pid: Callable[[], int]
) -> None:
    server = make_server()
    server.data_dir.mkdir(parents=True)
    stale = {
        "pid": recorded_pid(),
        "socket_path": server.socket_path,
        "port": None,
        "url": server.url,
        "appendfsync": "everysec",
    }
    server.state_path.write_text(json.dumps(stale))
    Path(server.socket_path).write_text("left behind by a crash")

    assert server.status() is None
    assert server.start() is True
    status = server.status()
    assert status is not None
    assert status.pid != stale["pid"]
    assert json.loads(server.state_path.read_text())["pid"] == status.pid
    with connect(server) as client:
        assert client.ping() is True


def test_a_long_folder_path_puts_the_socket_in_the_temp_folder(
    tmp_path: Path, make_server: MakeServer
) -> None:
    deep = tmp_path.joinpath(*["a-rather-long-folder-name"] * 5)
    server = make_server(deep)
    assert len(str(deep / "valkey.sock")) > embedded.MAX_SOCKET_PATH
    assert Path(server.socket_path).parent == Path(tempfile.gettempdir())
    assert server.socket_path == EmbeddedServer(deep).socket_path  # stable per folder
    assert server.start() is True
    with connect(server) as client:
        assert client.ping() is True
    server.stop()
    assert not Path(server.socket_path).exists()


def test_writes_acknowledged_with_fsync_always_survive_a_kill(make_server: MakeServer) -> None:
    server = make_server(appendfsync="always")
    server.start()
    with connect(server) as client:
        for number in range(50):
            client.set(f"key:{number}", number)
        ids = [client.xadd("log", {"n": number}) for number in range(200)]
    killed = server.status()
    assert killed is not None

    server.kill()
    assert not is_running(killed.pid)
    assert server.status() is None

    assert server.start() is True
    with connect(server) as client:
        assert [client.get(f"key:{number}") for number in range(50)] == [
            str(number).encode() for number in range(50)
        ]
        assert [entry_id for entry_id, _ in client.xrange("log")] == ids


def test_kill_without_a_server_is_an_error(make_server: MakeServer) -> None:
    with pytest.raises(EmbeddedServerError, match="no embedded server"):
        make_server().kill()


def test_a_new_stream_takes_its_own_size_not_a_default_node(make_server: MakeServer) -> None:
    """An actor's streams mostly stay small; at the servers' default `stream-node-max-bytes`
    each new one would hold 4 KB."""
    server = make_server()
    server.start()
    with connect(server) as client:
        assert client.config_get("stream-node-max-bytes") == {
            "stream-node-max-bytes": str(embedded.STREAM_NODE_MAX_BYTES)
        }
        client.xadd("one-event", {"e": b"x" * 150}, id="1-0")
        usage = client.memory_usage("one-event", samples=0)
        assert usage is not None
        assert usage < 2048  # 4.3 KB at the servers' default


def test_restart_keeps_the_data(make_server: MakeServer) -> None:
    server = make_server()
    server.start()
    with connect(server) as client:
        client.set("kept", "yes")
    first = server.status()
    server.restart()
    second = server.status()
    assert first is not None
    assert second is not None
    assert second.pid != first.pid
    with connect(server) as client:
        assert client.get("kept") == b"yes"


def test_ensure_server_starts_once_and_then_reuses(tmp_path: Path) -> None:
    server = ensure_server(tmp_path / "data", appendfsync="no")
    try:
        assert server.started_here is True
        again = ensure_server(tmp_path / "data")
        assert again.started_here is False
        status = again.status()
        assert status is not None
        assert status.appendfsync == "no"  # the running server's policy, not the default
    finally:
        server.stop()
