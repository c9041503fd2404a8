"""What every CLI module shares: the consoles and the way a typed error ends a command."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import typer
from rich.console import Console

from ballast.errors import BallastError, ConfigError

console = Console()
err = Console(stderr=True)


def report(exc: BallastError) -> None:
    """Print a typed error as one line naming its stage."""
    # soft_wrap: one line however long, also in a log file (rich wraps at 80 columns there).
    err.print(f"[bold red]error[/] stage={exc.stage}: {exc.message}", soft_wrap=True)


def prefect_unreachable(exc: RuntimeError) -> BallastError:
    """Prefect's "Failed to reach API at URL" as a typed error; any other RuntimeError is
    re-raised as it is (a bug, which must keep its traceback)."""
    if "Failed to reach API" not in str(exc):
        raise exc
    return ConfigError(
        f"cannot reach the Prefect API ({exc}); start it (ballast stack up) or unset "
        "PREFECT_API_URL to run on a temporary local server"
    )


@contextmanager
def no_server_telemetry() -> Iterator[None]:
    """A temporary Prefect server started inside this block sends no usage telemetry.

    Offline its telemetry service logs an ERROR line on every run that starts one;
    a local run has no business phoning home anyway. A value set in the environment wins.
    """
    if "PREFECT_SERVER_ANALYTICS_ENABLED" in os.environ:
        yield
        return
    from prefect.settings import PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings

    # The temporary server's process takes the settings in force when it starts.
    with temporary_settings({PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        yield


def fail(exc: BallastError) -> NoReturn:
    """Print a typed error as one line naming its stage, exit 2."""
    report(exc)
    raise typer.Exit(code=2)
