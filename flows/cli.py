"""The `batchsight` command (Typer + Rich, both shipped with Prefect)."""

from __future__ import annotations

import json
import os
import socket
import sys
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from models.errors import UserError
from tasks.options import RUN_DEFAULTS as D

if TYPE_CHECKING:
    from tasks.catalog import Manifest

app = typer.Typer(help="Catalogue buckets of images into Parquet tables and a FAISS index; search them.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
console = Console()
err = Console(stderr=True, soft_wrap=True)  # error lines stay whole, for grep and logs


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Compile(str, Enum):
    auto = "auto"
    on = "on"
    off = "off"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


EndpointOpt = Annotated[str | None, typer.Option("--endpoint-url", envvar="AWS_ENDPOINT_URL",
                                                 help="S3-compatible endpoint (also AWS_ENDPOINT_URL).")]
CatalogOpt = Annotated[str, typer.Option("--catalog", help="Output root of a run: folder or s3://bucket/prefix.")]
ClusterOpt = Annotated[str | None, typer.Option(
    envvar="BATCHSIGHT_DASK_CLUSTER", help="Run the shards on the Dask cluster whose scheduler is at this address "
    "(tcp://HOST:8786); see docs/operations.md.")]
WorkersOpt = Annotated[int | None, typer.Option(
    min=1, help="Run the shards on a local Dask cluster of this many worker processes; on a GPU machine a "
    "multiple of the GPUs, several shard processes feeding each card. Default: in this process.")]


BUG_REPORT = ("this is a bug in batchsight, not something you did: please report it with the command you ran "
              "and the lines above")


def _fail(exc: UserError) -> typer.Exit:
    """Print a user error's message (whole, for grep and logs) and exit with its
    code: 2 bad input, 3 another run committed first (rerun to continue from its
    version), 4 a file of the catalogue is missing or damaged (`status --verify`
    names it, rollback restores)."""
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code=exc.exit_code)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            console.print(f"batchsight {version('batchsight')}", highlight=False)
        except PackageNotFoundError:  # run from a checkout that was never installed
            console.print("batchsight (not installed)", highlight=False)
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                   help="Print the version and exit.")] = False) -> None:
    """Catalogue buckets of images into Parquet tables and a FAISS index; search them."""


class RichProgress:
    """A terminal progress bar fed by the shards (see tasks.pipeline.ProgressReporter)."""

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


def preflight(source: str, output: str, model: str, endpoint_url: str | None, weights: str | None = None,
              weights_sha256: str | None = None):
    """Check what can be checked in seconds before Prefect starts: the model name,
    that both roots are reachable (a missing bucket fails here) and apart, and the
    weights (downloaded or read, sha256 checked, loaded safely). Returns them."""
    from models.registry import model_family
    from models.weights import resolve_weights
    from tasks.storage import cached_store, check_roots_apart, url_reader

    family = model_family(model)
    check_roots_apart(source, output)
    cached_store(source, endpoint_url)
    cached_store(output, endpoint_url, create=True)
    return resolve_weights(weights, family, expected_sha256=weights_sha256, read=url_reader(endpoint_url))


def run_catalog(source: str, output: str, *, show_progress: bool = True, **params):
    """Run the nightly flow once, with a progress bar; returns its RunSummary.

    The listing is planned here first: a night with nothing to do records its run
    and returns without starting Prefect (whose temporary server takes 10-20 s)."""
    from flows.runners import ShardRunner, check_reachable

    check_reachable(ShardRunner(cluster=params.get("cluster"), workers=params.get("workers")))
    model = params.get("model", D.model)
    weights = preflight(source, output, model, params.get("endpoint_url"), params.get("weights"),
                        params.get("weights_sha256"))
    quiet = _nothing_to_do(source, output, f"{model}@{weights.sha256}", **params)
    if quiet is not None:
        return quiet
    from flows.nightly import catalog_images
    from tasks.pipeline import reporting_progress
    from tasks.planning import drop_handed_over

    progress = RichProgress() if show_progress else None
    try:
        with reporting_progress(progress):
            return catalog_images(source=source, output=output, **params)
    finally:
        drop_handed_over()  # the flow took the plan, or failed before it could
        if progress:
            progress.stop()


def _nothing_to_do(source: str, output: str, fingerprint: str, **params):
    """The run's summary when the plan is empty (recorded in the runs log), else
    None, and the plan is handed over to the flow that runs next (no second listing)."""
    import time
    from datetime import UTC, datetime

    from tasks.runs import RunSummary
    from tasks import catalog as cat
    from tasks.planning import plan_run
    from tasks.storage import cached_store

    started = time.perf_counter()
    endpoint = params.get("endpoint_url")
    out_store = cached_store(output, endpoint, create=True)
    planned = plan_run(cached_store(source, endpoint), out_store, fingerprint,
                       hand_over=True, **{k: params[k] for k in ("max_attempts", "limit", "max_delete_share",
                                                                 "allow_mass_delete") if k in params})
    if not planned.plan.is_empty:
        return None
    model, sha = fingerprint.split("@", 1)
    summary = RunSummary(run_id=cat.new_run_id(), status="no_changes", version=None, source=source, output=output,
                         model=model, weights_sha256=sha, started_at=datetime.now(UTC).isoformat())
    summary.note_plan(planned)
    summary.elapsed_s = time.perf_counter() - started
    cat.write_run_row(out_store, summary.run_row())
    return summary


