"""Structured chat requests: ``response_format`` and ``tools`` turned into a prompt, a grammar and
a parser of the reply. Shared by the Python API (Runtime.chat_completion) and the server.

``response_format`` accepts:

- None or ``{"type": "text"}``: free text;
- ``{"type": "json_object"}``: any JSON object;
- ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": true}}``;
- a JSON schema given directly (a dict whose ``type`` is not one of the three above);
- a pydantic model class: its JSON schema; the reply is parsed into an instance.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from zlocal.errors import InvalidArgumentError
from zlocal.inference.grammar import Grammar, GrammarCompiler, SchemaError
from zlocal.inference.tools import (
    ToolCall,
    ToolPlan,
    check_tool_messages,
    normalized_messages,
    parse_tool_calls,
    plain_messages,
    plan_tools,
    tool_grammar,
)

_FORMAT_TYPES = ("text", "json_object", "json_schema")


@dataclass
class StructuredChat:
    """A chat request ready to run: prompt ids, the grammar (None: free text) and how to read the
    reply (``parse`` for response_format, ``tools`` for tool calls)."""

    prompt_ids: list[int]
    grammar: Grammar | None = None
    parse: Callable[[str], Any] | None = None
    tools: ToolPlan | None = None

    def read(self, text: str) -> tuple[str | None, Any, list[ToolCall]]:
        """(content, parsed value, tool calls) of a finished reply. ``parsed`` is None when no
        response_format was asked for or the reply was cut short (it does not parse)."""
        if self.tools is not None and self.tools.mode != "none":
            content, calls = parse_tool_calls(text)
            return content, None, calls
        parsed = None
        if self.parse is not None:
            try:
                parsed = self.parse(text)
            except ValueError:  # cut short by max_tokens or a stop string; pydantic errors are ValueErrors
                parsed = None
        return text, parsed, []


def _is_pydantic_model(obj: Any) -> bool:
    try:
        from pydantic import BaseModel
    except ImportError:  # pragma: no cover - a dependency of transformers
        return False
    return isinstance(obj, type) and issubclass(obj, BaseModel)


def closed_objects(schema: Any) -> Any:
    """A pydantic model's schema with ``additionalProperties: false`` on every object that lists
    properties and says nothing about others (as OpenAI's strict mode wants): the model then ends
    the object after its fields instead of inventing more (pydantic would drop them anyway)."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed_objects(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def response_grammar(
    grammars: Callable[[], GrammarCompiler], response_format: Any
) -> tuple[Grammar | None, Callable | None]:
    """(grammar, parser) of a ``response_format``; InvalidArgumentError / SchemaError when bad.

    ``grammars`` returns the model's compiler; it is called only when there is a format to compile,
    so plain requests never build the grammar engine's vocabulary."""
    if response_format is None:
        return None, None
    if _is_pydantic_model(response_format):
        compiler = grammars()
        schema = closed_objects(response_format.model_json_schema())
        return compiler.json_schema(schema), response_format.model_validate_json
    if not isinstance(response_format, dict):
        raise InvalidArgumentError("response_format must be a dict, a JSON schema or a pydantic model class")
    kind = response_format.get("type")
    if kind == "text":
        return None, None
    compiler = grammars()
    if kind not in _FORMAT_TYPES:  # a JSON schema given directly
        return compiler.json_schema(response_format), json.loads
    if kind == "json_object":
        return compiler.json_schema(None), json.loads
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or "schema" not in spec:
        raise SchemaError('response_format.json_schema must be {"name": ..., "schema": {...}}')
    return compiler.json_schema(spec["schema"]), json.loads


def plan_chat(
    runtime,
    messages: Sequence[dict[str, Any]],
    response_format: Any = None,
    tools: Sequence[Any] | None = None,
    tool_choice: Any = None,
    parallel_tool_calls: bool | None = None,
) -> StructuredChat:
    """Render and tokenize ``messages`` for the runtime's template and build the grammar."""
    messages = normalized_messages(messages)
    has_tool_turns = any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)
    if not tools and tool_choice is None and not has_tool_turns:
        grammar, parse = response_grammar(lambda: runtime.grammars, response_format)
        return StructuredChat(runtime.encode_chat(messages), grammar, parse)
    plan = plan_tools(tools, tool_choice, parallel_tool_calls)
    for i, tool in enumerate(plan.tools):  # name the tool whose parameters cannot be enforced
        try:
            runtime.grammars.json_schema(tool.parameters)
        except SchemaError as exc:
            raise SchemaError(f"tools[{i}].function.parameters: {exc}", exc.keyword) from exc
    if response_format is not None and plan.mode != "none":
        grammar, _ = response_grammar(lambda: runtime.grammars, response_format)
        if grammar is not None:
            raise InvalidArgumentError(
                "response_format: use either tools or a JSON response format, not both"
            )
    template = runtime.template
    if template.supports_tools:
        check_tool_messages(messages)
        shown = [t.to_openai() for t in plan.tools] if plan.mode != "none" else []
        ids = template.encode_text(template.render_tools(messages, shown))
    else:
        ids = runtime.encode_chat(plain_messages(messages, plan))
    if plan.mode == "none":
        grammar, parse = response_grammar(lambda: runtime.grammars, response_format)
        return StructuredChat(ids, grammar, parse, plan)
    return StructuredChat(ids, runtime.grammars.lark(tool_grammar(plan)), None, plan)
