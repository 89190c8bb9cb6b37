"""logprobs / top_logprobs: a real server driven by the official `openai` client, the Python API, and an
independent computation from the tiny fixture's full forward pass (no cache, no zlocal sampling code).

The reported distribution is the log-softmax of the logits after the repetition penalty and the
temperature, before top-k/top-p/min-p (greedy: the raw logits, after the penalty).
"""

from __future__ import annotations

import pytest
import torch

from tests.server_helpers import shared_server

openai = pytest.importorskip("openai")

MODEL = "tiny-zephyr-v1"
MSGS = [{"role": "user", "content": "Name three colors, please."}]


@pytest.fixture(scope="module")
def server():
    return shared_server()


def client(server):
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=60)


@torch.inference_mode()
def reference_logprobs(runtime, prompt_ids, gen_ids, temperature, penalty):
    """log-softmax over the vocabulary at each generated position, computed from scratch: one full
    forward over prompt + generation, HF-style repetition penalty over everything seen so far, then
    the temperature (none when greedy)."""
    ids = torch.tensor([list(prompt_ids) + list(gen_ids)])
    logits = runtime.model(input_ids=ids).logits[0].float()
    out = []
    for j in range(len(gen_ids)):
        row = logits[len(prompt_ids) + j - 1].clone()
        if penalty != 1.0:
            seen = torch.tensor(sorted(set(list(prompt_ids) + list(gen_ids[:j]))))
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / penalty, vals * penalty)
        if temperature > 0:
            row = row / temperature
        out.append(torch.log_softmax(row, dim=-1))
    return out


def test_greedy_logprobs_are_the_model_distribution(server, tiny_runtime):
    got = client(server).chat.completions.create(
        model=MODEL, messages=MSGS, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3
    )
    want = tiny_runtime.chat_completion(MSGS, temperature=0, max_tokens=8)
    choice = got.choices[0]
    assert choice.message.content == want.text
    content = choice.logprobs.content
    assert len(content) == len(want.token_ids) == got.usage.completion_tokens == 8
    prompt = tiny_runtime.encode_chat(MSGS)
    ref = reference_logprobs(tiny_runtime, prompt, want.token_ids, temperature=0, penalty=1.0)
    for entry, token, dist in zip(content, want.token_ids, ref, strict=True):
        assert int(dist.argmax()) == token  # greedy picks the most likely token
        assert entry.logprob == pytest.approx(float(dist[token]), abs=1e-3)
        top_vals = torch.topk(dist, 3).values
        assert [a.logprob for a in entry.top_logprobs] == pytest.approx(top_vals.tolist(), abs=1e-3)
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].bytes == entry.bytes
        # bytes: the token's own bytes, SentencePiece's word marker as a space
        piece = tiny_runtime.tokenizer.convert_ids_to_tokens(token)
        if not piece.startswith("<0x"):
            assert bytes(entry.bytes) == piece.replace("\u2581", " ").encode()
            assert entry.token == piece.replace("\u2581", " ")
        assert len(entry.top_logprobs) == 3
    joined = b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace")
    assert joined.lstrip(" ") == choice.message.content  # decoding drops only the first word marker


