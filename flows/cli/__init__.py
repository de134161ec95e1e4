"""The `batchsight` command (Typer + Rich, both shipped with Prefect), one module
a command group: `run`, `serve` and `demo` catalogue; `search` and `duplicates`
read; `status`, `rollback`, `compact` and `gc` look after versions; `categories`
sorts; `ui` serves the page.

A command's module is imported when that command runs (`LazyCommands`), so
`batchsight --help` or `status` does not load torch and Prefect first: each
module imports what it needs at its top, and nothing else waits.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import traceback
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated

import click
import typer
from typer.core import TyperGroup

from flows.cli.common import BUG_REPORT, console, err

# command -> (module that defines it, its one-line help, shown by `batchsight --help`
# without importing the module; tests/test_cli.py checks each against the command's own)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("flows.cli.run", "Catalogue SOURCE into OUTPUT: embed new and changed images, index them, commit a "
                             "new version."),
    "search": ("flows.cli.search", "Print (or write) the images most similar to --key, --image, or each of "
                                   "--queries."),
    "duplicates": ("flows.cli.search", "Find groups of near-identical images in the live version; write them as a "
                                       "`duplicates` table."),
    "status": ("flows.cli.catalog", "Print the live version of a catalogue, the run that made it, its counts and "
                                    "its index's recall."),
    "rollback": ("flows.cli.catalog", "Make an earlier version live again (recorded as a new version)."),
    "compact": ("flows.cli.catalog", "Fold the nightly parts, deletes and index segments into one of each (a new "
                                     "version, same content)."),
    "gc": ("flows.cli.catalog", "Delete files no retained version references (parts of crashed runs, old "
                                "versions)."),
    "categories": ("flows.cli.categories", "Sort images into your own categories, learned from a few labelled "
                                           "examples."),
    "serve": ("flows.cli.serve", "Serve the nightly deployment: schedule, one run at a time, retries; every run "
                                 "option of `run` is its parameter."),
    "ui": ("flows.cli.ui", "Serve the search and review page, and its JSON API under /api/, over the live "
                           "catalogue."),
    "demo": ("flows.cli.demo", "Generate a sample bucket, catalogue it, and search it."),
}


def load_command(name: str) -> click.Command:
    """The click command `name`, from its module's Typer app."""
    group = typer.main.get_group(importlib.import_module(COMMANDS[name][0]).app)
    command = group.get_command(click.Context(group), name)
    if command is None:
        raise LookupError(f"{COMMANDS[name][0]} defines no command {name!r}")
    return command


class LazyCommands(TyperGroup):
    """The root group: lists the commands from `COMMANDS` and imports a command's
    module only when that command is run (or asked for its --help); the root's
    own --help lists them from `COMMANDS`, importing none."""

    _listing = False

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        if self._listing:  # a stand-in that carries the help line only
            return click.Command(cmd_name, help=COMMANDS[cmd_name][1])
        return load_command(cmd_name)

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


def _print_version(value: bool) -> None:
    if value:
        try:
            console.print(f"batchsight {version('batchsight')}", highlight=False)
        except PackageNotFoundError:  # run from a checkout that was never installed
            console.print("batchsight (not installed)", highlight=False)
        raise typer.Exit()


app = typer.Typer(cls=LazyCommands, help="Catalogue buckets of images into Parquet tables and a FAISS index; "
                                         "search them.", no_args_is_help=True, pretty_exceptions_enable=False)


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                   help="Print the version and exit.")] = False) -> None:
    """Catalogue buckets of images into Parquet tables and a FAISS index; search them."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is: a run stops as on Ctrl-C, its
    contexts (a local Dask cluster, decode processes, its lease) closing behind it."""


def _terminate(signum: int, frame: object) -> None:
    _stopped_by.append(signum)
    raise Terminated()


_stopped_by: list[int] = []  # SIGTERM, once it has been received


def main() -> None:
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # The temporary server would try to send telemetry (an ERROR line offline), and
    # its 20 s start timeout is too short on a loaded machine: the run would be lost.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # Python's default SIGTERM ends the process on the spot: no context closes, and a
    # local cluster's workers could outlive the run holding a GPU.
    signal.signal(signal.SIGTERM, _terminate)
    try:
        app()
    except (KeyboardInterrupt, SystemExit) as exc:  # Typer turns an interrupt into exit code 130
        if isinstance(exc, SystemExit) and exc.code != 130:
            raise
        stopped = "terminated" if _stopped_by else "interrupted"
        err.print(f"[bold red]{stopped}:[/] the catalogue stays at its last committed version (a run commits in "
                  "one step); the next run continues from it", highlight=False)
        sys.exit(128 + (signal.SIGTERM if _stopped_by else signal.SIGINT))
    except Exception:  # a UserError never gets here: each command turns it into its message and exit code
        traceback.print_exc()
        err.print(f"[bold red]error:[/] {BUG_REPORT}", highlight=False)
        sys.exit(1)
