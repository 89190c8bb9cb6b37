"""An engine failure in the middle of a stream ends it with an error chunk then [DONE]."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from zlocal.serving.server import create_app


class FailingRuntime:
    """The real tiny runtime, except that generation dies after two tokens."""

    def __init__(self, runtime):
        self._rt = runtime

    def __getattr__(self, name):
        return getattr(self._rt, name)

    def stream_tokens(self, ids, **kw):
        for i, r in enumerate(self._rt.stream_tokens(ids, **kw)):
            if i == 2:
                raise RuntimeError("kernel exploded in /home/someone/secret/model.safetensors")
            yield r


def _events(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


def test_error_inside_a_stream_ends_with_error_chunk_then_done(tiny_runtime):
    app = create_app(FailingRuntime(tiny_runtime), model_name="tiny")
    body = {
        "messages": [{"role": "user", "content": "Hello"}],
        "stream": True,
        "max_tokens": 20,
        "temperature": 0,
    }
    with TestClient(app, base_url="http://127.0.0.1") as client:
        resp = client.post("/v1/chat/completions", json=body)
        events = _events(resp.text)
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert "error" in last and "secret" not in last["error"]["message"]
        # the server keeps serving after the failure
        tiny_runtime.engine.reset()
        ok = client.post("/tokenize", json={"prompt": "hello"})
        assert ok.status_code == 200


def test_error_without_streaming_is_an_error_object_not_a_crash(tiny_runtime):
    app = create_app(FailingRuntime(tiny_runtime), model_name="tiny")
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 20, "temperature": 0}
    with TestClient(app, base_url="http://127.0.0.1") as client:
        resp = client.post("/v1/chat/completions", json=body)
        err = resp.json()["error"]
        assert resp.status_code == 500 and err["type"] == "server_error"
        assert "secret" not in err["message"] and "/home" not in err["message"]
