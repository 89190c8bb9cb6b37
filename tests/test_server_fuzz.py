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


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_server_errors(case):
    response = case.call(timeout=60)
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:500])
    if response.status_code >= 400:
        err = response.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert err["message"]
