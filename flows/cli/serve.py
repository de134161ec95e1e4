"""`batchsight serve`: the nightly deployment, on a schedule, with every run option `run` takes."""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import typer
from prefect.settings import PREFECT_API_URL, temporary_settings

from deployments.nightly import DEFAULT_CRON, DEFAULT_TIMEZONE, DEPLOYMENT_NAME, serve_nightly
from deployments.server import DEFAULT_PORT, check_api, prefect_server
from flows.cli.common import console, fail
from flows.cli.options import run_options
from flows.cli.run import preflight
from models.errors import UserError
from tasks.config import RunConfig

app = typer.Typer()


@app.command()
@run_options()
def serve(
    config: RunConfig,
    cron: Annotated[str, typer.Option(help="When to run (cron).")] = DEFAULT_CRON,
    interval: Annotated[float | None, typer.Option(min=10, help="Run every this many seconds instead of the cron "
                                                   "(a catalogue kept fresh all day).")] = None,
    timezone: Annotated[str, typer.Option(help="IANA timezone of the cron, e.g. Europe/Berlin.")] = DEFAULT_TIMEZONE,
    name: Annotated[str, typer.Option(help="Deployment name.")] = DEPLOYMENT_NAME,
    state_dir: Annotated[Path, typer.Option(help="Where the Prefect server batchsight starts keeps its database "
                                              "and log (when PREFECT_API_URL names no server).")]
    = Path("~/.batchsight/prefect"),
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port of the Prefect server batchsight starts (its "
                                                             "UI is there too).")] = DEFAULT_PORT,
) -> None:
    """Serve the nightly deployment: schedule, one run at a time, retries; every run option of `run` is its
    parameter.

    With PREFECT_API_URL set, the deployment is registered with that server (it
    must run the scheduler, as `prefect server start` does). Without it, a Prefect
    server with its scheduler is started here, state in --state-dir, and stopped
    with this command."""
    api_url = os.environ.get("PREFECT_API_URL")
    try:
        ZoneInfo(timezone)
        preflight(config.with_environment())
        if api_url:
            check_api(api_url)
    except ZoneInfoNotFoundError:
        raise fail(UserError(f"unknown timezone {timezone!r}; use an IANA name such as UTC or Europe/Berlin")) from None
    except UserError as exc:
        raise fail(exc) from None
    server = nullcontext(api_url) if api_url else prefect_server(state_dir, port=port)
    try:
        with server as url:
            os.environ["PREFECT_API_URL"] = url  # for processes the runs start
            console.print(f"serving catalog-images/{name} on {url} "
                          f"({'every ' + format(interval, 'g') + ' s' if interval else cron + ' ' + timezone}); "
                          "Ctrl-C stops it", highlight=False, soft_wrap=True)
            with temporary_settings({PREFECT_API_URL: url}):
                serve_nightly(config, name=name, cron=cron, timezone=timezone, interval_s=interval)
    except UserError as exc:  # the server did not start, or a run's flag was refused
        raise fail(exc) from None
    except KeyboardInterrupt:
        console.print("stopped; the schedule is paused while nothing serves it", highlight=False)
