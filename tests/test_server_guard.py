"""Which requests reach the routes: JSON Content-Type (415), Origin on state-changing requests (403),
CORS and Chrome private-network preflights. Against the shared real server where its setup
(loopback bind, no CORS list) is what is tested, in-process where another setup is needed."""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.server_helpers import shared_server
from zlocal.serving.server import create_app
from zlocal.serving.server_guard import OriginPolicy, json_content_type, split_origin

TOK = json.dumps({"prompt": "hello"}).encode()
CHAT = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}).encode()
PNA = {
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "content-type, authorization, x-stainless-os",
    "Access-Control-Request-Private-Network": "true",
}


@pytest.fixture(scope="module")
def server():
    return shared_server()


def post(server, path, body=TOK, **headers):
    headers.setdefault("Content-Type", "application/json")
    return httpx.post(server.url(path), content=body, headers=headers, timeout=60)


def assert_error(resp, status, code):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["code"] == code, err


# -- Content-Type ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ctype",
    [
        "text/plain",  # what a cross-site <form enctype=text/plain> or fetch without preflight sends
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "text/plain; application/json",
        "application/json; charset=latin-1",
        "application/jsonx",
        None,
    ],
)
def test_post_routes_need_a_json_content_type(server, ctype):
    for path, body in (
        ("/tokenize", TOK),
        ("/detokenize", b'{"tokens": [5]}'),
        ("/v1/chat/completions", CHAT),
    ):
        headers = {"Content-Type": ctype} if ctype else {}
        r = httpx.post(server.url(path), content=body, headers=headers, timeout=60)
        assert_error(r, 415, "unsupported_media_type")


def test_json_content_type_with_a_utf8_charset_is_accepted(server):
    for ctype in ("application/json", "Application/JSON; charset=UTF-8", 'application/json;charset="utf-8"'):
        assert post(server, "/tokenize", **{"Content-Type": ctype}).status_code == 200, ctype
    assert json_content_type("application/json; charset=utf8")
    assert not json_content_type("application/json; boundary=x")


# -- Origin on state-changing requests ------------------------------------------------------------
def test_foreign_origins_cannot_post(server):
    port = server.port
    for origin in (
        "http://evil.example",
        "https://evil.example",
        "null",  # sandboxed iframes and file:// pages
        f"http://127.0.0.1:{port + 1}",  # another local web app
        f"http://localhost:{port}/path",
    ):
        for path, body in (("/tokenize", TOK), ("/v1/chat/completions", CHAT)):
            assert_error(post(server, path, body, Origin=origin), 403, "forbidden_origin")
        # A form post from that origin is refused for its origin first, whatever its body type.
        form = post(server, "/v1/chat/completions", CHAT, Origin=origin, **{"Content-Type": "text/plain"})
        assert_error(form, 403, "forbidden_origin")
    # Reads are not state-changing: the browser keeps the answer from a foreign page anyway.
    r = httpx.get(server.url("/v1/models"), headers={"Origin": "http://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_own_origin_and_no_origin_can_post(server):
    port = server.port
    assert post(server, "/tokenize").status_code == 200  # curl, SDKs: no Origin at all
    own = post(server, "/tokenize", Origin=f"http://127.0.0.1:{port}")
    assert own.status_code == 200, own.text
    named = post(server, "/tokenize", Origin=f"http://localhost:{port}", Host=f"localhost:{port}")
    assert named.status_code == 200, named.text
    # Same name, but the page was not addressed to this server (Host differs): another origin.
    other = post(server, "/tokenize", Origin=f"http://localhost:{port}", Host=f"127.0.0.1:{port}")
    assert_error(other, 403, "forbidden_origin")


def test_own_origin_rules_resist_dns_rebinding():
    wild = OriginPolicy([], "0.0.0.0")
    assert wild.allowed("http://192.168.1.5:8000", "192.168.1.5:8000")
    assert wild.allowed("http://[::1]:8000", "[::1]:8000")
    assert wild.allowed("http://app.localhost:8000", "app.localhost:8000")
    # A rebinding page's origin is its own DNS name, and so is the Host it sends: not trusted.
    assert not wild.allowed("http://evil.example:8000", "evil.example:8000")
    assert not wild.allowed("http://192.168.1.5:8000", "192.168.1.5:8001")
    named = OriginPolicy(["http://App.Example:3000/"], "mybox.lan")
    assert named.allowed("http://mybox.lan:8000", "mybox.lan:8000")
    assert named.allowed("http://app.example:3000", "whatever:8000")
    assert not named.allowed("http://app.example:3001", "whatever:8000")
    assert not named.allowed("https://app.example:3000", "whatever:8000")
    # What `--cors-origin` refuses at start-up: not an origin at all.
    for bad in ("localhost:3000", "http://localhost:3000/app", "null", "file:///x", "http://u:p@host"):
        assert split_origin(bad) is None, bad
    assert split_origin("HTTP://LocalHost") == ("http", "localhost", 80)


# -- CORS and private-network preflights (in-process: needs a --cors-origin list) --------------------
@pytest.fixture(scope="module")
def cors_client(tiny_runtime):
    app = create_app(tiny_runtime, model_name="tiny", cors_origins=["http://app.example"], api_key="k")
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        yield client


def test_private_network_preflight_from_an_allowed_origin(cors_client):
    r = cors_client.options("/v1/chat/completions", headers={"Origin": "http://app.example", **PNA})
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == "http://app.example"
    assert r.headers["access-control-allow-private-network"] == "true"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "x-stainless-os" in r.headers["access-control-allow-headers"]
    plain = {k: v for k, v in PNA.items() if "Private" not in k}
    r = cors_client.options("/tokenize", headers={"Origin": "http://app.example", **plain})
    assert r.status_code == 200 and "access-control-allow-private-network" not in r.headers


def test_preflight_from_a_foreign_origin_is_refused(cors_client):
    for origin in ("http://evil.example", "null"):
        r = cors_client.options("/v1/chat/completions", headers={"Origin": origin, **PNA})
        assert_error(r, 403, "forbidden_origin")
        assert "access-control-allow-origin" not in r.headers
        assert "access-control-allow-private-network" not in r.headers


def test_allowed_origin_posts_and_reads_even_its_errors(cors_client):
    headers = {"Origin": "http://app.example", "Authorization": "Bearer k"}
    r = cors_client.post("/tokenize", json={"prompt": "hi"}, headers=headers)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
    bad_key = cors_client.post("/tokenize", json={"prompt": "hi"}, headers={"Origin": "http://app.example"})
    assert (
        bad_key.status_code == 401 and bad_key.headers["access-control-allow-origin"] == "http://app.example"
    )
    evil = cors_client.post(
        "/tokenize", json={"prompt": "hi"}, headers={**headers, "Origin": "http://evil.example"}
    )
    assert_error(evil, 403, "forbidden_origin")
