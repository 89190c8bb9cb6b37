"""GPTQ round trips on the tiny fixture (group size 32 divides its 64 and 128 input features)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from zlocal import cpu_kernels
from zlocal.bench import decode_path
from zlocal.convert import convert
from zlocal.manifest import verify

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
    from zlocal.quality import builtin_text
    from zlocal.quantize_gptq import calibration_samples

    s = calibration_samples(mistral_tokenizer, builtin_text("calibration.txt"), 8, 256)
    assert len(s) == 8 and all(len(x["input_ids"]) == 256 for x in s)
    assert len({tuple(x["input_ids"]) for x in s}) == 8


def test_sym_option_reaches_the_plan_and_is_gptq_only(tiny_zephyr, tmp_path):
    from zlocal.errors import InvalidArgumentError
    from zlocal.quantize_gptq import plan_gptq

    config = json.loads((tiny_zephyr / "config.json").read_text())
    common = dict(bits=4, group_size=None, samples=None, seq_len=None, calibration=None)
    assert plan_gptq(config, **common).sym is False
    assert plan_gptq(config, **common, sym=True).sym is True
    with pytest.raises(InvalidArgumentError, match="--sym"):
        convert(tiny_zephyr, tmp_path / "o", "nf4", sym=True, evaluate=False, quiet=True)
    assert not (tmp_path / "o").exists()
