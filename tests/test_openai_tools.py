"""Tool calls on a real server with the official `openai` client, and through the Python API: tool_choice
auto/none/required/named, parallel calls, streamed deltas the client assembles, the round trip with
tool results, the prompt formats (zlocal's for Zephyr, the template's own for a tool-aware template),
and the 400s for bad tool input.
"""

from __future__ import annotations

import json

import httpx
import pytest

import zlocal
from tests.server_helpers import shared_server
from zlocal.inference.tools import TOOL_OPEN, ToolCall

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

MODEL = "tiny-zephyr-v1"
MSGS = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "description": "Clock", "parameters": TIME}},
]
PARAMS = {"get_weather": WEATHER, "get_time": TIME}


@pytest.fixture(scope="module")
def server():
    return shared_server()


def client(server):
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=60)


def create(server, **kw):
    base = dict(model=MODEL, messages=MSGS, tools=TOOLS, max_tokens=200, temperature=0)
    return client(server).chat.completions.create(**{**base, **kw})


def _check_calls(calls, names=PARAMS):
    assert calls
    for call in calls:
        assert len(call.id) == 9 and call.id.isalnum() and call.type == "function"  # as Mistral requires
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])
    assert len({c.id for c in calls}) == len(calls)


def test_required_gives_one_valid_call(server):
    got = create(server, tool_choice="required", parallel_tool_calls=False)
    choice = got.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    _check_calls(choice.message.tool_calls)
    assert len(choice.message.tool_calls) == 1


@pytest.mark.parametrize("name", ["get_weather", "get_time"])
def test_named_tool_choice_calls_that_function(server, name):
    got = create(
        server, tool_choice={"type": "function", "function": {"name": name}}, parallel_tool_calls=False
    )
    calls = got.choices[0].message.tool_calls
    _check_calls(calls)
    assert [c.function.name for c in calls] == [name]


def test_parallel_calls_all_valid(server):
    got = create(server, tool_choice="required", temperature=1.0, seed=3, max_tokens=200)
    if got.choices[0].finish_reason == "tool_calls":
        _check_calls(got.choices[0].message.tool_calls)
    else:  # the random model kept adding calls: the complete ones still came back
        assert got.choices[0].finish_reason == "length"


def test_streamed_tool_calls_assemble_like_the_answer(server):
    kw = dict(tool_choice="required", parallel_tool_calls=False, temperature=0.7, seed=8)
    whole = create(server, **kw).choices[0].message.tool_calls
    base = dict(model=MODEL, messages=MSGS, tools=TOOLS, max_tokens=200, **kw)
    with client(server).chat.completions.stream(**base) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    streamed = final.choices[0].message.tool_calls
    _check_calls(streamed)
    got = [(c.function.name, c.function.arguments) for c in streamed]
    assert got == [(c.function.name, c.function.arguments) for c in whole]


def test_a_call_cut_short_is_neither_content_nor_a_call(server):
    choice = create(server, tool_choice="required", max_tokens=5).choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.content is None and choice.message.tool_calls is None
    base = dict(model=MODEL, messages=MSGS, tools=TOOLS, tool_choice="required", max_tokens=5, temperature=0)
    chunks = [c for c in client(server).chat.completions.create(stream=True, **base) if c.choices]
    assert not any(c.choices[0].delta.content or c.choices[0].delta.tool_calls for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_auto_is_text_or_valid_calls(server):
    for seed in (1, 2):
        choice = create(server, tool_choice="auto", temperature=1.0, seed=seed).choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            _check_calls(choice.message.tool_calls)
        else:
            assert TOOL_OPEN not in choice.message.content and not choice.message.content.startswith("<")


def test_none_keeps_tools_out_of_the_prompt(server):
    plain = client(server).chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2, temperature=0)
    none = create(server, tool_choice="none", max_tokens=2)
    auto = create(server, max_tokens=2)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens < auto.usage.prompt_tokens
    assert none.choices[0].message.tool_calls is None


def test_tool_results_round_trip(server):
    first = create(server, tool_choice="required", parallel_tool_calls=False).choices[0].message
    call = first.tool_calls[0]
    history = [
        *MSGS,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 degrees"},
    ]
    got = create(server, messages=history, max_tokens=4)
    assert got.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert got.usage.prompt_tokens > create(server, max_tokens=1).usage.prompt_tokens


