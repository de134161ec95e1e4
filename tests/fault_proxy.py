"""An HTTP proxy in front of moto's S3 server that injects the faults real S3
clients meet: 503 SlowDown, 500 InternalError, bodies cut short after a good
status line, and replies lost after the request was applied.

Real HTTP on 127.0.0.1 on both sides; boto3 talks to it as to any endpoint.
Used by tests/test_hardening.py and benchmarks/s3_faults.py.
"""

from __future__ import annotations

import http.client
import random
import re
import socket
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

_ERROR_XML = ("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>{message}</Message>"
              "<RequestId>fault-proxy</RequestId></Error>")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


@dataclass
class Faults:
    """Chances per request; `lose_reply(method, path, headers)` picks requests whose
    reply is dropped after the upstream applied them."""

    p503: float = 0.0
    p500: float = 0.0
    p_cut: float = 0.0  # GETs of object bodies only
    lose_reply: Callable[[str, str, dict[str, str]], bool] | None = None
    deny: Callable[[str, str], bool] | None = None  # (method, path) answered 403 AccessDenied, every time
    seed: int = 0


class FaultProxy:
    def __init__(self, upstream: str, faults: Faults) -> None:
        target = urlparse(upstream)
        self.upstream = (target.hostname, target.port)
        self.faults = faults
        self.injected: Counter[str] = Counter()
        self.requests = 0
        self._rng = random.Random(faults.seed)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _handle(self) -> None:
                proxy._serve(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _draw(self) -> float:
        with self._lock:
            self.requests += 1
            return self._rng.random()

    def _count(self, what: str) -> None:
        with self._lock:
            self.injected[what] += 1

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in _HOP_BY_HOP}
        f = self.faults
        if f.deny is not None and f.deny(handler.command, handler.path):
            self._count("403")
            return _send_error(handler, 403, "AccessDenied", "Access Denied")
        draw = self._draw()
        if draw < f.p503:
            self._count("503")
            return _send_error(handler, 503, "SlowDown", "Please reduce your request rate.")
        if draw < f.p503 + f.p500:
            self._count("500")
            return _send_error(handler, 500, "InternalError", "We encountered an internal error. Please try again.")
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            conn.request(handler.command, handler.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if f.lose_reply is not None and f.lose_reply(handler.command, handler.path, headers):
            self._count("lost_reply")
            return _drop(handler)
        cut = (handler.command == "GET" and resp.status == 200 and len(data) > 1 and _is_object_get(handler.path)
               and self._draw() < f.p_cut)
        handler.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in _HOP_BY_HOP:
                handler.send_header(k, v)
        if cut:
            self._count("cut")
            handler.send_header("Connection", "close")
            handler.end_headers()
            handler.wfile.write(data[:len(data) // 2])
            handler.wfile.flush()
            return _drop(handler)
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)


def _is_object_get(path: str) -> bool:
    """A GET of an object (path-style /bucket/key), not a listing (/bucket?list-type=2)."""
    return bool(re.match(r"^/[^/?]+/[^?]+", path))


def _send_error(handler: BaseHTTPRequestHandler, status: int, code: str, message: str) -> None:
    payload = _ERROR_XML.format(code=code, message=message).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/xml")
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(payload)


def _drop(handler: BaseHTTPRequestHandler) -> None:
    """Close the connection with nothing more said, as a lost reply or a reset would."""
    handler.close_connection = True
    try:
        handler.connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
