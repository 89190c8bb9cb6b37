"""Scale tuning after GPTQ (zlocal.conversion.tune_scales) on the tiny fixture: the layer-streamed reference
equals the source model, the student equals the GPTQ checkpoint, and what is written is what was measured."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil

import pytest
import torch

from zlocal.checkpoint.manifest import verify
from zlocal.conversion.convert import convert
from zlocal.errors import InvalidArgumentError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gptqmodel") is None or importlib.util.find_spec("optimum") is None,
    reason="GPTQ tests need gptqmodel and optimum (pip install 'zlocal[gptq]')",
)


def _windows(tok, n=4, seq=64):
    from zlocal.conversion.quality import builtin_text
    from zlocal.conversion.quantize_gptq import calibration_samples

    return [d["input_ids"] for d in calibration_samples(tok, builtin_text("calibration.txt"), n, seq)]


@pytest.fixture(scope="module")
def tiny_gptq4(tiny_zephyr, tmp_path_factory):
    """GPTQ's own 4-bit result, scales untouched."""
    out = tmp_path_factory.mktemp("tune") / "gptq4"
    convert(
        tiny_zephyr,
        out,
        "gptq4",
        group_size=32,
        samples=4,
        seq_len=64,
        tune_epochs=0,
        evaluate=False,
        quiet=True,
    )
    return out


def _tensors(path):
    from safetensors import safe_open

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})  # noqa: SIM118
    return out