def print_summary(summary) -> None:
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
                               f"{summary.failed} failed")
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
def run(
    source: Annotated[str, typer.Option(help="Images to catalogue: a folder or s3://bucket/prefix.")],
    output: Annotated[str, typer.Option(help="Catalogue root: a folder or s3://bucket/prefix.")],
    model: Annotated[str, typer.Option(help="torchvision classification model name.")] = D.model,
    weights: Annotated[str | None, typer.Option(
        help="torchvision weights name (default: the model's DEFAULT), a file (.pth/.safetensors), "
             "an s3:// key, or random:SEED (smoke tests only).")] = D.weights,
    weights_sha256: Annotated[str | None, typer.Option(help="Expected sha256 of the weights file.")] = D.weights_sha256,
    batch_size: Annotated[int | None, typer.Option(min=1, max=4096, help="Images per model batch "
                                                   "(default: 16 on CPU, what fits on a GPU).")] = D.batch_size,
    device: Annotated[Device, typer.Option(help="Where the model runs.")] = Device(D.device),
    precision: Annotated[Precision, typer.Option(help="auto = bf16 on GPUs and bf16-capable CPUs, else fp32.")]
    = Precision(D.precision),
    limit: Annotated[int | None, typer.Option(min=1, help="Process at most this many images this run.")] = D.limit,
    shard_size: Annotated[int, typer.Option(min=1, help="Images per Prefect task (with --workers N, smaller where "
                                                       "the workers would get fewer than 2 shards each).")] = D.shard_size,
    io_workers: Annotated[int | None, typer.Option(min=1, max=256, help="Fetch/decode threads per shard "
                                                   "(default: twice the cores, at least 4).")] = D.io_workers,
    compile: Annotated[Compile, typer.Option(help="torch.compile the model: auto = when the run has 3,000+ "
                                                  "images (compiling takes 10-20 s, then ~1.6x on CPU).")]
    = Compile(D.compile),
    gpu_decode: Annotated[bool, typer.Option("--gpu-decode", help="Decode JPEGs on the GPU (nvJPEG).")] = D.gpu_decode,
    pdf_dpi: Annotated[int, typer.Option(min=36, max=600, help="Resolution PDF pages are rendered at.")] = D.pdf_dpi,
    max_pages: Annotated[int, typer.Option(min=1, help="Pages read from one PDF or TIFF at most.")] = D.max_pages,
    thumbnails: Annotated[bool, typer.Option("--thumbnails/--no-thumbnails", help="Make 160 px thumbnails while "
                                             "decoding, for the web page (~1.1 ms of CPU an image).")]
    = D.thumbnails,
    index_memory: Annotated[str | None, typer.Option(
        envvar="BATCHSIGHT_INDEX_MEMORY", help="Memory the FAISS index may use, e.g. 8GiB (default: half of RAM); "
                                              "decides flat, IVF-Flat or IVF-PQ.")] = D.index_memory,
    recall_target: Annotated[float, typer.Option(min=0.5, max=1.0, help="recall@10 the search setting (nprobe) "
                                                                        "is tuned to reach.")] = D.recall_target,
    max_delete_share: Annotated[float, typer.Option(min=0.0, max=1.0, help="Refuse a run that would delete more "
                                                    "than this share of the catalogue (a typo'd prefix lists "
                                                    "nothing).")] = D.max_delete_share,
    allow_mass_delete: Annotated[bool, typer.Option("--allow-mass-delete", help="Commit the deletions even past "
                                                    "--max-delete-share (an emptied bucket, a big clean-up).")]
    = D.allow_mass_delete,
    cluster: ClusterOpt = D.cluster,
    workers: WorkersOpt = D.workers,
    endpoint_url: EndpointOpt = D.endpoint_url,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run summary as JSON.")] = False,
) -> None:
    """Catalogue SOURCE into OUTPUT: embed new and changed images, index them, commit a new version."""
    try:
        summary = run_catalog(source, output, show_progress=not as_json, cluster=cluster, workers=workers,
                              model=model, weights=weights,
                              weights_sha256=weights_sha256, batch_size=batch_size, device=device.value,
                              precision=precision.value, limit=limit, shard_size=shard_size, io_workers=io_workers,
                              compile=compile.value, gpu_decode=gpu_decode, pdf_dpi=pdf_dpi, max_pages=max_pages,
                              thumbnails=thumbnails,
                              index_memory=index_memory, recall_target=recall_target,
                              max_delete_share=max_delete_share, allow_mass_delete=allow_mass_delete,
                              endpoint_url=endpoint_url)
    except UserError as exc:
        raise _fail(exc) from None
    if as_json:
        from dataclasses import asdict

        console.print_json(json.dumps(asdict(summary), default=str))
    else:
        print_summary(summary)


