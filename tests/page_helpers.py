"""Helpers for the chat page and docs tests: a headless chromium driven over its DevTools protocol, and
one ``zlocal serve --api-key`` process shared by the modules that need a key-protected server."""

from __future__ import annotations

import atexit
import itertools
import json
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.server_helpers import SHARED_ARGS, ServerProcess, tiny_model_dir

API_KEY = "page-test-key"
_secured: dict[str, ServerProcess] = {}
_lock = threading.Lock()


def secured_server() -> ServerProcess:
    """The session's tiny-fixture server started with ``--api-key API_KEY`` (started on first use)."""
    with _lock:
        proc = _secured.get("tiny")
        if proc is None or proc.proc.poll() is not None:
            proc = _secured["tiny"] = ServerProcess(tiny_model_dir(), *SHARED_ARGS, "--api-key", API_KEY)
            atexit.register(proc.stop)
        return proc


def chromium_path() -> str | None:
    """The chromium executable (Debian's ``chromium`` package), or None when it is not installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Chromium:
    """A headless chromium with one page, driven through the DevTools protocol over a WebSocket.

    ``call`` sends a command and waits for its answer; every event received meanwhile is kept in
    ``events`` (method, params), so a test can look at the requests the page made.
    """

    def __init__(self, exe: str, timeout: float = 30.0):
        import websocket  # websocket-client (the dev extra)

        self._tmp = tempfile.TemporaryDirectory(prefix="zlocal-chromium-")
        profile = Path(self._tmp.name)
        self._log = open(profile / "stderr.log", "wb")  # noqa: SIM115 (closed in close())
        args = [
            exe,
            "--headless=new",
            "--no-sandbox",  # the tests may run as root, where the sandbox refuses to start
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-extensions",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "about:blank",
        ]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log)
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._ids = itertools.count(1)
        try:
            port = self._devtools_port(profile / "DevToolsActivePort", timeout)
            pages = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=timeout).json()
            url = next(p["webSocketDebuggerUrl"] for p in pages if p["type"] == "page")
            # chromium refuses DevTools connections that carry an Origin header it was not told about
            self.ws = websocket.create_connection(url, timeout=timeout, suppress_origin=True)
        except BaseException:
            self.close()
            raise

    def _devtools_port(self, port_file: Path, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("chromium exited:\n" + self.log_text())
            text = port_file.read_text() if port_file.exists() else ""
            if "\n" in text:
                return int(text.split("\n", 1)[0])
            time.sleep(0.05)
        raise RuntimeError("chromium did not open its DevTools port:\n" + self.log_text())

    def log_text(self) -> str:
        self._log.flush()
        return (Path(self._tmp.name) / "stderr.log").read_text(errors="replace")[-4000:]

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one DevTools command; return its result (raises on a protocol error)."""
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append((msg["method"], msg.get("params", {})))

    def js(self, expression: str) -> Any:
        """Evaluate ``expression`` in the page (awaiting a promise) and return its JSON value."""
        out = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in out:
            raise RuntimeError(f"page script failed: {out['exceptionDetails']}")
        return out["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0) -> Any:
        """Poll ``expression`` in the page until it is truthy; return that value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {expression!r}")

    def open(self, url: str, ready: str) -> None:
        """Navigate to ``url`` and wait until the page expression ``ready`` is truthy."""
        self.events.clear()
        self.call("Page.navigate", url=url)
        self.wait_for(ready)

    def type_into(self, element_id: str, text: str) -> None:
        """Clear a field, focus it and type ``text`` as keyboard input (fires the page's input events)."""
        field = f"document.getElementById({json.dumps(element_id)})"
        self.js(f"(() => {{ const el = {field}; el.value = ''; el.focus(); }})()")
        self.call("Input.insertText", text=text)

    def requests_to(self, path: str) -> list[dict[str, Any]]:
        """The requests the page sent whose URL ends with ``path`` (needs ``Network.enable``)."""
        self.call("Runtime.evaluate", expression="0")  # drain the events that arrived so far
        return [
            params["request"]
            for method, params in self.events
            if method == "Network.requestWillBeSent" and params["request"]["url"].endswith(path)
        ]

    def close(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            ws.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        self._tmp.cleanup()
