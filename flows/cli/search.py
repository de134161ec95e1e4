"""`batchsight search` and `batchsight duplicates`: look-alikes by key, image or a batch of queries, and groups of near-identical images."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from flows.cli.common import CatalogOpt, EndpointOpt, console, fail
from flows.search import find_duplicates, search_queries, similar_images
from models.errors import UserError
from tasks.search.query import results_format, write_results

app = typer.Typer()


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
    if sum(q is not None for q in (key, image, queries)) != 1:
        raise fail(UserError("pass exactly one of --key KEY or --image FILE (or --queries FOLDER|CSV for many)"))
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
        raise fail(exc) from None
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
def duplicates(
    catalog: CatalogOpt,
    threshold: Annotated[float, typer.Option(min=-1.0, max=0.9999, help="Cosine similarity above which two images "
                                             "are near-identical (about 0.95 for pretrained ResNet embeddings).")]
    = 0.95,
    endpoint_url: EndpointOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print each group (its representative, and each member's "
                                          "score to it) and every member as JSON.")] = False,
) -> None:
    """Find groups of near-identical images in the live version; write them as a `duplicates` table.
    Each group is its representative and the images above the threshold to it."""
    try:
        report = find_duplicates(catalog, threshold=threshold, endpoint_url=endpoint_url)
    except UserError as exc:
        raise fail(exc) from None
    groups = report.by_group()
    if as_json:
        console.print_json(json.dumps({"version": report.version, "threshold": threshold, "table": report.key,
                                       "groups": report.n_groups, "images": len(report.groups),
                                       "by_group": groups, "members": report.groups.to_dict(orient="records")}))
        return
    t = Table(title=f"{report.n_groups} groups of near-identical images ({len(report.groups)} images) in "
                    f"version {report.version}, each member's cosine to its representative > {threshold:g}",
              title_justify="left")
    for col in ("group", "size", "representative", "members (cosine to the representative)"):
        t.add_column(col, no_wrap=col == "representative")
    for group in groups:
        members = [f"{_page_key(m)} {m['score']:.4f}" for m in group["members"]]
        t.add_row(str(group["group_id"]), str(group["size"]), _page_key(group["representative"]),
                  ", ".join(members[:4]) + (f", ... (+{len(members) - 4})" if len(members) > 4 else ""))
    console.print(t)
    console.print(f"written to {report.key}", highlight=False, soft_wrap=True)


def _page_key(image: dict) -> str:
    """key, or key#page=N for a document's pages past the first."""
    return image["key"] if image["page"] in (1, None) else f"{image['key']}#page={image['page']}"