@app.command()
def search(
    catalog: CatalogOpt,
    key: Annotated[str | None, typer.Option(help="A catalogued key to find look-alikes of.")] = None,
    image: Annotated[Path | None, typer.Option(help="An image file to find look-alikes of.", exists=True,
                                               dir_okay=False)] = None,
    queries: Annotated[Path | None, typer.Option(help="Many queries: a folder of images, or a CSV with a 'key' "
                                                      "and/or 'image' column.", exists=True)] = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, max=10_000, help="How many neighbours.")] = 10,
    prefix: Annotated[str | None, typer.Option(help="Only return images whose key starts with this.")] = None,
    category: Annotated[str | None, typer.Option(help="Only return images of this category.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write the results to a .csv or .parquet file.")] = None,
    include_self: Annotated[bool, typer.Option("--include-self", help="Keep a --key query's own object (every "
                                               "page of it) in its results.")] = False,
    weights: Annotated[str | None, typer.Option(help="Where the catalogue's weights file lives now "
                                                     "(checked against its recorded sha256).")] = None,
    endpoint_url: EndpointOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON records.")] = False,
) -> None:
    """Print (or write) the images most similar to --key, --image, or each of --queries."""
    from flows.search import search_queries, similar_images
    from tasks.search import results_format, write_results

    if sum(q is not None for q in (key, image, queries)) != 1:
        raise _fail(UserError("pass exactly one of --key KEY or --image FILE (or --queries FOLDER|CSV for many)"))
    try:
        if out is not None:
            results_format(out)  # a bad name fails before any embedding work
        filters = {"k": k, "prefix": prefix, "category": category, "endpoint_url": endpoint_url, "weights": weights,
                   "include_self": include_self}
        if queries is not None:
            result = search_queries(catalog, queries, **filters)
        else:
            result = similar_images(catalog, key=key, image=image, **filters)
        if out is not None:
            write_results(result, out)
    except UserError as exc:
        raise _fail(exc) from None
    if out is not None:
        console.print(f"wrote {len(result)} results to {out}", highlight=False)
    elif as_json:
        sys.stdout.write(result.to_json(orient="records") + "\n")
    else:
        t = Table(title=f"nearest to {key or image or queries}", title_justify="left")
        columns = (["query"] if "query" in result else []) + ["rank", "key", "page", "score", "top_class"]
        for col in columns:  # keys print whole (a person copies them); long class names are cut
            t.add_column(col.replace("_", " "), justify="right" if col in ("rank", "page", "score") else "left",
                         no_wrap=col in ("key", "query"), max_width=24 if col == "top_class" else None)
        for row in result[columns].itertuples(index=False):
            t.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row))
        console.print(t)


@app.command()
def status(catalog: CatalogOpt, endpoint_url: EndpointOpt = None,
           verify: Annotated[bool, typer.Option("--verify", help="Read every file of the live version and check "
                                                "its size and sha256 against the manifest (exit 4 if any is "
                                                "damaged).")] = False,
           as_json: Annotated[bool, typer.Option("--json", help="Print it as JSON.")] = False) -> None:
    """Print the live version of a catalogue, the run that made it, its counts and its index's recall."""
    from tasks.catalog import list_versions, open_catalog, read_runs, verify_version

    try:
        cat = open_catalog(catalog, endpoint_url=endpoint_url)
        history = list_versions(cat.store)
        runs = read_runs(cat.store)
        checked = verify_version(cat.store, cat.manifest) if verify else None
    except UserError as exc:
        raise _fail(exc) from None
    m = cat.manifest
    made_by = runs[runs["run_id"] == m.run_id]
    last = runs.iloc[-1] if len(runs) else None
    index = {"kind": m.index_state.kind, "factory": m.index_factory, "vectors": m.counts.get("vectors"),
             "trained_n": m.index_trained_n, "nlist": m.index_nlist, "nprobe": m.index_nprobe,
             "recall_at_10": m.index_recall_at_10, "recall_target": m.index_recall_target,
             "recall_queries": m.index_recall_queries, "next_option": _next_option(m),
             "delta_vectors": m.counts.get("index_delta", 0), "removed_from_main": m.counts.get("index_removed", 0),
             "images_parts": len(m.images)}
    info = {
        "version": m.version, "run_id": m.run_id, "created_at": m.created_at, "model": m.model,
        "weights": m.weights, "weights_sha256": m.weights_sha256, "counts": m.counts, "index_type": m.index_type,
        "index": index, "rolled_back_from": m.rolled_back_from, "versions": [v.version for v in history],
        "run": _run_info(made_by.iloc[0]) if len(made_by) else None,
        "last_run": _run_info(last) if last is not None else None,
    }
    if checked is not None:
        info["verify"] = {"files": checked.checked, "damaged": checked.problems, "unrecorded": checked.unrecorded}
    if as_json:
        console.print_json(json.dumps(info, default=str))
        _exit_if_damaged(checked, catalog, history)
        return
    t = Table(title=f"catalogue {catalog}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("version", f"{m.version} (run {m.run_id}, {m.created_at})"
              + (f", restored from v{m.rolled_back_from}" if m.rolled_back_from else ""))
    t.add_row("model", f"{m.model}, weights {m.weights} ({m.weights_source}, sha256 {m.weights_sha256[:16]}...)")
    t.add_row("images", str(m.counts.get("images")))
    t.add_row("failures", str(m.counts.get("failures")))
    t.add_row("index", _index_line(index))
    for label, run_row in (("made by", info["run"]), ("last run", info["last_run"])):
        if run_row:
            t.add_row(label, f"{run_row['run_id']} {run_row['status']}: {run_row['new']} new, {run_row['changed']} "
                             f"changed, {run_row['deleted']} deleted, {run_row['failed']} failed, "
                             f"{run_row['images_per_s']:.1f} images/s")
    t.add_row("history", ", ".join(f"v{v.version}" for v in history))
    if checked is not None:
        t.add_row("verify", f"{checked.checked} files read, {len(checked.problems)} damaged"
                  + (f", {checked.unrecorded} without a recorded checksum (older version)" if checked.unrecorded else ""))
    console.print(t)
    _exit_if_damaged(checked, catalog, history)