BAD = {
    "tool_choice names no tool": (
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice.function.name",
    ),
    "required without tools": ({"tool_choice": "required"}, "tool_choice"),
    "tool result without a call": (
        {"messages": [*MSGS, {"role": "tool", "tool_call_id": "call_x", "content": "1"}]},
        "messages[1].tool_call_id",
    ),
    "tool result answering another id": (
        {
            "messages": [
                *MSGS,
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                    ],
                },
                {"role": "tool", "tool_call_id": "call_b", "content": "1"},
            ]
        },
        "messages[2].tool_call_id",
    ),
    "tool turn without tool_call_id": (
        {"messages": [*MSGS, {"role": "tool", "content": "1"}]},
        "messages[1].tool_call_id",
    ),
    "parameters the grammar cannot enforce": (
        {
            "tools": [
                {
                    "type": "function",
                    "function": {"name": "f", "parameters": {"type": "array", "uniqueItems": True}},
                }
            ]
        },
        "tools[0].function.parameters",
    ),
    "bad function name": (
        {"tools": [{"type": "function", "function": {"name": "a b"}}]},
        "tools[0].function.name",
    ),
    "duplicate function": ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
    "unknown tool_choice": ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    "tools and a JSON schema": (
        {"tools": TOOLS, "response_format": {"type": "json_object"}},
        "response_format",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_tool_input_is_400_naming_the_field(server, case):
    extra, param = BAD[case]
    body = {"messages": MSGS, "max_tokens": 4, **extra}
    r = httpx.post(server.url("/v1/chat/completions"), json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    assert httpx.get(server.url("/health"), timeout=10).status_code == 200


# -- Python API and prompt formats -------------------------------------------------------------------
def test_python_api_returns_typed_calls(tiny_runtime):
    kw = dict(tools=TOOLS, tool_choice="required", temperature=0, max_tokens=150)
    calls = tiny_runtime.chat(MSGS, parallel_tool_calls=False, **kw)
    assert len(calls) == 1 and isinstance(calls[0], ToolCall)
    jsonschema.validate(calls[0].args, PARAMS[calls[0].name])
    done = tiny_runtime.chat_completion(MSGS, **kw)
    assert done.finish_reason == "tool_calls" and done.content is None and done.tool_calls


def test_parameters_with_refs_are_enforced(tiny_runtime):
    # pydantic writes $defs/$ref for nested models and enums: each tool's schema is its own root
    place = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 8}},
        "required": ["city"],
        "additionalProperties": False,
    }
    params = {
        "$defs": {"Place": place, "Unit": {"enum": ["c", "f"]}},
        "type": "object",
        "properties": {"where": {"$ref": "#/$defs/Place"}, "unit": {"$ref": "#/$defs/Unit"}},
        "required": ["where", "unit"],
        "additionalProperties": False,
    }
    tools = [{"type": "function", "function": {"name": "weather", "parameters": params}}, TOOLS[1]]
    for seed in range(3):
        done = tiny_runtime.chat_completion(
            MSGS,
            tools=tools,
            tool_choice={"type": "function", "function": {"name": "weather"}},
            parallel_tool_calls=False,
            temperature=1.0,
            seed=seed,
            max_tokens=120,
        )
        assert done.finish_reason == "tool_calls" and len(done.tool_calls) == 1
        call = done.tool_calls[0]
        assert call.name == "weather" and len(call.id) == 9 and call.id.isalnum()
        jsonschema.validate(call.args, params)


def test_zephyr_prompt_carries_definitions_calls_and_results(tiny_runtime):
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'},
    }
    history = [
        *MSGS,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
    ]
    plan = tiny_runtime.plan_chat(history, tools=TOOLS)
    text = tiny_runtime.tokenizer.decode(plan.prompt_ids)
    assert '"name": "get_weather"' in text and '"maxLength": 10' in text  # definitions in the system turn
    assert '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>' in text
    assert '<tool_response>{"name": "get_time", "content": "12:00"}</tool_response>' in text


TOOL_TEMPLATE = (
    "{% if tools %}<|system|>\nTOOLS {{ tools | tojson }}</s>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'tool' %}<|tool|>\n{{ m['content'] }}</s>\n"
    "{% elif m.get('tool_calls') %}<|assistant|>\nCALL {{ m['tool_calls'][0]['function']['name'] }}</s>\n"
    "{% else %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def test_tool_aware_template_renders_the_tools_itself(tiny_zephyr, tmp_path):
    path = tmp_path / "tools.jinja"
    path.write_text(TOOL_TEMPLATE, encoding="utf-8")
    rt = zlocal.load(str(tiny_zephyr), plan=None, dtype="float32", max_context=512, chat_template=path)
    assert rt.template.supports_tools
    call = {"id": "call_9", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    history = [
        *MSGS,
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_9", "content": "noon"},
    ]
    text = rt.tokenizer.decode(rt.plan_chat(history, tools=TOOLS).prompt_ids)
    assert "TOOLS [" in text and "CALL get_time" in text and "<|tool|>\nnoon" in text
    assert "You can call these functions" not in text  # not zlocal's own prompt format
    done = rt.chat_completion(
        MSGS, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=0
    )
    assert done.finish_reason == "tool_calls"
    jsonschema.validate(done.tool_calls[0].args, PARAMS[done.tool_calls[0].name])


def test_text_replies_are_content_even_when_they_quote_a_call():
    from zlocal.inference.tools import parse_tool_calls

    quoted = ' I would write <tool_call>{"name": "rm", "arguments": {}}</tool_call> here.'
    assert parse_tool_calls(quoted) == (quoted, [])  # the text branch: never constrained, never a call
    content, calls = parse_tool_calls(
        '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>\n<tool_call>{"na'
    )
    assert content is None and [(c.name, c.args) for c in calls] == [("f", {"a": 1})]


def test_python_api_takes_its_own_tool_calls_back_and_names_bad_shapes(tiny_runtime):
    from zlocal.errors import InvalidArgumentError

    kw = dict(tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=150)
    first = tiny_runtime.chat_completion(MSGS, **kw)
    # the ToolCall objects a Completion holds go back as they are
    history = [*MSGS, {"role": "assistant", "content": None, "tool_calls": first.tool_calls}]
    history.append({"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": "sunny"})
    assert tiny_runtime.chat_completion(history, tools=TOOLS, max_tokens=5, temperature=0).finish_reason
    bad = [*MSGS, {"role": "assistant", "content": None, "tool_calls": [{"id": "x", "function": "f"}]}]
    with pytest.raises(InvalidArgumentError, match=r"messages\[1\]\.tool_calls\[0\]"):
        tiny_runtime.chat_completion(bad, **kw)
    with pytest.raises(InvalidArgumentError, match=r"messages\[1\] must be an object"):
        tiny_runtime.chat_completion([*MSGS, "hello"], **kw)


def test_a_reply_cut_by_max_tokens_stays_length_after_complete_calls():
    from zlocal.serving.server_responses import _final_reason

    assert _final_reason("length", called=True) == "length"  # a later call may have been lost
    assert _final_reason("stop", called=True) == "tool_calls"
    assert _final_reason("stop") == "stop"
