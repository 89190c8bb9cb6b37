"""/v1/completions, n, text content parts, model names and aliases, and the new fields' 400s, on real
`zlocal serve` processes driven by the official `openai` client (and raw HTTP where the client hides
the wire format)."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.server_helpers import SHARED_ARGS, ServerProcess, shared_server, sse_events, tiny_model_dir

openai = pytest.importorskip("openai")

MODEL = "tiny-zephyr-v1"
HI = [{"role": "user", "content": "Say hi."}]
# Plain sampling, no truncation: on the near-uniform tiny model two seeds give different text.
SAMPLED = dict(temperature=1.0, top_p=1.0, seed=11, max_tokens=6)
NO_FILTERS = {"top_k": 0, "min_p": 0.0}


@pytest.fixture(scope="module")
def server():
    return shared_server()


def client(server):
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=60)


def post(server, path, body, headers=None):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    return httpx.post(server.url(path), content=content, headers=hdrs, timeout=60)


# -- /v1/completions -----------------------------------------------------------------------------------
def test_completion_of_text_and_of_token_ids(server, tiny_runtime):
    c = client(server)
    text = c.completions.create(model=MODEL, prompt="Hello world", max_tokens=8, temperature=0)
    want = tiny_runtime.generate("Hello world", temperature=0, max_tokens=8)
    assert text.object == "text_completion" and text.choices[0].text == want.text
    assert text.usage.prompt_tokens == want.prompt_tokens == 3  # BOS + 2 tokens, no chat template
    assert text.usage.completion_tokens == 8 and text.choices[0].finish_reason == "length"
    ids = tiny_runtime.encode("Hello world")
    by_ids = c.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == want.text and by_ids.usage.prompt_tokens == len(ids)
    without_bos = c.completions.create(model=MODEL, prompt=ids[1:], max_tokens=8, temperature=0)
    assert without_bos.usage.prompt_tokens == len(ids) - 1  # ids are used exactly as given


def test_completion_stop_and_legacy_logprobs(server, tiny_runtime):
    c = client(server)
    full = c.completions.create(model=MODEL, prompt="Once upon", max_tokens=12, temperature=0, logprobs=3)
    text, lp = full.choices[0].text, full.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 12
    want = tiny_runtime.generate("Once upon", temperature=0, max_tokens=12, logprobs=True, top_logprobs=3)
    assert lp.tokens == want.text_logprobs["tokens"]
    assert lp.token_logprobs == pytest.approx(want.text_logprobs["token_logprobs"], abs=1e-4)
    for tok, chosen, alts in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(alts) == 3 and max(alts.values()) == pytest.approx(chosen, abs=1e-6)  # greedy: best
        assert alts[tok] == pytest.approx(chosen, abs=1e-6)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    stop = text[len(text) // 2 :][:3]
    cut = c.completions.create(model=MODEL, prompt="Once upon", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_completion_streams_sse_ending_with_done(server):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 6, "temperature": 0, "logprobs": 1}
    whole = post(server, "/v1/completions", body).json()
    with httpx.stream(
        "POST",
        server.url("/v1/completions"),
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert all(e["object"] == "text_completion" for e in chunks)
    assert "".join(e["choices"][0]["text"] for e in chunks) == whole["choices"][0]["text"]
    streamed = [
        t for e in chunks if e["choices"][0]["logprobs"] for t in e["choices"][0]["logprobs"]["tokens"]
    ]
    assert streamed == whole["choices"][0]["logprobs"]["tokens"]
    for e in chunks:  # each token's logprob travels with its text, not all at the end
        if e["choices"][0]["text"]:
            assert "".join(e["choices"][0]["logprobs"]["tokens"]) == e["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["usage"] == whole["usage"]
    # the official client assembles the same text
    parts = client(server).completions.create(
        model=MODEL, prompt="Hello", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(p.choices[0].text for p in parts if p.choices) == whole["choices"][0]["text"]


def test_streamed_logprobs_of_tokens_held_back_by_a_stop_string(server):
    """A stop string spanning two tokens: the first token's text is held back (it might start the
    stop), the second completes it; neither text is ever sent, their logprobs still are."""
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 12, "temperature": 0, "logprobs": 0}
    full = post(server, "/v1/completions", body).json()["choices"][0]
    tokens, offsets = full["logprobs"]["tokens"], full["logprobs"]["text_offset"]
    stop = tokens[5] + tokens[6]
    assert tokens[5] and stop not in full["text"][: offsets[5] + len(tokens[5]) - 1]
    cut = post(server, "/v1/completions", {**body, "stop": [stop]}).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["logprobs"]["tokens"] == tokens[:7]
    with httpx.stream(
        "POST", server.url("/v1/completions"), json={**body, "stop": [stop], "stream": True}
    ) as r:
        events = sse_events(r.iter_lines())
    chunks = [e["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == cut["text"] == full["text"][: offsets[5]]
    assert [t for c in chunks if c["logprobs"] for t in c["logprobs"]["tokens"]] == tokens[:7]


# -- n: choices one after another, choice i with seed + i -------------------------------------------------
def test_n_choices_use_seed_plus_index(server):
    c = client(server)
    many = c.chat.completions.create(model=MODEL, messages=HI, n=3, extra_body=NO_FILTERS, **SAMPLED)
    assert [ch.index for ch in many.choices] == [0, 1, 2]
    texts = [ch.message.content for ch in many.choices]
    for i, text in enumerate(texts):
        one = c.chat.completions.create(
            model=MODEL, messages=HI, extra_body=NO_FILTERS, **{**SAMPLED, "seed": SAMPLED["seed"] + i}
        )
        assert one.choices[0].message.content == text, i
    assert len(set(texts)) == 3  # different seeds, different choices
    assert many.usage.completion_tokens == 3 * 6
    streamed = list(
        c.chat.completions.create(
            model=MODEL, messages=HI, n=3, stream=True, extra_body=NO_FILTERS, **SAMPLED
        )
    )
    by_index = {
        i: "".join(
            ch.choices[0].delta.content or "" for ch in streamed if ch.choices and ch.choices[0].index == i
        )
        for i in range(3)
    }
    assert [by_index[i] for i in range(3)] == texts
    finals = [ch.choices[0].index for ch in streamed if ch.choices and ch.choices[0].finish_reason]
    assert finals == [0, 1, 2]


def test_n_on_completions(server):
    c = client(server)
    body = dict(model=MODEL, prompt="Hello", extra_body=NO_FILTERS, **SAMPLED)
    two = c.completions.create(n=2, **body)
    assert [ch.index for ch in two.choices] == [0, 1]
    second = c.completions.create(**{**body, "seed": SAMPLED["seed"] + 1})
    assert two.choices[1].text == second.choices[0].text != two.choices[0].text


# -- content parts --------------------------------------------------------------------------------------
def test_text_parts_are_joined_in_order(server):
    c = client(server)
    parts = [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi."}]
    got = c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": parts}], temperature=0, max_tokens=8
    )
    want = c.chat.completions.create(model=MODEL, messages=HI, temperature=0, max_tokens=8)
    assert got.choices[0].message.content == want.choices[0].message.content
    assert got.usage.prompt_tokens == want.usage.prompt_tokens
    tok = post(server, "/tokenize", {"messages": [{"role": "user", "content": parts}]}).json()
    assert tok["count"] == want.usage.prompt_tokens
    image = [*parts, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": image}], max_tokens=2)
    assert info.value.body["param"] == "messages[0].content[2].type"


# -- model names ----------------------------------------------------------------------------------------
def test_unknown_model_is_404_model_not_found(server):
    c = client(server)
    for call in (
        lambda: c.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=2),
        lambda: c.completions.create(model="gpt-4o", prompt="Hi", max_tokens=2),
    ):
        with pytest.raises(openai.NotFoundError) as info:
            call()
        assert info.value.code == "model_not_found" and info.value.body["param"] == "model"
    r = post(server, "/tokenize", {"model": "gpt-4o", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    # the served id, or no model at all, is served
    assert post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2}).status_code == 200
    assert c.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices


@pytest.fixture(scope="module")
def aliased():
    proc = ServerProcess(tiny_model_dir(), *SHARED_ARGS, "--alias", "gpt-4o-mini", "--alias", "local")
    yield proc
    proc.stop()


def test_aliases_are_served_and_listed(aliased):
    c = client(aliased)
    assert [m.id for m in c.models.list().data] == [MODEL, "gpt-4o-mini", "local"]
    assert c.models.retrieve("local").id == "local"
    for name in ("gpt-4o-mini", "local", MODEL):
        out = c.chat.completions.create(model=name, messages=HI, max_tokens=2, temperature=0)
        assert out.choices[0].message.content is not None and out.model == MODEL
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="gpt-4o", prompt="Hi", max_tokens=2)
    assert "aliases gpt-4o-mini, local" in aliased.log_text()


# -- the same admission and guard as chat --------------------------------------------------------------
def test_completions_pass_the_guard(server):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    plain = httpx.post(
        server.url("/v1/completions"), content=json.dumps(body), headers={"Content-Type": "text/plain"}
    )
    assert plain.status_code == 415
    foreign = post(server, "/v1/completions", body, headers={"Origin": "http://evil.example"})
    assert foreign.status_code == 403 and foreign.json()["error"]["code"] == "forbidden_origin"
    huge = post(server, "/v1/completions", b'{"prompt": "' + b"a" * (9 * 1024 * 1024) + b'"}')
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "body_too_large"


def test_completions_share_the_queue_429(server):
    def open_stream(http, max_tokens):
        body = {"messages": HI, "max_tokens": max_tokens, "stream": True, "temperature": 0}
        resp = http.send(
            http.build_request("POST", server.url("/v1/chat/completions"), json=body), stream=True
        )
        resp.lines = resp.iter_lines()
        return resp

    with httpx.Client(timeout=60) as http:
        running = open_stream(http, 480)
        next(line for line in running.lines if '"content": "' in line and '"content": ""' not in line)
        waiting = [open_stream(http, 2) for _ in range(4)]  # --max-queue 4
        over = post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        assert over.status_code == 429 and over.json()["error"]["code"] == "queue_full"
        for r in [running, *waiting]:
            r.close()
    deadline = time.monotonic() + 30
    while (s := httpx.get(server.url("/stats")).json())["waiting"] or s["running"] or s["admitted"]:
        assert time.monotonic() < deadline, "the queue never drained"
        time.sleep(0.05)
    assert post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2}).status_code == 200


# -- bad input: 400 naming the field, and the server keeps serving --------------------------------------
BAD = {
    ("/v1/chat/completions", "top_logprobs"): {"messages": HI, "logprobs": True, "top_logprobs": 21},
    ("/v1/chat/completions", "top_logprobs "): {"messages": HI, "logprobs": True, "top_logprobs": -1},
    ("/v1/chat/completions", "top_logprobs  "): {"messages": HI, "logprobs": False, "top_logprobs": 3},
    ("/v1/chat/completions", "n"): {"messages": HI, "n": 5},
    ("/v1/chat/completions", "seed"): {"messages": HI, "n": 2, "seed": 2**64 - 1},
    ("/v1/completions", "logprobs"): {"prompt": "x", "logprobs": 6},
    ("/v1/completions", "logprobs "): {"prompt": "x", "logprobs": True},
    ("/v1/completions", "n"): {"prompt": "x", "n": 0},
    ("/v1/completions", "prompt"): {"prompt": []},
    ("/v1/completions", "prompt[1]"): {"prompt": [1, 10**9]},
    ("/v1/completions", "prompt[0]"): {"prompt": ["a", "b"]},
    ("/v1/completions", "prompt "): {"model": MODEL},
    ("/v1/completions", "echo"): {"prompt": "x", "echo": True},
    ("/v1/completions", "best_of"): {"prompt": "x", "best_of": 3},
    ("/v1/completions", "max_tokens"): {"prompt": "x", "max_tokens": 600},
}


@pytest.mark.parametrize("route,param", list(BAD), ids=[f"{r}:{p}" for r, p in BAD])
def test_bad_fields_are_400_naming_the_field(server, route, param):
    r = post(server, route, BAD[(route, param)])
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param.strip() and err["type"] == "invalid_request_error" and err["message"]
    ok = (
        {"prompt": "ok", "max_tokens": 1} if route == "/v1/completions" else {"messages": HI, "max_tokens": 1}
    )
    assert post(server, route, ok).status_code == 200  # the server keeps serving


def test_openapi_describes_the_new_route_and_fields(server):
    spec = httpx.get(server.url("/openapi.json")).json()
    assert "/v1/completions" in spec["paths"]
    schemas = spec["components"]["schemas"]
    comp, chat = schemas["CompletionRequest"]["properties"], schemas["ChatCompletionRequest"]["properties"]
    assert {"prompt", "max_tokens", "stop", "logprobs", "stream", "n", "seed"} <= set(comp)
    assert comp["logprobs"]["anyOf"][0]["maximum"] == 5
    assert chat["top_logprobs"]["anyOf"][0]["maximum"] == 20 and chat["n"]["anyOf"][0]["maximum"] == 4
    assert comp["model"]["anyOf"][0]["enum"] == [MODEL]
