"""response_format on a real server, driven by the official `openai` client: JSON mode and strict JSON
schemas, streamed and not, on chat and text completions; what the grammar engine cannot enforce is a
400 naming the keyword. The tiny fixture is a random model: valid garbage, which is what is checked.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server_helpers import shared_server

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

MODEL = "tiny-zephyr-v1"
MSGS = [{"role": "user", "content": "Reply with JSON, please."}]

SCHEMAS = {
    "nested objects, $ref/$defs, required, no extra properties": {
        "type": "object",
        "properties": {
            "owner": {"$ref": "#/$defs/person"},
            "friend": {"$ref": "#/$defs/person"},
        },
        "required": ["owner", "friend"],
        "additionalProperties": False,
        "$defs": {
            "person": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
                "required": ["name", "age"],
                "additionalProperties": False,
            }
        },
    },
    "arrays with minItems/maxItems and enums": {
        "type": "object",
        "properties": {
            "colors": {"type": "array", "items": {"enum": ["red", "green"]}, "minItems": 2, "maxItems": 4},
            "sizes": {
                "type": "array",
                "items": {"type": "integer", "minimum": 1, "maximum": 3},
                "maxItems": 2,
            },
        },
        "required": ["colors", "sizes"],
        "additionalProperties": False,
    },
    "integer and number ranges, string lengths": {
        "type": "object",
        "properties": {
            "count": {"type": "integer", "minimum": -5, "maximum": 5},
            "ratio": {"type": "number", "minimum": 0.25, "maximum": 0.75},
            "code": {"type": "string", "minLength": 3, "maxLength": 5},
        },
        "required": ["count", "ratio", "code"],
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module")
def server():
    return shared_server()


def client(server):
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=60)


def strict(schema, name="answer"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_strict_schema_output_validates_streamed_or_not(server, name):
    schema = SCHEMAS[name]
    kw = dict(
        model=MODEL, messages=MSGS, max_tokens=300, temperature=0.8, seed=5, response_format=strict(schema)
    )
    got = client(server).chat.completions.create(**kw)
    choice = got.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), schema)
    streamed = client(server).chat.completions.create(stream=True, **kw)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == choice.message.content


def test_json_object_mode_gives_an_object(server):
    got = client(server).chat.completions.create(
        model=MODEL, messages=MSGS, max_tokens=100, temperature=0, response_format={"type": "json_object"}
    )
    assert got.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(got.choices[0].message.content), dict)


def test_every_choice_of_n_validates(server):
    schema = SCHEMAS["arrays with minItems/maxItems and enums"]
    got = client(server).chat.completions.create(
        model=MODEL,
        messages=MSGS,
        max_tokens=200,
        n=2,
        temperature=1.0,
        seed=9,
        response_format=strict(schema),
    )
    assert len(got.choices) == 2
    for choice in got.choices:
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_text_completions_take_response_format(server):
    schema = SCHEMAS["integer and number ranges, string lengths"]
    got = client(server).completions.create(
        model=MODEL,
        prompt="A JSON object:",
        max_tokens=200,
        temperature=0.8,
        seed=2,
        extra_body={"response_format": strict(schema)},
    )
    assert got.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(got.choices[0].text), schema)


BAD = {
    "keyword the engine cannot enforce": (
        strict({"type": "array", "uniqueItems": True}),
        "response_format.json_schema.schema",
        "uniqueItems",
    ),
    "nested unsupported keyword": (
        strict({"type": "object", "properties": {"a": {"not": {"type": "integer"}}}}),
        "response_format.json_schema.schema",
        "'not'",
    ),
    "invalid type": (strict({"type": "strng"}), "response_format.json_schema.schema", "strng"),
    "dangling $ref": (strict({"$ref": "#/$defs/nope"}), "response_format.json_schema.schema", "nope"),
    "schema not an object": (strict("x"), "response_format.json_schema.schema", "schema"),
    "json_schema missing": ({"type": "json_schema"}, "response_format.json_schema", "json_schema"),
    "bad name": (strict({"type": "integer"}, name="no spaces"), "response_format.json_schema.name", "name"),
    "unknown type": ({"type": "yaml"}, "response_format.type", "type"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_formats_are_400_naming_the_field(server, case):
    fmt, param, words = BAD[case]
    r = httpx.post(
        server.url("/v1/chat/completions"),
        json={"messages": MSGS, "max_tokens": 4, "response_format": fmt},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err
    assert httpx.get(server.url("/health"), timeout=10).status_code == 200


def test_unenforceable_keyword_has_its_own_code(server):
    with pytest.raises(openai.BadRequestError) as info:
        client(server).chat.completions.create(
            model=MODEL,
            messages=MSGS,
            max_tokens=4,
            response_format=strict({"type": "array", "uniqueItems": True}),
        )
    assert info.value.code == "unsupported_schema_keyword"


def test_streamed_logprobs_are_those_of_allowed_tokens(server):
    schema = SCHEMAS["arrays with minItems/maxItems and enums"]
    kw = dict(model=MODEL, messages=MSGS, max_tokens=200, temperature=0.7, seed=4)
    kw["response_format"] = strict(schema)
    stream = client(server).chat.completions.create(stream=True, logprobs=True, top_logprobs=2, **kw)
    text, entries = "", []
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            entries += chunk.choices[0].logprobs.content if chunk.choices[0].logprobs else []
    jsonschema.validate(json.loads(text), schema)
    assert b"".join(bytes(e.bytes) for e in entries).decode() == text
    # the distribution is the masked one: tokens the grammar forces are certain (logprob 0), which
    # no token ever is for this random model (about -10 each over 32000 tokens)
    assert all(e.logprob > -50 for e in entries)
    assert sum(e.logprob > -1e-3 for e in entries) >= 3
