"""The quality report's streamed path (one decoder layer at a time) against the whole-model path."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from zlocal.conversion import quality, quality_stream
from zlocal.conversion.convert import convert
from zlocal.conversion.quality import evaluate
from zlocal.errors import InvalidArgumentError


@pytest.fixture(scope="module")
def tiny_bnb(tiny_zephyr, tmp_path_factory):
    root = tmp_path_factory.mktemp("bnb")
    return {m: convert(tiny_zephyr, root / m, m, evaluate=False, quiet=True).out for m in ("nf4", "int8")}


def _same(a, b, ppl_rel=1e-5, kl_rel=1e-4, top1_abs=0.0):
    assert [k.kind for k in a.kinds] == [k.kind for k in b.kinds]
    for x, y in zip(a.kinds, b.kinds, strict=True):
        assert x.tokens == y.tokens
        assert x.reference_ppl == pytest.approx(y.reference_ppl, rel=ppl_rel)
        assert x.ppl == pytest.approx(y.ppl, rel=ppl_rel)
        assert x.kl_mean == pytest.approx(y.kl_mean, rel=kl_rel, abs=2e-6)
        assert x.top1_agreement == pytest.approx(y.top1_agreement, abs=top1_abs)


@pytest.mark.parametrize("method", ["reference", "nf4", "int8"])
def test_streamed_matches_whole_model_tiny(method, tiny_zephyr, tiny_bnb):
    # 64-token windows run past the tiny model's 48-token sliding window, so its mask matters
    model = tiny_zephyr if method == "reference" else tiny_bnb[method]
    s = evaluate(model, tiny_zephyr, max_tokens=64, window=64, stream=True)
    w = evaluate(model, tiny_zephyr, max_tokens=64, window=64, stream=False)
    assert s.path == "streamed layer by layer" and w.path == "whole models, one after the other"
    assert s.mode == w.mode
    _same(s, w)
    assert (s.top1_agreement < 1) == (method != "reference")  # the converted side really differs


def test_streamed_matches_whole_model_smollm2(smollm2, tmp_path):
    out = convert(smollm2, tmp_path / "nf4", "nf4", evaluate=False, quiet=True).out
    s = evaluate(out, smollm2, max_tokens=64, window=64, stream=True)
    w = evaluate(out, smollm2, max_tokens=64, window=64, stream=False)
    _same(s, w, ppl_rel=1e-4, kl_rel=1e-3, top1_abs=2e-3)
    assert s.ppl_change_pct > 1 and s.kl_mean > 0.05  # nf4 on a 135M model is visibly lossy


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None, reason="needs gptqmodel")
def test_streamed_gptq_matches_whole_model(tiny_zephyr, tmp_path):
    """GPTQ layers are rebuilt as s * (q - z); the whole-model path runs gptqmodel's kernel."""
    out = convert(
        tiny_zephyr, tmp_path / "g", "gptq4", group_size=32, samples=2, seq_len=64, tune_epochs=0,
        evaluate=False, quiet=True,
    )  # fmt: skip
    s = evaluate(out.out, tiny_zephyr, max_tokens=64, window=64, stream=True)
    w = evaluate(out.out, tiny_zephyr, max_tokens=64, window=64, stream=False)
    assert s.mode == "weight-only (GPTQ weights dequantized)" and w.mode == "native"
    _same(s, w, ppl_rel=1e-4, kl_rel=2e-2, top1_abs=0.02)
    assert s.kl_mean > 1e-6


