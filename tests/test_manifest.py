"""zlocal.json: hashes written at conversion time, and `zlocal verify` catching any change."""

from __future__ import annotations

import json

import pytest

from zlocal.checkpoint.manifest import MANIFEST_NAME, Manifest, read_manifest, sha256_file, verify
from zlocal.conversion.convert import convert
from zlocal.errors import VerificationError


@pytest.fixture(scope="module")
def converted(tiny_zephyr, tmp_path_factory):
    return convert(tiny_zephyr, tmp_path_factory.mktemp("m") / "int8", "int8", evaluate=False, quiet=True)


@pytest.fixture
def copy(converted, tmp_path):
    import shutil

    return shutil.copytree(converted.out, tmp_path / "c")


def test_manifest_hashes_every_file(converted):
    from pathlib import Path

    out = Path(converted.out)
    m = read_manifest(out)
    names = {p.name for p in out.iterdir() if p.name != MANIFEST_NAME}
    assert set(m.files) == names
    for name, entry in m.files.items():
        assert entry.sha256 == sha256_file(out / name) and entry.bytes == (out / name).stat().st_size
    assert m.method == "int8" and m.bits == 8 and m.group_size is None
    assert Manifest.from_dict(json.loads((out / MANIFEST_NAME).read_text())) == m


def test_verify_ok_then_flipped_byte_detected(copy):
    assert verify(copy).ok
    shard = copy / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    r = verify(copy)
    assert not r.ok and r.mismatched == ["model.safetensors"] and "changed: model.safetensors" in r.summary()


def test_verify_reports_missing_and_unexpected(copy):
    (copy / "tokenizer.json").unlink()
    (copy / "extra.safetensors").write_bytes(b"x")
    r = verify(copy)
    assert r.missing == ["tokenizer.json"] and r.unexpected == ["extra.safetensors"] and not r.ok


def test_verify_rejects_path_in_manifest(copy):
    m = json.loads((copy / MANIFEST_NAME).read_text())
    m["files"]["../escape"] = {"sha256": "0" * 64, "bytes": 1}
    (copy / MANIFEST_NAME).write_text(json.dumps(m))
    assert verify(copy).missing == ["../escape"]


def test_missing_or_broken_manifest(tmp_path, copy):
    with pytest.raises(VerificationError, match=r"no zlocal\.json"):
        verify(tmp_path)
    (copy / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(VerificationError, match="unreadable"):
        verify(copy)


def test_cli_verify_exit_codes(copy, capsys):
    from zlocal.cli import main

    assert main(["verify", str(copy), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    (copy / "config.json").write_text("{}")
    assert main(["verify", str(copy)]) == 8
    assert "changed: config.json" in capsys.readouterr().out


def test_source_recorded_by_name_and_hashes_not_path(converted, tiny_zephyr):
    """The manifest travels with the checkpoint: it names the source and hashes its shards, and
    says nothing about where it sat on the converting machine."""
    from pathlib import Path

    text = (Path(converted.out) / MANIFEST_NAME).read_text()
    m = json.loads(text)
    assert m["manifest_version"] == 2
    assert set(m["source"]) == {"name", "repo_id", "model_type", "weights_format", "shards"}
    assert m["source"]["name"] == tiny_zephyr.name
    assert m["source"]["shards"] == {"model.safetensors": sha256_file(tiny_zephyr / "model.safetensors")}
    assert str(tiny_zephyr.parent) not in text


def test_version_1_manifest_still_reads_and_verifies(copy, capsys):
    """Manifests written before version 2 kept the source's absolute path; they stay readable."""
    from zlocal.cli import main

    m = json.loads((copy / MANIFEST_NAME).read_text())
    m["manifest_version"] = 1
    m["source"]["path"] = "/home/someone/models/zephyr"
    m["conversion"] = {"seconds": 1.0, "options": {"calibration": "builtin"}}
    (copy / MANIFEST_NAME).write_text(json.dumps(m))
    old = read_manifest(copy)
    assert old.manifest_version == 1 and old.source["path"] == "/home/someone/models/zephyr"
    assert verify(copy).ok
    assert main(["verify", str(copy)]) == 0 and capsys.readouterr().out.startswith("OK:")
