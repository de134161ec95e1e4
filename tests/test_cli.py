"""The `batchsight` command: what a user types, what they see, and the exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import COMMANDS, app, load_command
from tasks.sample_data import generate_samples, write_samples
from tasks.storage import LocalStore
from tests.helpers import invoke

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("prefect_harness")
runner = CliRunner()


@pytest.fixture
def bucket(tmp_path):
    write_samples(LocalStore(tmp_path / "bucket", create=True), generate_samples(12, seed=11, broken=False))
    return tmp_path / "bucket"




def test_run_then_search_and_status(bucket, tmp_path, resnet18_weights):
    out = tmp_path / "out"
    code, text = invoke("run", "--source", bucket, "--output", out, "--model", "resnet18",
                        "--weights", resnet18_weights, "--batch-size", "8")
    assert code == 0, text
    assert "committed version 1" in text and "12 objects embedded (12 pages), 0 failed" in text

    key = sorted(p.relative_to(bucket).as_posix() for p in bucket.rglob("*.*"))[0]
    code, text = invoke("search", "--catalog", out, "--key", key, "-k", "3", "--json")
    assert code == 0, text
    hits = json.loads(text)
    assert [h["rank"] for h in hits] == [1, 2, 3] and key not in [h["key"] for h in hits]  # not its own hit
    code, text = invoke("search", "--catalog", out, "--key", key, "-k", "3", "--json", "--include-self")
    assert code == 0 and json.loads(text)[0]["key"] == key and json.loads(text)[0]["page"] == 1

    code, text = invoke("search", "--catalog", out, "--image", bucket / key, "-k", "2", "--json")
    assert code == 0, text
    hits = json.loads(text)  # the image itself is catalogued: it is its own nearest neighbour
    assert hits[0]["key"] == key and hits[0]["score"] > 0.999 and len(hits) == 2

    code, text = invoke("status", "--catalog", out, "--json")
    info = json.loads(text)
    assert code == 0 and info["counts"]["images"] == 12 and info["versions"] == [1]
    assert info["run"]["status"] == "committed" and info["run"]["processed"] == 12
    assert info["run"]["images_per_s"] > 0

    code, text = invoke("run", "--source", bucket, "--output", out, "--model", "resnet18",
                        "--weights", resnet18_weights)
    assert code == 0 and "nothing new, changed or deleted" in text
    code, text = invoke("status", "--catalog", out)
    assert "last run" in text and "no_changes" in text


@pytest.mark.parametrize("args,message", [
    (["--model", "resnet_fifty"], "unknown model 'resnet_fifty'"),
    (["--model", "resnet18", "--weights-sha256", "ab" * 32], "sha256 mismatch"),
    (["--model", "resnet34"], "do not fit resnet34"),
    (["--model", "resnet18", "--batch-size", "0"], "Invalid value for '--batch-size'"),
    (["--model", "resnet18", "--device", "tpu"], "Invalid value for '--device'"),
    (["--model", "resnet18", "--index-memory", "lots"], "'lots' is not a size"),
])
def test_bad_flags_exit_2_with_a_message(bucket, tmp_path, resnet18_weights, args, message):
    code, text = invoke("run", "--source", bucket, "--output", tmp_path / "out", "--weights", resnet18_weights, *args)
    assert code == 2, text  # the README's promise: bad input exits 2
    assert message in " ".join(text.split()), text
    assert not (tmp_path / "out" / "CURRENT").exists()


def test_missing_bucket_and_missing_catalogue(moto_endpoint, tmp_path):
    code, text = invoke("run", "--source", "s3://not-a-bucket/x", "--output", tmp_path / "o",
                        "--endpoint-url", moto_endpoint, "--model", "resnet18")
    assert code == 2 and "bucket 'not-a-bucket' does not exist" in text
    code, text = invoke("search", "--catalog", tmp_path / "empty", "--key", "a.jpg")
    assert code == 2 and "run `batchsight run" in " ".join(text.split())
    code, text = invoke("search", "--catalog", tmp_path / "empty")
    assert code == 2 and "exactly one of --key KEY or --image FILE" in text


def test_the_installed_command_runs_in_a_real_process(bucket, tmp_path, resnet18_weights):
    """The console script itself, as a user runs it: a fresh process with its own
    temporary Prefect server, honouring AWS_ENDPOINT_URL-free local paths."""
    env = dict(os.environ, PREFECT_API_URL="")
    env.pop("PREFECT_API_URL")
    env.pop("PREFECT_SERVER_ANALYTICS_ENABLED", None)  # the CLI turns telemetry off by itself
    cmd = [sys.executable, "-m", "flows.cli", "run", "--source", str(bucket), "--output", str(tmp_path / "out"),
           "--model", "resnet18", "--weights", str(resnet18_weights), "--compile", "on", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["status"] == "committed" and summary["processed"] == 12
    assert "telemetry" not in proc.stderr.lower() and "ERROR" not in proc.stderr, proc.stderr[-3000:]
    assert summary["stage_s"]["compile_s"] > 0.5  # compiled once, before the shards (seconds), and reported
    assert summary["bottleneck"].startswith(("model:", "input:", "shard process:"))
    bad = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--source", str(tmp_path / "missing"),
                          "--output", str(tmp_path / "o2")], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


@pytest.mark.parametrize("bug", ["ValueError", "ZeroDivisionError"])
def test_a_bug_exits_1_with_its_traceback_and_asks_for_a_report(tmp_path, bug):
    """Only `UserError`s are the user's to fix (exit 2-4). Any other exception is
    a bug: exit 1, the traceback, a line asking for a report. A bug cannot be
    produced on purpose, so this one is injected: `open_catalog` is replaced, in a
    subprocess running the real `main()`, by a function that raises."""
    code = ("import sys, flows.cli as cli, flows.cli.catalog as status_command\n"
            f"def broken(*a, **k): raise {bug}('injected bug')\n"
            "status_command.open_catalog = broken\n"
            "sys.argv = ['batchsight', 'status', '--catalog', sys.argv[1]]\n"
            "cli.main()\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"{bug}: injected bug" in proc.stderr and "Traceback" in proc.stderr
    assert "this is a bug in batchsight" in proc.stderr


def test_user_errors_exit_2_with_one_line_and_no_traceback(tmp_path):
    out = CliRunner().invoke(app, ["status", "--catalog", str(tmp_path / "nothing-here")])
    assert out.exit_code == 2 and "error:" in out.output and "Traceback" not in out.output


def test_a_run_with_work_lists_the_bucket_once(bucket, tmp_path, resnet18_weights, monkeypatch):
    """The CLI plans first (so a quiet night never starts Prefect) and hands its
    plan to the flow it starts: one listing of the bucket, not two. The real
    `LocalStore.list` is wrapped to count the listings of the bucket."""
    listings = []
    real_list = LocalStore.list

    def counting_list(self, prefix=""):
        if Path(self.url).resolve() == bucket.resolve():
            listings.append(prefix)
        return real_list(self, prefix)

    monkeypatch.setattr(LocalStore, "list", counting_list)
    out = tmp_path / "out"
    args = ("run", "--source", bucket, "--output", out, "--model", "resnet18", "--weights", resnet18_weights)
    code, text = invoke(*args)
    assert code == 0 and "committed version 1" in text, text
    assert len(listings) == 1
    (bucket / "late-arrival.jpg").write_bytes(next(bucket.rglob("*.jpg")).read_bytes())
    code, text = invoke(*args)  # a new plan, from a new listing: the object that arrived is seen
    assert code == 0 and "committed version 2" in text and "1 objects embedded" in text, text
    assert len(listings) == 2


def test_the_root_help_lists_each_command_with_its_own_help_line():
    for name, (_, line) in COMMANDS.items():
        assert load_command(name).get_short_help_str(limit=1000) == line, name
    code, text = invoke("--help")
    assert code == 0 and all(name in text for name in COMMANDS)


def test_the_root_help_and_status_load_no_model_code():
    """Each command's module is imported when it runs: `--help` and `status` do not wait for torch."""
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom flows.cli import app\n"
            "CliRunner().invoke(app, ['--help'])\nCliRunner().invoke(app, ['status', '--catalog', sys.argv[1]])\n"
            "print(sorted(m for m in ('torch', 'prefect', 'flows.nightly') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code, "/nonexistent"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
