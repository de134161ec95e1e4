"""`batchsight demo`: a sample bucket catalogued, searched and categorised."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated

import typer
from rich.panel import Panel
from rich.table import Table

from flows.categorize import apply_categories, fit_categories
from flows.cli.common import console, fail
from flows.cli.run import print_summary, run_catalog
from flows.search import similar_images
from models.errors import UserError
from models.registry import model_family
from models.weights import WeightsError, resolve_weights
from tasks.catalog.reader import Catalog
from tasks.config import DEFAULT_MODEL, ModelConfig, RunConfig
from tasks.sample_data import generate_samples, write_samples
from tasks.storage import LocalStore

app = typer.Typer()


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the sample bucket and catalogue go.")] = Path("demo-data"),
    images: Annotated[int, typer.Option(min=10, help="How many sample images to generate.")] = 300,
    model: Annotated[str, typer.Option(help="torchvision classification model name.")] = DEFAULT_MODEL,
) -> None:
    """Generate a sample bucket, catalogue it, and search it."""
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
        summary = run_catalog(RunConfig(source=str(bucket), output=str(output),
                                        model=ModelConfig(name=model, weights=weights)))
    except UserError as exc:
        raise fail(exc) from None
    print_summary(summary)

    cat = Catalog.open(LocalStore(output))
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


def _demo_categories(cat, output: Path) -> None:
    """Label every other sample by its folder (invoice, receipt, form, product),
    fit a categoriser on those, and categorise the whole catalogue with it."""
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
