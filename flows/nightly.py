"""The nightly flow, step by step as a night runs: check the model, plan or
skip, run the shards, build and commit the next version, report.

Thin by design: each step is a plain function in `tasks/`; this module wires
them, hands the shards to the runner the config names (flows/runners.py) and
reports. Its one parameter is the run's `RunConfig`, which Prefect validates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.runners import ShardRunner, check_reachable, shard_progress, shard_runner, shard_size_for
from models.engine import Embedder, ModelInfo, describe_model, get_embedder, should_compile
from models.errors import UserError
from models.registry import model_family
from models.weights import ResolvedWeights, resolve_weights
from tasks.catalog.errors import CatalogError
from tasks.catalog.leases import RunLease
from tasks.catalog.manifest import Manifest, commit_manifest, new_run_id, read_manifest
from tasks.catalog.reader import Catalog
from tasks.catalog.runs_log import write_run_row
from tasks.catalog.versions import build_next_version
from tasks.categories.store import active_categorizer
from tasks.config import RunConfig
from tasks.records import BuildStats, ChangePlan, ShardResult
from tasks.report import RunSummary
from tasks.shard.contents import CatalogRef, seed_catalog
from tasks.shard.progress import current_progress
from tasks.shard.runner import ShardSpec, process_shard
from tasks.source.planning import HANDED_PLANS, RunPlan, plan_run
from tasks.storage import StorageError, StoreSpec, cached_store, url_reader


@dataclass
class RunSetup:
    """What a run knows before it lists anything: its model, checked."""

    weights: ResolvedWeights
    model: ModelInfo
    embedder: Embedder | None  # loaded here when the shards run in this process
    categorizer: str | None  # the active categoriser's key, checked against the model
    seed: CatalogRef | None  # a catalogue of the same model whose vectors are reused by content


def check_model(config: RunConfig) -> RunSetup:
    """Resolve and check the weights once, here (every shard's process checks the
    same sha256 when it loads them); load the model where the shards run in this
    process (a wrong architecture or device fails before listing); refuse an
    active categoriser trained on other embeddings."""
    resolved = resolve_weights(config.model.weights, model_family(config.model.name),
                               expected_sha256=config.model.weights_sha256, read=url_reader(config.endpoint_url))
    settings = config.embedder_settings(resolved.sha256)
    embedder = get_embedder(settings, weights=resolved) if config.shards.in_process else None
    if config.decode.gpu_decode and embedder is not None and embedder.device.type != "cuda":
        raise UserError("--gpu-decode decodes JPEGs with nvJPEG and needs a CUDA device; drop it or use --device cuda")
    info = describe_model(settings, resolved)
    active = active_categorizer(cached_store(config.output, config.endpoint_url, create=True))
    if active:
        active[0].check_fits(info.fingerprint)
    seed = seed_catalog(config.seed, config.endpoint_url, info.fingerprint) if config.seed else None
    return RunSetup(resolved, info, embedder, active[1] if active else None, seed)


def _worth_retrying(task, task_run, state) -> bool:
    """Retry a listing on network trouble, never on what a retry cannot change
    (a damaged catalogue, a refused mass delete, a missing bucket)."""
    return not isinstance(state.data, (CatalogError, StorageError))


@task(name="plan", retries=2, retry_delay_seconds=5, retry_condition_fn=_worth_retrying, cache_policy=NO_CACHE)
def plan_task(config: RunConfig, fingerprint: str) -> RunPlan:
    """List the source (all pages), open the live version, diff them."""
    return plan_run(config, fingerprint)


def plan_or_skip(config: RunConfig, fingerprint: str, plan_token: str | None) -> RunPlan:
    """The plan the caller made moments ago in this process and handed over by
    token (the CLI plans first, so a quiet night never starts Prefect) while
    `CURRENT` has not moved since, else a new one."""
    planned = HANDED_PLANS.take(plan_token)
    if planned is not None and planned.still_current(cached_store(config.output, config.endpoint_url)):
        return planned
    return plan_task(config, fingerprint)


@task(name="process-shard", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE)
def process_shard_task(spec: ShardSpec) -> ShardResult:
    on_progress, finish = shard_progress(current_progress(), spec.progress_topic, spec.index)
    try:
        return process_shard(spec, on_progress=on_progress)
    finally:
        finish()


@task(name="build-and-commit", cache_policy=NO_CACHE)
def build_and_commit(output: StoreSpec, previous_key: str | None, pointer_etag: str | None,
                     plan: ChangePlan, results: list[ShardResult], **version_meta) -> tuple[Manifest, BuildStats]:
    store = output.open(create=True)
    previous = Catalog(store, read_manifest(store, previous_key), previous_key) if previous_key else None
    manifest, stats = build_next_version(store, previous, plan, results, **version_meta)
    commit_manifest(store, manifest, pointer_etag)
    return manifest, stats


def shard_specs(config: RunConfig, planned: RunPlan, setup: RunSetup, *, run_id: str, batch_size: int | None,
                compiled: bool, progress_topic: str | None) -> list[ShardSpec]:
    """The plan's work cut into shards: plain data, so each travels to whatever process runs it."""
    todo = planned.plan.to_process
    size = shard_size_for(len(todo), config.shards)
    source, output = StoreSpec(config.source, config.endpoint_url), StoreSpec(config.output, config.endpoint_url)
    # vectors are reused by content from the version this run builds on (same model) and from --seed
    contents_from = tuple(
        ([CatalogRef(output, planned.previous.manifest_key)] if planned.previous and not planned.reembed_all else [])
        + ([setup.seed] if setup.seed else []))
    return [ShardSpec(index=i, items=tuple(todo[start:start + size]), source=source, output=output, run_id=run_id,
                      embedder=config.embedder_settings(setup.weights.sha256), batch_size=batch_size,
                      workers=config.decode.io_workers, decode=config.decode_options(), compile=compiled,
                      categorizer=setup.categorizer, progress_topic=progress_topic, contents_from=contents_from)
            for i, start in enumerate(range(0, len(todo), size))]


