"""`batchsight categories ...`: sort images into your own categories, learned from a few labelled examples."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from flows.categorize import apply_categories, fit_categories, suggest_categories
from flows.cli.common import CatalogOpt, EndpointOpt, console, err, fail
from models.errors import UserError
from tasks.catalog import layout
from tasks.catalog.reader import open_catalog
from tasks.categories.store import list_categorizers, use_categorizer

app = typer.Typer()
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
    try:
        categorizer, key, embedded_now = fit_categories(
            catalog, labels_csv=str(labels) if labels else None, labels_prefix=labels_prefix,
            review_labels=review_labels, endpoint_url=endpoint_url, val_fraction=val_fraction, target_precision=target_precision)
    except UserError as exc:
        raise fail(exc) from None
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
    try:
        _print_apply(apply_categories(catalog, endpoint_url=endpoint_url))
    except UserError as exc:
        raise fail(exc) from None


@categories_app.command("list")
def categories_list(catalog: CatalogOpt, endpoint_url: EndpointOpt = None) -> None:
    """List the saved categorisers, oldest first, with their held-out accuracy; * marks the active one."""
    try:
        saved = list_categorizers(open_catalog(catalog, endpoint_url=endpoint_url).store)
    except UserError as exc:
        raise fail(exc) from None
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
    try:
        key = use_categorizer(open_catalog(catalog, endpoint_url=endpoint_url).store, which)
    except UserError as exc:
        raise fail(exc) from None
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
    try:
        frame, key = suggest_categories(catalog, k=k, samples_per_cluster=samples, endpoint_url=endpoint_url)
    except UserError as exc:
        raise fail(exc) from None
    t = Table(title=f"{k} clusters (written to {key})", title_justify="left")
    for col in ("cluster", "size", "key", "page", "score"):
        t.add_column(col)
    for row in frame.itertuples():
        t.add_row(str(row.cluster), str(row.cluster_size), row.key, str(row.page), f"{row.score:.3f}")
    console.print(t)
