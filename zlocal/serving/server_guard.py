"""The guard in front of every route of ``zlocal serve``: which requests reach the app at all.

Checks, cheapest refusal first: the Host allowlist on loopback binds (DNS rebinding), CORS preflights
(answered for allowed origins, 403 otherwise), the ``Origin`` of state-changing requests (403 when not
allowed), the API key (401), and ``Content-Type: application/json`` on requests with a body (415).
A web page can send ``text/plain`` or form POSTs to any address without a preflight, so the server
must refuse them itself: the browser only protects the *response*, not the side effect.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse

from zlocal.serving.server_pages import KEYLESS_PAGE_PATHS
from zlocal.serving.server_schema import APIError

access_log = logging.getLogger("zlocal.access")

LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "127.0.0.1", "::1"})
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
ALLOW_METHODS = "GET, POST"
PREFLIGHT_VARY = (
    "Origin, Access-Control-Request-Method, Access-Control-Request-Headers, "
    "Access-Control-Request-Private-Network"
)
_DEFAULT_PORTS = {"http": 80, "https": 443}


def is_loopback(host: str) -> bool:
    """True for loopback addresses and ``localhost`` (what the Host allowlist accepts)."""
    host = host.strip().lower().strip("[]")
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """The name part of a Host header (drops the port; keeps IPv6 brackets off)."""
    header = header.strip()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else ""
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def split_origin(origin: str) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` of a serialized origin, lower-cased with the default port filled in;
    None for ``null``, non-http(s) schemes and anything with a path, query or credentials."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), (parts.hostname or "").rstrip(".")
    if scheme not in _DEFAULT_PORTS or not host or parts.path not in ("", "/") or parts.query:
        return None
    if parts.username is not None or parts.fragment:
        return None
    return scheme, host, port if port is not None else _DEFAULT_PORTS[scheme]


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class OriginPolicy:
    """Which browser origins may make state-changing requests: the ``--cors-origin`` list, and this
    server's own origin (a page it serves, such as a future chat page at ``/``)."""

    def __init__(self, cors_origins: list[str] | None, bind_host: str):
        self.cors = {o for o in map(split_origin, cors_origins or []) if o is not None}
        self.bind_host = bind_host.strip().lower().strip("[]")

    def is_cors(self, origin: str) -> bool:
        """True when ``origin`` is on the CORS allow-list (its responses carry CORS headers)."""
        return split_origin(origin) in self.cors

    def is_own(self, origin: str, host_header: str) -> bool:
        """True for a same-origin request: the Origin is the very scheme://host:port the browser
        addressed (its Host header). A DNS name is only trusted when it cannot be a rebinding
        attacker's: a loopback name, or the name the server was bound to; IP literals are safe."""
        parsed = split_origin(origin)
        if parsed is None or not host_header.strip():
            return False
        addressed = split_origin(f"{parsed[0]}://{host_header.strip()}")
        if addressed != parsed:
            return False
        host = parsed[1].strip("[]")
        return is_loopback(host) or _is_ip(host) or host == self.bind_host

    def allowed(self, origin: str, host_header: str) -> bool:
        """May a page from ``origin`` make requests with side effects here?"""
        return self.is_cors(origin) or self.is_own(origin, host_header)


