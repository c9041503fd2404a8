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
    err.print(f"[bold red]error[/] stage={exc.stage}: {exc.message}")


def fail(exc: BallastError) -> NoReturn:
    """Print a typed error as one line naming its stage, exit 2."""
    report(exc)
    raise typer.Exit(code=2)
