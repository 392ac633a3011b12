"""The loop the runtime's processes run on: uvloop when installed, unless declined."""

import asyncio
import importlib.util

import pytest

from repertory.runtime import eventloop
from repertory.runtime.eventloop import EVENT_LOOP_VARIABLE, EventLoopChoiceError, event_loop_name


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_uvloop_is_the_default_where_it_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("uvloop")  # a dependency everywhere but Windows
    monkeypatch.delenv(EVENT_LOOP_VARIABLE, raising=False)
    assert event_loop_name() == "uvloop"
    assert eventloop.run(_loop_module).startswith("uvloop")


@pytest.mark.parametrize("setting", ["asyncio", " AsyncIO "])
def test_the_standard_loop_can_be_chosen(monkeypatch: pytest.MonkeyPatch, setting: str) -> None:
    monkeypatch.setenv(EVENT_LOOP_VARIABLE, setting)
    assert event_loop_name() == "asyncio"
    assert eventloop.run(_loop_module).startswith("asyncio")


def test_without_uvloop_the_standard_loop_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "uvloop" else real_find_spec(name, *args),
    )
    monkeypatch.delenv(EVENT_LOOP_VARIABLE, raising=False)
    assert event_loop_name() == "asyncio"
    assert eventloop.run(_loop_module).startswith("asyncio")
    monkeypatch.setenv(EVENT_LOOP_VARIABLE, "uvloop")
    with pytest.raises(EventLoopChoiceError, match="uvloop is not installed"):
        event_loop_name()


def test_an_unknown_loop_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EVENT_LOOP_VARIABLE, "trio")
    with pytest.raises(EventLoopChoiceError, match="'trio': expected 'uvloop' or 'asyncio'"):
        eventloop.run(_loop_module)


def test_arguments_and_result_pass_through() -> None:
    async def add(left: int, right: int) -> int:
        return left + right

    assert eventloop.run(add, 2, 3) == 5
