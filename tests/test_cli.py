"""The `repertory` command line: --version, --help, server start/status/stop, errors, demo."""

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

import repertory.runtime.agents_demo
from repertory import __version__
from repertory.runtime.cli import app
from repertory.streams.embedded import EmbeddedServer

runner = CliRunner()


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    """A data folder whose server, if a test started one, is stopped at teardown."""
    folder = tmp_path / "data"
    yield folder
    EmbeddedServer(folder).stop()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == __version__


def test_help_from_the_installed_console_script() -> None:
    script = Path(sys.executable).parent / "repertory"
    result = subprocess.run([script, "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    for command in ("server", "demo", "--version"):
        assert command in result.stdout
    server_help = runner.invoke(app, ["server", "--help"])
    assert server_help.exit_code == 0
    for command in ("start", "stop", "status"):
        assert command in server_help.stdout


@pytest.mark.integration
def test_server_start_status_stop(data_dir: Path) -> None:
    port = free_port()
    options = ["--data-dir", str(data_dir)]
    started = runner.invoke(
        app, ["server", "start", *options, "--fsync", "always", "--port", str(port)]
    )
    assert started.exit_code == 0, started.stderr
    assert started.stdout.startswith("started valkey-server")
    again = runner.invoke(app, ["server", "start", *options])
    assert again.exit_code == 0, again.stderr
    assert again.stdout.startswith("already running")

    table = runner.invoke(app, ["server", "status", *options])
    assert table.exit_code == 0, table.stderr
    assert "appendfsync" in table.stdout
    assert str(data_dir) in table.stdout

    as_json = runner.invoke(app, ["server", "status", *options, "--json"])
    assert as_json.exit_code == 0, as_json.stderr
    status = json.loads(as_json.stdout)
    assert status["running"] is True
    assert status["appendfsync"] == "always"
    assert status["aof_enabled"] is True
    assert status["port"] == port
    assert status["data_dir"] == str(data_dir)
    assert status["url"] == EmbeddedServer(data_dir).url
    assert str(status["pid"]) in table.stdout

    stopped = runner.invoke(app, ["server", "stop", *options])
    assert stopped.exit_code == 0, stopped.stderr
    assert stopped.stdout.startswith("stopped")
    assert EmbeddedServer(data_dir).status() is None

    not_running = runner.invoke(app, ["server", "status", *options])
    assert not_running.exit_code == 1
    assert "no valkey-server is running" in not_running.stdout
    not_running_json = runner.invoke(app, ["server", "status", *options, "--json"])
    assert not_running_json.exit_code == 1
    assert json.loads(not_running_json.stdout)["running"] is False
    stop_again = runner.invoke(app, ["server", "stop", *options])
    assert stop_again.exit_code == 0
    assert "no valkey-server was running" in stop_again.stdout


def test_an_unusable_folder_is_one_line_on_stderr(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = runner.invoke(app, ["server", "start", "--data-dir", str(blocker / "below")])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("error: the data folder")
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_an_unknown_fsync_policy_is_a_usage_error(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["server", "start", "--data-dir", str(tmp_path), "--fsync", "sometimes"]
    )
    assert result.exit_code == 2
    assert not (tmp_path / "server.json").exists()


def test_demo_passes_its_options_to_run_demo(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[tuple[str | None, Path]] = []

    def record(url: str | None, data_dir: Path) -> None:
        calls.append((url, data_dir))

    monkeypatch.setattr(repertory.runtime.agents_demo, "run_demo", record)
    with_url = runner.invoke(
        app, ["demo", "--url", "redis://cache.local", "--data-dir", str(tmp_path)]
    )
    assert with_url.exit_code == 0, with_url.stderr
    embedded = runner.invoke(app, ["demo"])
    assert embedded.exit_code == 0, embedded.stderr
    assert calls == [("redis://cache.local", tmp_path), (None, Path(".repertory"))]