def error_response(err: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    """The OpenAI error object of ``err`` as a response."""
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _forbidden_origin(origin: str) -> APIError:
    return APIError(
        403,
        f"requests from the web origin '{origin[:100]}' are not allowed here; start the server with "
        "--cors-origin ORIGIN to allow a page",
        type="permission_error",
        code="forbidden_origin",
    )


def json_content_type(value: str) -> bool:
    """``application/json``, optionally with ``charset=utf-8`` (bodies are always read as UTF-8)."""
    media, *params = (p.strip() for p in value.split(";"))
    if media.lower() != "application/json":
        return False
    for param in params:
        name, _, val = param.partition("=")
        if name.strip().lower() != "charset" or val.strip().strip('"').lower() not in ("utf-8", "utf8"):
            return False
    return True


class Guard:
    """Pure-ASGI middleware: Host allowlist on loopback binds, CORS preflights, Origin check on
    state-changing methods, the API key (not for /health), JSON content type on bodies."""

    def __init__(self, app, *, check_host: bool, api_key: str | None, origins: OriginPolicy):
        self.app = app
        self.check_host = check_host
        self.api_key = api_key.encode() if api_key else None
        self.origins = origins

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers") or []}
        method, path, origin = scope.get("method", ""), scope.get("path"), headers.get("origin")
        preflight = origin is not None and method == "OPTIONS" and "access-control-request-method" in headers
        if origin is not None and not preflight and self.origins.is_cors(origin):
            send = _with_cors_headers(send, origin)
        refusal = self._refusal(method, path, headers, preflight)
        if refusal is not None:
            err, extra, detail = refusal
            access_log.info("%s %s %d (%s)", method, path, err.status, detail)
            return await error_response(err, extra)(scope, receive, send)
        if preflight:
            access_log.info("%s %s 200 (preflight)", method, path)
            return await _preflight(send, origin, headers)
        await self._logged(scope, receive, send)

    def _refusal(self, method: str, path, headers: dict[str, str], preflight: bool):
        """The first check a request fails, as (error, extra headers, log detail), or None."""
        host = headers.get("host", "")
        if self.check_host and (not host.strip() or not is_loopback(_host_name(host))):
            msg = (
                "forbidden Host header: this server only answers to localhost / 127.0.0.1 "
                "(protection against DNS rebinding)"
            )
            err = APIError(403, msg, type="permission_error", code="forbidden_host")
            return err, None, f"Host {host[:100]!r}"
        origin = headers.get("origin")
        state_changing = preflight or method in STATE_CHANGING
        if origin is not None and state_changing and not self.origins.allowed(origin, host):
            return _forbidden_origin(origin), {"Vary": "Origin"}, f"Origin {origin[:100]!r}"
        if preflight:
            return None  # answered without the key: browsers never send credentials on a preflight
        # The chat page's own files are served without the key: a browser cannot send one on a page load.
        keyless = path == "/health" or (method == "GET" and path in KEYLESS_PAGE_PATHS)
        if self.api_key is not None and not keyless and method != "OPTIONS":
            scheme, _, token = headers.get("authorization", "").partition(" ")
            token_bytes = token.strip().encode("latin-1")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token_bytes, self.api_key):
                msg = "missing or invalid API key; send 'Authorization: Bearer KEY'"
                err = APIError(401, msg, type="authentication_error", code="invalid_api_key")
                return err, {"WWW-Authenticate": "Bearer"}, "API key"
        if method in BODY_METHODS and not json_content_type(headers.get("content-type", "")):
            shown = headers.get("content-type", "none")[:100]
            msg = f"Content-Type must be application/json, got {shown!r}"
            err = APIError(415, msg, param="Content-Type", code="unsupported_media_type")
            return err, None, f"Content-Type {shown!r}"
        return None

    async def _logged(self, scope, receive, send):
        status = [0]

        async def send_logged(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, send_logged)
        finally:
            ms = (time.perf_counter() - t0) * 1000
            access_log.info("%s %s %d %.0fms", scope.get("method"), scope.get("path"), status[0], ms)


def _with_cors_headers(send, origin: str):
    """Wrap ``send`` so that every response, errors included, lets the allowed page read it."""

    async def send_cors(message):
        if message["type"] == "http.response.start":
            extra = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return send_cors


async def _preflight(send, origin: str, headers: dict[str, str]) -> None:
    """Answer an allowed origin's CORS preflight, including Chrome's Private Network Access one
    (``Access-Control-Request-Private-Network: true`` when a public page calls a local address)."""
    out = {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Methods": ALLOW_METHODS,
        # The origin is trusted already: echo the headers it asks for (SDKs add their own X- headers).
        "Access-Control-Allow-Headers": headers.get("access-control-request-headers", "")
        or "Authorization, Content-Type",
        "Access-Control-Max-Age": "600",
        "Vary": PREFLIGHT_VARY,
        "Content-Length": "0",
    }
    if headers.get("access-control-request-private-network", "").strip().lower() == "true":
        out["Access-Control-Allow-Private-Network"] = "true"
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in out.items()]
    await send({"type": "http.response.start", "status": 200, "headers": raw})
    await send({"type": "http.response.body", "body": b""})