def _exit_if_damaged(checked, catalog: str, history) -> None:
    if checked is None or not checked.problems:
        return
    for problem in checked.problems:
        err.print(f"[bold red]damaged:[/] {problem}", highlight=False)
    earlier = [v.version for v in history if v.version < checked.version]
    err.print(f"version {checked.version} is damaged; restore those files, or make an earlier version live: "
              f"batchsight rollback --catalog {catalog} --to {earlier[0] if earlier else 'N'}", highlight=False)
    from tasks.catalog import CatalogCorrupt

    raise typer.Exit(code=CatalogCorrupt.exit_code)


def _next_option(m: Manifest) -> dict | None:
    """The index one rung up from the live one, where its measured recall misses the target."""
    if m.index_recall_at_10 is None or m.index_recall_at_10 >= m.index_recall_target:
        return None
    from tasks import index as faiss_index

    up = faiss_index.next_option_up(m.index_state, m.counts.get("vectors", 0), m.embedding_dim)
    return {"kind": up.kind, "factory": up.factory, "rerank": up.rerank, "estimated_bytes": up.estimated_bytes,
            "hint": faiss_index.next_option_hint(up)} if up else {"hint": faiss_index.next_option_hint(None)}


def _index_line(index: dict) -> str:
    line = f"{index['kind']} ({index['factory']}), {index['vectors']} vectors"
    if index["nlist"]:
        line += f", {index['nlist']} lists, nprobe {index['nprobe']}, trained at {index['trained_n']} vectors"
    if index["delta_vectors"] or index["removed_from_main"]:
        line += (f" (since the last compaction: {index['delta_vectors']} in the delta segment, "
                 f"{index['removed_from_main']} removed from the main index)")
    if index["recall_at_10"] is None:
        return line + ", recall not measured (version written before recall was)"
    line += f"; recall@10 {index['recall_at_10']:.3f} (target {index['recall_target']:g})"
    if index["recall_at_10"] < index["recall_target"]:
        line += f": below target, the index's codes limit it; {index['next_option']['hint']}"
    return line


@app.command()
def duplicates(
    catalog: CatalogOpt,
    threshold: Annotated[float, typer.Option(min=-1.0, max=0.9999, help="Cosine similarity above which two images "
                                             "are near-identical (about 0.95 for pretrained ResNet embeddings).")]
    = 0.95,
    endpoint_url: EndpointOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print every group member as JSON.")] = False,
) -> None:
    """Find groups of near-identical images in the live version; write them as a `duplicates` table."""
    from flows.search import find_duplicates

    try:
        report = find_duplicates(catalog, threshold=threshold, endpoint_url=endpoint_url)
    except UserError as exc:
        raise _fail(exc) from None
    if as_json:
        console.print_json(json.dumps({"version": report.version, "threshold": threshold, "table": report.key,
                                       "groups": report.n_groups, "images": len(report.groups),
                                       "members": report.groups.to_dict(orient="records")}))
        return
    t = Table(title=f"{report.n_groups} groups of near-identical images ({len(report.groups)} images) in "
                    f"version {report.version}, cosine > {threshold:g}", title_justify="left")
    for col in ("group", "size", "members (key, or key#page for a document's pages past the first)"):
        t.add_column(col)
    for group_id, members in report.groups.groupby("group_id", sort=False):
        keys = [k if p == 1 else f"{k}#page={p}" for k, p in zip(members["key"], members["page"], strict=True)]
        t.add_row(str(group_id), str(len(keys)), ", ".join(keys[:4]) + (f", ... (+{len(keys) - 4})" if len(keys) > 4 else ""))
    console.print(t)
    console.print(f"written to {report.key}", highlight=False, soft_wrap=True)


