"""Chat-template rendering is bounded in time and size, and still renders real templates exactly
as transformers' apply_chat_template does."""

from __future__ import annotations

import faulthandler
import re
import time

import pytest

from zlocal.errors import TemplateError
from zlocal.inference.template import build_template, render_chat_template, zephyr_template
from zlocal.inference.template_sandbox import TemplateLimitError

# Hand-written in the style of the published templates: what matters is the Jinja they exercise.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL_INSTRUCT = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
TOOLS = """{%- set ns = namespace(system='', count=0) -%}
{%- if messages[0].role == 'system' %}{% set ns.system = messages[0].content %}{% set rest = messages[1:] %}
{%- else %}{% set rest = messages %}{% endif -%}
<|im_start|>system
{{ ns.system or 'You are helpful.' }}
{%- if tools %}

# Tools
{% for tool in tools %}
{{- tool | tojson(indent=2) }}{{ '\\n' if not loop.last }}
{%- set ns.count = ns.count + 1 %}
{%- endfor %}
({{ ns.count }} tools: {{ tools | map(attribute='function') | map(attribute='name') | join(', ') }})
{%- endif %}<|im_end|>
{% for message in rest -%}
<|im_start|>{{ message.role }}
{% generation %}{{ message.content | trim }}{% endgeneration %}
{%- if message.tool_calls is defined %}{% for call in message.tool_calls %}
<tool_call>{{ {'name': call.function.name, 'arguments': call.function.arguments} | tojson }}</tool_call>
{%- endfor %}{% endif %}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather at a place, in \u00b0C",
        "parameters": {"type": "object", "properties": {"place": {"type": "string"}}, "required": ["place"]},
    },
}
CHAT = [
    {"role": "system", "content": "Be brief. \u00e9\u4e2d"},
    {"role": "user", "content": "  Hello there  "},
    {"role": "assistant", "content": "Hi! <b>bold</b> & 'quotes'"},
    {"role": "user", "content": "What's the weather in Paris?"},
]


def _context(tok, messages, add_generation_prompt=True, tools=None):
    return {
        **tok.special_tokens_map,
        "messages": messages,
        "tools": tools,
        "documents": None,
        "add_generation_prompt": add_generation_prompt,
    }


@pytest.mark.parametrize("name", ["zephyr", "llama3", "mistral", "tools", "smollm2"])
@pytest.mark.parametrize("gen", [True, False])
def test_real_templates_render_like_transformers(name, gen, mistral_tokenizer, smollm2):
    tok, msgs, tools = mistral_tokenizer, CHAT, None
    sources = {"zephyr": zephyr_template(), "llama3": LLAMA3, "mistral": MISTRAL_INSTRUCT, "tools": TOOLS}
    source = sources.get(name)
    if name == "smollm2":
        source = (smollm2 / "chat_template.jinja").read_text()
    if name == "mistral":
        msgs = CHAT[1:]
    if name == "tools":
        tools = [WEATHER_TOOL, {**WEATHER_TOOL, "function": {**WEATHER_TOOL["function"], "name": "get_time"}}]
        call = {"function": {"name": "get_weather", "arguments": {"place": "Paris"}}}
        msgs = [*CHAT, {"role": "assistant", "content": "", "tool_calls": [call]}]
    expected = tok.apply_chat_template(
        msgs, tools=tools, chat_template=source, tokenize=False, add_generation_prompt=gen
    )
    assert render_chat_template(source, _context(tok, msgs, gen, tools)) == expected


def test_raise_exception_and_sandbox_errors_are_template_errors(mistral_tokenizer):
    with pytest.raises(TemplateError, match="roles must alternate"):
        render_chat_template(MISTRAL_INSTRUCT, _context(mistral_tokenizer, CHAT))
    with pytest.raises(TemplateError, match="namespace"):
        render_chat_template("{% set ns = namespace(_x=1) %}", _context(mistral_tokenizer, CHAT))


_ECHO = "{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"
_NS = "{% set ns = namespace(s='xxxxxxxx', n=3, x=[1], y=[1], t=(1,)) %}"
_LOOP60 = "{% for i in range(60) %}"

# Each is hostile in one way; each must stop fast with a TemplateLimitError. Loops are stopped by the
# deadline; everything else by a size check *before* it runs, which the message tells apart (a size
# bug would otherwise hide behind the deadline while the render allocates gigabytes).
_LOOPS = {"nested_range", "silent_nested_range", "silent_nested_string_loops"}
HOSTILE = {
    "nested_range": "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "silent_nested_range": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    # no call, filter or output inside: only the loop itself can see the clock
    "silent_nested_string_loops": "{% set s = 'x' * 100000 %}"
    "{% for i in s %}{% for j in s %}{% endfor %}{% endfor %}",
    "repeat": "{{ 'x' * 10**11 }}",
    "repeat_list": "{{ [1] * 10**11 }}",
    "power": "{{ 2 ** (10 ** 10) }}",
    "product": _NS + _LOOP60 + "{% set ns.n = ns.n * ns.n %}{% endfor %}",
    "doubling_concat": _NS + _LOOP60 + "{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "doubling_plus": _NS + _LOOP60 + "{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "shared_structure_printed": _NS + _LOOP60 + "{% set ns.x = [ns.x, ns.x] %}{% endfor %}{{ ns.x }}",
    "shared_structure_compared": _NS
    + _LOOP60
    + "{% set ns.x = [ns.x, ns.x] %}{% set ns.y = [ns.y, ns.y] %}{% endfor %}{{ ns.x == ns.y }}",
    "shared_structure_filtered": _NS
    + _LOOP60
    + "{% set ns.x = [ns.x, ns.x] %}{% endfor %}{{ ns.x | string }}",
    "shared_structure_tested": _NS
    + _LOOP60
    + "{% set ns.x = [ns.x, ns.x] %}{% set ns.y = [ns.y, ns.y] %}{% endfor %}{{ ns.x is eq(ns.y) }}",
    "shared_structure_raised": _NS
    + _LOOP60
    + "{% set ns.x = [ns.x, ns.x] %}{% endfor %}{{ raise_exception(ns.x) }}",
    "shared_tuple_lookup": _NS + _LOOP60 + "{% set ns.t = (ns.t, ns.t) %}{% endfor %}{{ {'a': 1}[ns.t] }}",
    "captured_block": "{% set big = 'x' * 3000000 %}{% set y %}{% for i in range(100000) %}{{ big }}"
    "{% endfor %}{% endset %}",
    "center_filter": "{{ 'x' | center(10**11) }}",
    "pad_method": "{{ 'x'.ljust(10**11) }}",
    "printf_width": "{{ '%0100000000000d' % 1 }}",
    "format_filter_width": "{{ '%0100000000000d' | format(1) }}",
    "format_method_width": "{{ '{:>100000000000}'.format(1) }}",
    "join_filter": "{% set s = 'x' * 3000000 %}{{ s | join(s) }}",
    "join_method": "{% set s = 'x' * 3000000 %}{{ s.join(s) }}",
    "replace_filter": "{% set s = 'x' * 3000000 %}{{ s | replace('', s) }}",
    "replace_method": "{% set s = 'x' * 3000000 %}{{ s.replace('x', s) }}",
    "indent_filter": "{% set s = '\\n' * 3000000 %}{{ s | indent(3000000) }}",
    "tojson_indent": "{{ range(100000) | list | tojson(indent=100000) }}",
    "sum_lists": "{{ [[1] * 3000] * 3000 | sum(start=[]) }}",
    "long_output": "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}",
}


@pytest.fixture
def hang_guard():
    """End the process if a test hangs: a regression can hang inside one C call that holds the GIL
    (a deep ==), where no Python-level timeout runs but faulthandler's C watchdog still does."""
    faulthandler.dump_traceback_later(30, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_template_stops_fast_at_load(name, mistral_tokenizer, tmp_path, hang_guard):
    f = tmp_path / "hostile.jinja"
    f.write_text(HOSTILE[name] + _ECHO)
    t0 = time.monotonic()
    with pytest.raises(TemplateLimitError, match=r"chat template \(file\) stopped") as e:
        build_template(mistral_tokenizer, "x", None, [2], override=f)
    assert time.monotonic() - t0 < 2.0
    kind = r"s limit" if name in _LOOPS else r"characters|bits|must be a number"
    assert re.search(kind, str(e.value)), str(e.value)


def test_lipsum_is_not_offered(mistral_tokenizer, tmp_path):
    # lipsum(10**6) builds paragraphs in one call, out of reach of the deadline
    f = tmp_path / "lipsum.jinja"
    f.write_text("{{ lipsum(1000000) }}" + _ECHO)
    with pytest.raises(TemplateError, match="'lipsum' is undefined"):
        build_template(mistral_tokenizer, "x", None, [2], override=f)


def test_hostile_system_branch_is_not_mistaken_for_no_system_role(mistral_tokenizer, tmp_path, hang_guard):
    # Only the load-time probe with a system message hangs: that must fail the load, not set
    # supports_system=False and hang later in chat.
    f = tmp_path / "sys.jinja"
    f.write_text(
        "{% for m in messages %}{% if m.role == 'system' %}{% for i in range(100000) %}"
        "{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}"
        "{{ m.content }}{{ eos_token }}{% endfor %}"
    )
    with pytest.raises(TemplateLimitError):
        build_template(mistral_tokenizer, "x", None, [2], override=f)


def test_library_load_refuses_a_hostile_template(tiny_zephyr, tmp_path, hang_guard):
    from zlocal.inference.runtime import load_chat_template

    f = tmp_path / "hostile.jinja"
    f.write_text(HOSTILE["nested_range"] + _ECHO)
    t0 = time.monotonic()
    with pytest.raises(TemplateLimitError, match="1 s limit"):
        load_chat_template(str(tiny_zephyr), chat_template=f)
    assert time.monotonic() - t0 < 10  # tokenizer and config load included


def test_hostile_only_on_long_chats_is_bounded_at_render(mistral_tokenizer, tmp_path, hang_guard):
    f = tmp_path / "late.jinja"
    f.write_text("{% if messages | length > 5 %}{{ 'x' * 10**11 }}{% endif %}" + _ECHO)
    tpl = build_template(mistral_tokenizer, "x", None, [2], override=f)
    many = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"} for i in range(7)]
    with pytest.raises(TemplateLimitError, match="repeated"):
        tpl.render(many)


def test_a_long_real_conversation_is_within_bounds(mistral_tokenizer):
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": "word " * 2000} for i in range(200)]
    tools = [WEATHER_TOOL] * 20
    t0 = time.monotonic()
    text = render_chat_template(TOOLS, _context(mistral_tokenizer, msgs, tools=tools))
    assert time.monotonic() - t0 < 1.0 and len(text) > 200 * 10000
    expected = mistral_tokenizer.apply_chat_template(
        msgs, tools=tools, chat_template=TOOLS, tokenize=False, add_generation_prompt=True
    )
    assert text == expected
