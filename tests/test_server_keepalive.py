"""``zlocal serve --keep-alive SECONDS``: the model is unloaded when idle and reloaded on demand."""

from __future__ import annotations

import time

import httpx

from tests.server_helpers import ServerProcess, tiny_model_dir
from zlocal.serving.server_keepalive import KeepAliveRuntime


class FakeRuntime:
    """Just what KeepAliveRuntime and the server touch, with a record of close()."""

    max_context = 64
    sampling_defaults: dict = {}  # noqa: RUF012 - read only
    busy = False

    def __init__(self):
        self.closed = False

    def close(self):
        self.closed = True

    def encode(self, text, add_special_tokens=True):
        return [1, 2]

    def stream_tokens(self, ids, **kw):
        yield from ids


def _until(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_unloads_when_idle_and_reloads_on_use():
    made = []
    ka = KeepAliveRuntime(lambda: made.append(FakeRuntime()) or made[-1], 0.2)
    try:
        assert ka.encode("x") == [1, 2]
        assert _until(lambda: not ka.loaded) and made[0].closed
        assert ka.max_context == 64 and not ka.loaded  # what /v1/models reads loads nothing
        assert list(ka.stream_tokens([5, 6])) == [5, 6]
        assert len(made) == 2 and ka.residency() | {"keep_alive_s": 0} == {
            "loaded": True,
            "keep_alive_s": 0,
            "loads": 2,
            "unloads": 1,
        }
        # a stream in progress keeps the model loaded past the keep-alive
        stream = ka.stream_tokens([1, 2, 3])
        next(stream)
        time.sleep(0.5)
        assert ka.loaded and not made[1].closed
        assert list(stream) == [2, 3]
    finally:
        ka.close()
    assert made[-1].closed


def test_server_reloads_the_model_after_the_keep_alive():
    server = ServerProcess(tiny_model_dir(), "--keep-alive", "1", "--default-max-tokens", "4")
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}

    def stats():
        return httpx.get(server.url("/stats"), timeout=10).json()["model"]

    try:
        first = httpx.post(server.url("/v1/chat/completions"), json=body, timeout=60)
        assert first.status_code == 200, first.text
        assert _until(lambda: not stats()["loaded"], 15), stats()
        second = httpx.post(server.url("/v1/chat/completions"), json=body, timeout=120)
        assert second.status_code == 200, second.text
        assert second.json()["choices"][0]["message"] == first.json()["choices"][0]["message"]
        assert stats() == {"loaded": True, "keep_alive_s": 1.0, "loads": 2, "unloads": 1}
    finally:
        server.stop()
    log = server.log_text()
    assert "model unloaded after 1 s idle" in log and "model reloaded in" in log


def test_keep_alive_must_be_positive(capsys):
    from zlocal.cli import main

    assert main(["serve", tiny_model_dir(), "--port", "0", "--keep-alive", "0"]) == 2
    assert "--keep-alive must be > 0 seconds" in capsys.readouterr().err