def _run_info(row) -> dict:
    keys = ("run_id", "status", "started_at", "listed", "new", "changed", "deleted", "unchanged", "processed",
            "failed", "images_per_s", "elapsed_s", "message")
    return {k: (row[k].item() if hasattr(row[k], "item") else row[k]) for k in keys}


@app.command()
def rollback(catalog: CatalogOpt,
             to: Annotated[int, typer.Option("--to", min=1, help="The version to make live again.")],
             endpoint_url: EndpointOpt = None) -> None:
    """Make an earlier version live again (recorded as a new version)."""
    from tasks.catalog import rollback as rollback_catalog
    from tasks.storage import cached_store

    try:  # not through open_catalog: rollback must work when the live version is the damaged one
        restored = rollback_catalog(cached_store(catalog, endpoint_url), to)
    except UserError as exc:
        raise _fail(exc) from None
    console.print(f"version {restored.version} is live: the content of version {to} "
                  f"({restored.counts.get('images')} images)")


@app.command()
def compact(catalog: CatalogOpt,
            index_memory: Annotated[str | None, typer.Option(
                envvar="BATCHSIGHT_INDEX_MEMORY", help="Memory the FAISS index may use, e.g. 8GiB (default: half "
                                                       "of RAM), as for `run`.")] = None,
            recall_target: Annotated[float, typer.Option(min=0.5, max=1.0, help="recall@10 the search setting "
                                                         "(nprobe) is tuned to reach.")] = D.recall_target,
            endpoint_url: EndpointOpt = None) -> None:
    """Fold the nightly parts, deletes and index segments into one of each (a new version, same content).
    Nights do this on their own past a threshold; run it on demand, e.g. before a busy day of searches."""
    from tasks.catalog import open_catalog
    from tasks.index import IndexSettings, parse_memory_size
    from tasks.versions import compact as compact_catalog

    try:
        settings = IndexSettings(memory_budget_bytes=parse_memory_size(index_memory) if index_memory else None,
                                 recall_target=recall_target)
        m = compact_catalog(open_catalog(catalog, endpoint_url=endpoint_url).store, settings)
    except UserError as exc:
        raise _fail(exc) from None
    console.print(f"version {m.version} is live: {m.counts.get('images')} images in {len(m.images)} part, "
                  f"{m.counts.get('vectors')} vectors in one {m.index_factory} index "
                  f"(recall@10 {m.index_recall_at_10:.3f})", highlight=False)


@app.command()
def gc(catalog: CatalogOpt,
       keep_versions: Annotated[int | None, typer.Option(min=1, help="Also delete versions older than the newest N "
                                                                     "(default: keep every version).")] = None,
       min_age_hours: Annotated[float, typer.Option(min=0, help="Leave unreferenced files younger than this. "
                                                                "Runs in progress are protected by their lease "
                                                                "whatever their age; this guards other writers.")]
       = 1.0,
       dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would go; delete nothing.")] = False,
       endpoint_url: EndpointOpt = None) -> None:
    """Delete files no retained version references (parts of crashed runs, old versions)."""
    from tasks.catalog import collect_garbage, open_catalog

    try:
        report = collect_garbage(open_catalog(catalog, endpoint_url=endpoint_url).store, keep_versions=keep_versions,
                                 min_age_s=min_age_hours * 3600, dry_run=dry_run)
    except UserError as exc:
        raise _fail(exc) from None
    verb = "would delete" if dry_run else "deleted"
    for key in report.deleted:
        console.print(f"{verb} {key}", highlight=False)
    console.print(f"{verb} {len(report.deleted)} files ({report.bytes_freed / 1e6:.1f} MB); kept versions "
                  f"{', '.join(map(str, report.kept_versions))}; {report.skipped_recent} recent files and "
                  f"{report.skipped_running} files of runs in progress left alone")


