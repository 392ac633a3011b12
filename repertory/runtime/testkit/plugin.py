"""The pytest plugin (entry point `pytest11: repertory`): fixtures and hypothesis profiles.

Fixtures:
- `repertory_server`: one embedded valkey-server per test session; `repertory_url` its URL.
- `actor_system_factory`: `make(*actors, partitions=4)` builds an `ActorSystem` on that
  server in a namespace of its own, deleted after the test; `isolated_system` is
  `make(*repertory_actors)` (override the `repertory_actors` fixture to name your actors).
- `simulated_system`: `make(actor, model=None, seed=0, ...)` builds a `Simulation` (fakeredis,
  `SimulatedClock`, seeded ids, fault steps); use it as `async with`.

Profiles: `ci` (derandomized, small: the examples `make test` can afford) and `soak` (10,000
examples per test unless REPERTORY_SOAK_EXAMPLES says otherwise, for `make soak`); pick one
with `--hypothesis-profile`.
"""

import itertools
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, settings

from repertory.actors.model import Actor
from repertory.runtime.system import ActorSystem
from repertory.runtime.testkit.simulation import STATS, Model, Simulation
from repertory.streams.embedded import EmbeddedServer

settings.register_profile(
    "ci",
    max_examples=40,
    stateful_step_count=15,
    # The same examples on every run: CI never fails on an example drawn for the first time.
    derandomize=True,
    deadline=None,
    print_blob=True,
)
settings.register_profile(
    "soak",
    # REPERTORY_SOAK_EXAMPLES scales a soak down (or up) without editing the profile.
    max_examples=int(os.environ.get("REPERTORY_SOAK_EXAMPLES", "10000")),
    stateful_step_count=25,
    deadline=None,
    print_blob=True,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="session")
def repertory_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """The session's embedded server (AOF, fsync always). Tests that kill or restart a server
    start their own instead."""
    # A long temp path still works: EmbeddedServer then moves the socket under the temp folder.
    server = EmbeddedServer(tmp_path_factory.mktemp("valkey"), appendfsync="always")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def repertory_url(repertory_server: EmbeddedServer) -> str:
    return repertory_server.url


ActorSystemFactory = Callable[..., ActorSystem]


@pytest.fixture
def actor_system_factory(repertory_url: str) -> Iterator[ActorSystemFactory]:
    """Builds actor systems on the session's server, each in an `app` namespace of its own;
    their keys are deleted after the test. Connect with `async with system:`."""
    apps: list[str] = []
    numbers = itertools.count()
    prefix = f"t{uuid.uuid4().hex[:8]}"

    def make(*actors: Actor[Any], partitions: int = 4, **options: Any) -> ActorSystem:
        app = f"{prefix}-{next(numbers)}"
        apps.append(app)
        return ActorSystem(*actors, url=repertory_url, app=app, partitions=partitions, **options)

    yield make
    # Every key of a namespace starts with its hash tag `{app:`.
    with redis.Redis.from_url(repertory_url) as client:
        for app in apps:
            keys = list(client.scan_iter(match=f"{{{app}:*", count=1000))
            if keys:
                client.delete(*keys)


@pytest.fixture
def repertory_actors() -> tuple[Actor[Any], ...]:
    """The actors `isolated_system` hosts: override this fixture in your conftest or module."""
    return ()


@pytest.fixture
def isolated_system(
    actor_system_factory: ActorSystemFactory, repertory_actors: tuple[Actor[Any], ...]
) -> ActorSystem:
    return actor_system_factory(*repertory_actors)


SimulationFactory = Callable[..., Simulation]


@pytest.fixture
def simulated_system() -> SimulationFactory:
    """Builds deterministic simulations: `async with simulated_system(actor, seed=1) as sim:`
    then `await sim.send(...)`, `await sim.pass_time(...)`, `await sim.apply(Crash(...))`,
    `await sim.check()`."""

    def make(actor: Actor[Any], model: Model | None = None, **options: Any) -> Simulation:
        return Simulation(actor, model, **options)

    return make


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if STATS.simulations:
        terminalreporter.write_line(f"repertory testkit: {STATS.summary()}")
