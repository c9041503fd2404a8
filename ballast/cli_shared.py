"""What every CLI module shares: the consoles and the way a typed error ends a command."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console

from ballast.errors import BallastError

console = Console()
err = Console(stderr=True)


def report(exc: BallastError) -> None:
    """Print a typed error as one line naming its stage."""
    # soft_wrap: one line however long, also in a log file (rich wraps at 80 columns there).
    err.print(f"[bold red]error[/] stage={exc.stage}: {exc.message}", soft_wrap=True)


def fail(exc: BallastError) -> NoReturn:
    """Print a typed error as one line naming its stage, exit 2."""
    report(exc)
    raise typer.Exit(code=2)