@app.command()
def serve(
    source: Annotated[str, typer.Option(help="Images to catalogue every night.")],
    output: Annotated[str, typer.Option(help="Catalogue root.")],
    cron: Annotated[str, typer.Option(help="When to run (cron).")] = "0 2 * * *",
    interval: Annotated[float | None, typer.Option(min=10, help="Run every this many seconds instead of the cron "
                                                   "(a catalogue kept fresh all day).")] = None,
    timezone: Annotated[str, typer.Option(help="IANA timezone of the cron, e.g. Europe/Berlin.")] = "UTC",
    name: Annotated[str, typer.Option(help="Deployment name.")] = "nightly",
    model: Annotated[str | None, typer.Option(help="torchvision classification model name (default resnet50).")]
    = None,
    weights: Annotated[str | None, typer.Option(help="Weights, as for `batchsight run --weights`.")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, max=4096, help="Images per model batch (default: by "
                                                   "device).")] = None,
    state_dir: Annotated[Path, typer.Option(help="Where the Prefect server batchsight starts keeps its database "
                                              "and log (when PREFECT_API_URL names no server).")]
    = Path("~/.batchsight/prefect"),
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port of the Prefect server batchsight starts (its "
                                                             "UI is there too).")] = 4200,
    cluster: ClusterOpt = None,
    workers: WorkersOpt = None,
    endpoint_url: EndpointOpt = None,
) -> None:
    """Serve the nightly deployment: schedule, one run at a time, retries.

    With PREFECT_API_URL set, the deployment is registered with that server (it
    must run the scheduler, as `prefect server start` does). Without it, a Prefect
    server with its scheduler is started here, state in --state-dir, and stopped
    with this command."""
    from contextlib import nullcontext
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    from deployments.server import check_api, prefect_server

    api_url = os.environ.get("PREFECT_API_URL")
    try:
        ZoneInfo(timezone)
        from flows.runners import ShardRunner, check_reachable

        check_reachable(ShardRunner(cluster=cluster, workers=workers))
        preflight(source, output, model or D.model, endpoint_url, weights)
        if api_url:
            check_api(api_url)
    except ZoneInfoNotFoundError:
        raise _fail(UserError(f"unknown timezone {timezone!r}; use an IANA name such as UTC or Europe/Berlin")) from None
    except UserError as exc:
        raise _fail(exc) from None
    server = nullcontext(api_url) if api_url else prefect_server(state_dir, port=port)
    try:
        with server as url:
            os.environ["PREFECT_API_URL"] = url  # before Prefect is imported: its settings read it once
            from prefect.settings import PREFECT_API_URL, temporary_settings

            from deployments.nightly import serve_nightly

            console.print(f"serving catalog-images/{name} on {url} "
                          f"({'every ' + format(interval, 'g') + ' s' if interval else cron + ' ' + timezone}); "
                          "Ctrl-C stops it", highlight=False, soft_wrap=True)
            with temporary_settings({PREFECT_API_URL: url}):
                serve_nightly(source, output, name=name, cron=cron, timezone=timezone, interval_s=interval,
                              model=model, weights=weights, batch_size=batch_size, endpoint_url=endpoint_url,
                              cluster=cluster, workers=workers)
    except UserError as exc:  # the server did not start, or a run's flag was refused
        raise _fail(exc) from None
    except KeyboardInterrupt:
        console.print("stopped; the schedule is paused while nothing serves it", highlight=False)


@app.command()
def ui(
    catalog: CatalogOpt,
    host: Annotated[str, typer.Option(help="Address to listen on; beyond 127.0.0.1 a --token is required.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8765,
    token: Annotated[str | None, typer.Option(envvar="BATCHSIGHT_UI_TOKEN", help="Secret every request must carry "
                                              "when --host is not loopback; label writes always need it when set "
                                              "(also BATCHSIGHT_UI_TOKEN).")] = None,
    max_upload_mb: Annotated[float, typer.Option(min=0.1, max=1024, help="Largest query image accepted.")] = 20,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Server processes, each with its own copy of the "
                                         "catalogue's index in memory: one uses one core at most.")] = 1,
    endpoint_url: EndpointOpt = None,
) -> None:
    """Serve the search and review page, and its JSON API under /api/, over the live catalogue."""
    from flows.ui import check_bind, serve as serve_ui

    try:
        check_bind(host, token)
        shown = "localhost" if host in ("127.0.0.1", "::1") else host
        console.print(f"batchsight page on http://{shown}:{port}/ (API docs: /docs); Ctrl-C stops it",
                      highlight=False)
        serve_ui(catalog, host=host, port=port, token=token, endpoint_url=endpoint_url,
                 max_upload_bytes=int(max_upload_mb * 1024 * 1024), workers=workers)
    except UserError as exc:
        raise _fail(exc) from None


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the sample bucket and catalogue go.")] = Path("demo-data"),
    images: Annotated[int, typer.Option(min=10, help="How many sample images to generate.")] = 300,
    model: Annotated[str, typer.Option(help="torchvision classification model name.")] = D.model,
) -> None:
    """Generate a sample bucket, catalogue it, and search it."""
    from models.registry import model_family
    from models.weights import WeightsError, resolve_weights
    from tasks.sample_data import generate_samples, write_samples
    from tasks.storage import LocalStore

    bucket = workdir / "bucket"
    if not bucket.exists() or not any(bucket.rglob("*.jpg")):
        console.print(f"generating {images} sample images in {bucket} ...")
        write_samples(LocalStore(bucket, create=True), generate_samples(images, seed=7, large_photos=3))
    weights = None
    socket.setdefaulttimeout(15)
    try:
        resolve_weights(None, model_family(model))
    except WeightsError as exc:
        weights = "random:0"
        console.print(Panel(
            f"[bold]Pretrained {model} weights could not be downloaded[/]\n{exc}\n\n"
            "This demo carries on with SEEDED RANDOM weights (random:0): search and dedup mechanics work, "
            "but class labels are meaningless. Outside the demo batchsight never does this; pass --weights.",
            title="DEMO: RANDOM WEIGHTS", border_style="bold yellow"))
    finally:
        socket.setdefaulttimeout(None)
    output = workdir / "catalog"
    try:
        summary = run_catalog(str(bucket), str(output), model=model, weights=weights)
    except UserError as exc:
        raise _fail(exc) from None
    print_summary(summary)

    from flows.search import similar_images
    from tasks.catalog import Catalog
    from tasks.storage import LocalStore as _Local

    cat = Catalog.open(_Local(output))
    if not cat.failures.empty:
        t = Table(title="failures (recorded, the run went on)", title_justify="left")
        for col in ("key", "stage", "reason", "message"):
            t.add_column(col)
        for row in cat.failures.itertuples():
            t.add_row(row.key, row.stage, row.error_type, row.message[:70])
        console.print(t)
    query = next(k for k in cat.images["key"] if k.startswith("photos/"))
    result = similar_images(cat, key=query, k=5)
    t = Table(title=f"5 nearest to {query}", title_justify="left")
    for col in ("rank", "key", "score", "top class"):
        t.add_column(col)
    for row in result.itertuples():
        t.add_row(str(row.rank), row.key, f"{row.score:.4f}", str(row.top_class))
    console.print(t)
    _demo_categories(cat, output)
    console.print(f"\nTry: .venv/bin/batchsight search --catalog {output} --key {query} -k 10\n"
                  f"     .venv/bin/batchsight status --catalog {output}", soft_wrap=True)


