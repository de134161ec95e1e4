"""Commands over a catalogue's versions: `status`, `rollback`, `compact`, `gc`."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.table import Table

from flows.cli.common import CatalogOpt, EndpointOpt, console, err, fail
from flows.cli.options import config_option
from models.errors import UserError
from tasks.catalog.errors import CatalogCorrupt
from tasks.catalog.gc import collect_garbage
from tasks.catalog.history import list_versions
from tasks.catalog.manifest import Manifest
from tasks.catalog.reader import open_catalog, verify_version
from tasks.catalog.runs_log import read_runs
from tasks.catalog.versions import compact as compact_catalog
from tasks.catalog.versions import rollback as rollback_catalog
from tasks.config import ConfigError, IndexConfig, describe_errors
from tasks.search import index_choice
from tasks.search.index_choice import DEFAULT_RECALL_TARGET
from tasks.storage import cached_store

app = typer.Typer()


@app.command()
def status(catalog: CatalogOpt, endpoint_url: EndpointOpt = None,
           verify: Annotated[bool, typer.Option("--verify", help="Read every file of the live version and check "
                                                "its size and sha256 against the manifest (exit 4 if any is "
                                                "damaged).")] = False,
           as_json: Annotated[bool, typer.Option("--json", help="Print it as JSON.")] = False) -> None:
    """Print the live version of a catalogue, the run that made it, its counts and its index's recall."""
    try:
        cat = open_catalog(catalog, endpoint_url=endpoint_url)
        history = list_versions(cat.store)
        runs = read_runs(cat.store)
        checked = verify_version(cat.store, cat.manifest) if verify else None
    except UserError as exc:
        raise fail(exc) from None
    try:
        unhashed = cat.live_table("images", ["content_sha256"])["content_sha256"].null_count
    except CatalogCorrupt:  # a damaged images part: `--verify` names it; status still reports the rest
        unhashed = None
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
        "rows_without_content_sha256": unhashed,
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
    if info["rows_without_content_sha256"]:
        t.add_row("identity", f"{info['rows_without_content_sha256']} rows were written before rows carried their "
                              "bytes' sha256: they get it when their object next changes, and until then their "
                              "vectors are not reused for copies of those bytes")
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
    raise typer.Exit(code=CatalogCorrupt.exit_code)


def _next_option(m: Manifest) -> dict | None:
    """The index one rung up from the live one, where its measured recall misses the target."""
    if m.index_recall_at_10 is None or m.index_recall_at_10 >= m.index_recall_target:
        return None

    up = index_choice.next_option_up(m.index_state, m.counts.get("vectors", 0), m.embedding_dim)
    return {"kind": up.kind, "factory": up.factory, "rerank": up.rerank, "estimated_bytes": up.estimated_bytes,
            "hint": index_choice.next_option_hint(up)} if up else {"hint": index_choice.next_option_hint(None)}


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


def _run_info(row) -> dict:
    keys = ("run_id", "status", "started_at", "listed", "new", "changed", "deleted", "unchanged", "processed",
            "failed", "images_per_s", "elapsed_s", "message")
    return {k: (row[k].item() if hasattr(row[k], "item") else row[k]) for k in keys}


@app.command()
def rollback(catalog: CatalogOpt,
             to: Annotated[int, typer.Option("--to", min=1, help="The version to make live again.")],
             endpoint_url: EndpointOpt = None) -> None:
    """Make an earlier version live again (recorded as a new version)."""
    try:  # not through open_catalog: rollback must work when the live version is the damaged one
        restored = rollback_catalog(cached_store(catalog, endpoint_url), to)
    except UserError as exc:
        raise fail(exc) from None
    console.print(f"version {restored.version} is live: the content of version {to} "
                  f"({restored.counts.get('images')} images)")


@app.command()
def compact(catalog: CatalogOpt,
            index_memory: config_option("index", "memory") = None,
            recall_target: config_option("index", "recall_target") = DEFAULT_RECALL_TARGET,
            endpoint_url: EndpointOpt = None) -> None:
    """Fold the nightly parts, deletes and index segments into one of each (a new version, same content).
    Nights do this on their own past a threshold; run it on demand, e.g. before a busy day of searches."""
    try:
        index = IndexConfig(memory=index_memory, recall_target=recall_target).with_environment()
        m = compact_catalog(open_catalog(catalog, endpoint_url=endpoint_url).store, index.settings())
    except ValidationError as exc:
        raise fail(ConfigError(describe_errors(exc))) from None
    except UserError as exc:
        raise fail(exc) from None
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
    try:
        report = collect_garbage(open_catalog(catalog, endpoint_url=endpoint_url).store, keep_versions=keep_versions,
                                 min_age_s=min_age_hours * 3600, dry_run=dry_run)
    except UserError as exc:
        raise fail(exc) from None
    verb = "would delete" if dry_run else "deleted"
    for key in report.deleted:
        console.print(f"{verb} {key}", highlight=False)
    console.print(f"{verb} {len(report.deleted)} files ({report.bytes_freed / 1e6:.1f} MB); kept versions "
                  f"{', '.join(map(str, report.kept_versions))}; {report.skipped_recent} recent files and "
                  f"{report.skipped_running} files of runs in progress left alone")
