"""The page server's guard, plain ASGI around the app (a refused request costs no
route): the Host header checked (no DNS rebinding), writes from other sites
refused (Origin), request bodies capped, the token required where one is set,
and the security headers on every response. `check_bind` refuses to serve
beyond this machine without a token."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote_to_bytes, urlsplit

from fastapi import HTTPException

from models.errors import UserError

TOKEN_COOKIE = "batchsight_token"
TOKEN_ENV = "BATCHSIGHT_UI_TOKEN"
DEFAULT_MAX_JSON_BYTES = 2 * 1024 * 1024  # 1,000 search keys of 1 KB; labels need far less
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' blob:; style-src 'self'; script-src 'self'; "
                           "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                           "frame-ancestors 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
SAFE_METHODS = frozenset({"GET", "HEAD"})
_COOKIE_KEY_INFO = b"batchsight page cookie"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None, allowed_hosts: Sequence[str] = ()) -> None:
    """Refuse to serve beyond this machine without a token: a bind address that
    is not loopback, or a host name a reverse proxy forwards (`--allow-host`)."""
    if not is_loopback(host) and not token:
        raise UserError(f"--host {host} makes the page reachable from other machines; pass --token-file FILE (or "
                        f"set {TOKEN_ENV}) so every request must carry the token, or keep the default --host "
                        "127.0.0.1")
    public = [name for name in allowed_hosts if not is_loopback(name)]
    if public and not token:
        raise UserError(f"--allow-host {public[0]} answers requests a reverse proxy forwards from other machines; "
                        f"pass --token-file FILE (or set {TOKEN_ENV}) so every request must carry the token")


def exposed(host: str, allowed_hosts: Sequence[str] = ()) -> bool:
    """Whether other machines reach the page: every request then needs the token."""
    return not is_loopback(host) or any(not is_loopback(name) for name in allowed_hosts)


def read_token_file(path: str | Path) -> str:
    """The token in `path`, surrounding whitespace dropped: a file (or the
    environment) keeps it out of the process list, where `--token` shows it to
    every user of the machine."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read the token file {path}: {exc}") from None
    token = text.strip()
    if not token:
        raise UserError(f"the token file {path} is empty; write the secret on its first line")
    return token


def cookie_value(token: str) -> str:
    """What the token cookie holds: a keyed hash of the token, never the token
    itself. Plain hex, so no character of the token (`;`, non-ASCII) can break
    the cookie, and a new token ends every browser's session."""
    return hmac.new(token.encode(), _COOKIE_KEY_INFO, hashlib.sha256).hexdigest()


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is over the limit of {limit:,} bytes")


class RequestGuard:
    """Adds the security headers to every response, and refuses, before any
    route runs: a Host not served here (421; with `allowed_hosts`); a write
    (any method but GET and HEAD) whose Origin is another site (403: a page
    elsewhere cannot drive this server through a browser); a body over its
    limit (413; `body_limits` by path, else `max_json_bytes`); a request
    without the token where one is needed (401: every request when
    `token_everywhere`, else label writes). The token is taken from
    `Authorization: Bearer`, `X-Batchsight-Token`, `?token=` or the cookie
    that `?token=` sets; any one of them that matches is enough."""

    def __init__(self, app, *, token: str | None, token_everywhere: bool, allowed_hosts: Sequence[str] | None,
                 body_limits: dict[str, int] | None = None, max_json_bytes: int = DEFAULT_MAX_JSON_BYTES) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.cookie = cookie_value(token).encode() if token else None
        self.token_everywhere = token_everywhere
        self.allowed_hosts = {h.lower() for h in allowed_hosts} if allowed_hosts else None
        self.body_limits = body_limits or {}
        self.max_json_bytes = max_json_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        if self.allowed_hosts is not None:
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name.lower() not in self.allowed_hosts:
                return await plain_response(send, 421, f"host {host!r} is not served here")
        method = scope["method"]
        if method not in SAFE_METHODS and (other := other_site(headers, host)):
            return await plain_response(send, 403, f"a {method} from another site ({other}) is refused: the page "
                                                   "writes only from its own pages")
        set_cookie = None
        if self.token:
            ok, from_query = self._credentials(scope, headers)
            writes_labels = scope["path"].startswith("/api/labels") and method not in SAFE_METHODS
            if (self.token_everywhere or writes_labels) and not ok:
                return await plain_response(send, 401, "this server needs its token: send the header "
                                                       "'Authorization: Bearer TOKEN', or open the page once as "
                                                       "/?token=TOKEN")
            if from_query:
                set_cookie = f"{TOKEN_COOKIE}={self.cookie.decode()}; Path=/; HttpOnly; SameSite=Strict".encode()
        limit = self.body_limits.get(scope["path"], self.max_json_bytes)
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await plain_response(send, 400, "the Content-Length header is not a number")
            if int(declared) > limit:
                return await plain_response(send, 413, f"the request body is {int(declared):,} bytes; the limit "
                                                       f"is {limit:,}")

        received = 0

        async def capped_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # a body sent without a length, or longer than it said
                    raise BodyTooLarge(limit)
            return message

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS + (
                    [(b"set-cookie", set_cookie)] if set_cookie else [])
            await send(message)

        await self.app(scope, capped_receive, send_with_headers)

    def _credentials(self, scope, headers: dict[bytes, bytes]) -> tuple[bool, bool]:
        """(a credential sent matches the token, whether `?token=` did and the cookie did not: set the cookie).
        Compared as bytes: a header's raw bytes, the query's percent-decoded UTF-8."""
        sent = []
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            sent.append(auth[7:].strip())
        if b"x-batchsight-token" in headers:
            sent.append(headers[b"x-batchsight-token"].strip())
        ok = any(hmac.compare_digest(given, self.token) for given in sent)
        cookie_ok = any(hmac.compare_digest(value, self.cookie) for value in _cookies(headers, TOKEN_COOKIE))
        query_ok = any(hmac.compare_digest(unquote_to_bytes(value), self.token)
                       for name, _, value in (p.partition(b"=") for p in scope.get("query_string", b"").split(b"&"))
                       if name == b"token")
        return ok or cookie_ok or query_ok, query_ok and not cookie_ok


def other_site(headers: dict[bytes, bytes], host: str) -> str | None:
    """The Origin a request came from when that is not this server (None: same
    origin, or no browser said). Browsers send Origin with every write, a
    cross-site `no-cors` one too."""
    origin = headers.get(b"origin")
    if origin is None:
        return "a cross-site page" if headers.get(b"sec-fetch-site") == b"cross-site" else None
    text = origin.decode("latin-1")
    if text == "null" or urlsplit(text).netloc.lower() != host.lower():
        return text
    return None


def _cookies(headers: dict[bytes, bytes], name: str) -> list[bytes]:
    wanted = name.encode()
    found = []
    for part in headers.get(b"cookie", b"").split(b";"):
        key, _, value = part.strip().partition(b"=")
        if key == wanted:
            found.append(value)
    return found


async def plain_response(send, status: int, detail: str) -> None:
    """A JSON error answered by the guard itself (ASCII: nothing a client sent can break its encoding)."""
    data = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *SECURITY_HEADERS]})
    await send({"type": "http.response.body", "body": data})
