"""Running one node in the foreground: `repertory run MODULE:SYSTEM`."""

import importlib
import logging
import signal
import sys
from pathlib import Path

import anyio

from repertory.runtime.node import Node, NodeConfig
from repertory.runtime.system import ActorSystem
from repertory.schemas.errors import RepertoryError

logger = logging.getLogger("repertory.runner")


class SystemLoadError(RepertoryError):
    """`MODULE:ATTRIBUTE` does not name an ActorSystem."""


def load_system(spec: str) -> ActorSystem:
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise SystemLoadError(f"{spec!r} is not of the form MODULE:SYSTEM")
    # Like `python -m`, the working directory is importable.
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise SystemLoadError(f"cannot import {module_name!r}: {error}") from error
    system = getattr(module, attribute, None)
    if not isinstance(system, ActorSystem):
        raise SystemLoadError(f"{spec} is {type(system).__name__}, not an ActorSystem")
    return system


async def serve(system: ActorSystem, config: NodeConfig | None = None) -> None:
    """Run a node until SIGTERM or SIGINT, then stop it gracefully: stop reading, finish the
    messages in hand, commit, release the leases (bounded by `shutdown_timeout_s`)."""
    async with system:
        node = Node(system, config)
        async with anyio.create_task_group() as group:
            await group.start(node.run)
            logger.info("node %s serving %s", node.node_id, ", ".join(system.actors))

            async def stop_on_signal() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for received in signals:
                        logger.info("%s: stopping", signal.Signals(received).name)
                        node.stop()
                        return

            group.start_soon(stop_on_signal)
            await node.stopped.wait()
            group.cancel_scope.cancel()