def test_one_decoder_layer_at_a_time(tiny_zephyr, tiny_bnb, monkeypatch):
    """Whenever a layer is lent its weights, no other decoder layer holds any, on either side."""
    held, lent = [], []
    original = quality_stream.Skeleton.lend

    def lend(self, module, side, prefix):
        original(self, module, side, prefix)
        lent.append(prefix)
        held.append(sum(any(not p.is_meta for p in layer.parameters()) for layer in self.inner.layers))

    trims = []
    monkeypatch.setattr(quality_stream.Skeleton, "lend", lend)
    monkeypatch.setattr(quality_stream, "release_freed_memory", lambda: trims.append(len(lent)))
    evaluate(tiny_bnb["nf4"], tiny_zephyr, max_tokens=64, window=64)
    layers = [p for p in lent if p.startswith("model.layers.")]
    assert layers == ["model.layers.0.", "model.layers.1."] * 2  # reference, then the converted side
    assert max(held) == 1
    # freed heap memory goes back to the OS after every layer, so fragments do not pile up
    passes = [i + 1 for i, p in enumerate(lent) if p.startswith("model.layers.")]
    assert set(passes) <= set(trims)


def test_fallback_says_so(tiny_zephyr, tiny_bnb, monkeypatch, capsys):
    """Where streaming is impossible: whole models when the reference is small, else no numbers;
    the report and stderr say which and why."""
    monkeypatch.setattr(quality_stream, "STREAMABLE_TYPES", set())
    with pytest.raises(InvalidArgumentError, match=r"cannot stream.*'mistral' is not streamed"):
        evaluate(tiny_bnb["nf4"], tiny_zephyr, max_tokens=64, stream=True)
    r = evaluate(tiny_bnb["nf4"], tiny_zephyr, max_tokens=64)
    assert r.path == "whole models, one after the other" and "'mistral' is not streamed" in r.note
    assert r.kl_mean > 0 and r.note in r.table() and r.note in capsys.readouterr().err
    monkeypatch.setattr(quality, "WHOLE_MODEL_MAX_BYTES", 0)
    r = evaluate(tiny_bnb["nf4"], tiny_zephyr, max_tokens=64)
    assert r.path == "skipped" and r.ppl is None and r.kinds == [] and "memory bound" in r.note
    assert r.table() == f"quality report skipped: {r.note}" and r.note in capsys.readouterr().err
    assert json.loads(json.dumps(r.to_dict()))["note"] == r.note


def test_convert_records_a_skipped_report(tiny_zephyr, tmp_path, monkeypatch, capsys):
    from zlocal.cli import main

    monkeypatch.setattr(quality_stream, "STREAMABLE_TYPES", set())
    monkeypatch.setattr(quality, "WHOLE_MODEL_MAX_BYTES", 0)
    assert main(["convert", str(tiny_zephyr), str(tmp_path / "o"), "--method", "int8", "--json"]) == 0
    captured = capsys.readouterr()
    q = json.loads((tmp_path / "o" / "zlocal.json").read_text())["quality"]
    assert q["path"] == "skipped" and q["ppl"] is None and q["note"] in captured.err


def test_gptq_weight_act_order():
    """Rows naming their group through g_idx (act-order) use that group's zero and scale."""
    from zlocal.formats.gptq_cpu import unpack

    k, n, group = 64, 8, 32
    codes = torch.randint(0, 16, (k, n), dtype=torch.int32)
    packed = torch.zeros(k // 8, n, dtype=torch.int32)
    for j in range(8):
        packed |= codes[j::8] << (4 * j)
    zeros = torch.tensor([[3] * n, [9] * n], dtype=torch.int32)
    qzeros = torch.zeros(2, 1, dtype=torch.int32)
    for j in range(n):
        qzeros |= (zeros[:, j : j + 1] - 1) << (4 * j)  # the original GPTQ format stores z - 1
    scales = torch.tensor([[0.5] * n, [2.0] * n], dtype=torch.float16)
    g_idx = torch.randperm(k) % 2
    store = {"l.qweight": packed, "l.qzeros": qzeros, "l.scales": scales, "l.g_idx": g_idx.int()}
    assert torch.equal(unpack(packed, 4, 0), codes)
    w = quality_stream.gptq_weight(store, "l", {"bits": 4, "group_size": group, "checkpoint_format": "gptq"})
    want = (codes.float() - zeros[g_idx].float()) * scales[g_idx].float()
    assert torch.equal(w, want.t())