@flow(name="catalog-images", validate_parameters=True)
def catalog_images(config: RunConfig, plan_token: str | None = None) -> RunSummary:
    """Catalogue `config.source` into `config.output`: embed new and changed
    images, drop deleted ones, and commit a new version atomically. `plan_token`
    names a plan the caller made moments ago in this process (`HANDED_PLANS`;
    None: list and plan here)."""
    logger = get_run_logger()
    started = time.perf_counter()
    config = config.with_environment()
    check_reachable(config.shards)
    with shard_runner(config.shards) as runner:  # a local cluster starts now, while the model is checked
        setup = check_model(config)
        run_id = new_run_id()
        runner.warm(warm_up_spec(config, setup))  # workers load the model while the plan is made
        out_store = cached_store(config.output, config.endpoint_url, create=True)
        summary = RunSummary(run_id=run_id, status="failed", version=None, source=config.source,
                             output=config.output, model=setup.model.name, weights_sha256=setup.weights.sha256,
                             started_at=datetime.now(UTC).isoformat())
        try:
            with RunLease(out_store, run_id):  # gc leaves this run's files alone while it lives
                planned = plan_or_skip(config, setup.model.fingerprint, plan_token)
                summary.note_plan(planned)
                if planned.reembed_all:
                    logger.info("model or weights changed (%s -> %s): re-embedding every image",
                                planned.previous.manifest.fingerprint[:40], setup.model.fingerprint[:40])
                logger.info("listed %s objects under %s: %s", summary.listed, config.source, summary.counts)
                if planned.plan.is_empty:
                    return summary
                _run_and_commit(config, planned, setup, run_id, summary, runner)
                return summary
        except Exception as exc:
            summary.message = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            summary.elapsed_s = time.perf_counter() - started
            write_run_row(out_store, summary.run_row())
            _publish_artifact(summary)


