"""`zlocal list`, `rm`, `pull` and `cache clear` on a made-up HF cache, zlocal cache and prepared cache."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

COMMIT = "a" * 40


def _hf_repo(hub, repo_id, config):
    """A repo laid out the way huggingface_hub caches it: blobs, refs/main, snapshots/COMMIT/*."""
    root = hub / f"models--{repo_id.replace('/', '--')}"
    snap = root / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (root / "blobs").mkdir()
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    for name, data in {"config.json": json.dumps(config).encode(), "model.safetensors": b"x" * 1000}.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    return root


@pytest.fixture
def caches(tmp_path):
    hub = tmp_path / "hub"
    _hf_repo(hub, "org/gptq-model", {"quantization_config": {"quant_method": "gptq", "bits": 4}})
    _hf_repo(
        hub,
        "org/nf4-model",
        {
            "quantization_config": {
                "quant_method": "bitsandbytes",
                "load_in_4bit": True,
                "bnb_4bit_quant_type": "nf4",
            }
        },
    )
    home = tmp_path / "zhome"
    model = home / "models" / "smollm2-135m-instruct"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))
    (model / "model.safetensors").write_bytes(b"y" * 2048)
    entry = home / "prepared" / "0123456789abcdef"
    entry.mkdir(parents=True)
    meta = {"model": "smollm2-135m", "source": str(model), "format": "int8", "bits": 8, "created": 1.0}
    (entry / "prepared.json").write_text(json.dumps(meta))
    (entry / "weights.bin").write_bytes(b"z" * 512)
    env = {
        k: v for k, v in os.environ.items() if k not in ("HF_HOME", "ZLOCAL_PREPARED_DIR", "XDG_CACHE_HOME")
    }
    env.update(HF_HUB_CACHE=str(hub), ZLOCAL_HOME=str(home), HF_HUB_OFFLINE="1")
    return env, hub, home, entry


def _run(env, *args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "zlocal", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


def _one_line(r, needle):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and needle in lines[0], r.stderr


def test_list_shows_both_caches_and_prepared_forms(caches):
    env, *_ = caches
    r = _run(env, "list", "--json")
    assert r.returncode == 0, r.stderr
    rows = {m["name"]: m for m in json.loads(r.stdout)}
    assert set(rows) == {"org/gptq-model", "org/nf4-model", "smollm2-135m"}
    assert (rows["org/gptq-model"]["format"], rows["org/gptq-model"]["bits"]) == ("gptq", 4)
    assert (rows["org/nf4-model"]["format"], rows["org/nf4-model"]["bits"]) == ("bnb-nf4", 4)
    assert (rows["smollm2-135m"]["format"], rows["smollm2-135m"]["bits"]) == ("bf16", 16)
    assert rows["org/gptq-model"]["size_bytes"] >= 1000 and rows["smollm2-135m"]["size_bytes"] >= 2048
    assert [p["key"] for p in rows["smollm2-135m"]["prepared"]] == ["0123456789abcdef"]
    table = _run(env, "list").stdout
    assert "org/nf4-model" in table and "bnb-nf4" in table and "0123456789ab" in table


def test_list_does_not_import_torch(caches):
    env, *_ = caches
    code = "import sys; from zlocal.cli import main; main(['list', '--json']); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert r.stdout.strip().splitlines()[-1] == "False", r.stderr


def test_rm_asks_and_refuses_without_a_terminal(caches):
    env, _, _, entry = caches
    _one_line(_run(env, "rm", "0123456"), "pass -y")
    assert entry.is_dir()
    r = _run(env, "rm", "0123456", "-y")
    assert r.returncode == 0 and not entry.exists(), r.stderr
    _one_line(_run(env, "rm", "no-such-thing", "-y"), "zlocal list")


def test_rm_names_what_it_deletes_in_the_hf_cache(caches):
    env, hub, home, entry = caches
    _one_line(_run(env, "rm", "org/gptq-model"), "org/gptq-model from the Hugging Face cache")
    r = _run(env, "rm", "org/gptq-model", "--yes")
    assert r.returncode == 0, r.stderr
    assert "org/gptq-model from the Hugging Face cache" in r.stderr
    assert not (hub / "models--org--gptq-model" / "snapshots" / COMMIT).exists()
    assert (hub / "models--org--nf4-model" / "snapshots" / COMMIT / "config.json").is_file()  # same commit id
    r = _run(env, "rm", "smollm2-135m", "-y")
    assert r.returncode == 0 and not (home / "models" / "smollm2-135m-instruct").exists(), r.stderr
    assert "and its 1 prepared form" in r.stderr and not entry.exists()


def test_cache_clear(caches):
    env, _, home, entry = caches
    _one_line(_run(env, "cache", "clear"), "pass -y")
    assert entry.is_dir()
    r = _run(env, "cache", "clear", "-y")
    assert r.returncode == 0 and not entry.exists(), r.stderr
    assert (home / "models" / "smollm2-135m-instruct").is_dir()  # models stay
    assert "empty" in _run(env, "cache", "clear", "-y").stdout


def test_pull_offline_is_one_line(caches):
    env, *_ = caches
    r = _run(env, "pull", "HuggingFaceH4/zephyr-7b-beta")
    _one_line(r, "HF_HUB_OFFLINE")
    _one_line(_run(env, "pull", "not a repo"), "not a Hugging Face repo id")
