"""The prepared form: saved once after a CPU int4/int8 load, mapped (not copied) on later loads."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from zlocal.checkpoint import prepared_cache
from zlocal.checkpoint.resolve import resolve_model
from zlocal.inference.bench import cpu_plan
from zlocal.inference.loader import load_config, load_for_runtime
from zlocal.inference.prepare import prepare_decoder


@pytest.fixture
def prep_dir(tmp_path, monkeypatch):
    d = tmp_path / "prepared"
    monkeypatch.setenv("ZLOCAL_PREPARED_DIR", str(d))
    return d


@pytest.fixture
def model_copy(tiny_zephyr, tmp_path):
    dest = tmp_path / "model"
    shutil.copytree(tiny_zephyr, dest)
    return dest


def _load(path, fmt, *, cache=True, events=None):
    resolved = resolve_model(str(path))
    config = load_config(resolved)
    plan = cpu_plan(str(path), fmt, dtype="bfloat16")
    return load_for_runtime(
        resolved, config, plan=plan, cache=cache, progress=None if events is None else events.append
    )


def _greedy(model, n=6):
    ids = [1, 415, 5565, 302]
    with torch.inference_mode():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids, logits.float()


def _mapped_files() -> set[str]:
    with open("/proc/self/maps") as f:
        return {line.split()[-1] for line in f if line.strip().endswith(prepared_cache.ENTRY_WEIGHTS)}


def _in_mapping(t: torch.Tensor, path: str) -> bool:
    addr = t.data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if parts[-1] == path:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                if lo <= addr < hi:
                    return True
    return False


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_second_load_maps_the_prepared_form_and_computes_the_same(model_copy, prep_dir, fmt):
    events = []
    first = _load(model_copy, fmt, events=events)
    assert any("prepared form saved" in r for r in first.plan.reasons)
    stages = [e.stage for e in events]
    assert "read" in stages and "save" in stages and stages[-1] == "ready"
    (entry,) = prepared_cache.list_prepared()
    assert entry.format == fmt and entry.size_bytes > 0
    ids_a, logits_a = _greedy(first.model)

    events.clear()
    second = _load(model_copy, fmt, events=events)
    assert any("mapped from the prepared form" in r for r in second.plan.reasons)
    assert [e.stage for e in events] == ["map", "ready"]
    weights = os.path.join(entry.path, prepared_cache.ENTRY_WEIGHTS)
    layer = prepare_decoder(second.model).layers[0]
    # the fused kernels' weights and the HF modules' views point into the mapped file
    assert _in_mapping(layer.qkv.weight, weights)
    assert _in_mapping(second.model.model.layers[0].self_attn.k_proj.weight, weights)
    assert _in_mapping(second.model.model.embed_tokens.weight, weights)
    ids_b, logits_b = _greedy(second.model)
    assert ids_a == ids_b
    torch.testing.assert_close(logits_a, logits_b, rtol=0, atol=0)


def test_changed_source_misses_and_broken_entry_falls_back(model_copy, prep_dir):
    _load(model_copy, "int4")
    (old,) = prepared_cache.list_prepared()
    shard = next(model_copy.glob("*.safetensors"))
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the source changed
    again = _load(model_copy, "int4")
    assert not any("mapped" in r for r in again.plan.reasons)
    assert len(prepared_cache.list_prepared()) == 2
    # a truncated weights file is dropped and the model is read from the checkpoint
    new = next(e for e in prepared_cache.list_prepared() if e.key != old.key)
    with open(os.path.join(new.path, prepared_cache.ENTRY_WEIGHTS), "r+b") as f:
        f.truncate(100)
    third = _load(model_copy, "int4")
    assert not any("mapped" in r for r in third.plan.reasons)
    assert _greedy(third.model)[0] == _greedy(again.model)[0]


def test_cache_off_cap_and_dense_plans_write_nothing(model_copy, prep_dir, monkeypatch):
    _load(model_copy, "int4", cache=False)
    assert prepared_cache.list_prepared() == []
    _load(model_copy, "bf16")  # dense: nothing to prepare
    assert prepared_cache.list_prepared() == []
    monkeypatch.setenv("ZLOCAL_PREPARED_CACHE_MAX_GB", "0.0001")
    lp = _load(model_copy, "int4").plan
    assert prepared_cache.list_prepared() == [] and not any("prepared" in r for r in lp.reasons)
    monkeypatch.setenv("ZLOCAL_PREPARED_CACHE", "0")
    monkeypatch.delenv("ZLOCAL_PREPARED_CACHE_MAX_GB")
    _load(model_copy, "int4", cache=None)
    assert prepared_cache.list_prepared() == []


def test_cap_evicts_least_recently_used_and_remove_clears(model_copy, prep_dir, monkeypatch):
    _load(model_copy, "int4")
    _load(model_copy, "int8")
    int4, int8 = sorted(prepared_cache.list_prepared(), key=lambda e: e.bits)
    prepared_cache.touch(prepared_cache.Path(int4.path))  # int4 used last: int8 goes first
    monkeypatch.setenv("ZLOCAL_PREPARED_CACHE_MAX_GB", str((int4.size_bytes + int8.size_bytes) / 2**30))
    assert prepared_cache.evict_for(1)
    assert [e.key for e in prepared_cache.list_prepared()] == [int4.key]
    with pytest.raises(prepared_cache.InvalidArgumentError, match="zlocal list"):
        prepared_cache.remove_prepared("nope-nope")
    assert prepared_cache.remove_prepared(int4.key[:8]) == int4.size_bytes
    assert prepared_cache.list_prepared() == []


def test_record_names_every_module(model_copy, prep_dir):
    _load(model_copy, "int4")
    (entry,) = prepared_cache.list_prepared()
    doc = json.loads((prepared_cache.Path(entry.path) / prepared_cache.ENTRY_META).read_text())
    assert doc["modules"]["model.layers.0.self_attn.q_proj"]["kind"] == "Int4WeightOnlyLinear"
    assert doc["modules"]["lm_head"]["kind"] == "Int8WeightOnlyLinear"
    assert "fused" in doc["layers"][0]["qkv"] and "module" in doc["layers"][0]["o"]
    blobs = doc["blobs"]
    assert all(b["offset"] % 4096 == 0 for b in blobs)


def test_clear_removes_entries_and_temporaries_only(model_copy, prep_dir, monkeypatch):
    _load(model_copy, "int4")
    mine = prep_dir / "notes"  # ZLOCAL_PREPARED_DIR may point at a folder holding other things
    mine.mkdir()
    stale, fresh = prep_dir / ".tmp-dead-1", prep_dir / ".tmp-busy-2"
    stale.mkdir()
    fresh.mkdir()
    os.utime(stale, (1, 1))  # left by a killed writer long ago
    monkeypatch.setenv("ZLOCAL_PREPARED_CACHE_MAX_GB", "inf")  # not a crash: no cap
    assert prepared_cache.evict_for(1)
    assert not stale.exists() and fresh.exists()
    assert prepared_cache.clear_prepared() > 0
    assert sorted(p.name for p in prep_dir.iterdir()) == ["notes"]


def test_mapped_load_keeps_the_generation_config(model_copy, prep_dir):
    first = _load(model_copy, "int8").model.generation_config.to_dict()
    second = _load(model_copy, "int8")
    assert any("mapped" in r for r in second.plan.reasons)
    assert second.model.generation_config.to_dict() == first
