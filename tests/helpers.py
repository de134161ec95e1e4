"""Helpers every test module shares: run the nightly flow, invoke the CLI in
this process or in a child process of its own, find a free port, give a child
process the harness's Prefect API."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import prefect.settings
from typer.testing import CliRunner

from flows.cli import app
from flows.nightly import catalog_images
from tasks.config import config_from_flat
from tasks.report import RunSummary

ROOT = Path(__file__).resolve().parents[1]
_runner = CliRunner()


def run_flow(source: str, output: str, **options: Any) -> RunSummary:
    """The `catalog_images` flow on a config made from `batchsight run`'s flags as keywords."""
    return catalog_images(config_from_flat(source=str(source), output=str(output), **options))


def run_small(source: str, output: str, weights: Path, endpoint: str | None = None, **options: Any) -> RunSummary:
    """A run with the tests' small model: resnet18 with seeded random weights from a file, batches of 8,
    shards of 10 (each overridable)."""
    options = {"model": "resnet18", "weights": str(weights), "batch_size": 8, "shard_size": 10,
               "endpoint_url": endpoint} | options
    return run_flow(source, output, **options)


def invoke(*args: Any) -> tuple[int, str]:
    """`batchsight ARGS` in this process: (exit code, output)."""
    result = _runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The harness's Prefect API for child processes, so they need no server of their own."""
    env = dict(os.environ, PREFECT_API_URL=prefect.settings.PREFECT_API_URL.value(), PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def cli_process(*args: Any, env: dict[str, str], wait: bool = True, timeout: float = 300
                ) -> subprocess.CompletedProcess | subprocess.Popen:
    """`batchsight ARGS` in a child process of its own (`python -m flows.cli`)."""
    cmd = [sys.executable, "-m", "flows.cli", *map(str, args)]
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