def test_reference_is_the_source_model(tiny_zephyr, tiny_gptq4, mistral_tokenizer):
    from transformers import AutoModelForCausalLM

    from zlocal.conversion.tune_scales import build_student, source_logprobs

    ids = torch.tensor(_windows(mistral_tokenizer, 2))
    model, tuned, bits, group = build_student(tiny_gptq4)
    assert (bits, group) == (4, 32) and len(tuned) == 7 * 2
    refs = source_logprobs(model, tiny_zephyr, ids)
    src = AutoModelForCausalLM.from_pretrained(tiny_zephyr, dtype=torch.float32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = torch.log_softmax(src(input_ids=ids).logits.float(), -1)
    got = torch.stack(refs).float()
    assert got.shape == want.shape
    # 64-token windows pass the fixture's 48-token sliding window: the layers get the model's own mask
    assert (got - want).abs().max() < 0.01
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.95


def test_student_is_the_gptq_checkpoint(tiny_gptq4):
    from transformers import AutoModelForCausalLM

    from zlocal.conversion.tune_scales import build_student

    ids = torch.tensor([[1, 22557, 1526, 28725, 910, 460, 368, 28804]])
    model, _, _, _ = build_student(tiny_gptq4)
    gptq = AutoModelForCausalLM.from_pretrained(tiny_gptq4, device_map="cpu", dtype=torch.float32)
    with torch.no_grad():
        got = model(input_ids=ids).logits[0].float()
        want = gptq(input_ids=ids).logits[0].float()
    cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    assert cos.min() > 0.999


def test_tuning_writes_the_scales_it_measured(tiny_zephyr, tiny_gptq4, mistral_tokenizer, tmp_path):
    from zlocal.conversion.tune_scales import _heldout_kl, build_student, source_logprobs, tune_scales

    out = tmp_path / "tuned"
    shutil.copytree(tiny_gptq4, out)
    # one window four times: the held-out one is also trained on, so its KL must fall (on a random
    # model, distinct 64-token windows barely inform each other)
    windows = _windows(mistral_tokenizer, 4)[:1] * 4
    r = tune_scales(tiny_zephyr, out, windows, epochs=3, lr=1e-2, quiet=True)
    assert (r.train_windows, len(r.heldout_windows), r.modules) == (3, 1, 14)
    assert r.best_epoch >= 1 and r.heldout_kl_after < r.heldout_kl_before
    before, after = _tensors(tiny_gptq4), _tensors(out)
    assert before.keys() == after.keys()
    for k in before:
        if k.endswith(".scales"):
            assert after[k].dtype == before[k].dtype and after[k].shape == before[k].shape
        else:  # codes, zero points, norms and embeddings are GPTQ's
            assert torch.equal(before[k], after[k]), k
    changed = sum(not torch.equal(before[k], after[k]) for k in before if k.endswith(".scales"))
    assert changed == 14
    # the held-out KL of the written checkpoint is the one reported (float16 scales round a little)
    model, _, _, _ = build_student(out)
    ids = torch.tensor(windows)
    refs = source_logprobs(model, tiny_zephyr, ids)
    kl = _heldout_kl(model, ids, refs, r.heldout_windows)
    assert abs(kl - r.heldout_kl_after) <= 0.02 * r.heldout_kl_after


def test_no_better_epoch_leaves_the_checkpoint_untouched(
    tiny_zephyr, tiny_gptq4, mistral_tokenizer, tmp_path
):
    from zlocal.conversion.tune_scales import tune_scales

    out = tmp_path / "same"
    shutil.copytree(tiny_gptq4, out)
    digest = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in out.glob("*.safetensors")}
    r = tune_scales(tiny_zephyr, out, _windows(mistral_tokenizer, 2), epochs=1, lr=0.0, quiet=True)
    assert r.best_epoch == 0 and r.heldout_kl_after == r.heldout_kl_before
    assert digest == {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in out.glob("*.safetensors")}


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"method": "gptq4", "tune_epochs": -1}, "--tune-epochs must be >= 0"),
        ({"method": "gptq4", "samples": 1}, "--samples 2 or more"),
        ({"method": "nf4", "tune_epochs": 2}, "apply to gptq4/gptq8 only"),
    ],
)
def test_tuning_options_are_checked_first(tiny_zephyr, tmp_path, kwargs, message):
    with pytest.raises(InvalidArgumentError, match=message):
        convert(tiny_zephyr, tmp_path / "o", evaluate=False, quiet=True, **kwargs)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_convert_records_the_tuning(tiny_zephyr, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "g4"
    convert(tiny_zephyr, out, "gptq4", group_size=32, samples=4, seq_len=64, evaluate=False, quiet=True)
    assert verify(out).ok
    conv = json.loads((out / "zlocal.json").read_text())["conversion"]
    assert conv["options"]["tune_epochs"] == 8
    t = conv["scale_tuning"]
    assert t["epochs"] == 8 and t["heldout_kl_after"] <= t["heldout_kl_before"] and t["modules"] == 14
    assert len(t["heldout_windows"]) == 1 and t["train_windows"] == 3
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert model.generate(torch.tensor([[1, 22557]]), max_new_tokens=3, do_sample=False).shape[1] == 5


def test_tuning_default_follows_bits_and_size():
    from zlocal.conversion.quantize_gptq import TUNE_EPOCHS, linear_params, plan_gptq

    mistral_7b = {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 32768,
    }
    small = {**mistral_7b, "num_hidden_layers": 2}
    assert linear_params(mistral_7b) == 6_979_321_856  # Mistral-7B's 7.24B less embeddings and head
    kw = {"group_size": None, "samples": None, "seq_len": None, "calibration": None}
    assert plan_gptq(small, bits=4, **kw).tune_epochs == TUNE_EPOCHS
    assert plan_gptq(small, bits=8, **kw).tune_epochs == 0
    big = plan_gptq(mistral_7b, bits=4, **kw)
    assert big.tune_epochs == 0 and "--tune-epochs 8 runs it" in big.tune_note
    assert plan_gptq(mistral_7b, bits=4, tune_epochs=2, **kw).tune_epochs == 2
    # the source's log-probabilities must fit: 64 x 2048 tokens x 32000 float16 is 7.8 GiB
    too_many = {**kw, "samples": 64, "seq_len": 2048}
    with pytest.raises(InvalidArgumentError, match=r"7\.8 GiB"):
        plan_gptq({**small, "vocab_size": 32000}, bits=4, **too_many)
    assert plan_gptq({**small, "vocab_size": 32000}, bits=4, tune_epochs=0, **too_many).tune_epochs == 0


def test_cli_tune_epochs_error_is_one_line(tiny_zephyr, tmp_path, capsys):
    from zlocal.cli import main

    argv = ["convert", str(tiny_zephyr), str(tmp_path / "o"), "--method", "gptq4", "--tune-epochs", "-1"]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == InvalidArgumentError.exit_code and err.count("\n") == 1
    assert err.startswith("zlocal: error: --tune-epochs must be >= 0") and not (tmp_path / "o").exists()
