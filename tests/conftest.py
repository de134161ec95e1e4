"""Shared fixtures: real parts only.

- S3 is moto's server (`ThreadedMotoServer`) over real HTTP on 127.0.0.1, driven by boto3.
- Prefect runs for real against `prefect_test_harness` (a temporary local API server).
- Models are real torchvision architectures with seeded random weights saved to a
  file and loaded through `--weights PATH` (no pretrained weights can be downloaded here).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import boto3
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def isolated_env(tmp_path_factory: pytest.TempPathFactory):
    """Keep Prefect state, torch hub and AWS config inside temp dirs."""
    home = tmp_path_factory.mktemp("home")
    saved = dict(os.environ)
    os.environ.update({
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "false",
        "TORCH_HOME": str(home / "torch"),
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(home / "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "aws-credentials"),
    })
    os.environ.pop("AWS_ENDPOINT_URL", None)
    os.environ.pop("AWS_PROFILE", None)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def prefect_harness(isolated_env):
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def moto_endpoint(isolated_env):
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(moto_endpoint):
    """A boto3 client on the moto server, and a helper that makes fresh buckets."""
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    return client


@pytest.fixture
def new_bucket(s3, request):
    counter = iter(range(1000))

    def make() -> str:
        name = f"bs-{request.node.name.lower()[:30].replace('_', '-').replace('[', '-').replace(']', '')}-{next(counter)}"
        s3.create_bucket(Bucket=name)
        return name

    return make


@pytest.fixture(scope="session")
def resnet18_weights(tmp_path_factory) -> Path:
    """Seeded random resnet18 weights saved as a plain state dict file."""
    from models.weights import save_random_weights

    path = tmp_path_factory.mktemp("weights") / "resnet18-random.pth"
    save_random_weights("resnet18", 0, path)
    return path


@pytest.fixture(scope="session")
def samples():
    """50 generated images (products and documents, JPEG and PNG) plus 3 broken files."""
    from tasks.sample_data import generate_samples

    return generate_samples(50, seed=3)


def pytest_collection_modifyitems(config, items):
    """A test that runs the flow (it needs Prefect's server, `prefect_harness`) is an
    end-to-end run and `slow`: `make test-fast` leaves it out, `make test` runs it."""
    for item in items:
        if "prefect_harness" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
