"""Quality report: perplexity, KL divergence and top-1 agreement against the reference."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from zlocal.errors import InvalidArgumentError
from zlocal.quality import evaluate


def test_identical_models_agree_exactly(tiny_zephyr):
    r = evaluate(tiny_zephyr, tiny_zephyr, max_tokens=200, window=64)
    assert r.tokens == 200 - math.ceil(200 / 64)
    assert r.kl_mean == pytest.approx(0.0, abs=1e-6)
    assert r.top1_agreement == 1.0 and r.ppl == r.reference_ppl and r.ppl_change_pct == 0.0
    assert "top-1 token agreement" in r.table()


@pytest.fixture(scope="module")
def noisy(tiny_zephyr, tmp_path_factory):
    """The tiny model with seeded noise added to every weight: a stand-in for a lossy conversion."""
    dest = tmp_path_factory.mktemp("noisy") / "m"
    shutil.copytree(tiny_zephyr, dest)
    g = torch.Generator().manual_seed(0)
    with safe_open(str(dest / "model.safetensors"), "pt") as st:
        sd = {k: st.get_tensor(k) for k in st.keys()}  # noqa: SIM118
    noise = {k: 0.5 * v.std() * torch.randn(v.shape, generator=g) for k, v in sd.items() if v.ndim == 2}
    sd = {k: v + noise[k] if k in noise else v for k, v in sd.items()}
    save_file(sd, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def test_perturbed_model_scores_worse(tiny_zephyr, noisy, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    r = evaluate(noisy, tiny_zephyr, text=text, max_tokens=128, window=64)
    assert r.text == "t.txt" and r.tokens == 126
    assert r.kl_mean > 1e-3 and r.top1_agreement < 1.0 and r.ppl != r.reference_ppl
    # KL is a divergence: evaluate it by hand on one window to check the sign and the mean
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_zephyr)
    ids = torch.tensor(tok(text.read_text())["input_ids"][:64])[None]
    lr = torch.log_softmax(AutoModelForCausalLM.from_pretrained(tiny_zephyr)(ids).logits[0, :-1].float(), -1)
    lq = torch.log_softmax(AutoModelForCausalLM.from_pretrained(noisy)(ids).logits[0, :-1].float(), -1)
    kl_first = (lr.exp() * (lr - lq)).sum(-1).mean().item()
    assert kl_first > 0 and r.kl_mean == pytest.approx(kl_first, rel=0.5)


def test_text_too_short(tiny_zephyr, tmp_path):
    (tmp_path / "t.txt").write_text("")
    with pytest.raises(InvalidArgumentError, match="too short"):
        evaluate(tiny_zephyr, tiny_zephyr, text=tmp_path / "t.txt")


def test_cli_eval_json(tiny_zephyr, capsys):
    from zlocal.cli import main

    args = ["eval", str(tiny_zephyr), "--reference", str(tiny_zephyr), "--max-tokens", "64", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["top1_agreement"] == 1.0 and out["tokens"] == 63


def test_convert_stores_quality_in_manifest(tiny_zephyr, tmp_path, capsys):
    from zlocal.cli import main

    rc = main(["convert", str(tiny_zephyr), str(tmp_path / "o"), "--method", "nf4", "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    manifest = json.loads((tmp_path / "o" / "zlocal.json").read_text())
    q = manifest["quality"]
    assert q == result["quality"] and q["tokens"] > 500
    assert 0 < q["kl_mean"] < 1 and 0.5 < q["top1_agreement"] <= 1.0
