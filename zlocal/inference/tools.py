"""Tool (function) calling: definitions, the prompt format, the reply grammar and the parsed calls.

One reply format for every model: each call is ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
(the Hermes/Qwen convention), calls separated by a newline. The grammar (zlocal.inference.grammar, Lark with
an embedded JSON schema per function) forces exactly that shape, so the arguments always parse and
validate against the function's ``parameters``:

- ``auto``: text (not starting with ``<``) or one or more calls;
- ``required``: one or more calls (exactly one when ``parallel_tool_calls`` is false);
- a named function: calls of that function only;
- ``none``: no tools in the prompt and no grammar.

Templates that render tools themselves (their source uses ``tools``) get the definitions, the
assistant ``tool_calls`` and the ``tool`` results as the model's own template lays them out. Other
templates (Zephyr, SmolLM2) get ``TOOLS_PROMPT`` appended to the system message, assistant calls
written back in the reply format, and each run of tool results as one user turn of
``<tool_response>{"name": ..., "content": ...}</tool_response>`` blocks.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from zlocal.errors import InvalidArgumentError
from zlocal.inference.template import message_objects

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_CALL_RE = re.compile(re.escape(TOOL_OPEN) + r"(.*?)" + re.escape(TOOL_CLOSE), re.S)
TOOLS_PROMPT = (
    "You can call these functions. Each line is one function: its name, what it does, and the "
    "JSON schema of its arguments.\n{definitions}\n"
    "To call a function, reply with " + TOOL_OPEN + '{{"name": "<function name>", "arguments": '
    "{{<the arguments as a JSON object>}}}}" + TOOL_CLOSE + " and nothing else (one such block per "
    "call). A function's result comes back as <tool_response>...</tool_response>. {rule}"
)
_RULES = {
    "auto": "If no function helps, answer normally.",
    "required": "You must call a function.",
}
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class FunctionTool:
    """One callable function: ``parameters`` is the JSON schema of its arguments object."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: dict(EMPTY_PARAMETERS))

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI ``tools[i]`` object (what tool-aware chat templates expect)."""
        fn = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": fn}


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: ``arguments`` is the JSON text, ``args`` the parsed object."""

    id: str
    name: str
    arguments: str

    @property
    def args(self) -> dict[str, Any]:
        """The arguments as a dict (they always parse: the grammar produced them)."""
        return json.loads(self.arguments)

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI ``message.tool_calls[i]`` object."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools mean for one generation: the mode and the functions it may call."""

    tools: tuple[FunctionTool, ...]
    mode: str  # "auto", "required" or "none"
    allowed: tuple[str, ...]  # functions the reply may call (one when a function was named)
    parallel: bool = True