categories_app = typer.Typer(help="Sort images into your own categories, learned from a few labelled examples.",
                             no_args_is_help=True)
app.add_typer(categories_app, name="categories")


@categories_app.command("fit")
def categories_fit(
    catalog: CatalogOpt,
    labels: Annotated[Path | None, typer.Option(help="CSV with columns key,label.", exists=True, dir_okay=False)]
    = None,
    labels_prefix: Annotated[str | None, typer.Option(help="A folder or s3:// prefix with one sub-folder per "
                                                           "category, e.g. SRC/labelled/.")] = None,
    val_fraction: Annotated[float, typer.Option(min=0.05, max=0.5, help="Share of each category held out.")] = 0.25,
    target_precision: Annotated[float, typer.Option(min=0.5, max=1.0, help="Calibrate the confidence threshold "
                                                                           "so accepted answers are this precise on "
                                                                           "the held-out split.")] = 0.95,
    apply: Annotated[bool, typer.Option("--apply", help="Also re-categorise the whole catalogue now.")] = False,
    review_labels: Annotated[bool, typer.Option("--review-labels/--no-review-labels", help="Also use the labels "
                                                "given on the review page of `batchsight ui` (they win over "
                                                "--labels for the same key).")] = True,
    endpoint_url: EndpointOpt = None,
) -> None:
    """Train a categoriser on stored embeddings, report held-out metrics, save and activate it."""
    from flows.categorize import apply_categories, fit_categories

    try:
        categorizer, key, embedded_now = fit_categories(
            catalog, labels_csv=str(labels) if labels else None, labels_prefix=labels_prefix,
            review_labels=review_labels, endpoint_url=endpoint_url, val_fraction=val_fraction, target_precision=target_precision)
    except UserError as exc:
        raise _fail(exc) from None
    r = categorizer.report
    console.print(f"trained on {r.n_train} examples, checked on {r.n_val} held out "
                  f"({embedded_now} labelled images embedded now)")
    console.print(f"accuracy {r.accuracy:.3f} (always answering the most common label: {r.majority_baseline:.3f}); "
                  f"threshold {r.threshold:.3f}: {r.uncertain_rate:.1%} uncertain, "
                  f"accuracy when certain {r.accuracy_when_certain:.3f}")
    t = Table(title="per class (held out)", title_justify="left")
    for col in ("category", "precision", "recall", "support"):
        t.add_column(col, justify="left" if col == "category" else "right")
    for name, m in r.per_class.items():
        t.add_row(name, f"{m['precision']:.3f}", f"{m['recall']:.3f}", str(m["support"]))
    console.print(t)
    cm = Table(title="confusion matrix (rows: true, columns: predicted)", title_justify="left")
    cm.add_column("")
    for name in categorizer.labels:
        cm.add_column(name, justify="right")
    for name, row in zip(categorizer.labels, r.confusion, strict=True):
        cm.add_row(name, *map(str, row))
    console.print(cm)
    for warning in r.warnings:
        err.print(f"[bold yellow]warning:[/] {warning}", highlight=False)
    console.print(f"saved and activated {key}; nightly runs now categorise new images "
                  f"(`batchsight categories list` shows every categoriser, `categories use N` switches back)",
                  highlight=False)
    if apply:
        _print_apply(apply_categories(catalog, endpoint_url=endpoint_url))
    else:
        console.print(f"re-categorise existing rows: batchsight categories apply --catalog {catalog}", soft_wrap=True)


