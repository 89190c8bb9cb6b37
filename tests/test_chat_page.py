"""The chat page at ``/`` and the docs at ``/docs`` in a real headless browser (Debian's chromium, driven
over the DevTools protocol): typing, streaming, the stop button cancelling the generation on the server,
the API key, the JSON-schema mode, and Swagger UI rendering with no request leaving the server."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.page_helpers import API_KEY, Chromium, chromium_path, secured_server
from tests.server_helpers import shared_server, sse_events

AUTH = {"Authorization": f"Bearer {API_KEY}"}
READY = "document.body?.dataset.state === 'idle'"
FINISHED = "['done', 'stopped', 'error'].includes(document.body.dataset.state) && document.body.dataset.state"

# Clicks Send, watches the reply arrive, and clicks Stop as soon as 20 tokens are on screen: done inside
# the page so the stop lands while the (fast) tiny model is still generating.
SEND_THEN_STOP = """
new Promise((resolve) => {
  const tokens = () => Number(document.getElementById("tps").dataset.tokens || 0);
  let sent = false;
  const obs = new MutationObserver(() => {
    const state = document.body.dataset.state;
    sent = sent || ["waiting", "streaming"].includes(state);
    if (tokens() >= 20 && state === "streaming") {
      obs.disconnect();
      const shown = [...document.querySelectorAll(".msg.assistant .text")].at(-1).textContent;
      document.getElementById("stop").click();
      resolve({tokens: tokens(), state, shown});
    } else if (sent && ["done", "error"].includes(state)) {
      obs.disconnect();
      const errors = [...document.querySelectorAll(".msg.error")];
      resolve({tokens: tokens(), state, shown: "", error: errors.length ? errors.at(-1).textContent : ""});
    }
  });
  obs.observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true});
  document.getElementById("send").click();
})
"""


@pytest.fixture(scope="module")
def browser():
    exe = chromium_path()
    if exe is None:
        pytest.skip(
            "chromium is not installed (Debian: apt-get install -y chromium); the chat page's browser "
            "tests need a real browser"
        )
    chrome = Chromium(exe)
    chrome.call("Network.enable")
    yield chrome
    chrome.close()


@pytest.fixture(scope="module")
def secured():
    return secured_server()


def stats(server) -> dict:
    return httpx.get(server.url("/stats"), headers=AUTH, timeout=10).json()


def wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def page_text(browser: Chromium, selector: str) -> str:
    """The text of the last element matching ``selector`` (the newest message of a kind)."""
    return browser.js(f"[...document.querySelectorAll({json.dumps(selector)})].at(-1).textContent")


def sent_body(browser: Chromium) -> dict:
    requests = browser.requests_to("/v1/chat/completions")
    assert len(requests) == 1, requests
    return json.loads(requests[0]["postData"])


def test_page_streams_a_reply_and_stop_cancels_it_on_the_server(browser, secured):
    browser.open(secured.url("/"), READY)
    # Without the key the server refuses, and the page says why instead of hanging.
    browser.type_into("prompt", "Hello?")
    browser.js("document.getElementById('send').click()")
    assert browser.wait_for(FINISHED) == "error"
    assert "API key" in page_text(browser, ".msg.error")

    browser.type_into("api-key", API_KEY)
    browser.type_into("system", "You are terse.")
    browser.type_into("temperature", "0.5")
    browser.type_into("max-tokens", "450")
    browser.type_into("prompt", "Tell me a long story")
    browser.events.clear()
    before = stats(secured)["cancelled"]
    seen = browser.js(SEND_THEN_STOP)
    assert seen["state"] == "streaming" and seen["tokens"] >= 20 and seen["shown"], seen
    assert browser.wait_for(FINISHED) == "stopped"

    job = wait_for(lambda: stats(secured)["cancelled"] > before and stats(secured)["recent"][-1])
    assert job["finish_reason"] == "cancelled" and seen["tokens"] <= job["completion_tokens"] < 450, job
    request = browser.requests_to("/v1/chat/completions")[0]
    headers = {k.lower(): v for k, v in request["headers"].items()}
    assert headers["authorization"] == f"Bearer {API_KEY}"
    body = json.loads(request["postData"])
    assert body["stream"] is True and body["max_tokens"] == 450 and body["temperature"] == 0.5
    assert body["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Tell me a long story"},
    ]
    rate = float(page_text(browser, "#tps").split(" tok/s")[0])
    assert rate > 0

    # The server keeps serving, and the stopped reply is part of the conversation's history.
    partial = page_text(browser, ".msg.assistant .text")
    assert partial.startswith(seen["shown"])
    browser.type_into("max-tokens", "4")
    browser.type_into("prompt", "Go on")
    browser.events.clear()
    browser.js("document.getElementById('send').click()")
    assert browser.wait_for(FINISHED) == "done"
    assert sent_body(browser)["messages"][1:] == [
        {"role": "user", "content": "Tell me a long story"},
        {"role": "assistant", "content": partial},
        {"role": "user", "content": "Go on"},
    ]
    assert stats(secured)["recent"][-1]["finish_reason"] == "length"
    assert page_text(browser, ".msg.assistant .text")


def test_json_schema_mode_sends_the_schema_and_shows_the_outcome(browser, secured):
    browser.open(secured.url("/"), READY)
    browser.type_into("api-key", API_KEY)
    # Out-of-range settings are the server's to refuse: its 400 names the field, on the page.
    browser.type_into("temperature", "7")
    browser.type_into("prompt", "Name a city")
    browser.js("document.getElementById('send').click()")
    assert browser.wait_for(FINISHED) == "error"
    assert "400" in page_text(browser, ".msg.error") and "temperature" in page_text(browser, ".msg.error")

    browser.type_into("temperature", "0")
    browser.type_into("max-tokens", "24")
    browser.js("document.getElementById('json-mode').click()")
    assert browser.js("document.getElementById('schema').hidden") is False

    # A schema that is not JSON is the user's mistake: said on the page, nothing sent.
    browser.type_into("schema", "{not json")
    browser.type_into("prompt", "Name a city")
    browser.events.clear()
    browser.js("document.getElementById('send').click()")
    assert browser.wait_for(FINISHED) == "error"
    assert "not valid JSON" in page_text(browser, ".msg.error")
    browser.type_into("schema", "[]")
    browser.js("document.getElementById('send').click()")
    assert browser.wait_for(FINISHED) == "error"
    assert "must be a JSON object" in page_text(browser, ".msg.error")
    assert browser.requests_to("/v1/chat/completions") == []

    # bounded, so even a random model's reply completes within max_tokens
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 8}},
        "required": ["city"],
        "additionalProperties": False,
    }
    browser.type_into("max-tokens", "60")
    browser.type_into("schema", json.dumps(schema))
    browser.type_into("prompt", "Name a city")
    browser.events.clear()
    browser.js("document.getElementById('send').click()")
    state = browser.wait_for(FINISHED)
    body = sent_body(browser)
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "page", "schema": schema, "strict": True},
    }
    # The page shows the constrained reply: JSON valid against the schema, the same text the server
    # gives that very request (greedy, so repeatable).
    assert state == "done"
    shown = page_text(browser, ".msg.assistant .text")
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(json.loads(shown), schema)
    resp = httpx.post(secured.url("/v1/chat/completions"), json=body, headers=AUTH, timeout=60)
    assert resp.status_code == 200
    events = [e for e in sse_events(resp.text.splitlines()) if e != "[DONE]"]
    assert shown == "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])


def test_docs_render_offline_from_the_server_alone(browser):
    server = shared_server()
    browser.open(server.url("/docs"), "document.querySelectorAll('.opblock').length > 0")
    assert "zlocal" in page_text(browser, ".swagger-ui .info .title")
    paths = browser.js("[...document.querySelectorAll('.opblock-summary-path')].map(e => e.textContent)")
    assert any("/v1/chat/completions" in p for p in paths), paths
    browser.call("Runtime.evaluate", expression="0")  # collect the events that arrived so far
    urls = [p["request"]["url"] for m, p in browser.events if m == "Network.requestWillBeSent"]
    assert urls and all(u.startswith(server.base + "/") or u.startswith("data:") for u in urls), urls
