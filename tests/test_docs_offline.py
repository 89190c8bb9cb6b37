"""``/docs`` and the chat page at ``/`` work offline: every file they reference comes from the server
itself (no CDN), and the page's files are the only ones served without the API key."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urljoin

import httpx
import pytest

from tests.page_helpers import API_KEY, secured_server
from tests.server_helpers import shared_server
from zlocal.serving.server_pages import PAGE_CSP, STATIC_DIR, swagger_dir

EXTERNAL = re.compile(r"(?:https?:)?//[\w.-]+", re.IGNORECASE)
REFERENCE = re.compile(r"""(?:src|href)="([^"]+)"|url: '([^']+)'""")


@pytest.fixture(scope="module")
def server():
    return shared_server()


def references(html: str) -> list[str]:
    """Every src/href attribute and the Swagger UI ``url:`` of a page."""
    return [a or b for a, b in REFERENCE.findall(html)]


def test_docs_reference_no_external_url_and_their_assets_are_served(server):
    resp = httpx.get(server.url("/docs"), timeout=10)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    html = resp.text
    assert EXTERNAL.findall(html) == []
    refs = references(html)
    wanted = {"/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css", "/docs/favicon.png", "/openapi.json"}
    assert wanted <= set(refs)
    for ref in refs:
        asset = httpx.get(urljoin(server.url("/docs"), ref), timeout=10)
        assert asset.status_code == 200, ref
        if ref.startswith("/docs/"):  # the very Swagger UI build of the pinned package, not a stand-in
            assert asset.content == (swagger_dir() / Path(ref).name).read_bytes(), ref
    assert "'validatorUrl': null" in html.replace('"', "'")  # no schema sent to validator.swagger.io


def test_fastapis_cdn_pages_are_gone(server):
    # FastAPI's own ReDoc page loads from a CDN too: it is switched off, not left half-working.
    assert httpx.get(server.url("/redoc"), timeout=10).status_code == 404
    assert "/redoc" not in httpx.get(server.url("/openapi.json"), timeout=10).json()["paths"]


def test_chat_page_files_are_local_and_locked_to_this_origin(server):
    page = httpx.get(server.url("/"), timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == PAGE_CSP
    assert page.text == (STATIC_DIR / "chat.html").read_text(encoding="utf-8")
    refs = [r for r in references(page.text) if not r.startswith("data:")]
    assert set(refs) == {"static/chat.css", "static/chat.js", "docs"}
    for ref in refs:
        asset = httpx.get(urljoin(server.url("/"), ref), timeout=10)
        assert asset.status_code == 200, ref
        assert EXTERNAL.findall(asset.text) == [], ref
    assert (
        httpx.get(server.url("/static/chat.js"), timeout=10)
        .headers["content-type"]
        .startswith("text/javascript")
    )


def test_only_the_page_files_skip_the_api_key():
    secured = secured_server()
    for path in ("/", "/static/chat.js", "/static/chat.css"):
        assert httpx.get(secured.url(path), timeout=10).status_code == 200, path
    for method, path in [
        ("GET", "/docs"),
        ("GET", "/docs/swagger-ui.css"),
        ("GET", "/openapi.json"),
        ("GET", "/static/other.js"),
        ("POST", "/"),
    ]:
        resp = httpx.request(method, secured.url(path), timeout=10)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key", path
    good = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.get(secured.url("/docs"), headers=good, timeout=10).status_code == 200
