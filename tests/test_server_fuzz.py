"""Fuzz every route of a real `zlocal serve` process from its own OpenAPI schema (schemathesis).

Bounded: a few dozen generated requests per operation. Any 5xx fails; every 4xx must be an
OpenAI-style error object.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from tests.server_helpers import shared_server  # noqa: E402


@pytest.fixture(scope="module")
def api_schema():
    server = shared_server()
    return schemathesis.openapi.from_url(server.url("/openapi.json"))


schema = schemathesis.pytest.from_fixture("api_schema")


def _no_server_error(case) -> None:
    """The case's answer is not a 5xx, and an error answer is an OpenAI error object."""
    response = case.call(timeout=60)
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:500])
    if response.status_code >= 400:
        err = response.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert err["message"]



@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_server_errors(case):
    _no_server_error(case)


# The structured-output and tool fields are optional, so the run above seldom sends them: here the
# same schema, with them required, fuzzes /v1/chat/completions (and response_format on /v1/completions).
STRUCTURED = {
    "ChatCompletionRequest": ["response_format", "tools", "tool_choice", "parallel_tool_calls"],
    "CompletionRequest": ["response_format"],
}


@pytest.fixture(scope="module")
def structured_schema():
    import httpx

    server = shared_server()
    raw = httpx.get(server.url("/openapi.json"), timeout=30).json()
    components = raw["components"]["schemas"]
    for model, fields in STRUCTURED.items():
        props = components[model]["properties"]
        assert all(f in props for f in fields), f"{model} no longer describes {fields}"
        components[model]["required"] = sorted({*components[model].get("required", []), *fields})
    # Plain user turns (the run above fuzzes tool turns, which random data rarely gets right), so
    # that the structured fields, not the messages, decide most answers.
    message = components["ChatMessage"]
    message["required"] = sorted({*message.get("required", []), "content"})
    message["properties"]["role"] = {"type": "string", "enum": ["user"]}
    for name in ("tool_calls", "tool_call_id"):
        del message["properties"][name]
    raw["paths"] = {p: raw["paths"][p] for p in ("/v1/chat/completions", "/v1/completions")}
    schema = schemathesis.openapi.from_dict(raw)
    schema.config.update(base_url=server.base)
    return schema


structured = schemathesis.pytest.from_fixture("structured_schema")


@structured.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_structured_fields_no_server_errors(case):
    _no_server_error(case)
