"""The nightly deployment: `catalog_images` on a cron schedule, one run at a
time, retried after a failure. `batchsight serve` (or `python -m
deployments.nightly`) serves it; `prefect deploy --prefect-file
deployments/prefect.yaml` registers the same deployment for a work pool.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron, Interval

from flows.nightly import catalog_images

DEPLOYMENT_NAME = "nightly"
DEFAULT_CRON = "0 2 * * *"
DEFAULT_TIMEZONE = "UTC"
RETRIES = 2
RETRY_DELAY_S = 900

# The flow as the schedule runs it: a failed night (a lost S3 connection, a
# lost commit race) is retried after 15 minutes; the commit protocol makes a
# retry safe.
nightly_catalog = catalog_images.with_options(retries=RETRIES, retry_delay_seconds=RETRY_DELAY_S)


def build_deployment(source: str, output: str, *, name: str = DEPLOYMENT_NAME, cron: str = DEFAULT_CRON,
                     timezone: str = DEFAULT_TIMEZONE, interval_s: float | None = None,
                     **parameters: Any) -> RunnerDeployment:
    """The deployment object: schedule (the cron, or every `interval_s` seconds),
    parameters, and a concurrency limit of one so two runs never overlap on one
    output root."""
    params = {"source": source, "output": output} | {k: v for k, v in parameters.items() if v is not None}
    if interval_s is not None:
        schedule, when = Interval(timedelta(seconds=interval_s), timezone=timezone), f"every {interval_s:g} s"
    else:
        schedule, when = Cron(cron, timezone=timezone), f"{cron}, {timezone}"
    return nightly_catalog.to_deployment(
        name=name,
        schedule=schedule,
        parameters=params,
        concurrency_limit=1,
        description=f"Catalogue {source} into {output} on a schedule ({when}).",
        tags=["batchsight", "nightly"],
    )


def serve_nightly(source: str, output: str, **kwargs: Any) -> None:
    """Register the deployment and run its schedule in this process until stopped."""
    serve(build_deployment(source, output, **kwargs))


if __name__ == "__main__":
    import os

    serve_nightly(os.environ["BATCHSIGHT_SOURCE"], os.environ["BATCHSIGHT_OUTPUT"])