def _print_apply(report) -> None:
    mix = ", ".join(f"{k} {v}" for k, v in report.counts.items())
    console.print(f"version {report.version}: categorised {report.rows} rows at {report.rows_per_s:,.0f} rows/s ({mix})")


@categories_app.command("apply")
def categories_apply(catalog: CatalogOpt, endpoint_url: EndpointOpt = None) -> None:
    """Re-categorise every row with the active categoriser, from stored embeddings (no CNN)."""
    from flows.categorize import apply_categories

    try:
        _print_apply(apply_categories(catalog, endpoint_url=endpoint_url))
    except UserError as exc:
        raise _fail(exc) from None


@categories_app.command("list")
def categories_list(catalog: CatalogOpt, endpoint_url: EndpointOpt = None) -> None:
    """List the saved categorisers, oldest first, with their held-out accuracy; * marks the active one."""
    from tasks import layout
    from tasks.catalog import open_catalog
    from tasks.categories import list_categorizers

    try:
        saved = list_categorizers(open_catalog(catalog, endpoint_url=endpoint_url).store)
    except UserError as exc:
        raise _fail(exc) from None
    t = Table(title=f"{len(saved)} categorisers in {catalog}", title_justify="left")
    for col in ("#", "active", "name", "created", "categories", "examples", "held-out accuracy"):
        t.add_column(col)
    for i, (key, c, active) in enumerate(saved, 1):
        r = c.report
        t.add_row(str(i), "*" if active else "", layout.categorizer_name(key),
                  c.created_at, ", ".join(c.labels), f"{r.n_train} + {r.n_val}" if r else "?",
                  f"{r.accuracy:.3f}" if r else "?")
    console.print(t)


@categories_app.command("use")
def categories_use(catalog: CatalogOpt,
                   which: Annotated[str, typer.Argument(help="The categoriser's number in `categories list`, or "
                                                             "its name.")],
                   endpoint_url: EndpointOpt = None) -> None:
    """Make a saved categoriser the active one (nightly runs use it; `categories apply` re-categorises with it)."""
    from tasks.catalog import open_catalog
    from tasks.categories import use_categorizer

    try:
        key = use_categorizer(open_catalog(catalog, endpoint_url=endpoint_url).store, which)
    except UserError as exc:
        raise _fail(exc) from None
    console.print(f"{key} is active; re-categorise existing rows with: batchsight categories apply --catalog "
                  f"{catalog}", highlight=False, soft_wrap=True)


@categories_app.command("suggest")
def categories_suggest(
    catalog: CatalogOpt,
    k: Annotated[int, typer.Option("--k", "-k", min=2, max=1000, help="How many clusters.")] = 8,
    samples: Annotated[int, typer.Option(min=1, max=100, help="Sample keys per cluster.")] = 5,
    endpoint_url: EndpointOpt = None,
) -> None:
    """Cluster the catalogue (FAISS k-means) and list sample keys per cluster, to start labelling."""
    from flows.categorize import suggest_categories

    try:
        frame, key = suggest_categories(catalog, k=k, samples_per_cluster=samples, endpoint_url=endpoint_url)
    except UserError as exc:
        raise _fail(exc) from None
    t = Table(title=f"{k} clusters (written to {key})", title_justify="left")
    for col in ("cluster", "size", "key", "page", "score"):
        t.add_column(col)
    for row in frame.itertuples():
        t.add_row(str(row.cluster), str(row.cluster_size), row.key, str(row.page), f"{row.score:.3f}")
    console.print(t)


def _demo_categories(cat, output: Path) -> None:
    """Label every other sample by its folder (invoice, receipt, form, product),
    fit a categoriser on those, and categorise the whole catalogue with it."""
    from flows.categorize import apply_categories, fit_categories

    keys = sorted(set(cat.images["key"]))
    kind = {k: ("product" if k.startswith("photos/") else k.split("/")[1]) for k in keys}
    labels = output / "demo-labels.csv"
    labels.write_text("key,label\n" + "".join(f"{k},{kind[k]}\n" for k in keys[::2]))
    categorizer, _, _ = fit_categories(str(output), labels_csv=str(labels))
    report = apply_categories(str(output))
    r = categorizer.report
    console.print(f"\ncategories from {r.n_train} labelled examples: held-out accuracy {r.accuracy:.2f} "
                  f"(majority baseline {r.majority_baseline:.2f}); {report.rows} rows categorised at "
                  f"{report.rows_per_s:,.0f} rows/s: " + ", ".join(f"{k} {v}" for k, v in report.counts.items()))


def main() -> None:
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # The temporary server would try to send telemetry (an ERROR line offline), and
    # its 20 s start timeout is too short on a loaded machine: the run would be lost.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    try:
        app()
    except Exception:  # a UserError never gets here: each command turns it into its message and exit code
        import traceback

        traceback.print_exc()
        err.print(f"[bold red]error:[/] {BUG_REPORT}", highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
