"""The memory benchmark's smoke run: both settings measured through a real node."""

import pytest

from benchmarks.memory import SERVER_DEFAULT, main
from repertory.streams.embedded import STREAM_NODE_MAX_BYTES

pytestmark = pytest.mark.integration


def test_a_quick_run_reports_memory_per_actor_and_per_event_for_both_settings(
    capsys: pytest.CaptureFixture[str],
) -> None:
    main(["--quick"])
    captured = capsys.readouterr()
    assert "server memory" in captured.out
    per_actor = {}
    for line in captured.err.splitlines():
        setting, _, figure = line.partition(": ")
        if figure.endswith(" B per actor"):
            per_actor[int(setting)] = int(figure.removesuffix(" B per actor").replace(",", ""))
    # At the servers' default every new stream holds a 4 KB node; the embedded server's
    # setting keeps an actor's two streams near their size.
    assert per_actor[SERVER_DEFAULT] > 2 * per_actor[STREAM_NODE_MAX_BYTES] > 0
