"""`zlocal serve`: a real server process on a loopback port, driven by the `openai` package and raw HTTP."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.server_helpers import ServerProcess, shared_server, sse_events, tiny_model_dir

openai = pytest.importorskip("openai")

HI = [{"role": "user", "content": "Say hi."}]
MODEL = "tiny-zephyr-v1"  # the served id: other names are a 404 model_not_found


@pytest.fixture(scope="module")
def server():
    return shared_server()


def client(server, **kw):
    return openai.OpenAI(
        base_url=server.url("/v1"), api_key=kw.pop("api_key", "unused"), max_retries=0, timeout=60, **kw
    )


def post(server, path, body, timeout=60.0):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        server.url(path), content=content, headers={"Content-Type": "application/json"}, timeout=timeout
    )


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not reached in time")


def stats(server):
    return httpx.get(server.url("/stats"), timeout=10).json()


def recent_job(server, completion_id):
    return next((j for j in stats(server)["recent"] if j["completion_id"] == completion_id), None)


# -- happy paths with the official client --------------------------------------------------------------
def test_health_and_models_show_a_name_not_a_path(server):
    assert httpx.get(server.url("/health")).json() == {"status": "ok"}
    models = client(server).models.list().data
    assert [m.id for m in models] == ["tiny-zephyr-v1"]
    assert httpx.get(server.url("/v1/models/tiny-zephyr-v1")).json()["id"] == "tiny-zephyr-v1"
    missing = httpx.get(server.url("/v1/models/other"))
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert tiny_model_dir() not in server.log_text()


def test_same_seed_same_text_streaming_or_not(server):
    c = client(server)
    kw = dict(model=MODEL, messages=HI, temperature=0.9, top_p=0.95, seed=1234, max_tokens=12)
    first = c.chat.completions.create(**kw)
    again = c.chat.completions.create(**kw)
    chunks = list(c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = first.choices[0].message.content
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text and streamed == text == again.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [first.choices[0].finish_reason] and finals[0] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == first.usage.completion_tokens <= 12
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    other = c.chat.completions.create(**{**kw, "seed": 99})
    assert other.choices[0].message.content  # a different seed still answers


def test_answer_matches_the_runtime_in_process(server, tiny_runtime):
    """The server adds nothing and loses nothing: greedy text equals the embedded runtime's."""
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]
    got = client(server).chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=20)
    want = tiny_runtime.chat_completion(msgs, temperature=0, max_new_tokens=20)
    assert got.choices[0].message.content == want.text
    assert got.usage.prompt_tokens == want.prompt_tokens
    assert got.usage.completion_tokens == want.completion_tokens
    assert got.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")


