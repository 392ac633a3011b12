"""Running actor code: `repertory run` (one node), `repertory spawn` (supervised nodes or worker
agents) and `repertory demo`."""

import enum
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from repertory.runtime.cli.options import DEFAULT_DATA_DIR, DataDir
from repertory.runtime.cli.output import console, print_error, reported
from repertory.streams.embedded import EmbeddedServer

if TYPE_CHECKING:
    from repertory.actors.agents import Strategy

commands = typer.Typer()


def _log_to_stderr() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")


@commands.command()
def demo(
    url: Annotated[
        str | None,
        typer.Option(help="Redis URL to use (default: the embedded server of DATA_DIR)."),
    ] = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Run the demo: a coordinator splits a project into 20 tasks, 4 worker processes do them,
    one is killed mid-task and the health monitor recovers it; exit 1 unless every task
    completed exactly once."""
    from repertory.runtime.agents_demo import run_demo  # heavy imports only for this command

    with reported():
        run_demo(url=url, data_dir=data_dir)


@commands.command()
def run(
    system: Annotated[str, typer.Argument(help="The ActorSystem to serve, as MODULE:ATTRIBUTE.")],
    url: Annotated[
        str | None, typer.Option(help="Redis URL to use instead of the system's own.")
    ] = None,
    node_id: Annotated[
        str | None, typer.Option(help="This node's name (default: host, pid and a suffix).")
    ] = None,
    shutdown_timeout: Annotated[
        float, typer.Option(help="Seconds a graceful stop may take to finish in-flight work.")
    ] = 10.0,
) -> None:
    """Run one node of SYSTEM in the foreground until SIGTERM or SIGINT.

    On a signal it stops reading, finishes and commits the messages in hand, releases its
    partitions and exits 0.
    """
    from repertory.runtime import eventloop
    from repertory.runtime.node import NodeConfig, default_node_id
    from repertory.runtime.runner import load_system, serve

    _log_to_stderr()
    with reported():
        actor_system = load_system(system)
        if url is not None:
            actor_system.url = url
        config = NodeConfig(
            node_id=node_id or default_node_id(), shutdown_timeout_s=shutdown_timeout
        )
        eventloop.run(serve, actor_system, config)


class WorkerStrategy(enum.StrEnum):
    RESTART = "restart"
    REPLACE = "replace"
    ALERT = "alert"


@commands.command()
def spawn(
    system: Annotated[
        str | None,
        typer.Argument(
            help="The ActorSystem whose nodes to run, as MODULE:ATTRIBUTE (or give --workers).",
            show_default=False,
        ),
    ] = None,
    processes: Annotated[int, typer.Option("-n", "--processes", help="Child processes.")] = 2,
    workers: Annotated[
        str | None,
        typer.Option(
            help="Run worker agents instead of nodes: their task handler, as MODULE:FUNCTION.",
            show_default=False,
        ),
    ] = None,
    queue: Annotated[
        str | None,
        typer.Option(help="The task queue the workers serve (default: the project's name)."),
    ] = None,
    project: Annotated[
        str | None,
        typer.Option(help="Workers exit once the queue is empty and this project is complete."),
    ] = None,
    app_name: Annotated[
        str, typer.Option("--app", help="The workers' application namespace.")
    ] = "agents",
    strategy: Annotated[
        WorkerStrategy,
        typer.Option(
            help="What the health monitor does with a worker that fails: restart (this "
            "supervisor restarts it), replace (a new worker in its place), alert (nothing)."
        ),
    ] = WorkerStrategy.RESTART,
    visibility: Annotated[
        float, typer.Option(help="Seconds a worker's claim on a task lasts unrenewed.")
    ] = 5.0,
    heartbeat: Annotated[
        float, typer.Option(help="Seconds between a worker's heartbeats to the monitor.")
    ] = 2.0,
    log_dir: Annotated[
        Path | None,
        typer.Option(help="Write each child's output to LOG_DIR/ID.log instead of here."),
    ] = None,
    url: Annotated[
        str | None,
        typer.Option(help="Redis URL (default: the embedded server of DATA_DIR, shared)."),
    ] = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    max_restarts: Annotated[
        int, typer.Option(help="Restarts allowed within --period before the group stops.")
    ] = 5,
    period: Annotated[float, typer.Option(help="The restart-intensity window, seconds.")] = 60.0,
    shutdown_timeout: Annotated[
        float, typer.Option(help="Seconds each child may take to stop gracefully.")
    ] = 10.0,
) -> None:
    """Run N node processes of SYSTEM, or N worker agents (--workers), under a supervisor.

    A crashed child is restarted with exponential backoff; too many restarts within the period
    stop the group (exit 1). SIGTERM or SIGINT is forwarded for a graceful stop of every child.
    Nodes: the partition owners are printed whenever they change, and if SYSTEM hosts a
    health monitor, the nodes are registered with it. Workers: a worker that is done (its
    project complete) exits 0 and is not restarted; the group stops when all are done; the
    health monitor's recovery decisions about them are carried out here.
    """
    import anyio

    from repertory.runtime import eventloop
    from repertory.runtime.supervisor import Supervisor, SupervisorConfig

    if (system is None) == (workers is None):
        print_error("give either SYSTEM (nodes) or --workers HANDLER")
        raise typer.Exit(2)
    queue = queue or project
    if workers is not None and queue is None:
        print_error("--workers needs --queue (or --project)")
        raise typer.Exit(2)
    _log_to_stderr()
    strategies: dict[WorkerStrategy, Strategy] = {
        WorkerStrategy.RESTART: "restart",
        WorkerStrategy.REPLACE: "replace",
        WorkerStrategy.ALERT: "alert",
    }
    worker_strategy = strategies[strategy]
    config = SupervisorConfig(
        processes=processes,
        max_restarts=max_restarts,
        period_s=period,
        shutdown_timeout_s=shutdown_timeout,
        restart="permanent"
        if workers is None
        else ("transient" if worker_strategy == "restart" else "temporary"),
        fresh_ids=workers is not None,
        log_dir=log_dir,
    )

    def show(owners: dict[tuple[str, int], str | None]) -> None:
        table = Table(title="partition owners")
        for column in ("kind", "partition", "node"):
            table.add_column(column)
        for (kind, number), owner in sorted(owners.items()):
            table.add_row(kind, str(number), owner or "-")
        console.print(table)

    async def supervise_nodes(server_url: str, spec: str) -> None:
        from repertory.actors.agents import HealthMonitor
        from repertory.runtime.agents_followers import NodeWatcher
        from repertory.runtime.runner import load_system
        from repertory.runtime.supervisor import node_command, watch_owners

        actor_system = load_system(spec)
        actor_system.url = server_url
        supervisor = Supervisor(node_command(spec, server_url, shutdown_timeout), config)
        async with actor_system, anyio.create_task_group() as group:
            group.start_soon(watch_owners, actor_system, show)
            if any(isinstance(actor, HealthMonitor) for actor in actor_system.actors.values()):
                group.start_soon(NodeWatcher(actor_system).run)
            await supervisor.run()
            group.cancel_scope.cancel()

    async def supervise_workers(server_url: str, handler: str, queue_name: str) -> None:
        from repertory.runtime.agents_followers import run_worker_group
        from repertory.runtime.agents_worker import agents_system, worker_command
        from repertory.streams.taskqueue import TaskQueue

        command = worker_command(
            handler,
            url=server_url,
            queue=queue_name,
            project_id=project,
            app=app_name,
            visibility_s=visibility,
            heartbeat_s=heartbeat,
            strategy=worker_strategy,
            stop_grace_s=shutdown_timeout,
        )
        supervisor = Supervisor(command, config)
        async with agents_system(server_url, app=app_name) as agents:
            task_queue = TaskQueue(agents.client, queue_name, keys=agents.keys)
            await task_queue.ensure()
            await run_worker_group(
                agents, supervisor, task_queue, visibility_ms=round(visibility * 1000)
            )
        codes = ", ".join(f"{agent}: {code}" for agent, code in supervisor.exit_codes().items())
        console.print(f"workers stopped; exit codes: {codes}")

    def supervise(server_url: str) -> None:
        if system is not None:
            eventloop.run(supervise_nodes, server_url, system)
        elif workers is not None and queue is not None:
            eventloop.run(supervise_workers, server_url, workers, queue)

    with reported():
        if url is not None:
            supervise(url)
            return
        with EmbeddedServer(data_dir) as server:
            supervise(server.url)
