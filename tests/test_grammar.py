"""Constrained decoding in the library (zlocal.inference.grammar): compiler caches, the token mask, every
sampling option, logprobs of the masked distribution, every forward path and multi-turn prefix reuse.

The tiny fixture is a random model: its JSON is garbage, but valid garbage; the schemas bound every
string and array so that greedy decoding ends.
"""

from __future__ import annotations

import json

import pytest
import torch

import zlocal
from zlocal.inference.engine import Engine
from zlocal.inference.grammar import GrammarCompiler, SchemaError
from zlocal.inference.runtime import Runtime

jsonschema = pytest.importorskip("jsonschema")

MSGS = [{"role": "user", "content": "Describe a person as JSON."}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 2, "maxLength": 12},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
        "pet": {"$ref": "#/$defs/pet"},
    },
    "required": ["name", "age", "tags", "pet"],
    "additionalProperties": False,
    "$defs": {
        "pet": {
            "type": "object",
            "properties": {
                "kind": {"enum": ["cat", "dog"]},
                "legs": {"type": "integer", "minimum": 0, "maximum": 4},
            },
            "required": ["kind", "legs"],
            "additionalProperties": False,
        }
    },
}


def _valid(text: str, schema=PERSON):
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


def test_vocabulary_compiled_once_and_schemas_cached(tiny_runtime):
    compiler = tiny_runtime.grammars
    assert tiny_runtime.grammars is compiler  # one per model
    before = compiler.compiled
    schema = {"type": "object", "properties": {"cache_probe": {"type": "integer"}}}
    first = compiler.json_schema(schema)
    # the same schema (keys in another order) comes from the cache
    assert compiler.json_schema(dict(reversed(list(schema.items())))) is first
    assert compiler.compiled == before + 1


def test_lru_drops_the_least_recently_used(tiny_runtime):
    compiler = GrammarCompiler(tiny_runtime.tokenizer, 32000, [2], cache_size=2)
    a, b = ({"type": "integer", "maximum": i} for i in (1, 2))
    ga = compiler.json_schema(a)
    compiler.json_schema(b)
    assert compiler.json_schema(a) is ga  # a is now the most recent
    compiler.json_schema({"type": "integer", "maximum": 3})  # evicts b
    assert compiler.json_schema(a) is ga
    n = compiler.compiled
    compiler.json_schema(b)
    assert compiler.compiled == n + 1


@pytest.mark.parametrize(
    ("schema", "keyword"),
    [
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not"),
        ({"if": {"type": "integer"}, "then": {"minimum": 1}}, "if"),
    ],
)
def test_unenforceable_keywords_are_refused_by_name(tiny_runtime, schema, keyword):
    with pytest.raises(SchemaError) as info:
        tiny_runtime.grammars.json_schema(schema)
    assert info.value.keyword == keyword and f"'{keyword}'" in str(info.value)


@pytest.mark.parametrize("schema", [{"type": "strng"}, {"$ref": "#/$defs/missing"}, {"minimum": "x"}, "str"])
def test_invalid_schemas_are_refused(tiny_runtime, schema):
    with pytest.raises(SchemaError):
        tiny_runtime.grammars.json_schema(schema)


def test_mask_allows_exactly_the_grammar_prefixes(tiny_runtime):
    tok = tiny_runtime.tokenizer
    grammar = tiny_runtime.grammars.json_schema({"enum": ["yes", "no"]})
    c = tiny_runtime.grammars.constraint(grammar)
    logits = torch.zeros(32000)
    masked = c.mask(logits)
    allowed = torch.nonzero(masked > float("-inf")).flatten().tolist()
    assert allowed
    for t in allowed:  # every allowed token starts one of the two answers
        text = tok.convert_tokens_to_string([tok.convert_ids_to_tokens(t)])
        assert '"yes"'.startswith(text) or '"no"'.startswith(text), text
    assert tok.convert_tokens_to_ids('"') in allowed or tok.convert_tokens_to_ids('▁"') not in allowed


SAMPLING = {
    "greedy": {"temperature": 0},
    "sampled": {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": 3},
    "filters": {"temperature": 0.8, "top_k": 5, "top_p": 0.9, "min_p": 0.1, "seed": 4},
    "penalty": {"temperature": 0.7, "repetition_penalty": 1.3, "seed": 5},
    "greedy penalty": {"temperature": 0, "repetition_penalty": 1.5},
}


@pytest.mark.parametrize("name", list(SAMPLING))
def test_every_sampling_option_gives_valid_json(tiny_runtime, name):
    done = tiny_runtime.chat_completion(MSGS, response_format=PERSON, max_tokens=200, **SAMPLING[name])
    assert done.finish_reason == "stop"
    assert done.parsed == _valid(done.text)


def test_free_decoding_of_the_same_request_is_not_json(tiny_runtime):
    # the mask is what makes the JSON: without it the random model writes no object
    done = tiny_runtime.chat_completion(MSGS, temperature=0, max_tokens=40)
    with pytest.raises(ValueError):
        json.loads(done.text)


def test_generation_ends_when_the_grammar_completes(tiny_runtime):
    with tiny_runtime.engine.without_stop_tokens():  # no end-of-turn token can end it
        done = tiny_runtime.chat_completion(MSGS, response_format=PERSON, temperature=0, max_tokens=200)
    assert done.finish_reason == "stop" and done.completion_tokens < 200
    assert done.text.endswith("}}") and _valid(done.text)


@torch.inference_mode()
def test_logprobs_come_from_the_masked_distribution(tiny_runtime):
    rt = tiny_runtime
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}}}
    schema |= {"required": ["n"], "additionalProperties": False}
    done = rt.chat_completion(
        MSGS, response_format=schema, temperature=0, max_tokens=30, logprobs=True, top_logprobs=3
    )
    _valid(done.text, schema)
    prompt = rt.encode_chat(MSGS)
    replay = rt.grammars.constraint(rt.grammars.json_schema(schema))
    for j, entry in enumerate(done.logprobs):
        ids = torch.tensor([prompt + done.token_ids[:j]])
        row = rt.model(input_ids=ids).logits[0, -1].float()
        ref = torch.log_softmax(replay.mask(row), dim=-1)
        token = done.token_ids[j]
        assert entry["logprob"] == pytest.approx(float(ref[token]), abs=1e-3)
        for alt in entry["top_logprobs"]:  # alternatives are allowed tokens or at the floor
            assert alt["logprob"] <= entry["logprob"] + 1e-6
        replay.accept(token)