def test_stop_string_and_max_completion_tokens(server):
    c = client(server)
    full = c.chat.completions.create(model=MODEL, messages=HI, temperature=0, max_completion_tokens=16)
    text = full.choices[0].message.content
    assert full.usage.completion_tokens == 16 and full.choices[0].finish_reason == "length"
    stop = text[len(text) // 2 :][:3]
    cut = c.chat.completions.create(
        model=MODEL, messages=HI, temperature=0, max_tokens=16, stop=[stop, "\x00"]
    )
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_default_max_tokens_and_ignored_fields(server):
    body = {
        "messages": HI,
        "temperature": 0,
        "user": "me",
        "metadata": {"a": "b"},
        "store": False,
        "n": 1,
        "presence_penalty": 0,
        "logprobs": False,
        "response_format": {"type": "text"},
    }
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 16  # --default-max-tokens 16


def test_tokenize_counts_what_the_completion_bills(server):
    msgs = [{"role": "user", "content": "Count my tokens, please."}]
    tok = post(server, "/tokenize", {"messages": msgs}).json()
    done = post(server, "/v1/chat/completions", {"messages": msgs, "max_tokens": 1}).json()
    assert tok["count"] == len(tok["tokens"]) == done["usage"]["prompt_tokens"]
    assert tok["max_context"] == 512
    plain = post(server, "/tokenize", {"prompt": "hello world"}).json()
    bare = post(server, "/tokenize", {"prompt": "hello world", "add_special_tokens": False}).json()
    assert plain["tokens"][0] == 1 and plain["tokens"][1:] == bare["tokens"]
    back = post(server, "/detokenize", {"tokens": bare["tokens"]}).json()
    assert back["text"] == "hello world"
    for bad in ({}, {"prompt": "a", "messages": msgs}, {"prompt": 3}):
        assert post(server, "/tokenize", bad).status_code == 400
    r = post(server, "/detokenize", {"tokens": [5, 10**9]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens[1]"
    # a conversation with tool turns counts what the chat request with it bills
    call = {"id": "abc123def", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    turns = [*msgs, {"role": "assistant", "content": None, "tool_calls": [call]}]
    turns.append({"role": "tool", "tool_call_id": "abc123def", "content": "42"})
    tok = post(server, "/tokenize", {"messages": turns})
    assert tok.status_code == 200, tok.text
    done = post(server, "/v1/chat/completions", {"messages": turns, "max_tokens": 1}).json()
    assert tok.json()["count"] == done["usage"]["prompt_tokens"]
    orphan = [*msgs, {"role": "tool", "tool_call_id": "nope", "content": "1"}]
    r = post(server, "/tokenize", {"messages": orphan})
    assert r.status_code == 400 and "tool_call_id" in r.json()["error"]["message"]


# -- validation: 400 with an OpenAI error object, never a 500 ------------------------------------------
LONG = "word " * 3000
G = {"type": "function", "function": {"name": "g"}}
BAD = {
    "malformed json": (b'{"messages": [', None),
    "empty body": (b"", None),
    "json array": (b"[1, 2]", None),
    "json string": (b'"hello"', None),
    "nan": (b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', None),
    "invalid utf-8": (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', None),
    "messages not a list": ({"messages": {"role": "user"}}, "messages"),
    "empty messages": ({"messages": []}, "messages"),
    "missing messages": ({"model": MODEL}, "messages"),
    "unknown role": ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    "text part without text": (
        {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
        "messages[0].content[0].text",
    ),
    "image part": (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages[0].content[0].type",
    ),
    "null content": ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    "number content": ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    "max_tokens 0": ({"messages": HI, "max_tokens": 0}, "max_tokens"),
    "max_tokens negative": ({"messages": HI, "max_tokens": -3}, "max_tokens"),
    "max_tokens string": ({"messages": HI, "max_tokens": "5"}, "max_tokens"),
    "max_tokens float": ({"messages": HI, "max_tokens": 2.5}, "max_tokens"),
    "max_completion_tokens 0": ({"messages": HI, "max_completion_tokens": 0}, "max_completion_tokens"),
    "temperature string": ({"messages": HI, "temperature": "hot"}, "temperature"),
    "temperature negative": ({"messages": HI, "temperature": -1}, "temperature"),
    "top_p zero": ({"messages": HI, "top_p": 0}, "top_p"),
    "stream not bool": ({"messages": HI, "stream": "yes"}, "stream"),
    "stop wrong type": ({"messages": HI, "stop": 7}, "stop"),
    "seed too large": ({"messages": HI, "seed": 2**70}, "seed"),
    "prompt longer than context": ({"messages": [{"role": "user", "content": LONG}]}, "messages"),
    "prompt + max_tokens over context": ({"messages": HI, "max_tokens": 500}, "max_tokens"),
    "n > 4": ({"messages": HI, "n": 5}, "n"),
    "n 0": ({"messages": HI, "n": 0}, "n"),
    "tool_choice names no tool": (
        {"messages": HI, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": G},
        "tool_choice.function.name",
    ),
    "json_schema without schema": (
        {"messages": HI, "response_format": {"type": "json_schema"}},
        "response_format.json_schema",
    ),
    "top_logprobs > 20": ({"messages": HI, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    "top_logprobs without logprobs": ({"messages": HI, "top_logprobs": 2}, "top_logprobs"),
    "logprobs not bool": ({"messages": HI, "logprobs": 3}, "logprobs"),
    "unknown field": ({"messages": HI, "max_token": 5}, "max_token"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_requests_get_400_error_objects(server, name):
    body, param = BAD[name]
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param
    if "context" in name:
        assert err["code"] == "context_length_exceeded"
    assert "/" not in err["message"].replace("N/A", "")  # no filesystem path leaks into messages


def test_server_survives_bad_input_and_openai_client_sees_400(server):
    with pytest.raises(openai.BadRequestError) as info:
        client(server).chat.completions.create(model=MODEL, messages=HI, max_tokens=10_000)
    assert info.value.code == "context_length_exceeded"
    wrong = httpx.get(server.url("/v1/chat/completions"))
    assert wrong.status_code == 405 and "error" in wrong.json()
    assert httpx.get(server.url("/health")).status_code == 200


# -- concurrency: FIFO queue, 429, disconnects ----------------------------------------------------------
def test_parallel_clients_all_get_complete_correct_answers(server):
    prompts = [f"Tell me about the number {i}." for i in range(4)]
    c = client(server)

    def ask(p):
        r = c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": p}], temperature=0, max_tokens=10
        )
        return r.choices[0].message.content, r.usage.completion_tokens

    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(ask, prompts))
    alone = [ask(p) for p in prompts]
    assert together == alone
    assert all(n == 10 for _, n in together)


def _open_stream(http, server, max_tokens=480, **extra):
    body = {"messages": HI, "max_tokens": max_tokens, "stream": True, "temperature": 0, **extra}
    req = http.build_request("POST", server.url("/v1/chat/completions"), json=body)
    resp = http.send(req, stream=True)
    # One line iterator per response, kept alive: a dropped httpx iterator closes the connection.
    resp.sse_lines = resp.iter_lines()
    return resp


def _content_chunks(resp, n):
    got = 0
    for line in resp.sse_lines:
        if line.startswith("data: {") and '"content": "' in line and '"content": ""' not in line:
            got += 1
            if got == n:
                return
    raise AssertionError("the stream ended early")


def test_disconnect_stops_generation_within_one_token_and_next_starts_at_once(server):
    with httpx.Client(timeout=60) as http:
        resp = _open_stream(http, server)
        assert resp.status_code == 200
        _content_chunks(resp, 3)
        assert stats(server)["running"]
        resp.close()  # the client goes away mid-stream
    t0 = time.monotonic()
    nxt = post(server, "/v1/chat/completions", {"messages": HI, "max_tokens": 4, "temperature": 0})
    elapsed = time.monotonic() - t0
    assert nxt.status_code == 200
    jobs = stats(server)["recent"]
    cancelled = [j for j in jobs if j["finish_reason"] == "cancelled"]
    assert cancelled, jobs
    job = cancelled[-1]
    assert job["steps_after_cancel"] is not None and job["steps_after_cancel"] <= 1, job
    assert 3 <= job["completion_tokens"] < 480
    following = recent_job(server, nxt.json()["id"])
    assert following["id"] > job["id"]
    assert following["queue_wait_s"] < 0.5, following
    assert elapsed < 5


def test_non_streaming_client_that_hangs_up_cancels_its_generation(server):
    before = stats(server)["cancelled"]
    with pytest.raises(httpx.ReadTimeout):
        post(
            server, "/v1/chat/completions", {"messages": HI, "max_tokens": 480, "temperature": 0}, timeout=0.1
        )
    job = wait_for(lambda: stats(server)["cancelled"] > before and stats(server)["recent"][-1])
    assert job["finish_reason"] == "cancelled" and job["completion_tokens"] < 480, job
    assert post(server, "/v1/chat/completions", {"messages": HI, "max_tokens": 2}).status_code == 200


def test_full_queue_answers_429_and_drains_after_disconnects(server):
    with httpx.Client(timeout=60) as http:
        running = _open_stream(http, server)
        _content_chunks(running, 1)
        waiting = [_open_stream(http, server, max_tokens=4) for _ in range(4)]  # --max-queue 4
        assert all(r.status_code == 200 for r in waiting)
        assert stats(server)["waiting"] == 4
        over = post(server, "/v1/chat/completions", {"messages": HI, "max_tokens": 4})
        assert over.status_code == 429
        assert over.json()["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            client(server).chat.completions.create(model=MODEL, messages=HI, max_tokens=4)
        for r in [running, *waiting]:
            r.close()
    wait_for(lambda: (s := stats(server))["waiting"] == 0 and not s["running"])
    ok = post(server, "/v1/chat/completions", {"messages": HI, "max_tokens": 4})
    assert ok.status_code == 200


# -- security ------------------------------------------------------------------------------------------
def _raw_get(port, host_header: bytes | None) -> bytes:
    req = b"GET /health HTTP/1.1\r\n" + (
        b"Host: " + host_header + b"\r\n" if host_header is not None else b""
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(req + b"Connection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.split(b"\r\n", 1)[0]


def test_host_header_allowlist_on_loopback(server):
    port = server.port
    assert httpx.get(server.url("/health"), headers={"Host": f"localhost:{port}"}).status_code == 200
    assert httpx.get(server.url("/health"), headers={"Host": f"[::1]:{port}"}).status_code == 200
    for evil in (f"evil.example:{port}", "attacker.com", f"127.0.0.1.nip.io:{port}"):
        r = httpx.get(server.url("/v1/models"), headers={"Host": evil})
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_host"
    assert b" 403 " in _raw_get(port, b"")
    assert b" 200 " in _raw_get(port, f"127.0.0.1:{port}".encode())


def test_no_cors_unless_asked(server):
    r = httpx.get(server.url("/v1/models"), headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    pre = httpx.options(
        server.url("/v1/chat/completions"),
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in pre.headers


def test_logs_escape_control_characters_and_hold_no_paths(server):
    httpx.get(server.url("/v1/models/x%0aINJECTED fake log line"))
    httpx.get(server.url("/health"), headers={"Host": "evil\x1b[31m.example"})
    wait_for(lambda: "INJECTED" in server.log_text())
    assert not any(line.startswith("INJECTED") for line in server.lines)
    assert "\\nINJECTED" in server.log_text()
    assert "\x1b" not in server.log_text()
    assert tiny_model_dir() not in server.log_text()


@pytest.fixture(scope="module")
def secured():
    proc = ServerProcess(
        tiny_model_dir(),
        "--api-key",
        "s3cret",
        "--cors-origin",
        "http://app.example",
        "--default-max-tokens",
        "8",
    )
    yield proc
    assert proc.stop(signal.SIGINT) == 0  # Ctrl-C is a clean shutdown too


def test_api_key_guards_every_route_but_health(secured):
    assert httpx.get(secured.url("/health")).status_code == 200
    for method, path in [
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/tokenize"),
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
        ("GET", "/stats"),
        ("GET", "/nope"),
    ]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.request(method, secured.url(path), headers=headers, content=b"{}")
            assert r.status_code == 401, (method, path, headers)
            assert r.json()["error"]["code"] == "invalid_api_key"
    good = {"Authorization": "Bearer s3cret"}
    assert httpx.get(secured.url("/v1/models"), headers=good).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        client(secured, api_key="wrong").models.list()
    out = client(secured, api_key="s3cret").chat.completions.create(model=MODEL, messages=HI, max_tokens=3)
    assert out.usage.completion_tokens <= 3


def test_cors_only_for_listed_origins(secured):
    # What Chrome sends before a public page may call a local address (Private Network Access).
    pre = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
        "Access-Control-Request-Private-Network": "true",
    }
    ok = httpx.options(secured.url("/v1/chat/completions"), headers={"Origin": "http://app.example", **pre})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://app.example"
    assert ok.headers["access-control-allow-private-network"] == "true"
    bad = httpx.options(secured.url("/v1/chat/completions"), headers={"Origin": "http://evil.example", **pre})
    assert bad.status_code == 403 and bad.json()["error"]["code"] == "forbidden_origin"
    assert bad.headers.get("access-control-allow-origin") != "http://evil.example"
    assert "access-control-allow-private-network" not in bad.headers
    # The key does not make a foreign page's POST acceptable; the listed page's goes through.
    key = {"Authorization": "Bearer s3cret", "Content-Type": "application/json"}
    for origin, status in (("http://evil.example", 403), ("http://app.example", 200)):
        r = httpx.post(
            secured.url("/tokenize"), content=b'{"prompt": "hi"}', headers={**key, "Origin": origin}
        )
        assert r.status_code == status, (origin, r.text)


# -- graceful shutdown: in-flight and queued streams end with an error chunk then [DONE] ------------------
def test_sigterm_ends_streams_cleanly_and_exits(tmp_path):
    proc = ServerProcess(tiny_model_dir(), "--host", "0.0.0.0", "--api-key", "k")
    try:
        assert any("other machines can reach this server" in line for line in proc.lines)
        base = f"http://127.0.0.1:{proc.port}"
        # Not a loopback bind: no Host allowlist (the API key protects it instead).
        assert httpx.get(
            base + "/v1/models", headers={"Host": "box.lan", "Authorization": "Bearer k"}
        ).is_success
        results: dict[str, list] = {}

        def consume(name, resp):
            results[name] = sse_events(resp.sse_lines)

        with httpx.Client(timeout=60, headers={"Authorization": "Bearer k"}) as http:
            target = type("Target", (), {"url": staticmethod(lambda path: base + path)})
            first = _open_stream(http, target)
            _content_chunks(first, 1)
            second = _open_stream(http, target)
            threads = [
                threading.Thread(target=consume, args=(n, r))
                for n, r in (("first", first), ("second", second))
            ]
            for t in threads:
                t.start()
            code = proc.stop(signal.SIGTERM, timeout=20)
            for t in threads:
                t.join(10)
        assert code == 0, proc.log_text()
        for name in ("first", "second"):
            events = results[name]
            assert events[-1] == "[DONE]", (name, events[-3:])
            assert events[-2]["error"]["type"] == "server_error", (name, events[-2])
            assert not any(
                isinstance(e, dict) and e.get("choices") and e["choices"][0]["finish_reason"] for e in events
            ), "a cut-off answer must not look finished"
    finally:
        proc.stop(signal.SIGKILL)
