"""The nightly flow: list -> plan -> shards -> build + commit -> report.

Thin by design: each step is a plain function in `tasks/`; this module wires
them, hands the shards to the runner the caller chose (flows/runners.py) and
reports.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.runners import ShardRunner, check_reachable, run_shards, shard_progress, shard_size_for
from models.engine import EmbedderSettings, describe_model, get_embedder, should_compile
from models.errors import UserError
from models.registry import model_family
from models.weights import resolve_weights
from tasks import catalog as cat
from tasks import planning
from tasks.categories import active_categorizer
from tasks.index import IndexSettings, parse_memory_size
from tasks.options import RUN_DEFAULTS as D
from tasks.pipeline import DecodeOptions, ShardSpec, current_progress, process_shard
from tasks.runs import RunSummary
from tasks.storage import StorageError, StoreSpec, check_roots_apart, url_reader
from tasks.thumbnails import THUMBNAIL_SIDE


def _worth_retrying(task, task_run, state) -> bool:
    """Retry a listing on network trouble, never on what a retry cannot change
    (a damaged catalogue, a refused mass delete, a missing bucket)."""
    return not isinstance(state.data, (cat.CatalogError, StorageError))


@task(name="list-and-plan", retries=2, retry_delay_seconds=5, retry_condition_fn=_worth_retrying,
      cache_policy=NO_CACHE)
def list_and_plan(source: StoreSpec, output: StoreSpec, fingerprint: str, **options) -> planning.RunPlan:
    """List the source (all pages), open the live version, diff them; or take the
    plan the CLI made moments ago in this process (`planning.plan_run`'s hand-over)."""
    return planning.plan_run(source.open(), output.open(create=True), fingerprint, take_handed_over=True, **options)


@task(name="process-shard", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE)
def process_shard_task(spec: ShardSpec) -> cat.ShardResult:
    on_progress, finish = shard_progress(current_progress(), spec.progress_topic, spec.index)
    try:
        return process_shard(spec, on_progress=on_progress)
    finally:
        finish()


@task(name="build-and-commit", cache_policy=NO_CACHE)
def build_and_commit(output: StoreSpec, previous_key: str | None, pointer_etag: str | None,
                     plan: cat.ChangePlan, results: list[cat.ShardResult], **version_meta) -> tuple[cat.Manifest, cat.BuildStats]:
    store = output.open(create=True)
    previous = cat.Catalog(store, cat.read_manifest(store, previous_key), previous_key) if previous_key else None
    manifest, stats = cat.build_next_version(store, previous, plan, results, **version_meta)
    cat.commit_manifest(store, manifest, pointer_etag)
    return manifest, stats


@flow(name="catalog-images")
def catalog_images(
    source: str,
    output: str,
    model: str = D.model,
    weights: str | None = D.weights,
    weights_sha256: str | None = D.weights_sha256,
    batch_size: int | None = D.batch_size,
    device: str = D.device,
    precision: str = D.precision,
    limit: int | None = D.limit,
    shard_size: int = D.shard_size,
    io_workers: int | None = D.io_workers,
    compile: str = D.compile,
    gpu_decode: bool = D.gpu_decode,
    pdf_dpi: int = D.pdf_dpi,
    max_pages: int = D.max_pages,
    thumbnails: bool = D.thumbnails,
    index_memory: str | None = D.index_memory,
    recall_target: float = D.recall_target,
    max_attempts: int = D.max_attempts,
    max_delete_share: float = D.max_delete_share,
    allow_mass_delete: bool = D.allow_mass_delete,
    endpoint_url: str | None = D.endpoint_url,
    cluster: str | None = D.cluster,
    workers: int | None = D.workers,
) -> RunSummary:
    """Catalogue `source` into `output`: embed new and changed images, drop
    deleted ones, and commit a new version atomically. Shards run in this
    process, on a local Dask cluster of `workers` processes, or on the Dask
    cluster at `cluster` (flows/runners.py)."""
    logger = get_run_logger()
    started = time.perf_counter()
    check_roots_apart(source, output)
    source_at, output_at = StoreSpec(source, endpoint_url), StoreSpec(output, endpoint_url)
    runner = ShardRunner(cluster=cluster, workers=workers)
    check_reachable(runner)
    run_id = cat.new_run_id()
    index_settings = IndexSettings(
        memory_budget_bytes=parse_memory_size(index_memory) if index_memory else None, recall_target=recall_target)
    # Weights are resolved and checked once, here; every shard's process checks
    # the same sha256 when it loads them.
    resolved = resolve_weights(weights, model_family(model), expected_sha256=weights_sha256,
                               read=url_reader(endpoint_url))
    settings = EmbedderSettings(model=model, weights=weights, weights_sha256=resolved.sha256, device=device,
                                precision=precision)
    model_info = describe_model(settings, resolved)
    # The model is loaded where the shards run: here for the in-process runner
    # (failing fast on a bad device), else once in each Dask worker process.
    embedder = get_embedder(settings, weights=resolved) if runner.in_process else None
    out_store = output_at.open(create=True)
    active = active_categorizer(out_store)
    if active:  # refused here, before any work, if it was trained on other embeddings
        active[0].check_fits(model_info.fingerprint)
    categorizer_key = active[1] if active else None
    if gpu_decode and embedder is not None and embedder.device.type != "cuda":
        raise UserError("--gpu-decode decodes JPEGs with nvJPEG and needs a CUDA device; drop it or use --device cuda")
    summary = RunSummary(run_id=run_id, status="failed", version=None, source=source, output=output,
                         model=model, weights_sha256=resolved.sha256,
                         started_at=datetime.now(UTC).isoformat())
    lease = cat.RunLease(out_store, run_id)  # gc leaves this run's files alone while it lives
    try:
        lease.__enter__()
        planned = list_and_plan(source_at, output_at, model_info.fingerprint, max_attempts=max_attempts,
                                limit=limit, max_delete_share=max_delete_share, allow_mass_delete=allow_mass_delete)
        previous, plan, reembed_all = planned.previous, planned.plan, planned.reembed_all
        summary.note_plan(planned)
        if reembed_all:
            logger.info("model or weights changed (%s -> %s): re-embedding every image",
                        previous.manifest.fingerprint[:40], model_info.fingerprint[:40])
        logger.info("listed %s objects under %s: %s", summary.listed, source, summary.counts)
        if plan.is_empty:
            return summary

        todo = plan.to_process
        if embedder is not None:
            batch_size = batch_size or embedder.fitting_batch_size()
        compiled = should_compile(compile, len(todo))
        t_compile = time.perf_counter()
        if compiled and embedder is not None:  # once, here, so shards in this process start warm
            embedder.enable_compile()
            embedder.warm_up(batch_size)
        compile_s = time.perf_counter() - t_compile
        progress = current_progress()
        if progress:  # after compiling, so the bar's rate is the shards' rate
            progress.start(len(todo))
        topic = None if runner.in_process else f"batchsight-progress-{run_id}"
        shard_size = shard_size_for(len(todo), shard_size, runner)
        specs = [ShardSpec(index=i, items=tuple(todo[start:start + shard_size]), source=source_at, output=output_at,
                           run_id=run_id, embedder=settings, batch_size=batch_size, workers=io_workers,
                           decode=DecodeOptions(on_device=gpu_decode, pdf_dpi=pdf_dpi, max_pages=max_pages,
                                               thumbnail_side=THUMBNAIL_SIDE if thumbnails else 0),
                           compile=compiled, categorizer=categorizer_key, progress_topic=topic)
                 for i, start in enumerate(range(0, len(todo), shard_size))]
        logger.info("%s shards of up to %s objects on %s", len(specs), shard_size, runner.describe())
        t_shards = time.perf_counter()
        done = run_shards(process_shard_task, specs, runner, progress=progress, topic=topic)
        results = done.results
        shard_wall = time.perf_counter() - t_shards

        manifest, stats = build_and_commit(
            output_at, previous.manifest_key if previous else None, planned.pointer_etag, plan, results,
            run_id=run_id, source=source, model=model_info.name, weights=resolved.spec,
            weights_source=resolved.source, weights_sha256=resolved.sha256,
            embedding_dim=model_info.embedding_dim, reembed_all=reembed_all, index_settings=index_settings,
            categorizer=categorizer_key)
        summary.note_shards(results, runner=runner.describe(), wall_s=shard_wall, cluster_start_s=done.start_s,
                            ready_at=done.ready_at, compile_s=compile_s, build=stats, batch_size=batch_size)
        summary.note_commit(manifest.version)
        logger.info("run %s committed version %s: %s images, %s failures, %.1f images/s", run_id,
                    manifest.version, manifest.counts["images"], manifest.counts["failures"], summary.images_per_s)
        return summary
    except Exception as exc:
        summary.message = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        lease.__exit__(None, None, None)
        summary.elapsed_s = time.perf_counter() - started
        cat.write_run_row(out_store, summary.run_row())
        _publish_artifact(summary)


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
