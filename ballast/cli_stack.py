"""``ballast stack``: the local stack (Prefect server and worker, MLflow, gateway, Prometheus) as
background processes with pid files in ``<state_dir>/stack`` (see :mod:`ballast.stack`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer
from rich.table import Table

from ballast.cli_shared import console, fail
from ballast.errors import BallastError
from ballast.settings import get_settings

if TYPE_CHECKING:
    from ballast.stack import ComponentStatus

stack_app = typer.Typer(
    help="Start, stop and inspect the local stack (Prefect, worker, MLflow, gateway, Prometheus).",
    no_args_is_help=True,
)


def _components(only: str | None) -> tuple[str, ...]:
    from ballast.stack import COMPONENTS

    if not only:
        return COMPONENTS
    wanted = tuple(n.strip() for n in only.split(",") if n.strip())
    if not wanted:  # "," or " ": almost surely a mistake; doing nothing would hide it
        raise typer.BadParameter(f"names no component: {only!r}", param_hint="--only")
    # Keep the start order whatever order they were given in.
    return tuple(n for n in COMPONENTS if n in wanted) + tuple(
        n for n in wanted if n not in COMPONENTS
    )


def _table(statuses: list[ComponentStatus]) -> Table:
    table = Table(title="ballast stack")
    for col in ("component", "pid", "state", "url"):
        table.add_column(col)
    for st in statuses:
        if st.healthy:
            state = "[green]healthy[/]"
        elif st.running:
            state = "[yellow]running, not healthy[/]"
        elif st.answering:
            state = "[yellow]answering, not started by the stack[/]"
        else:
            state = "[red]stopped[/]"
        table.add_row(st.name, str(st.pid or ""), state, st.url)
    return table


@stack_app.command("up")
def stack_up(
    only: str = typer.Option(
        None,
        help="Comma-separated subset: prefect-server,mlflow,gateway,prometheus,prefect-worker.",
    ),
    prefect_port: int = typer.Option(4200, min=1, max=65535),
    mlflow_port: int = typer.Option(5000, min=1, max=65535),
    prometheus_port: int = typer.Option(9090, min=1, max=65535),
    worker_health_port: int = typer.Option(8180, min=1, max=65535),
    prefect_db: str = typer.Option(
        "",
        envvar="BALLAST_STACK_PREFECT_DB",
        help="Prefect database URL, e.g. postgresql+asyncpg://u:p@127.0.0.1:5432/prefect "
        "(default: sqlite in the stack folder). With a password, set BALLAST_STACK_PREFECT_DB "
        "instead: a command-line argument is visible to every user in `ps`.",
    ),
    deploy: bool = typer.Option(False, help="Then `prefect deploy --all` to the new server."),
    timeout: float = typer.Option(90.0, min=1, help="Seconds each component may take to start."),
) -> None:
    """Start what is not running yet (idempotent), wait until healthy, print the URLs."""
    from ballast.stack import StackConfig, default_root, deploy_all, up

    s = get_settings()
    try:
        config = StackConfig(
            root=default_root(s),
            prefect_port=prefect_port,
            mlflow_port=mlflow_port,
            prometheus_port=prometheus_port,
            worker_health_port=worker_health_port,
            prefect_database_url=prefect_db,
            components=_components(only),
            start_timeout_s=timeout,
        )
        statuses = up(s, config, say=console.print)
        if deploy:
            deploy_all(config, say=console.print)
    except BallastError as exc:
        fail(exc)
    console.print(_table(statuses))
    if "prefect-server" in config.components:
        console.print(f"export PREFECT_API_URL={config.prefect_api_url}")
    if not all(st.healthy for st in statuses):
        raise typer.Exit(code=1)


@stack_app.command("down")
def stack_down(
    timeout: float = typer.Option(15.0, min=0, help="Seconds between SIGTERM and SIGKILL."),
) -> None:
    """Stop every process `stack up` started (by pid), remove the pid files; and the gateway a
    release started (it keeps serving the champion after the release ends)."""
    from ballast.gateway_process import stop_recorded_gateway
    from ballast.stack import StackConfig, default_root, down

    s = get_settings()
    try:
        stopped = down(
            StackConfig(root=default_root(s), stop_timeout_s=timeout),
            say=console.print,
        )
    except BallastError as exc:
        fail(exc)
    console.print(f"stopped {len(stopped)} component(s)")
    gateway = stop_recorded_gateway(s, timeout=timeout)
    if gateway is not None:
        console.print(f"stopped the gateway a release started (pid {gateway})")


@stack_app.command("status")
def stack_status() -> None:
    """Each component's pid, whether it runs and answers its health check, and its URL."""
    from ballast.stack import StackConfig, default_root, status

    s = get_settings()
    statuses = status(s, StackConfig(root=default_root(s)))
    console.print(_table(statuses))
