"""The nightly deployment, served for real against a local Prefect server:
registered with its schedule and parameters, triggered, and run to completion."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client

from deployments import nightly
from tasks.catalog.reader import open_catalog
from tasks.catalog.runs_log import read_runs
from tasks.config import RunConfig
from tasks.sample_data import generate_samples, write_samples
from tasks.storage import LocalStore

pytestmark = pytest.mark.usefixtures("prefect_harness")
ROOT = Path(__file__).resolve().parents[1]


def test_prefect_yaml_matches_the_served_deployment():
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    (dep,) = spec["deployments"]
    assert dep["name"] == nightly.DEPLOYMENT_NAME
    assert dep["schedules"] == [{"cron": nightly.DEFAULT_CRON, "timezone": nightly.DEFAULT_TIMEZONE}]
    assert dep["concurrency_limit"] == 1
    path, _, attr = dep["entrypoint"].partition(":")
    assert (ROOT / path).is_file() and getattr(nightly, attr).retries == nightly.RETRIES
    # its one parameter is a run configuration, as `batchsight serve` registers it
    (config,) = dep["parameters"].values()
    filled = yaml.safe_load(yaml.safe_dump(config).replace("{{ $BATCHSIGHT_SOURCE }}", "/data/photos")
                            .replace("{{ $BATCHSIGHT_OUTPUT }}", "/data/catalog"))
    assert RunConfig.model_validate(filled).model.name == "resnet50"


def test_a_deployment_parameter_out_of_bounds_is_refused_before_a_run_starts(tmp_path):
    """The deployment's parameter schema is the config's, bounds included: Prefect's
    server refuses a run whose config is out of bounds, so no run starts at all."""
    deployment_id = nightly.build_deployment(RunConfig(source=str(tmp_path / "src"), output=str(tmp_path / "out")),
                                             name="bounds-test").apply()
    with get_client(sync_client=True) as client:
        for group, field, bad in (("model", "batch_size", 0), ("index", "recall_target", 1.5),
                                  ("shards", "shard_size", -3), ("model", "device", "tpu")):
            config = {"source": str(tmp_path / "src"), "output": str(tmp_path / "out"), group: {field: bad}}
            with pytest.raises(Exception, match=field) as refused:
                client.create_flow_run_from_deployment(deployment_id, parameters={"config": config})
            assert "Validation failed" in str(refused.value), refused.value
        good = client.create_flow_run_from_deployment(
            deployment_id, parameters={"config": {"source": str(tmp_path / "src"), "output": str(tmp_path / "o2"),
                                                  "model": {"batch_size": 8}}})
        runs = client.read_flow_runs()
        assert [r.id for r in runs if r.deployment_id == deployment_id] == [good.id]


def test_serve_registers_schedule_and_runs_a_triggered_night(tmp_path, resnet18_weights):
    import prefect.settings
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    src, out = tmp_path / "src", tmp_path / "out"
    write_samples(LocalStore(src, create=True), generate_samples(8, seed=13))
    api = prefect.settings.PREFECT_API_URL.value()
    env = dict(__import__("os").environ, PREFECT_API_URL=api, PYTHONPATH=str(ROOT),
               PREFECT_RUNNER_POLL_FREQUENCY="2")
    cmd = [sys.executable, "-m", "flows.cli", "serve", "--source", str(src), "--output", str(out),
           "--cron", "30 3 * * *", "--timezone", "Europe/Berlin", "--model", "resnet18",
           "--weights", str(resnet18_weights), "--batch-size", "4", "--name", "nightly-test"]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with get_client(sync_client=True) as client:
            deployment = None
            deadline = time.time() + 120
            while deployment is None and time.time() < deadline:
                assert server.poll() is None, server.stdout.read()
                try:
                    deployment = client.read_deployment_by_name("catalog-images/nightly-test")
                except Exception:  # not registered yet
                    time.sleep(1)
            assert deployment is not None, "serve never registered the deployment"
            (schedule,) = deployment.schedules
            assert (schedule.schedule.cron, schedule.schedule.timezone) == ("30 3 * * *", "Europe/Berlin")
            assert deployment.parameters == {"config": {
                "source": str(src), "output": str(out),
                "model": {"name": "resnet18", "weights": str(resnet18_weights), "batch_size": 4}}}
            limit = deployment.global_concurrency_limit
            assert limit is not None and limit.limit == 1

            flow_run = run_deployment("catalog-images/nightly-test", timeout=240, poll_interval=2)
            assert flow_run.state.is_completed(), flow_run.state
            artifacts = client.read_artifacts()
            summary = [a for a in artifacts if a.key == "batchsight-run" and a.flow_run_id == flow_run.id]
            assert summary and "| 11 | 11 | 0 | 0 | 0 | 8 | 3 |" in summary[0].data
            assert "| decode |" in summary[0].data and "Bottleneck: " in summary[0].data
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    c = open_catalog(str(out))
    assert c.manifest.version == 1 and len(c.images) == 8 and len(c.failures) == 3
    assert read_runs(c.store)["status"].tolist() == ["committed"]


def test_serve_starts_a_scheduler_and_the_schedule_fires_unattended(tmp_path, resnet18_weights):
    """No Prefect server running and no PREFECT_API_URL: `batchsight serve` starts a
    real one with its scheduler, and a run nobody triggered starts and commits."""
    import os
    import socket

    src, out = tmp_path / "src", tmp_path / "out"
    write_samples(LocalStore(src, create=True), generate_samples(5, seed=14, broken=False))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "client-home"), PYTHONPATH=str(ROOT), PREFECT_RUNNER_POLL_FREQUENCY="2")
    cmd = [sys.executable, "-m", "flows.cli", "serve", "--source", str(src), "--output", str(out), "--model",
           "resnet18", "--weights", str(resnet18_weights), "--interval", "15", "--state-dir",
           str(tmp_path / "state"), "--port", str(port)]
    serving = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (out / "CURRENT").exists():
            assert serving.poll() is None, serving.stdout.read()
            time.sleep(1)
        assert (out / "CURRENT").exists(), "no scheduled run committed within 5 minutes"
    finally:
        serving.send_signal(signal.SIGINT)
        try:
            output, _ = serving.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            serving.kill()
            output, _ = serving.communicate()
    c = open_catalog(str(out))
    assert c.manifest.version >= 1 and len(c.images) == 5
    assert read_runs(c.store)["status"].iloc[0] == "committed"
    assert (tmp_path / "state" / "prefect.db").exists()  # the server kept its state where it was told
    assert "every 15 s" in output, output[-3000:]


def test_serve_refuses_a_bad_timezone(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    (tmp_path / "src").mkdir()
    result = CliRunner().invoke(app, ["serve", "--source", str(tmp_path / "src"), "--output", str(tmp_path / "o"),
                                      "--timezone", "Mars/Olympus"])
    assert result.exit_code == 2 and "unknown timezone 'Mars/Olympus'" in result.output
