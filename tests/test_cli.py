"""The CLI as a user runs it: real subprocesses, streaming output, clean one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def zlocal(*args, stdin=None, timeout=300):
    return subprocess.run(  # noqa: PLW1510 - the tests read returncode themselves
        [sys.executable, "-m", "zlocal", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )


def test_readme_first_command_path(smollm2):
    """`zlocal chat --prompt ...` on the embedded default model streams a real answer."""
    r = zlocal(
        "chat", "--prompt", "What is the capital of France?", "--temperature", "0", "--max-new-tokens", "24"
    )
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "Traceback" not in r.stderr


def test_generate_json(tiny_zephyr):
    r = zlocal(
        "generate",
        str(tiny_zephyr),
        "--prompt",
        "Hello",
        "--json",
        "--temperature",
        "0",
        "--max-new-tokens",
        "5",
        "--dtype",
        "float32",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["completion_tokens"] == len(out["token_ids"]) <= 5
    assert out["prompt_tokens"] == len(out["prompt_token_ids"])
    assert out["finish_reason"] in ("stop", "length")
    assert {"prompt_tps", "generation_tps", "time_to_first_token", "total_time"} <= out.keys()


def test_repl_commands(tiny_zephyr):
    script = "Hello there\n/system Talk like a pirate\nAhoy\n/reset\n/bogus\nBye\n/exit\nnot reached\n"
    r = zlocal(
        "chat",
        str(tiny_zephyr),
        "--temperature",
        "0",
        "--max-new-tokens",
        "4",
        "--dtype",
        "float32",
        "--stats",
        stdin=script,
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("generated") == 3  # three replies, then /exit stops before "not reached"
    assert "system prompt set" in r.stderr and "conversation reset" in r.stderr
    assert "unknown command /bogus" in r.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["chat", "does-not-exist", "-p", "hi"], "not a directory"),
        (["chat", "-p", "hi", "--top-p", "3"], "top_p"),
        (["chat", "-p", "hi", "--max-new-tokens", "0"], "max_new_tokens"),
        (["generate", "--prompt", "x", "--temperature", "abc"], "invalid float"),
        (["chat", "-p", "hi", "--dtype", "int3"], "dtype"),
        (["prompt", "--messages", "/nonexistent.json"], "does not exist"),
    ],
)
def test_user_mistakes_are_one_line_errors(args, needle):
    r = zlocal(*args)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr


@pytest.mark.parametrize("plan", ["dense", "int8"])
def test_unreadable_checkpoint_is_one_line(tmp_path, tiny_zephyr, plan):
    # both loaders: transformers' from_pretrained (dense) and zlocal's streaming quantize-on-load
    import shutil

    from zlocal.bench import cpu_plan
    from zlocal.plan import save_plan

    d = tmp_path / "broken"
    shutil.copytree(tiny_zephyr, d)
    (d / "model.safetensors").write_bytes(b"garbage")
    plan_file = save_plan(cpu_plan(str(d), plan, max_context=64), tmp_path / "plan.json")
    r = zlocal("chat", str(d), "-p", "hi", "--plan", str(plan_file))
    assert r.returncode == 3 and "Traceback" not in r.stderr
    assert "cannot load weights" in r.stderr.strip().splitlines()[-1]


def test_help_lists_commands():
    r = zlocal("--help")
    assert r.returncode == 0
    for cmd in ("chat", "generate", "prompt"):
        assert cmd in r.stdout
