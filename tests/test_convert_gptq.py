"""GPTQ round trips on the tiny fixture (group size 32 divides its 64 and 128 input features)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from zlocal.checkpoint.manifest import verify
from zlocal.conversion.convert import convert
from zlocal.inference.bench import decode_path
from zlocal.kernels import cpu_kernels

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gptqmodel") is None or importlib.util.find_spec("optimum") is None,
    reason="GPTQ tests need gptqmodel and optimum (pip install 'zlocal[gptq]')",
)


@pytest.mark.slow
@pytest.mark.parametrize("method,bits", [("gptq4", 4), ("gptq8", 8)])
def test_gptq_round_trip(method, bits, tiny_zephyr, tmp_path):
    from transformers import AutoModelForCausalLM

    import zlocal

    r = convert(
        tiny_zephyr,
        tmp_path / method,
        method,
        group_size=32,
        samples=2,
        seq_len=64,
        evaluate=False,
        quiet=True,
    )
    out = tmp_path / method
    assert verify(out).ok and r.group_size == 32
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == bits and qc["group_size"] == 32
    assert qc["sym"] is False  # asymmetric groups by default
    assert qc["meta"]["gptaq"]["alpha"] == 0.25 and qc["meta"]["mse"] == 2.4
    # the temp offload dir gptqmodel records is gone from both configs
    saved_qc = json.loads((out / "quantize_config.json").read_text())
    assert "offload_to_disk_path" not in qc["meta"] and "offload_to_disk_path" not in saved_qc["meta"]
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    ids = torch.tensor([[1, 22557, 736]])
    hf = model.generate(ids, max_new_tokens=4, do_sample=False)[0, 3:].tolist()
    rt = zlocal.load(str(out), dtype="bfloat16", max_context=64)
    toks = [x.token for x in rt.stream_tokens([1, 22557, 736], max_new_tokens=4, temperature=0) if x.token]
    assert len(hf) == 4 and len(toks) == 4
    # 4-bit layers move to zlocal's int4 kernel where it runs (checked against gptqmodel's output)
    on_kernel = bits == 4 and cpu_kernels.kernels() is not None
    assert any(f"GPTQ layers ({7 * 2}) run on zlocal" in r for r in rt.plan.reasons) == on_kernel
    assert (type(rt.model.model.layers[1].mlp.down_proj).__name__ == "Int4WeightOnlyLinear") == on_kernel
    assert decode_path(rt.engine).startswith("zlocal decode kernel") == on_kernel
    native = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", dtype=torch.bfloat16)
    ids = [1, 22557, 736, 28725, 910]
    want = native(torch.tensor([ids])).logits[0, -1].float()
    rt.engine.reset()
    got = rt.engine.prefill(ids).float()
    assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.999
    m = json.loads((out / "zlocal.json").read_text())
    assert m["method"] == method and m["group_size"] == 32 and "gptqmodel" in m["versions"]
    assert m["conversion"]["options"]["sym"] is False and m["conversion"]["options"]["gptaq_alpha"] == 0.25


def test_calibration_windows_differ(mistral_tokenizer):
    from zlocal.conversion.quality import builtin_text
    from zlocal.conversion.quantize_gptq import calibration_samples

    s = calibration_samples(mistral_tokenizer, builtin_text("calibration.txt"), 8, 256)
    assert len(s) == 8 and all(len(x["input_ids"]) == 256 for x in s)
    assert len({tuple(x["input_ids"]) for x in s}) == 8


def test_sym_option_reaches_the_plan_and_is_gptq_only(tiny_zephyr, tmp_path):
    from zlocal.conversion.quantize_gptq import plan_gptq
    from zlocal.errors import InvalidArgumentError

    config = json.loads((tiny_zephyr / "config.json").read_text())
    common = dict(bits=4, group_size=None, samples=None, seq_len=None, calibration=None)
    assert plan_gptq(config, **common).sym is False
    assert plan_gptq(config, **common, sym=True).sym is True
    with pytest.raises(InvalidArgumentError, match="--sym"):
        convert(tiny_zephyr, tmp_path / "o", "nf4", sym=True, evaluate=False, quiet=True)
    assert not (tmp_path / "o").exists()


def test_group_size_falls_back_to_per_channel():
    """Input features 200 (the issue's case): no preferred size divides it, so per-channel, said
    in one line, with scale tuning (which needs groups) off by default and refused on request."""
    from zlocal.conversion.quantize_gptq import PER_CHANNEL, check_group_size, default_group_size, plan_gptq
    from zlocal.errors import InvalidArgumentError

    odd = {"hidden_size": 200, "intermediate_size": 128, "num_attention_heads": 4, "head_dim": 16}
    odd |= {"num_hidden_layers": 2, "vocab_size": 32000}
    assert default_group_size(odd) == PER_CHANNEL == -1
    check_group_size(odd, -1)  # accepted when given, too
    with pytest.raises(InvalidArgumentError, match="does not divide q_proj/k_proj/v_proj input features 200"):
        check_group_size(odd, 32)
    common = dict(bits=4, group_size=None, samples=None, seq_len=None, calibration=None)
    plan = plan_gptq(odd, **common)
    assert plan.group_size == -1 and plan.tune_epochs == 0 and "per channel" in plan.tune_note
    assert plan.group_note.startswith("GPTQ group size -1 (per channel): none of 128, 64, 32 divides")
    assert "q_proj/k_proj/v_proj=200" in plan.group_note
    with pytest.raises(InvalidArgumentError, match=r"scale tuning needs GPTQ groups.*--tune-epochs 0"):
        plan_gptq(odd, **{**common, "tune_epochs": 8})
    grouped = plan_gptq({**odd, "hidden_size": 192}, **common)
    assert grouped.group_size == 64 and grouped.group_note.startswith("GPTQ group size 64: the largest of")
    assert plan_gptq({**odd, "hidden_size": 192}, **{**common, "group_size": 32}).group_note.endswith(
        "given with --group-size"
    )


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptq4", "gptq8"])
def test_per_channel_round_trip(method, tmp_path, capsys):
    """Input features 200 quantize per channel, say so, and load in transformers and zlocal (CPU)."""
    from transformers import AutoModelForCausalLM

    import zlocal
    from tests.fixtures import build_tiny_mistral
    from zlocal.checkpoint.manifest import sha256_file
    from zlocal.conversion.quality import builtin_text

    src = tmp_path / "src"
    build_tiny_mistral(src, hidden_size=200)
    calib = tmp_path / "my-calibration.txt"
    calib.write_text(builtin_text("calibration.txt"), encoding="utf-8")
    out = tmp_path / method
    r = convert(src, out, method, calibration=calib, samples=2, seq_len=64, evaluate=False)
    err = capsys.readouterr().err
    assert "GPTQ group size -1 (per channel): none of 128, 64, 32 divides" in err
    assert verify(out).ok and r.group_size == -1
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["group_size"] == -1 and qc["bits"] == int(method[-1])
    m = json.loads((out / "zlocal.json").read_text())
    assert m["group_size"] == -1 and m["conversion"]["group_size_note"].startswith("GPTQ group size -1")
    assert m["conversion"]["options"]["tune_epochs"] == 0 and m["conversion"]["scale_tuning"] is None
    opts = m["conversion"]["options"]
    assert opts["calibration"] == "my-calibration.txt" and opts["calibration_sha256"] == sha256_file(calib)
    assert str(tmp_path) not in (out / "zlocal.json").read_text()

    ids = [1, 22557, 736, 28725, 910]
    native = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", dtype=torch.bfloat16)
    hf = native.generate(torch.tensor([ids[:3]]), max_new_tokens=4, do_sample=False)[0, 3:].tolist()
    want = native(torch.tensor([ids])).logits[0, -1].float()
    rt = zlocal.load(str(out), dtype="bfloat16", max_context=64)
    toks = [x.token for x in rt.stream_tokens(ids[:3], max_new_tokens=4, temperature=0) if x.token]
    assert len(hf) == 4 and toks == hf
    # zlocal's int4 kernel takes groups only: per-channel layers stay on gptqmodel's kernel
    assert type(rt.model.model.layers[1].mlp.down_proj).__name__ != "Int4WeightOnlyLinear"
    rt.engine.reset()
    got = rt.engine.prefill(ids).float()
    assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.999