def warm_up_spec(config: RunConfig, setup: RunSetup) -> ShardSpec:
    """A shard of no objects with every setting the run's shards will have: what a
    worker builds ahead of them (`warm_shard_process`)."""
    return ShardSpec(index=-1, items=(), source=StoreSpec(config.source, config.endpoint_url),
                     output=StoreSpec(config.output, config.endpoint_url), run_id="warm-up",
                     embedder=config.embedder_settings(setup.weights.sha256), batch_size=config.model.batch_size,
                     workers=config.decode.io_workers, decode=config.decode_options(),
                     compile=config.model.compile == "on")


def _run_and_commit(config: RunConfig, planned: RunPlan, setup: RunSetup, run_id: str, summary: RunSummary,
                    runner: ShardRunner) -> None:
    logger = get_run_logger()
    todo = planned.plan.to_process
    batch_size = config.model.batch_size
    if setup.embedder is not None:
        batch_size = batch_size or setup.embedder.fitting_batch_size()
    compiled = should_compile(config.model.compile, len(todo))
    t_compile = time.perf_counter()
    if compiled and setup.embedder is not None:  # once, here, so shards in this process start warm
        setup.embedder.enable_compile()
        setup.embedder.warm_up(batch_size)
    compile_s = time.perf_counter() - t_compile
    progress = current_progress()
    if progress:  # after compiling, so the bar's rate is the shards' rate
        progress.start(len(todo))
    topic = None if config.shards.in_process else f"batchsight-progress-{run_id}"
    specs = shard_specs(config, planned, setup, run_id=run_id, batch_size=batch_size, compiled=compiled,
                        progress_topic=topic)
    logger.info("%s shards of up to %s objects on %s", len(specs), max((len(s.items) for s in specs), default=0),
                config.shards.describe())
    t_shards = time.perf_counter()
    done = runner.run(process_shard_task, specs, progress=progress, topic=topic)
    shard_wall = time.perf_counter() - t_shards
    previous = planned.previous
    manifest, stats = build_and_commit(
        StoreSpec(config.output, config.endpoint_url), previous.manifest_key if previous else None,
        planned.pointer_etag, planned.plan, done.results,
        run_id=run_id, source=config.source, model=setup.model.name, weights=setup.weights.spec,
        weights_source=setup.weights.source, weights_sha256=setup.weights.sha256,
        embedding_dim=setup.model.embedding_dim, reembed_all=planned.reembed_all,
        index_settings=config.index_settings(), categorizer=setup.categorizer)
    summary.note_shards(done.results, runner=config.shards.describe(), wall_s=shard_wall,
                        cluster_start_s=done.start_s, ready_at=done.ready_at, compile_s=compile_s, build=stats,
                        batch_size=batch_size)
    summary.note_commit(manifest.version)
    logger.info("run %s committed version %s: %s images, %s failures, %.1f images/s", run_id, manifest.version,
                manifest.counts["images"], manifest.counts["failures"], summary.images_per_s)


def _publish_artifact(summary: RunSummary) -> None:
    lines = [
        f"# batchsight run {summary.run_id}: {summary.status}",
        "", f"{summary.message}", "",
        "| listed | new | changed | deleted | unchanged | processed | failed | images/s |",
        "|---|---|---|---|---|---|---|---|",
        f"| {summary.listed} | {summary.counts.get('new', 0)} | {summary.counts.get('changed', 0)} "
        f"| {summary.counts.get('deleted', 0)} | {summary.counts.get('unchanged', 0)} | {summary.processed} "
        f"| {summary.failed} | {summary.images_per_s:.1f} |",
    ]
    if summary.stage_s:
        lines += ["", "| stage | seconds |", "|---|---|"] + [f"| {k.removesuffix('_s')} | {v:.2f} |"
                                                          for k, v in summary.stage_s.items()]
    if summary.bottleneck:
        lines += ["", f"Bottleneck: {summary.bottleneck}"]
    if summary.failures_by_reason:
        lines += ["", "| failure | count |", "|---|---|"] + [f"| {k} | {v} |"
                                                          for k, v in summary.failures_by_reason.items()]
    if summary.top_classes:
        lines += ["", "| top class | images |", "|---|---|"] + [f"| {k} | {v} |" for k, v in summary.top_classes.items()]
    create_markdown_artifact(markdown="\n".join(lines), key="batchsight-run", description="batchsight run summary")
