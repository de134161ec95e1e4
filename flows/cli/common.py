"""What every `batchsight` command shares: the consoles, the options that name a
catalogue and an endpoint, and how a user error becomes its message and exit code."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from models.errors import UserError

console = Console()
err = Console(stderr=True, soft_wrap=True)  # error lines stay whole, for grep and logs

EndpointOpt = Annotated[str | None, typer.Option("--endpoint-url",
                                                 help="S3-compatible endpoint (also AWS_ENDPOINT_URL).")]
CatalogOpt = Annotated[str, typer.Option("--catalog", help="Output root of a run: folder or s3://bucket/prefix.")]

BUG_REPORT = ("this is a bug in batchsight, not something you did: please report it with the command you ran "
              "and the lines above")


def fail(exc: UserError) -> typer.Exit:
    """Print a user error's message (whole, for grep and logs) and exit with its
    code: 2 bad input, 3 another run committed first (rerun to continue from its
    version), 4 a file of the catalogue is missing or damaged (`status --verify`
    names it, rollback restores)."""
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code=exc.exit_code)
