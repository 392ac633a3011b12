"""The agents benchmark's smoke run: speedup and detection figures from real worker processes."""

import pytest

from benchmarks.agents import main

pytestmark = pytest.mark.integration


def test_a_quick_run_reports_speedup_and_detection(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--quick"])
    out = capsys.readouterr().out
    assert "wall time against the" in out
    assert "failure detection after" in out
