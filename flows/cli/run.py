"""`batchsight run`: check what can be checked in seconds, plan, and either
record a quiet night (no Prefect started) or run the nightly flow with a
progress bar; then print what the run did."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from flows.cli.common import console, err, fail
from flows.cli.options import run_options
from flows.nightly import catalog_images
from flows.runners import check_reachable
from models.errors import UserError
from models.registry import model_family
from models.weights import ResolvedWeights, resolve_weights
from tasks.catalog.manifest import new_run_id
from tasks.catalog.runs_log import write_run_row
from tasks.config import RunConfig
from tasks.report import RunSummary
from tasks.shard.contents import seed_catalog
from tasks.shard.progress import reporting_progress
from tasks.source.planning import HANDED_PLANS, plan_run
from tasks.storage import cached_store, url_reader

app = typer.Typer()


class RichProgress:
    """A terminal progress bar fed by the shards (`tasks.shard.progress.ProgressReporter`)."""

    def __init__(self) -> None:
        self.bar = Progress(TextColumn("[bold]embedding"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=err, transient=False)
        self.task_id = None

    def start(self, total: int) -> None:
        self.bar.start()
        self.task_id = self.bar.add_task("embedding", total=total, rate="")

    def advance(self, n: int) -> None:
        if self.task_id is not None:
            self.bar.advance(self.task_id, n)
            task = self.bar.tasks[0]  # the average since the shards began, as the summary reports it
            rate = task.completed / task.elapsed if task.elapsed else 0.0
            self.bar.update(self.task_id, rate=f"{rate:.1f} objects/s" if rate else "")

    def stop(self) -> None:
        self.bar.stop()


def preflight(config: RunConfig) -> ResolvedWeights:
    """Check what can be checked in seconds before Prefect starts: the scheduler
    answers, the model name, both roots reachable (a missing bucket fails here),
    the weights (downloaded or read, sha256 checked, loaded safely), and a --seed
    catalogue made with them."""
    check_reachable(config.shards)
    family = model_family(config.model.name)
    cached_store(config.source, config.endpoint_url)
    cached_store(config.output, config.endpoint_url, create=True)
    weights = resolve_weights(config.model.weights, family, expected_sha256=config.model.weights_sha256,
                              read=url_reader(config.endpoint_url))
    if config.seed:
        seed_catalog(config.seed, config.endpoint_url, family.fingerprint(weights.sha256))
    return weights


def run_catalog(config: RunConfig, *, show_progress: bool = True) -> RunSummary:
    """Run one night: plan here, then either record a quiet night (nothing new,
    changed or deleted: no Prefect server is started, which takes 10-20 s) or run
    the flow with that plan (it is not listed twice) and a progress bar."""
    started = time.perf_counter()
    config = config.with_environment()
    weights = preflight(config)
    fingerprint = model_family(config.model.name).fingerprint(weights.sha256)
    planned = plan_run(config, fingerprint)
    if planned.plan.is_empty:
        summary = RunSummary(run_id=new_run_id(), status="no_changes", version=None, source=config.source,
                             output=config.output, model=config.model.name, weights_sha256=weights.sha256,
                             started_at=datetime.now(UTC).isoformat())
        summary.note_plan(planned)
        summary.elapsed_s = time.perf_counter() - started
        write_run_row(cached_store(config.output, config.endpoint_url), summary.run_row())
        return summary
    progress = RichProgress() if show_progress else None
    token = HANDED_PLANS.hand_over(planned)
    try:
        with reporting_progress(progress):
            return catalog_images(config, plan_token=token)
    finally:
        HANDED_PLANS.take(token)  # a flow that failed before taking it leaves nothing behind
        if progress:
            progress.stop()


def print_summary(summary: RunSummary) -> None:
    t = Table(title=f"run {summary.run_id}: {summary.status}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    c = summary.counts
    t.add_row("version", str(summary.version))
    t.add_row("listed", f"{summary.listed} objects to read" + (f"; skipped {summary.skipped_examples}"
                                                                if summary.skipped else ""))
    t.add_row("plan", f"{c.get('new', 0)} new, {c.get('changed', 0)} changed, {c.get('deleted', 0)} deleted, "
                      f"{c.get('unchanged', 0)} unchanged, {c.get('retry', 0)} retried"
                      + (f", {c['given_up']} failed before (left until their bytes change)" if c.get("given_up") else ""))
    if summary.processed + summary.failed:
        t.add_row("processed", f"{summary.processed} objects embedded ({summary.pages} pages), "
                               f"{summary.failed} failed"
                  + (f"; {summary.reused} of them had bytes embedded before: vectors reused, no model pass"
                     if summary.reused else ""))
        t.add_row("throughput", f"{summary.images_per_s:.1f} objects/s ({summary.elapsed_s:.1f} s in all)")
    else:
        t.add_row("time", f"{summary.elapsed_s:.1f} s")
    if summary.shards:
        t.add_row("shards", f"{summary.shards} on {summary.runner}"
                  + (f" ({len(summary.shards_by_process)} processes ran them, each loading its model "
                     f"{'once' if summary.models_built == 1 else f'{summary.models_built} times'})"
                     if summary.shards_by_process and summary.runner != "this process" else ""))
    if summary.batch_size:
        t.add_row("batch size", str(summary.batch_size))
    if summary.stage_s:
        t.add_row("stages", ", ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in summary.stage_s.items()))
    if summary.bottleneck:
        t.add_row("bottleneck", summary.bottleneck)
    for reason, n in summary.failures_by_reason.items():
        t.add_row("failure", f"{n} x {reason}")
    t.add_row("", summary.message)
    console.print(t)


@app.command()
@run_options()
def run(config: RunConfig,
        as_json: Annotated[bool, typer.Option("--json", help="Print the run summary as JSON.")] = False) -> None:
    """Catalogue SOURCE into OUTPUT: embed new and changed images, index them, commit a new version."""
    try:
        summary = run_catalog(config, show_progress=not as_json)
    except UserError as exc:
        raise fail(exc) from None
    if as_json:
        console.print_json(json.dumps(asdict(summary), default=str))
    else:
        print_summary(summary)