def normalize_tools(tools: Sequence[Any]) -> tuple[FunctionTool, ...]:
    """OpenAI tool objects (``{"type": "function", "function": {...}}``), plain ``{"name", ...}``
    dicts or FunctionTool values as FunctionTools; InvalidArgumentError naming the bad field."""
    out: list[FunctionTool] = []
    for i, tool in enumerate(tools):
        if isinstance(tool, FunctionTool):
            out.append(tool)
            continue
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise InvalidArgumentError(f"{where}: must be an object")
        fn = tool
        if "function" in tool:
            if tool.get("type", "function") != "function":
                raise InvalidArgumentError(f"{where}.type: must be 'function'")
            fn, where = tool["function"], where + ".function"
        if not isinstance(fn, dict):
            raise InvalidArgumentError(f"{where}: must be an object")
        name, params = fn.get("name"), fn.get("parameters")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise InvalidArgumentError(f"{where}.name: must be 1-64 letters, digits, '_' or '-'")
        if params is not None and not isinstance(params, dict):
            raise InvalidArgumentError(f"{where}.parameters: must be a JSON schema object")
        out.append(FunctionTool(name, str(fn.get("description") or ""), params or dict(EMPTY_PARAMETERS)))
    names = [t.name for t in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise InvalidArgumentError(f"tools: the function name '{dup}' is defined twice")
    return tuple(out)


def plan_tools(
    tools: Sequence[Any] | None, tool_choice: Any = None, parallel: bool | None = None
) -> ToolPlan:
    """Resolve ``tools`` + ``tool_choice`` (``"auto"`` when tools are given, ``"none"``,
    ``"required"``, or ``{"type": "function", "function": {"name": ...}}``)."""
    defs = normalize_tools(tools or [])
    names = tuple(t.name for t in defs)
    choice = tool_choice if tool_choice is not None else ("auto" if defs else "none")
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise InvalidArgumentError('tool_choice: must be {"type": "function", "function": {"name": ...}}')
        if name not in names:
            raise InvalidArgumentError(f"tool_choice.function.name: no tool named '{name[:64]}' in tools")
        return ToolPlan(defs, "required", (name,), parallel is not False)
    if choice not in ("auto", "none", "required"):
        raise InvalidArgumentError("tool_choice: must be 'auto', 'none', 'required' or a named function")
    if choice != "none" and not defs:
        raise InvalidArgumentError(f"tool_choice: '{choice}' needs a non-empty tools list")
    return ToolPlan(defs, choice, names if choice != "none" else (), parallel is not False)


# %json uses the same compact-but-spaced layout as response_format (zlocal.inference.grammar.JSON_LAYOUT).
_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def tool_grammar(plan: ToolPlan) -> str:
    """The Lark grammar (llguidance dialect) of a reply under ``plan`` (not for mode "none").

    Each allowed tool has its own rule whose arguments are a ``%json`` of its parameters schema as
    the root, so the schema's own ``$ref``/``$defs`` resolve (nested in a wrapper schema they would
    point nowhere). A call reads ``<tool_call>{"name": NAME, "arguments": {...}}</tool_call>``."""
    by_name = {t.name: t for t in plan.tools}
    calls = 'call ("\\n" call)*' if plan.parallel else "call"
    start = "start: calls" if plan.mode == "required" else "start: text | calls"
    lines = [start, f"calls: {calls}", "call: " + " | ".join(f"call_{i}" for i in range(len(plan.allowed)))]
    for i, name in enumerate(plan.allowed):
        params = by_name[name].parameters
        schema = {**(params if isinstance(params, dict) else {}), "x-guidance": _LAYOUT}
        head = json.dumps(TOOL_OPEN + json.dumps({"name": name})[:-1] + ', "arguments": ')
        lines += [f'call_{i}: {head} args_{i} "}}{TOOL_CLOSE}"', f"args_{i}: %json {json.dumps(schema)}"]
    # Plain text must not open with '<', so a reply is unambiguously text or calls.
    lines.append(r"text: /[^<](.|\n)*/")
    return "\n".join(lines)


def new_call_id() -> str:
    """A tool call id: 9 alphanumerics, the form Mistral's tool templates require (and OpenAI clients
    take any string)."""
    return uuid.uuid4().hex[:9]


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """Split a reply into (content, calls): the calls are the complete ``<tool_call>`` blocks in
    order; content is the text of a plain reply, None for a reply of calls (even cut short)."""
    if not text.startswith("<"):
        # the grammar's text branch: a <tool_call> inside it was never constrained, so it is content
        return text, []
    calls = []
    for m in _CALL_RE.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except ValueError:
            continue  # cut short by max_tokens: not a call
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            continue
        args = json.dumps(obj.get("arguments", {}), ensure_ascii=False)
        calls.append(ToolCall(new_call_id(), obj["name"], args))
    # calls cut short by max_tokens are no content either (streaming never sent them as text)
    return None, calls


def system_prompt(plan: ToolPlan) -> str:
    """TOOLS_PROMPT filled in for ``plan`` (templates without tool support)."""
    lines = [
        json.dumps(
            {"name": t.name, "description": t.description, "parameters": t.parameters}, ensure_ascii=False
        )
        for t in plan.tools
    ]
    rule = _RULES.get(plan.mode, "")
    if len(plan.allowed) == 1 and plan.mode == "required" and len(plan.tools) > 1:
        rule = f"You must call the function {plan.allowed[0]}."
    return TOOLS_PROMPT.format(definitions="\n".join(lines), rule=rule)


def _calls_text(calls: Sequence[dict[str, Any]]) -> str:
    out = []
    for call in calls:
        fn = call.get("function", call)
        args = fn.get("arguments", "{}")
        try:
            parsed = json.loads(args) if isinstance(args, str) else args
        except ValueError:
            parsed = args
        out.append(
            TOOL_OPEN
            + json.dumps({"name": fn.get("name"), "arguments": parsed}, ensure_ascii=False)
            + TOOL_CLOSE
        )
    return "\n".join(out)


def normalized_messages(messages: Any) -> list[dict[str, Any]]:
    """``messages`` with each assistant ``tool_calls`` entry as an OpenAI dict (``ToolCall`` objects,
    as ``Completion.tool_calls`` holds them, are accepted); InvalidArgumentError naming the first
    entry of the wrong shape."""
    out = []
    for i, msg in enumerate(message_objects(messages)):
        calls = msg.get("tool_calls")
        if calls is None:
            out.append(msg)
            continue
        if not isinstance(calls, (list, tuple)):
            raise InvalidArgumentError(f"messages[{i}].tool_calls must be a list")
        fixed = []
        for j, given in enumerate(calls):
            call = given.to_openai() if isinstance(given, ToolCall) else given
            if not isinstance(call, dict) or not isinstance(call.get("function", {}), dict):
                raise InvalidArgumentError(
                    f"messages[{i}].tool_calls[{j}] must be {{id, type, function: {{name, arguments}}}}"
                )
            fixed.append(call)
        out.append({**msg, "tool_calls": fixed})
    return out


def check_tool_messages(messages: Sequence[dict[str, Any]]) -> None:
    """Every ``tool`` message answers a call id of an earlier assistant ``tool_calls``;
    InvalidArgumentError naming ``messages[i].tool_call_id`` otherwise."""
    known: set[str] = set()
    for i, msg in enumerate(messages):
        for call in msg.get("tool_calls") or []:
            known.add(str(call.get("id")))
        if msg.get("role") == "tool" and msg.get("tool_call_id") not in known:
            raise InvalidArgumentError(
                f"messages[{i}].tool_call_id: no earlier assistant tool call has the id "
                f"'{str(msg.get('tool_call_id'))[:64]}'"
            )


def plain_messages(messages: Sequence[dict[str, Any]], plan: ToolPlan | None) -> list[dict[str, str]]:
    """Messages with tool calls and tool results rewritten as plain role/content turns, and the
    tool definitions added to the system message (templates without tool support)."""
    check_tool_messages(messages)
    names = {}
    out: list[dict[str, str]] = []
    for msg in messages:
        role, content = msg.get("role"), msg.get("content") or ""
        if role == "assistant" and msg.get("tool_calls"):
            for call in msg["tool_calls"]:
                names[call.get("id")] = call.get("function", call).get("name")
            content = (content + "\n" if content else "") + _calls_text(msg["tool_calls"])
        if role == "tool":
            block = json.dumps(
                {"name": names.get(msg.get("tool_call_id")), "content": content}, ensure_ascii=False
            )
            block = f"<tool_response>{block}</tool_response>"
            if out and out[-1].get("tool"):  # consecutive results: one user turn
                out[-1]["content"] += "\n" + block
                continue
            out.append({"role": "user", "content": block, "tool": "1"})
            continue
        out.append({"role": role, "content": content})
    out = [{"role": m["role"], "content": m["content"]} for m in out]
    if plan is not None and plan.mode != "none":
        prompt = system_prompt(plan)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


@dataclass(frozen=True)
class StreamedCall:
    """A tool call completed while streaming, with its position in the reply's tool_calls."""

    index: int
    call: ToolCall


class ToolCallStream:
    """Splits a streamed reply into content deltas and completed tool calls. The grammar makes the
    first character decide: ``<`` opens calls, anything else is plain text to the end."""

    def __init__(self):
        self._buf = ""
        self._mode: str | None = None  # "text" or "calls" once the first character arrived
        self.count = 0

    def feed(self, text: str) -> tuple[str, list[StreamedCall]]:
        """(content delta, calls completed by ``text``)."""
        if self._mode is None and text:
            self._mode = "calls" if text[:1] == "<" else "text"
        if self._mode != "calls":
            return text, []
        self._buf += text
        done: list[StreamedCall] = []
        while TOOL_CLOSE in self._buf:
            block, self._buf = self._buf.split(TOOL_CLOSE, 1)
            _, calls = parse_tool_calls(block + TOOL_CLOSE)
            for call in calls:
                done.append(StreamedCall(self.count, call))
                self.count += 1
        return "", done