def test_sampled_logprobs_after_penalty_and_temperature_before_filters(server, tiny_runtime):
    """temperature 0.7 and a repetition penalty are in the reported distribution; top_k 5 is not
    (after the cut the chosen token's logprob would be near log(1/5))."""
    kw = dict(temperature=0.7, top_k=5, min_p=0.0, top_p=1.0, repetition_penalty=0.5, seed=7, max_tokens=8)
    want = tiny_runtime.chat_completion(MSGS, logprobs=True, top_logprobs=4, **kw)
    assert len(want.logprobs) == len(want.token_ids) == 8
    prompt = tiny_runtime.encode_chat(MSGS)
    ref = reference_logprobs(tiny_runtime, prompt, want.token_ids, temperature=0.7, penalty=0.5)
    for entry, token, dist in zip(want.logprobs, want.token_ids, ref, strict=True):
        assert entry["logprob"] == pytest.approx(float(dist[token]), abs=1e-3)
        top_vals, top_ids = torch.topk(dist, 4)
        assert [a["logprob"] for a in entry["top_logprobs"]] == pytest.approx(top_vals.tolist(), abs=1e-3)
        assert [a["token"] for a in entry["top_logprobs"]] == [
            tiny_runtime.token_texts(int(t))[0] for t in top_ids
        ]
        assert entry["logprob"] < -2.0  # far below what the top-5 cut would report
    # The server reports the same data for the same request (zlocal extensions go through extra_body).
    body = {k: v for k, v in kw.items() if k in ("temperature", "top_p", "seed", "max_tokens")}
    extra = {"top_k": 5, "min_p": 0.0, "repetition_penalty": 0.5}
    got = client(server).chat.completions.create(
        model=MODEL, messages=MSGS, logprobs=True, top_logprobs=4, extra_body=extra, **body
    )
    assert got.choices[0].message.content == want.text
    served = [e.model_dump() for e in got.choices[0].logprobs.content]
    for s, w in zip(served, want.logprobs, strict=True):
        assert s["token"] == w["token"] and s["bytes"] == w["bytes"]
        assert s["logprob"] == pytest.approx(w["logprob"], abs=1e-4)
        assert [a["token"] for a in s["top_logprobs"]] == [a["token"] for a in w["top_logprobs"]]


def test_streamed_logprobs_equal_the_whole_answer(server):
    c = client(server)
    kw = dict(model=MODEL, messages=MSGS, temperature=0, max_tokens=10, logprobs=True, top_logprobs=2)
    whole = c.chat.completions.create(**kw)
    chunks = list(c.chat.completions.create(stream=True, **kw))
    streamed = [
        e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content
    ]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in whole.choices[0].logprobs.content]
    assert len(streamed) == whole.usage.completion_tokens
    # each token's entry travels with its text, not all at the end
    for ch in chunks:
        if ch.choices and ch.choices[0].delta.content:
            entries = ch.choices[0].logprobs.content
            joined = b"".join(bytes(e.bytes) for e in entries).decode("utf-8", "replace")
            assert entries and joined.lstrip(" ") == ch.choices[0].delta.content.lstrip(" ")


def test_no_logprobs_unless_asked(server):
    got = client(server).chat.completions.create(model=MODEL, messages=MSGS, temperature=0, max_tokens=3)
    assert got.choices[0].logprobs is None
    zero = client(server).chat.completions.create(
        model=MODEL, messages=MSGS, temperature=0, max_tokens=3, logprobs=True
    )
    assert all(e.top_logprobs == [] for e in zero.choices[0].logprobs.content)


def test_default_path_computes_no_logprobs(tiny_runtime, monkeypatch):
    """Without logprobs the engine never builds the adjusted logits twice nor a log-softmax."""
    from zlocal.inference import engine

    calls = []
    real = engine.token_logprob
    monkeypatch.setattr(engine, "token_logprob", lambda *a: calls.append(1) or real(*a))
    plain = tiny_runtime.generate("Hello", temperature=0, max_tokens=5)
    assert calls == [] and plain.logprobs is None and plain.text_logprobs is None
    with_lp = tiny_runtime.generate("Hello", temperature=0, max_tokens=5, logprobs=True)
    assert len(calls) == 5 and with_lp.token_ids == plain.token_ids
    assert with_lp.text_logprobs["tokens"] == [e["token"] for e in with_lp.logprobs]


def test_python_api_validates_logprob_options(tiny_runtime):
    from zlocal.errors import InvalidArgumentError

    for bad in ({"top_logprobs": 21, "logprobs": True}, {"top_logprobs": 2}, {"logprobs": "yes"}):
        with pytest.raises(InvalidArgumentError):
            tiny_runtime.chat_completion(MSGS, max_tokens=2, **bad)


def test_byte_level_tokens_map_back_to_bytes(smollm2_runtime):
    """SmolLM2's GPT-2 style vocabulary: the reported bytes of a reply are exactly its UTF-8 text."""
    out = smollm2_runtime.chat_completion(
        [{"role": "user", "content": "Write one word in French with an accent."}],
        temperature=0,
        max_tokens=12,
        logprobs=True,
    )
    joined = b"".join(bytes(e["bytes"]) for e in out.logprobs)
    assert joined.decode("utf-8") == out.text
    assert all(e["logprob"] <= 0 for e in out.logprobs)
