"""/tokenize and /detokenize share the generation admission (429 when full), prepare one at a time,
stay within a size and token budget (413), and give their memory back to the OS afterwards."""

from __future__ import annotations

import json
import platform
import random
import socket
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.server_helpers import shared_server
from zlocal.serving.server import create_app
from zlocal.serving.server_budget import release_memory

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}


class GatedRuntime:
    """The tiny runtime, except that encoding waits for ``gate`` and records how many overlap."""

    def __init__(self, runtime):
        self._rt = runtime
        self.gate = threading.Event()
        self.lock = threading.Lock()
        self.active = self.max_active = self.calls = 0

    def __getattr__(self, name):
        return getattr(self._rt, name)

    def _gated(self, fn, *args, **kwargs):
        with self.lock:
            self.calls += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            assert self.gate.wait(30), "the test never opened the gate"
            return fn(*args, **kwargs)
        finally:
            with self.lock:
                self.active -= 1

    def encode(self, text, add_special_tokens=True):
        return self._gated(self._rt.encode, text, add_special_tokens)

    def encode_chat(self, messages):
        return self._gated(self._rt.encode_chat, messages)

    def plan_chat(self, messages, **structured):  # how the server prepares a chat request
        return self._gated(self._rt.plan_chat, messages, **structured)


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def in_background(fn, *args, **kwargs):
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("r", fn(*args, **kwargs)), daemon=True)
    thread.start()
    return thread, out


def test_tokenize_takes_a_place_in_the_generation_queue(tiny_runtime):
    gated = GatedRuntime(tiny_runtime)
    app = create_app(gated, model_name="tiny", max_queue=1)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        first, out = in_background(client.post, "/tokenize", json={"prompt": "hello"})
        try:
            wait_until(lambda: gated.active == 1)
            assert client.get("/stats").json()["admitted"] == 1
            for path, body in (
                ("/tokenize", {"prompt": "x"}),
                ("/detokenize", {"tokens": [5]}),
                ("/v1/chat/completions", CHAT),
            ):
                r = client.post(path, json=body)
                assert r.status_code == 429, (path, r.text)
                assert r.json()["error"]["code"] == "queue_full"
        finally:  # never leave a request hanging in the app (the client would wait for it)
            gated.gate.set()
            first.join(30)
        assert out["r"].status_code == 200 and out["r"].json()["count"] == len(out["r"].json()["tokens"])
        assert client.get("/stats").json()["admitted"] == 0
        assert client.post("/detokenize", json={"tokens": [5]}).status_code == 200


def test_big_requests_are_prepared_one_at_a_time(tiny_runtime):
    gated = GatedRuntime(tiny_runtime)
    app = create_app(gated, model_name="tiny", max_queue=4)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        jobs = [in_background(client.post, "/tokenize", json={"prompt": f"text {i}"}) for i in range(2)]
        jobs.append(in_background(client.post, "/v1/chat/completions", json=CHAT))
        try:
            wait_until(lambda: client.get("/stats").json()["admitted"] == 3)
            time.sleep(0.2)  # time for a second encode to start, were they run in parallel
            assert gated.calls == 1
        finally:
            gated.gate.set()
            for thread, _ in jobs:
                thread.join(30)
        assert all(out["r"].status_code == 200 for _, out in jobs), [out["r"].text for _, out in jobs]
        assert gated.max_active == 1 and gated.calls == 3


@pytest.fixture(scope="module")
def budget_client(tiny_runtime):
    calls = []

    class Counting(GatedRuntime):
        def encode(self, text, add_special_tokens=True):
            calls.append(len(text))
            return self._rt.encode(text, add_special_tokens)

    runtime = Counting(tiny_runtime)
    runtime.gate.set()
    app = create_app(runtime, model_name="tiny", token_budget=50)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        client.calls = calls
        yield client


def assert_413(resp, code, param):
    assert resp.status_code == 413, resp.text
    err = resp.json()["error"]
    assert (err["code"], err["param"], err["type"]) == (code, param, "invalid_request_error"), err


def test_text_over_the_size_budget_is_refused_before_tokenizing(budget_client):
    before = len(budget_client.calls)
    r = budget_client.post("/tokenize", json={"prompt": "ab " * 67})  # 201 > 4 characters x 50 tokens
    assert_413(r, "request_too_large", "prompt")
    msgs = [{"role": "user", "content": "a" * 150}, {"role": "user", "content": "b" * 51}]
    assert_413(budget_client.post("/tokenize", json={"messages": msgs}), "request_too_large", "messages")
    assert len(budget_client.calls) == before  # the tokenizer never saw them
    assert budget_client.post("/tokenize", json={"prompt": "ab " * 10}).status_code == 200


def test_token_budget_on_tokenize_answers_and_detokenize_input(budget_client):
    assert_413(budget_client.post("/tokenize", json={"prompt": "x " * 100}), "too_many_tokens", None)
    assert_413(budget_client.post("/detokenize", json={"tokens": [5] * 51}), "too_many_tokens", "tokens")
    ok = budget_client.post("/detokenize", json={"tokens": [5] * 50})
    assert ok.status_code == 200 and isinstance(ok.json()["text"], str)


# -- against a real server process -----------------------------------------------------------------
def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _words(n_chars: int) -> str:
    rnd = random.Random(0)
    words = ["hello", "world", "token", "memory", "server", "quantized", "the", "of", "and"]
    return " ".join(rnd.choice(words) for _ in range(n_chars // 5))[:n_chars]


def test_a_declared_oversized_body_is_refused_before_it_is_sent():
    server = shared_server()
    head = (
        f"POST /tokenize HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: application/json\r\n"
        "Content-Length: 100000000\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(head.encode())  # and no body at all: the answer must not wait for it
        status = s.recv(65536).split(b"\r\n", 1)[0]
    assert b" 413 " in status, status


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc and needs glibc's malloc_trim")
def test_large_tokenize_gives_its_memory_back():
    if not release_memory():
        pytest.skip("no glibc malloc_trim here")
    server = shared_server()
    pid = server.proc.pid
    httpx.post(server.url("/tokenize"), json={"prompt": "warm up"}, timeout=60)
    before = _rss_mb(pid)
    # The body: 8 MB of text is over the default budget, refused before tokenizing.
    huge = httpx.post(server.url("/tokenize"), json={"prompt": _words(8 * 1024 * 1024 - 64)}, timeout=120)
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    r = httpx.post(server.url("/tokenize"), json={"prompt": _words(2 * 1024 * 1024)}, timeout=300)
    assert r.status_code == 200 and r.json()["count"] > 300_000
    del r
    grown = _rss_mb(pid) - before
    # Tokenizing 2 MiB peaks at ~+150 MB; without malloc_trim ~+95 MB stays, with it ~+25 MB.
    assert grown < 60, f"RSS grew by {grown:.0f} MB and stayed"
    assert json.loads(httpx.get(server.url("/stats")).text)["admitted"] == 0
