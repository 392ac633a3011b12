"""The runtime suite's activation benchmarks run alone (`python -m benchmarks.bench_runtime
activation`): a quick run gives every activation benchmark with both variants. No speed is
asserted."""

import pytest

from benchmarks import bench_runtime


@pytest.mark.integration
def test_the_activation_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    bench_runtime.main(["activation", "--quick", "--rounds", "1"])
    output = capsys.readouterr().out
    for benchmark in (
        "activation, 2,500 events, no snapshot",
        "activation, 2,500 events, snapshot",
        "activation, new actor",
    ):
        assert f"runtime · {benchmark} | raw redis-py |" in output
    assert output.count("| repertory rebuild |") == 3
    assert "end to end" not in output
