"""CLI input and output: --messages, --prompt -, Ctrl-C under --json, flag names in errors, the load
progress bar, third-party noise kept off stderr, per-model sampling defaults, eval's default reference."""

from __future__ import annotations

import argparse
import io
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.test_cli import ENV, zlocal

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


def _write(path, data):
    path.write_text(json.dumps(data))
    return str(path)


def test_prompt_reads_stdin_and_messages_agree(tmp_path, tiny_zephyr):
    m = _write(tmp_path / "m.json", MSGS)
    from_file = zlocal("prompt", str(tiny_zephyr), "--messages", m)
    from_stdin = zlocal(
        "prompt", str(tiny_zephyr), "--system", "Be brief.", "--prompt", "-", stdin="Hi there\n"
    )
    from_json_stdin = zlocal("prompt", str(tiny_zephyr), "--messages", "-", stdin=json.dumps(MSGS))
    assert from_file.returncode == from_stdin.returncode == from_json_stdin.returncode == 0, from_stdin.stderr
    assert from_file.stdout == from_stdin.stdout == from_json_stdin.stdout
    assert "Hi there" in from_file.stdout and "Be brief." in from_file.stdout


def test_generate_messages_renders_through_the_template(tmp_path, tiny_zephyr):
    m = _write(tmp_path / "m.json", MSGS[1:])
    common = ("generate", str(tiny_zephyr), "--json", "--max-new-tokens", "2", "--dtype", "float32")
    a = zlocal(*common, "--messages", m)
    b = zlocal(*common, "--prompt", "Hi there")
    assert a.returncode == b.returncode == 0, a.stderr
    assert json.loads(a.stdout)["prompt_token_ids"] == json.loads(b.stdout)["prompt_token_ids"]


