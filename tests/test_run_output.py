"""What a person sees from `batchsight`: the first error, the summary of a run,
quiet nights that cost seconds, and categorisers they can trust and manage."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app
from models.categorizer import MIN_HELD_OUT, fit_categorizer, stratified_split
from tasks.catalog.reader import open_catalog
from tasks.catalog.runs_log import read_runs
from tasks.sample_data import generate_samples, write_samples
from tasks.storage import LocalStore
from tests.helpers import invoke

pytestmark = pytest.mark.usefixtures("prefect_harness")
ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()




def without_prefect(tmp_path: Path) -> dict[str, str]:
    """An environment whose Prefect API is a closed port: any command that reaches
    for Prefect fails, so one that succeeds never started or called it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PREFECT_HOME=str(tmp_path / "no-prefect"),
               PREFECT_API_URL="http://127.0.0.1:9/api")
    return env


def cli(*args, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_version_and_help_for_every_option():
    code, text = invoke("--version")
    assert code == 0 and text.startswith("batchsight ")
    missing = []

    def walk(command, path):
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*path, name])
        for param in getattr(command, "params", []):
            if not getattr(param, "help", None):
                missing.append(f"{' '.join(path)} {param.name}")

    walk(typer.main.get_command(app), ["batchsight"])
    assert missing == []
    code, text = invoke("--help")
    assert "--install-completion" in text  # shell completion


def test_a_quiet_night_never_starts_prefect_and_a_bad_weights_file_fails_first(tmp_path, resnet18_weights):
    src, out = tmp_path / "src", tmp_path / "out"
    write_samples(LocalStore(src, create=True), generate_samples(4, seed=23, broken=False))
    base = ("run", "--source", src, "--output", out, "--model", "resnet18")
    code, text = invoke(*base, "--weights", resnet18_weights)
    assert code == 0, text

    env = without_prefect(tmp_path)
    quiet = cli(*base, "--weights", resnet18_weights, env=env)
    assert quiet.returncode == 0 and "nothing new, changed or deleted" in quiet.stdout, quiet.stderr[-2000:]
    assert "throughput" not in quiet.stdout and "bottleneck" not in quiet.stdout  # no rate for an empty run
    assert read_runs(open_catalog(str(out)).store)["status"].tolist() == ["committed", "no_changes"]

    missing = cli(*base, "--weights", tmp_path / "resnet18-typo.pth", env=env)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    lines = [line for line in missing.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "resnet18-typo.pth does not exist" in lines[0], missing.stderr


def test_the_summary_counts_objects_and_pages_and_names_what_it_skipped(tmp_path, resnet18_weights):
    src = LocalStore(tmp_path / "src", create=True)
    write_samples(src, generate_samples(3, seed=24, broken=False))
    red = Image.new("RGB", (320, 240), (200, 30, 30))
    pdf, jp2, png = io.BytesIO(), io.BytesIO(), io.BytesIO()
    red.save(pdf, "PDF", save_all=True, append_images=[red.rotate(90), red.rotate(180)])
    red.save(jp2, "JPEG2000")
    red.save(png, "PNG")
    src.put("scans/three-pages.pdf", pdf.getvalue())
    src.put("scans/scanner-output.jp2", jp2.getvalue())
    src.put("uploads/0001", png.getvalue())  # no extension: the content decides
    src.put("uploads/0002", b"plain text, no image")
    src.put("notes.txt", b"x")
    src.put("exports/a.csv", b"k,v")
    src.put("exports/b.csv", b"k,v")
    code, text = invoke("run", "--source", tmp_path / "src", "--output", tmp_path / "out", "--model", "resnet18",
                        "--weights", resnet18_weights, "--json")
    assert code == 0, text
    summary = json.loads(text)
    assert summary["listed"] == 7 and summary["skipped"] == 3
    assert summary["skipped_by_extension"] == {".csv": 2, ".txt": 1}
    assert "2 .csv (e.g. exports/a.csv, exports/b.csv)" in summary["skipped_examples"]
    assert (summary["processed"], summary["pages"], summary["failed"]) == (6, 8, 1)
    live = open_catalog(str(tmp_path / "out"))
    assert {"scans/scanner-output.jp2", "uploads/0001"} <= set(live.images["key"])
    assert live.failures.set_index("key").loc["uploads/0002", "error_type"] == "not_an_image"

    code, text = invoke("run", "--source", tmp_path / "src", "--output", tmp_path / "out", "--model", "resnet18",
                        "--weights", resnet18_weights)
    assert code == 0 and all(part in text for part in ("skipped 2 .csv", "exports/a.csv", "1 .txt"))
    assert "1 failed" in text and "(left until their bytes change)" in text, text

    code, text = invoke("search", "--catalog", tmp_path / "out", "--key", "scans/three-pages.pdf", "--json")
    hits = json.loads(text)
    assert code == 0 and "scans/three-pages.pdf" not in {h["key"] for h in hits}  # not even its other pages
    assert all("page" in h for h in hits)


def test_documents_are_split_by_object_and_thin_classes_are_flagged():
    rng = np.random.default_rng(0)
    # 12 documents of 3 pages in two classes: pages of one document look alike
    centres = rng.normal(size=(12, 16))
    x = np.repeat(centres, 3, axis=0) + 0.01 * rng.normal(size=(36, 16))
    labels = np.repeat(["a", "b"] * 6, 3)
    groups = np.repeat([f"doc-{i}.pdf" for i in range(12)], 3)
    train, val = stratified_split(labels, 0.25, seed=1, groups=groups)
    assert not set(groups[train]) & set(groups[val]), "a document's pages on both sides"
    probe = fit_categorizer(x, labels, model="m", weights_sha256="s", groups=groups)
    assert probe.report.n_val % 3 == 0  # whole documents held out
    assert len(probe.report.warnings) == 2 and all(f"fewer than {MIN_HELD_OUT}" in w for w in probe.report.warnings)


def test_categorisers_can_be_listed_and_switched(tmp_path, resnet18_weights):
    src = LocalStore(tmp_path / "src", create=True)
    samples = generate_samples(24, seed=25, broken=False)
    write_samples(src, samples)
    out = tmp_path / "out"
    code, text = invoke("run", "--source", tmp_path / "src", "--output", out, "--model", "resnet18",
                        "--weights", resnet18_weights)
    assert code == 0, text
    kind = {s.key: "document" if s.kind != "product" else "product" for s in samples}
    (tmp_path / "labels.csv").write_text("key,label\n" + "".join(f"{k},{v}\n" for k, v in kind.items()))
    for _ in range(2):
        code, text = invoke("categories", "fit", "--catalog", out, "--labels", tmp_path / "labels.csv")
        assert code == 0, text
    assert "warning:" in text and "fewer than 10" in text
    code, text = invoke("categories", "list", "--catalog", out)
    assert code == 0 and "2 categorisers" in text
    rows = [line for line in text.splitlines() if line.strip().startswith("│ ") and "document" in line]
    assert len(rows) == 2 and "*" in rows[1] and "*" not in rows[0]
    first = sorted(o.key for o in open_catalog(str(out)).store.list("categorizers/") if o.key.endswith(".json"))[0]
    code, text = invoke("categories", "use", "--catalog", out, "1")
    assert code == 0 and first in text
    active = json.loads(open_catalog(str(out)).store.get("categorizers/ACTIVE"))["categorizer"]
    assert active == first
    code, text = invoke("categories", "use", "--catalog", out, "7")
    assert code == 2 and "categories list" in text