def _other_engine(rt, fast: bool) -> Runtime:
    twin = Runtime(rt.model, rt.tokenizer, rt.template, rt.info, rt.resolved)
    twin.engine = Engine(rt.model, rt.tokenizer, rt.max_context, rt.template.stop_token_ids, fast=fast)
    twin._grammars = rt.grammars
    return twin


def test_lean_and_hf_forward_paths_give_the_same_constrained_answer(tiny_runtime):
    fast = _other_engine(tiny_runtime, fast=True)
    hf = _other_engine(tiny_runtime, fast=False)
    assert fast.engine.fast is not None and hf.engine.fast is None
    kw = dict(response_format=PERSON, temperature=0.9, seed=11, max_tokens=200)
    a, b = fast.chat_completion(MSGS, **kw), hf.chat_completion(MSGS, **kw)
    assert a.finish_reason == b.finish_reason == "stop"
    _valid(a.text)
    assert a.token_ids == b.token_ids


def test_one_call_decode_kernel_path(tiny_zephyr):
    from zlocal.inference.bench import cpu_plan
    from zlocal.kernels import cpu_kernels

    if cpu_kernels.kernels() is None:
        pytest.skip(f"needs zlocal's AVX-512 BF16 kernels: {cpu_kernels.kernel_status()}")
    plan = cpu_plan(str(tiny_zephyr), "int8", dtype="bfloat16", max_context=256)
    rt = zlocal.load(str(tiny_zephyr), plan=plan, dtype="bfloat16", max_context=256)
    assert rt.engine.fast.stack_reason is None  # decode steps run on the kernel
    for kw in ({"temperature": 0}, {"temperature": 0.8, "seed": 2}):
        done = rt.chat_completion(MSGS, response_format=PERSON, max_tokens=200, **kw)
        assert done.finish_reason == "stop"
        _valid(done.text)


def test_session_turns_reuse_the_prefix_and_stay_valid(tiny_runtime):
    rt = tiny_runtime
    # long enough for one full aligned prefill chunk (128 tokens), the unit of reuse
    session = rt.session(system="Answer every question with one JSON object. " * 16)
    first = session.send("A person?", response_format=PERSON, temperature=0, max_tokens=200)
    _valid(first)
    second = session.send("Another one?", response_format=PERSON, temperature=0, max_tokens=200)
    _valid(second)
    assert rt.engine.stats.last_reused > 0
    # the second turn equals the same conversation run cold
    rt.engine.reset()
    cold = rt.chat_completion(session.messages[:-1], response_format=PERSON, temperature=0, max_tokens=200)
    assert cold.text == second


def test_pydantic_model_gives_an_instance(tiny_runtime):
    from pydantic import BaseModel, Field

    class Pet(BaseModel):
        kind: str = Field(max_length=6)
        legs: int = Field(ge=0, le=4)

    got = tiny_runtime.chat(MSGS, response_format=Pet, temperature=0, max_tokens=60)
    assert isinstance(got, Pet) and 0 <= got.legs <= 4 and len(got.kind) <= 6
    done = tiny_runtime.chat_completion(MSGS, response_format=Pet, temperature=0, max_tokens=60)
    assert json.loads(json.dumps(done.to_dict()))["parsed"] == got.model_dump()


def test_chat_returns_text_for_a_text_format(tiny_runtime):
    kw = dict(temperature=0, max_tokens=8)
    assert tiny_runtime.chat(MSGS, response_format={"type": "text"}, **kw) == tiny_runtime.chat(MSGS, **kw)
    parsed = tiny_runtime.chat(MSGS, response_format={"type": "json_object"}, **kw | {"max_tokens": 100})
    assert isinstance(parsed, dict)


def test_plain_chat_never_builds_the_grammar_engine(tiny_runtime, monkeypatch):
    # a model whose tokenizer the grammar engine cannot take still chats; only structured requests fail
    from zlocal.errors import DependencyError
    from zlocal.inference.runtime import Runtime

    def broken(self):
        raise DependencyError("structured output and tools need a fast tokenizer for this model")

    monkeypatch.setattr(Runtime, "grammars", property(broken))
    msgs = [{"role": "user", "content": "hi"}]
    assert isinstance(tiny_runtime.chat(msgs, temperature=0, max_new_tokens=3), str)
    text = {"type": "text"}
    assert isinstance(tiny_runtime.chat(msgs, temperature=0, max_new_tokens=3, response_format=text), str)
    with pytest.raises(DependencyError, match="fast tokenizer"):
        tiny_runtime.chat(msgs, max_new_tokens=3, response_format={"type": "json_object"})