def test_chat_answers_the_last_user_message_of_a_file(tmp_path, tiny_zephyr):
    history = [*MSGS, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again"}]
    r = zlocal(
        "chat", str(tiny_zephyr), "--messages", _write(tmp_path / "m.json", history),
        "--max-new-tokens", "3", "--dtype", "float32", "--stats",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("generated") == 1


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["generate", "--raw", "--messages", "m.json"], "--raw"),
        (["generate"], "--prompt"),
        (["prompt"], "--messages"),
        (["prompt", "--messages", "-", "--prompt", "-"], "stdin"),
        (["prompt", "--messages", "MSGS", "--system", "x"], "--system"),
        (["chat", "-p", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be"),
        (["generate", "-p", "hi", "--top-p", "3"], "--top-p must be"),
        (["chat", "-p", "hi", "--max-tokens", "x"], "--max-new-tokens"),
        (["bench", "--max-new-tokens", "1"], "--max-new-tokens"),
        (["eval", "m", "--reference", "r", "--window", "1"], "--window must be"),
    ],
)
def test_errors_name_flags(tmp_path, args, needle):
    args = [_write(tmp_path / "m.json", MSGS) if a == "MSGS" else a for a in args]
    r = zlocal(*args, stdin="")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert not any(n in lines[0].replace("--", "") for n in ("max_new_tokens", "top_p")), lines[0]


def test_ctrl_c_under_json_prints_the_cancelled_result(tmp_path):
    from tests.fixtures import build_tiny_mistral

    model = tmp_path / "long"
    build_tiny_mistral(model, max_position_embeddings=8192)
    common = [sys.executable, "-m", "zlocal", "generate", str(model), "--prompt", "Hello", "--json"]
    common += ["--dtype", "float32", "--temperature", "0", "--max-context", "8192"]
    t0 = time.monotonic()
    short = subprocess.run(
        [*common, "--max-new-tokens", "1"], capture_output=True, text=True, env=ENV, check=False
    )
    assert short.returncode == 0, short.stderr
    started = time.monotonic() - t0 + 1.0  # load + one token, with a margin: generation has begun by then
    pipe = subprocess.PIPE
    for wait in (started * 1.5, started * 3, started * 6):  # a busy machine may load slower this time
        long_run = [*common, "--max-new-tokens", "8000"]
        p = subprocess.Popen(long_run, stdout=pipe, stderr=pipe, text=True, env=ENV)
        time.sleep(wait)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
        assert p.returncode == 130 and "Traceback" not in err, err
        if out:  # else the signal came while loading ("zlocal: interrupted"): wait longer
            break
    result = json.loads(out)
    assert result["finish_reason"] == "cancelled"
    assert 0 < result["completion_tokens"] < 8000 and len(result["token_ids"]) == result["completion_tokens"]


def test_third_party_noise_stays_off_stderr(tmp_path, tiny_zephyr):
    # A generation_config transformers warns about; ZLOCAL_LOG=warning shows that it does.
    d = tmp_path / "noisy"
    shutil.copytree(tiny_zephyr, d)
    gc = json.loads((d / "generation_config.json").read_text())
    (d / "generation_config.json").write_text(json.dumps({**gc, "do_sample": False, "temperature": 0.5}))
    args = ("generate", str(d), "--prompt", "Hello", "--max-new-tokens", "3", "--dtype", "float32")
    r = zlocal(*args)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("[16 prompt tokens"), r.stderr  # only zlocal's stats line
    env = {**ENV, "ZLOCAL_LOG": "warning"}
    loud = subprocess.run(
        [sys.executable, "-m", "zlocal", *args], capture_output=True, text=True, env=env, check=False
    )
    assert "transformers" in loud.stderr, loud.stderr


class _Tty(io.StringIO):
    def isatty(self):
        return True


def _args(**kw):
    base = dict(model="m", plan="auto", dtype=None, device=None, max_context=None, chat_template=None,
                allow_pickle=False, download=False, quiet=False, json=False)  # fmt: skip
    return argparse.Namespace(**{**base, **kw})


@pytest.fixture
def fake_load(monkeypatch):
    """zlocal.load replaced by one that sends three stages of progress events."""
    from types import SimpleNamespace

    from zlocal.inference import runtime
    from zlocal.progress import report

    def load(model, progress=None, **kw):
        for stage, total, unit in (
            ("read", 4 << 20, "bytes"),
            ("prepare", 3, "layers"),
            ("ready", 1, "steps"),
        ):
            for done in range(0, total + 1, max(1, total // 4)):
                report(progress, stage, done, total, unit)
        info = SimpleNamespace(model=model, path="/x/smollm2-135m-instruct", source="embedded")
        return SimpleNamespace(info=info, sampling_defaults={"top_k": 7})

    monkeypatch.setattr(runtime, "load", load)


@pytest.mark.parametrize(
    ("tty", "flags", "bar"),
    [(True, {}, True), (True, {"quiet": True}, False), (True, {"json": True}, False), (False, {}, False)],
)
def test_load_progress_bar_only_on_a_terminal(monkeypatch, fake_load, tty, flags, bar):
    from zlocal.commands._common import load_runtime

    err = _Tty() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    rt = load_runtime(_args(**flags))
    out = err.getvalue()
    assert ("loading m (plan auto)" in out and "read" in out and "prepare" in out) == bar, out
    if not bar:
        assert out == ""
    # the embedded model's per-model defaults sit over the model's own
    assert rt.sampling_defaults == {"top_k": 7, "temperature": 0.0}


def test_per_model_sampling_defaults():
    from zlocal.checkpoint.embedded import sampling_defaults_for

    assert sampling_defaults_for("smollm2-135m", "/c/models/smollm2-135m-instruct", "embedded") == {
        "temperature": 0.0
    }
    assert sampling_defaults_for("HuggingFaceTB/SmolLM2-135M-Instruct", "/hub/snapshots/abc", "hf-cache")
    assert sampling_defaults_for("HuggingFaceH4/zephyr-7b-beta", "/hub/snapshots/abc", "hf-cache") == {}


def _converted(tmp_path, tiny_zephyr, source):
    from zlocal.checkpoint.manifest import Manifest, write_manifest

    out = tmp_path / "quant"
    shutil.copytree(tiny_zephyr, out)
    write_manifest(out, Manifest(method="int8", bits=8, group_size=None, source=source))
    return out


def test_eval_defaults_its_reference_to_the_recorded_source(tmp_path, tiny_zephyr, monkeypatch):
    from zlocal.checkpoint.manifest import sha256_file
    from zlocal.commands.eval import default_reference

    src = tmp_path / "src-model"
    shutil.copytree(tiny_zephyr, src)
    digest = sha256_file(src / "model.safetensors")
    monkeypatch.chdir(tmp_path)
    quant = _converted(tmp_path, tiny_zephyr, {"name": "src-model", "repo_id": None,
                                               "shards": {"model.safetensors": digest}})  # fmt: skip
    assert default_reference(str(quant)) == str(src.resolve())
    # same name, other weights: not taken for the source
    (quant / "zlocal.json").unlink()
    quant = _converted(
        tmp_path / "x", tiny_zephyr, {"name": "src-model", "shards": {"model.safetensors": "0" * 64}}
    )
    r = subprocess.run([sys.executable, "-m", "zlocal", "eval", str(quant)], capture_output=True, text=True,
                       env=ENV, cwd=tmp_path, check=False)  # fmt: skip
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "--reference" in lines[0] and "src-model" in lines[0], (
        r.stderr
    )


def test_embedded_conversion_keeps_transformers_bar_off_stderr(tmp_path, monkeypatch, capsys):
    from zlocal.checkpoint import embedded

    def fake_convert(src, tmp, dtype):
        print("Converting and de-quantizing GGUF tensors...: 100%|##########| 272/272", file=sys.stderr)
        for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
            (tmp / name).write_text("{}")

    monkeypatch.setenv("ZLOCAL_HOME", str(tmp_path))
    monkeypatch.setattr(embedded, "gguf_path", lambda: tmp_path / "x.gguf")
    monkeypatch.setattr(embedded, "_convert", fake_convert)
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: object())
    path = embedded.ensure_embedded_model()
    assert path == tmp_path / "models" / embedded.EMBEDDED_DIRNAME and (path / "config.json").is_file()
    assert "Converting" not in capsys.readouterr().err


def test_library_prints_during_load_go_to_logging(monkeypatch, capsys, caplog):
    from types import SimpleNamespace

    from zlocal.commands._common import load_runtime
    from zlocal.inference import runtime

    def load(model, **kw):
        print("INFO  GPT-QModel banner")  # gptqmodel prints on import, on stdout
        print("Loading weights: 100%|####| 3/3\rdone", file=sys.stderr)
        print("zlocal: a note of zlocal's own", file=sys.stderr)
        return SimpleNamespace(
            info=SimpleNamespace(model=model, path="/m", source="local"), sampling_defaults={}
        )

    monkeypatch.setattr(runtime, "load", load)
    with caplog.at_level("INFO", logger="libraries.output"):
        load_runtime(_args(quiet=True))
    out, err = capsys.readouterr()
    assert out == "" and err == "zlocal: a note of zlocal's own\n"
    assert "INFO  GPT-QModel banner" in caplog.text and "Loading weights" in caplog.text
