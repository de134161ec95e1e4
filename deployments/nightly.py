"""The nightly deployment: `catalog_images` on a cron schedule, one run at a
time, retried after a failure. `batchsight serve` (or `python -m
deployments.nightly`) serves it; `prefect deploy --prefect-file
deployments/prefect.yaml` registers the same deployment for a work pool.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron, Interval

from flows.nightly import catalog_images
from tasks.config import RunConfig

DEPLOYMENT_NAME = "nightly"
DEFAULT_CRON = "0 2 * * *"
DEFAULT_TIMEZONE = "UTC"
RETRIES = 2
RETRY_DELAY_S = 900

# The flow as the schedule runs it: a failed night (a lost S3 connection, a
# lost commit race) is retried after 15 minutes; the commit protocol makes a
# retry safe.
nightly_catalog = catalog_images.with_options(retries=RETRIES, retry_delay_seconds=RETRY_DELAY_S)


def build_deployment(config: RunConfig, *, name: str = DEPLOYMENT_NAME, cron: str = DEFAULT_CRON,
                     timezone: str = DEFAULT_TIMEZONE, interval_s: float | None = None) -> RunnerDeployment:
    """The deployment object: schedule (the cron, or every `interval_s` seconds),
    the run's configuration as its one parameter (Prefect checks a run's
    parameters against the config's bounds before the run starts), and a
    concurrency limit of one so two runs never overlap on one output root."""
    if interval_s is not None:
        schedule, when = Interval(timedelta(seconds=interval_s), timezone=timezone), f"every {interval_s:g} s"
    else:
        schedule, when = Cron(cron, timezone=timezone), f"{cron}, {timezone}"
    return nightly_catalog.to_deployment(
        name=name,
        schedule=schedule,
        parameters={"config": config.model_dump(mode="json", exclude_defaults=True)},
        enforce_parameter_schema=True,
        concurrency_limit=1,
        description=f"Catalogue {config.source} into {config.output} on a schedule ({when}).",
        tags=["batchsight", "nightly"],
    )


def serve_nightly(config: RunConfig, **kwargs: Any) -> None:
    """Register the deployment and run its schedule in this process until stopped."""
    serve(build_deployment(config, **kwargs))


if __name__ == "__main__":
    serve_nightly(RunConfig(source=os.environ["BATCHSIGHT_SOURCE"], output=os.environ["BATCHSIGHT_OUTPUT"]))
