"""A Prefect server with its scheduler, for `batchsight serve` on a machine that
runs no Prefect server yet. The temporary server Prefect starts on its own runs
no scheduler, so a schedule registered with it never fires."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from models.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_PORT = 4200
START_TIMEOUT_S = 180  # migrations on a fresh state folder, on a busy 2-core machine


class PrefectServerError(UserError, RuntimeError):
    """The Prefect server could not be started or reached; the message says what to do."""


def api_healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def check_api(api_url: str) -> None:
    """A server named by PREFECT_API_URL must answer before a deployment is served on it."""
    if not api_healthy(api_url, timeout=10):
        raise PrefectServerError(f"the Prefect server at PREFECT_API_URL={api_url} does not answer; start it "
                                 "(`prefect server start`) or unset PREFECT_API_URL so batchsight serve starts one")


@contextmanager
def prefect_server(state_dir: Path, *, port: int = DEFAULT_PORT, host: str = "127.0.0.1") -> Iterator[str]:
    """Run `prefect server start` (API, UI and services, the scheduler among them)
    with its database in `state_dir`; yield its API URL; stop it on exit."""
    state_dir = Path(state_dir).expanduser().resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    api_url = f"http://{host}:{port}/api"
    if api_healthy(api_url):
        raise PrefectServerError(f"port {port} already answers as a Prefect API ({api_url}); point "
                                 f"PREFECT_API_URL at it to use it, or pass --port for a server of batchsight's own")
    env = dict(os.environ, PREFECT_HOME=str(state_dir), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="true")
    env.pop("PREFECT_API_URL", None)
    log_path = state_dir / "server.log"
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port",
                                 str(port)], env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not api_healthy(api_url):
            if proc.poll() is not None:
                raise PrefectServerError(f"the Prefect server exited with code {proc.returncode} while starting; "
                                         f"its log is {log_path}")
            if time.monotonic() > deadline:
                raise PrefectServerError(f"the Prefect server did not answer within {START_TIMEOUT_S} s; its log "
                                         f"is {log_path}")
            time.sleep(0.5)
        log.info("Prefect server with its scheduler at %s, state in %s", api_url, state_dir)
        yield api_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
