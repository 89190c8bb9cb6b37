"""Server request models for structured output and tools (published in the OpenAPI schema, so the
schemathesis fuzz run generates them): ``response_format``, ``tools``, ``tool_choice``, and the
messages that carry tool calls and tool results.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from zlocal.errors import InvalidArgumentError
from zlocal.inference.grammar import SchemaError

NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
MAX_TOOLS = 128


class JSONSchemaSpec(BaseModel):
    """``response_format.json_schema``: the schema is always enforced (``strict`` or not)."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """``{"type": "text" | "json_object"}`` or ``{"type": "json_schema", "json_schema": {...}}``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaSpec | None = None

    def as_dict(self) -> dict[str, Any] | None:
        """The format for zlocal.inference.grammar_format (None: free text); 400 when json_schema is
        missing."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "json_object"}
        if self.json_schema is None:
            raise InvalidArgumentError('response_format.json_schema: needed with "type": "json_schema"')
        return {"type": "json_schema", "json_schema": {"schema": self.json_schema.schema_}}


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolSpec(BaseModel):
    """One ``tools[i]``: a function the model may call."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["function"]
    function: FunctionSpec


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str


class NamedToolChoice(BaseModel):
    """``tool_choice`` naming one function: the reply is a call of that function."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["function"]
    function: FunctionName


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str
    arguments: str = Field(description="the arguments as a JSON text")


class MessageToolCall(BaseModel):
    """A call in an earlier assistant message (``messages[i].tool_calls[j]``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    id: str = Field(max_length=256)
    type: Literal["function"]
    function: CalledFunction


def tool_choice_value(choice: str | NamedToolChoice | None) -> Any:
    """tool_choice as zlocal.inference.tools.plan_tools takes it."""
    if isinstance(choice, NamedToolChoice):
        return {"type": "function", "function": {"name": choice.function.name}}
    return choice


def error_param(exc: InvalidArgumentError, default: str) -> str:
    """The request field an error names: the text before its first ': ' when that is a field path
    (``tools[0].function.parameters: ...``), else ``default``."""
    head = str(exc).split(": ", 1)[0]
    if head and " " not in head and (head[0].isalpha()):
        return head
    return default


def schema_error_code(exc: InvalidArgumentError) -> str:
    """``unsupported_schema_keyword`` for a keyword the grammar cannot enforce, else invalid_value."""
    return "unsupported_schema_keyword" if isinstance(exc, SchemaError) and exc.keyword else "invalid_value"
