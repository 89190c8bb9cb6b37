"""Model resolution: local dirs, the HF cache (offline first), aliases, safety refusals."""

from __future__ import annotations

import shutil

import pytest

from zlocal.checkpoint.resolve import resolve_model
from zlocal.errors import CheckpointError, ModelNotFoundError


def _fake_hf_cache(root, repo_id, src):
    """Lay out a checkpoint the way huggingface_hub stores it: blobs, snapshots, refs."""
    repo_dir = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo_dir / "snapshots" / ("a" * 40)
    shutil.copytree(src, snap)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text("a" * 40)
    return snap


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    return root


def test_local_directory(tiny_zephyr):
    r = resolve_model(str(tiny_zephyr))
    assert r.source == "local" and r.path == tiny_zephyr.resolve()


def test_repo_id_found_in_hf_cache(hf_cache, tiny_zephyr, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap = _fake_hf_cache(hf_cache, "HuggingFaceH4/zephyr-7b-beta", tiny_zephyr)
    for name in ("HuggingFaceH4/zephyr-7b-beta", "zephyr-7b-beta"):
        r = resolve_model(name)
        assert r.source == "hf-cache" and r.path == snap and r.repo_id == "HuggingFaceH4/zephyr-7b-beta"


def test_missing_repo_names_the_cache_path(hf_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model("zephyr-7b-alpha")
    assert str(hf_cache) in str(e.value) and "HF_HUB_OFFLINE" in str(e.value)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(ModelNotFoundError, match="--download"):
        resolve_model("someone/some-model")


def test_garbage_name_is_not_found():
    with pytest.raises(ModelNotFoundError, match="alias"):
        resolve_model("no such model")


def test_pickle_only_checkpoint_refused_without_opt_in(tmp_path, tiny_zephyr):
    import torch
    from safetensors.torch import load_file

    d = tmp_path / "pickled"
    shutil.copytree(tiny_zephyr, d)
    sd = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    torch.save(sd, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        resolve_model(str(d))
    assert resolve_model(str(d), allow_pickle=True).weights_format == "pickle"


def test_pickle_opt_in_loads_with_weights_only(tmp_path, tiny_zephyr):
    import torch
    from safetensors.torch import load_file

    import zlocal

    d = tmp_path / "pickled"
    shutil.copytree(tiny_zephyr, d)
    sd = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    torch.save(sd, d / "pytorch_model.bin")
    rt = zlocal.load(str(d), allow_pickle=True, dtype="float32", max_context=64)
    assert rt.generate("Hello", temperature=0, max_new_tokens=3).completion_tokens >= 1


def test_missing_config_and_broken_config(tmp_path, tiny_zephyr):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_zephyr, d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json"):
        resolve_model(str(d))
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json"):
        resolve_model(str(d))


def test_corrupt_weights_give_checkpoint_error(tmp_path, tiny_zephyr):
    import zlocal

    d = tmp_path / "ckpt"
    shutil.copytree(tiny_zephyr, d)
    (d / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="weights"):
        zlocal.load(str(d), dtype="float32")


def test_unsupported_architecture(tmp_path, tiny_zephyr):
    import json

    import zlocal

    d = tmp_path / "ckpt"
    shutil.copytree(tiny_zephyr, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "bert"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not supported"):
        zlocal.load(str(d))


def test_embedded_alias_resolves_to_converted_checkpoint(smollm2):
    r = resolve_model("smollm2-135m")
    assert r.source == "embedded" and r.path == smollm2
    assert (r.path / "model.safetensors").is_file() and (r.path / "chat_template.jinja").is_file()


class _RunsCode:
    """Unpickling this would call os.makedirs(marker): proof of code execution, harmless."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.makedirs, (self.marker,))


def _pickled_checkpoint(tmp_path, tiny_zephyr, payload):
    import torch

    d = tmp_path / "pickled"
    shutil.copytree(tiny_zephyr, d)
    (d / "model.safetensors").unlink()
    torch.save(payload, d / "pytorch_model.bin")
    return d


def test_malicious_pickle_with_opt_in_is_refused_without_running_it(tmp_path, tiny_zephyr):
    import zlocal

    marker = tmp_path / "pwned"
    d = _pickled_checkpoint(tmp_path, tiny_zephyr, {"w": _RunsCode(marker)})
    for attempt in (
        lambda: resolve_model(str(d), allow_pickle=True),
        lambda: zlocal.load(str(d), allow_pickle=True, dtype="float32", max_context=64),
    ):
        with pytest.raises(CheckpointError, match=r"weights_only=True\) refuses it") as e:
            attempt()
        assert "\n" not in str(e.value) and ("makedirs" in str(e.value) or "posix" in str(e.value))
    assert not marker.exists()


def test_pickle_that_is_not_a_state_dict_is_refused(tmp_path, tiny_zephyr):
    d = _pickled_checkpoint(tmp_path, tiny_zephyr, [1, 2, 3])
    with pytest.raises(CheckpointError, match="not a plain state dict"):
        resolve_model(str(d), allow_pickle=True)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x02truncated")
    with pytest.raises(CheckpointError, match="refuses it"):
        resolve_model(str(d), allow_pickle=True)


def test_pickle_check_reads_the_shards_a_load_reads(tmp_path, tiny_zephyr):
    import json

    import torch
    from safetensors.torch import load_file

    sd = load_file(tiny_zephyr / "model.safetensors")
    d = _pickled_checkpoint(tmp_path, tiny_zephyr, sd)
    # fine-tuning leftovers are pickles of other things; no loader reads them
    torch.save({"lr": 1e-4, "steps": [1, 2]}, d / "training_args.bin")
    assert resolve_model(str(d), allow_pickle=True).weights_format == "pickle"
    # with an index, the listed shards are checked, and only they
    (d / "pytorch_model.bin").unlink()
    names = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    keys = sorted(sd)
    torch.save({k: sd[k] for k in keys[:5]}, d / names[0])
    torch.save({k: sd[k] for k in keys[5:]}, d / names[1])
    index = {"weight_map": {k: names[0] if i < 5 else names[1] for i, k in enumerate(keys)}}
    (d / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    assert resolve_model(str(d), allow_pickle=True).weights_format == "pickle"
    torch.save({"w": _RunsCode(tmp_path / "pwned")}, d / names[1])
    with pytest.raises(CheckpointError, match=r"00002-of-00002\.bin: torch\.load"):
        resolve_model(str(d), allow_pickle=True)
    assert not (tmp_path / "pwned").exists()
