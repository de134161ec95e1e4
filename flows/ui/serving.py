"""Serving the page with uvicorn (what `batchsight ui` runs): one process, or
`--workers N` processes accepting on one socket. A connection must send its
request headers within `HEADER_TIMEOUT_S` (`HeaderDeadlineProtocol`), and the
process may open as many files as its hard limit allows."""

from __future__ import annotations

import gc
import json
import os
import resource
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import faiss
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from flows.ui.app import create_app
from flows.ui.live import live_pointer
from flows.ui.security import LOOPBACK_HOSTS, check_bind, exposed, is_loopback
from flows.ui.uploads import DEFAULT_DECODE_BUDGET_PIXELS, DEFAULT_MAX_UPLOAD_BYTES
from tasks.catalog.manifest import read_manifest
from tasks.storage import cached_store

DEFAULT_PORT = 8765
HEADER_TIMEOUT_S = 5.0
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this (uvicorn's own timer)
WORKER_SETTINGS_ENV = "BATCHSIGHT_UI_WORKER_SETTINGS"  # serve -> uvicorn's worker processes


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline on request headers: they must
    be complete within `header_timeout_s` of the connection opening, or of the
    first byte of its next request, or the connection is closed. uvicorn has no
    such deadline: a client that never finished its headers held a socket (and a
    file descriptor) forever, before the token check could run."""

    header_timeout_s = HEADER_TIMEOUT_S

    def connection_made(self, transport) -> None:
        self._header_deadline = None
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_deadline()

    def on_headers_complete(self) -> None:
        self._disarm_header_deadline()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        if self._header_deadline is None:
            self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_late)

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_late(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            self.transport.close()


def uvicorn_options(host: str, port: int) -> dict:
    """What every server of the page runs with (tests start theirs with these too)."""
    return {"host": host, "port": port, "log_level": "warning", "access_log": False,
            "http": HeaderDeadlineProtocol, "timeout_keep_alive": KEEP_ALIVE_S}


def raise_open_files_limit() -> None:
    """Let the process open as many sockets as the hard limit allows (often 1,024 soft against 500,000 hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass(frozen=True)
class ServeSettings:
    """What a server process builds its app from: plain data, so that it can
    travel to uvicorn's worker processes."""

    catalog: str
    token: str | None
    token_everywhere: bool
    endpoint_url: str | None
    max_upload_bytes: int
    decode_budget_pixels: int
    allowed_hosts: list[str] | None


def serving_app(settings: ServeSettings) -> FastAPI:
    """The app of one server process, its live version loaded (or its failure
    raised) before it listens."""
    faiss.omp_set_num_threads(1)  # one query a request: threads would only fight over the cores
    # What is imported by now (torch, prefect, pandas: ~430,000 objects) lives as long as the
    # process. Frozen, it is left out of the collector's full passes, which took ~0.4 s each, with
    # every request waiting; the catalogue versions loaded later stay collectable.
    gc.freeze()
    raise_open_files_limit()
    app = create_app(settings.catalog, token=settings.token, token_everywhere=settings.token_everywhere,
                     endpoint_url=settings.endpoint_url, max_upload_bytes=settings.max_upload_bytes,
                     decode_budget_pixels=settings.decode_budget_pixels, allowed_hosts=settings.allowed_hosts)
    app.state.live.view()
    return app


def worker_app() -> FastAPI:
    """uvicorn's app factory in each `--workers` process; `serve` passes the settings in the environment."""
    return serving_app(ServeSettings(**json.loads(os.environ[WORKER_SETTINGS_ENV])))


def served_hosts(host: str, allow_hosts: Sequence[str] = ()) -> list[str] | None:
    """The Host names answered: on a loopback bind the loopback names, plus the
    names a reverse proxy forwards (`--allow-host`); None (any) on another bind
    without `--allow-host`."""
    if not allow_hosts and not is_loopback(host):
        return None
    return list(dict.fromkeys([*LOOPBACK_HOSTS, host, *allow_hosts]))


def serve(catalog: str, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT, token: str | None = None,
          endpoint_url: str | None = None, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
          decode_budget_pixels: int = DEFAULT_DECODE_BUDGET_PIXELS, workers: int = 1,
          allow_hosts: Sequence[str] = ()) -> None:
    """Run the app with uvicorn until interrupted (what `batchsight ui` does).

    With `workers` > 1, that many processes accept on the one socket, each
    holding its own copy of the live version (memory: `workers` x the index) and
    its own upload budgets, and following `CURRENT` on its own; one Python
    process uses one core at most."""
    check_bind(host, token, allow_hosts)
    settings = ServeSettings(catalog=catalog, token=token, token_everywhere=bool(token) and exposed(host, allow_hosts),
                             endpoint_url=endpoint_url, max_upload_bytes=max_upload_bytes,
                             decode_budget_pixels=decode_budget_pixels,
                             allowed_hosts=served_hosts(host, allow_hosts))
    if workers == 1:
        uvicorn.run(serving_app(settings), **uvicorn_options(host, port))
        return
    store = cached_store(catalog, endpoint_url)
    read_manifest(store, live_pointer(store).manifest)  # a missing catalogue fails here once, not in each worker
    os.environ[WORKER_SETTINGS_ENV] = json.dumps(asdict(settings))
    uvicorn.run(f"{__name__}:worker_app", factory=True, workers=workers, **uvicorn_options(host, port))
