"""The README's shell examples run as written, against a local folder laid out
as the README describes (`./photos`, `./resnet18.pth`, `./query.jpg`, ...).
Examples on `s3://` buckets are left out: those buckets do not exist here."""

from __future__ import annotations

import re
import shlex
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from models.weights import save_random_weights
from tasks.sample_data import generate_samples, write_samples
from tasks.storage import LocalStore

pytestmark = pytest.mark.usefixtures("prefect_harness")
ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """Every `.venv/bin/batchsight` line of the README's bash blocks, in order."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith(".venv/bin/batchsight") and "s3://" not in line:
                commands.append(line)
    return commands


def lay_out_readme_folder(root: Path) -> None:
    samples = generate_samples(40, seed=17, broken=False)
    photos = LocalStore(root / "photos", create=True)
    # the README's keys: item-00042.jpg at the top, documents/ for the prefix filter
    named = [replace(s, key=f"item-{i:05d}.jpg" if s.kind == "product" else s.key) for i, s in enumerate(samples)]
    named.append(replace(next(s for s in samples if s.kind == "product"), key="item-00042.jpg"))
    write_samples(photos, named)
    kinds = sorted({s.kind for s in samples})
    labelled = [replace(s, key=f"labelled/{s.kind}/{i:03d}.jpg")
                for i, s in enumerate(generate_samples(24, seed=18, broken=False))]
    write_samples(photos, labelled)
    shutil.copytree(root / "photos", root / "photos-copy", copy_function=shutil.copy)  # as cp -r, for --seed
    save_random_weights("resnet18", 0, root / "resnet18.pth")
    (root / "query.jpg").write_bytes(samples[3].data)
    (root / "query-photos").mkdir()
    for s in samples[5:7]:
        (root / "query-photos" / Path(s.key).name).write_bytes(s.data)
    keys = [s.key for s in named[:3]]
    (root / "skus.csv").write_text("key\n" + "\n".join(keys) + "\n")
    by_kind = {k: [s.key for s in named if s.kind == k] for k in kinds}
    (root / "labels.csv").write_text("key,label\n" + "".join(f"{key},{kind}\n" for kind, ks in by_kind.items()
                                                          for key in ks[:6]))


def test_the_readme_examples_run_as_written(tmp_path, monkeypatch):
    """Each command's words go to the CLI as the shell would split them, in the
    README's folder. In this process: a fresh interpreter a command cost 9 s of
    imports each (154 s for 17); the installed console script in a process of
    its own is tests/test_cli.py's."""
    from typer.testing import CliRunner

    from flows.cli import app

    commands = readme_commands()
    assert len(commands) >= 12, commands  # run, search x4, duplicates, status, categories x6, recovery x3
    assert commands[0].startswith(".venv/bin/batchsight run --source ./photos")
    lay_out_readme_folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    cli = CliRunner()
    for command in commands:
        result = cli.invoke(app, shlex.split(command)[1:])
        assert result.exit_code == 0, f"{command}\n{result.output[-3000:]}\n{result.exception!r}"
    assert (tmp_path / "hits.parquet").exists() and (tmp_path / "hits.csv").exists()
