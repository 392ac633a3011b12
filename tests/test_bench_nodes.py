"""The many-nodes benchmark's smoke run: every figure is produced, from real node processes."""

import pytest

from benchmarks.nodes import main

pytestmark = pytest.mark.integration


def test_a_quick_run_reports_failover_rebalancing_and_throughput(
    capsys: pytest.CaptureFixture[str],
) -> None:
    main(["--quick"])
    out = capsys.readouterr().out
    assert "failover after SIGKILL" in out
    assert "rebalance when a node joins" in out
    for processes in ("1", "2", "4"):
        assert f"│ {processes} " in out
