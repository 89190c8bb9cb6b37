"""Run real ``zlocal serve`` processes on ephemeral loopback ports for the server tests.

``shared_server()`` starts one tiny-fixture server per test session (reused by every module that
asks; stopped at exit), so the suite pays the ~7 s start-up once.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx

from tests import fixtures

_LISTEN_RE = re.compile(r"zlocal serve: .* on http://(\S+?)/v1 ")
SHARED_ARGS = ("--max-queue", "4", "--default-max-tokens", "16")


class ServerProcess:
    """A ``python -m zlocal serve`` child process; stderr is collected in ``lines``."""

    def __init__(self, model: str, *args: str, start_timeout: float = 120.0):
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONUNBUFFERED="1")
        env.pop("ZLOCAL_API_KEY", None)
        cmd = [
            sys.executable,
            "-m",
            "zlocal",
            "serve",
            model,
            "--dtype",
            "float32",
            "--max-context",
            "512",
            "--port",
            "0",
            *args,
        ]
        self.model = model
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            env=env,
        )
        self._address = threading.Event()
        self.base = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            self._wait_ready(start_timeout)
        except BaseException:
            self.stop()
            raise

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            m = _LISTEN_RE.search(line)
            if m and not self.base:
                self.base = "http://" + m.group(1)
                self._address.set()
        self._address.set()

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self._address.wait(timeout)
        if not self.base:
            raise RuntimeError("server did not start:\n" + self.log_text())
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited:\n" + self.log_text())
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server never became healthy:\n" + self.log_text())

    @property
    def port(self) -> int:
        return int(self.base.rsplit(":", 1)[1])

    def url(self, path: str) -> str:
        return self.base + path

    def log_text(self) -> str:
        return "\n".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        """Send ``sig`` and wait; kill after ``timeout``. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)
        return self.proc.returncode


_shared: dict[str, ServerProcess] = {}
_lock = threading.Lock()


def tiny_model_dir() -> str:
    return str(fixtures.tiny_zephyr_dir())


def shared_server() -> ServerProcess:
    """The session's tiny-fixture server (max queue 4, default max_tokens 16), started on first use."""
    with _lock:
        proc = _shared.get("tiny")
        if proc is None or proc.proc.poll() is not None:
            proc = _shared["tiny"] = ServerProcess(tiny_model_dir(), *SHARED_ARGS)
            atexit.register(proc.stop)
        return proc


def sse_events(lines) -> list:
    """Parse SSE ``data:`` lines into JSON objects, with the literal "[DONE]" kept as a string."""
    import json

    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out
