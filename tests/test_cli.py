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
    """The README's first command, exactly, on the embedded default model: its per-model sampling
    defaults (greedy, zlocal/checkpoint/embedded.py) make it answer Paris."""
    r = zlocal("chat", "--prompt", "What is the capital of France?")
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
        (["chat", "-p", "hi", "--top-p", "3"], "--top-p"),
        (["chat", "-p", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
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

    from zlocal.inference.bench import cpu_plan
    from zlocal.planning.loadplan import save_plan

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


def _one_line_error(r, needle):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith("zlocal: error: ") and needle in lines[0], r.stderr


def test_malformed_config_is_one_line(tmp_path, tiny_zephyr):
    import shutil

    d = tmp_path / "deep"
    shutil.copytree(tiny_zephyr, d)
    (d / "config.json").write_text('{"model_type": "mistral", "x": ' + "[" * 100000 + "]" * 100000 + "}")
    _one_line_error(zlocal("plan", str(d)), "nests deeper")
    cfg = json.loads((tiny_zephyr / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 0}))
    _one_line_error(zlocal("chat", str(d), "-p", "hi"), "num_attention_heads")


def test_rejected_pickle_is_one_line(tmp_path, tiny_zephyr):
    import shutil

    import torch

    d = tmp_path / "pickled"
    shutil.copytree(tiny_zephyr, d)
    (d / "model.safetensors").unlink()
    torch.save({"w": [1, {2: 3}]}, d / "pytorch_model.bin")  # plain data, not tensors
    (tmp_path / "m.json").write_text('[{"role": "user", "content": "hi"}]')
    _one_line_error(zlocal("chat", str(d), "-p", "hi"), "--allow-pickle")
    _one_line_error(zlocal("chat", str(d), "-p", "hi", "--allow-pickle"), "not a plain state dict")
    _one_line_error(
        zlocal("convert", str(d), str(tmp_path / "out"), "--method", "int8", "--allow-pickle"), "not a plain"
    )
    _one_line_error(
        zlocal("prompt", str(d), "--messages", str(tmp_path / "m.json"), "--allow-pickle"), "not a plain"
    )
    # planning reads config.json only: no opt-in asked for, no pickle opened
    r = zlocal("plan", str(d), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["weights_format"], r.stderr


def test_hostile_chat_template_is_one_line_and_fast(tmp_path, tiny_zephyr):
    import time

    (tmp_path / "m.json").write_text('[{"role": "user", "content": "hi"}]')
    for i, hostile in enumerate(
        [
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            "{{ 'x' * 10**11 }}",
        ]
    ):
        f = tmp_path / f"hostile{i}.jinja"
        f.write_text(hostile + "{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}")
        t0 = time.monotonic()
        r = zlocal(
            "prompt", str(tiny_zephyr), "--messages", str(tmp_path / "m.json"), "--chat-template", str(f)
        )
        assert time.monotonic() - t0 < 60
        _one_line_error(r, "chat template (file) stopped")


def test_import_and_the_parser_do_not_load_torch():
    # `zlocal --help`, argument errors and `import zlocal` stay fast: torch loads on first real use
    code = (
        "import sys, zlocal, zlocal.cli; zlocal.cli.build_parser(); print('torch' in sys.modules); "
        "zlocal.SamplingParams; print('torch' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert r.stdout.split() == ["False", "True"], r.stderr
