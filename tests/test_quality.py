"""Quality report: perplexity, KL divergence and top-1 agreement against the reference, per kind of text."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from zlocal.conversion.quality import KINDS, evaluate
from zlocal.errors import InvalidArgumentError


def test_identical_models_agree_exactly(tiny_zephyr):
    r = evaluate(tiny_zephyr, tiny_zephyr, max_tokens=200, window=64)
    assert [k.kind for k in r.kinds] == [k for k, _ in KINDS]
    assert all(k.tokens == 200 - math.ceil(200 / 64) for k in r.kinds) and r.tokens == 4 * 196
    assert r.kl_mean == pytest.approx(0.0, abs=1e-6)
    assert r.top1_agreement == 1.0 and r.ppl == r.reference_ppl and r.ppl_change_pct == 0.0
    assert r.path == "streamed layer by layer" and r.note is None
    table = r.table()
    assert all(k in table for k, _ in KINDS) and "\nmean " in table and "KL(ref || converted)" in table


@pytest.fixture(scope="module")
def noisy(tiny_zephyr, tmp_path_factory):
    """The tiny model with seeded noise added to every weight: a stand-in for a lossy conversion.

    Its first 1000 output rows are also scaled up: the random tiny model's next-token distributions
    are close to uniform, where small symmetric noise gives KL(ref || model) ~= KL(model || ref) (to
    0.01%); a head that concentrates mass on some tokens makes the two directions differ twofold."""
    dest = tmp_path_factory.mktemp("noisy") / "m"
    shutil.copytree(tiny_zephyr, dest)
    g = torch.Generator().manual_seed(0)
    with safe_open(str(dest / "model.safetensors"), "pt") as st:
        sd = {k: st.get_tensor(k) for k in st.keys()}  # noqa: SIM118
    noise = {k: 0.5 * v.std() * torch.randn(v.shape, generator=g) for k, v in sd.items() if v.ndim == 2}
    sd = {k: v + noise[k] if k in noise else v for k, v in sd.items()}
    sd["lm_head.weight"][:1000] *= 8
    save_file(sd, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def _by_hand(ref, model, ids: list[int], window: int):
    """KL(ref || model), the reversed KL, both perplexities and top-1 agreement over the windows,
    with the whole models in transformers, as the definitions say."""
    from transformers import AutoModelForCausalLM

    r_model, q_model = AutoModelForCausalLM.from_pretrained(ref), AutoModelForCausalLM.from_pretrained(model)
    kl = kl_rev = nll_r = nll_q = agree = n = 0.0
    for s in range(0, len(ids), window):
        w = torch.tensor(ids[s : s + window])[None]
        with torch.no_grad():
            lr = torch.log_softmax(r_model(w).logits[0, :-1].float(), -1)
            lq = torch.log_softmax(q_model(w).logits[0, :-1].float(), -1)
        t = w[0, 1:, None]
        kl += (lr.exp() * (lr - lq)).sum().item()
        kl_rev += (lq.exp() * (lq - lr)).sum().item()
        nll_r -= lr.gather(-1, t).sum().item()
        nll_q -= lq.gather(-1, t).sum().item()
        agree += (lr.argmax(-1) == lq.argmax(-1)).sum().item()
        n += t.shape[0]
    return kl / n, kl_rev / n, math.exp(nll_r / n), math.exp(nll_q / n), agree / n


def test_perturbed_model_scores_worse(tiny_zephyr, noisy, tmp_path):
    from transformers import AutoTokenizer

    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    r = evaluate(noisy, tiny_zephyr, text=text, max_tokens=128, window=64)
    # the user's text is one more kind after the built-in ones, and counts in the means
    mine = r.kinds[-1]
    assert [k.kind for k in r.kinds] == [*(k for k, _ in KINDS), "t.txt"] and mine.tokens == 126
    assert r.text.endswith("+ t.txt") and r.tokens == sum(k.tokens for k in r.kinds)
    assert r.kl_mean == pytest.approx(sum(k.kl_mean for k in r.kinds) / 5, abs=2e-6)
    assert r.top1_agreement == pytest.approx(sum(k.top1_agreement for k in r.kinds) / 5, abs=2e-4)
    geo = math.exp(sum(math.log(k.ppl / k.reference_ppl) for k in r.kinds) / 5)
    assert r.ppl_change_pct == pytest.approx(100 * (geo - 1), abs=2e-3)
    assert mine.kl_mean > 1e-3 and mine.top1_agreement < 1.0 and mine.ppl != mine.reference_ppl
    # every number of that kind against its definition, computed here with the whole models
    ids = AutoTokenizer.from_pretrained(tiny_zephyr)(text.read_text())["input_ids"][:128]
    kl, kl_rev, ppl_r, ppl_q, agree = _by_hand(tiny_zephyr, noisy, ids, 64)
    # the two directions differ by far more than the tolerance, so a reversed KL cannot pass
    assert abs(kl_rev - kl) > 0.05 * kl
    assert mine.kl_mean == pytest.approx(kl, rel=1e-3)
    assert mine.reference_ppl == pytest.approx(ppl_r, rel=1e-4) and mine.ppl == pytest.approx(ppl_q, rel=1e-4)
    assert mine.top1_agreement == pytest.approx(agree, abs=1e-4)


def test_text_too_short(tiny_zephyr, tmp_path):
    (tmp_path / "t.txt").write_text("")
    with pytest.raises(InvalidArgumentError, match=r"t\.txt is too short"):
        evaluate(tiny_zephyr, tiny_zephyr, text=tmp_path / "t.txt")


def test_cli_eval_json(tiny_zephyr, capsys):
    from zlocal.cli import main

    args = ["eval", str(tiny_zephyr), "--reference", str(tiny_zephyr), "--max-tokens", "64", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["top1_agreement"] == 1.0 and out["tokens"] == 4 * 63
    assert [k["tokens"] for k in out["kinds"]] == [63] * 4 and out["path"] == "streamed layer by layer"
    assert main([*args, "--whole-model"]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert whole["path"] == "whole models, one after the other" and whole["kinds"] == out["kinds"]


def test_convert_stores_quality_in_manifest(tiny_zephyr, tmp_path, capsys):
    from zlocal.cli import main

    rc = main(["convert", str(tiny_zephyr), str(tmp_path / "o"), "--method", "nf4", "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    manifest = json.loads((tmp_path / "o" / "zlocal.json").read_text())
    q = manifest["quality"]
    assert q == result["quality"] and q["tokens"] > 2000 and q["path"] == "streamed layer by layer"
    assert [k["kind"] for k in q["kinds"]] == [k for k, _ in KINDS]
    assert 0 < q["kl_mean"] < 1 and 0.5 < q["top1_agreement"] <= 1.0
