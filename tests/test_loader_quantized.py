"""Converted bitsandbytes int8 checkpoints run on zlocal's fused CPU int8 kernel, with the same weights."""

from __future__ import annotations

import torch

import zlocal
from zlocal.conversion.convert import convert


def test_bnb_int8_checkpoint_uses_cpu_kernel_and_keeps_weights(tiny_zephyr, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "int8"
    convert(tiny_zephyr, out, "int8", evaluate=False, quiet=True)
    rt = zlocal.load(str(out), dtype="float32", max_context=128)
    kinds = {type(m).__name__ for m in rt.model.modules()}
    assert "Int8WeightOnlyLinear" in kinds and "Linear8bitLt" not in kinds
    assert any("fused CPU int8 kernel" in r for r in rt.plan.reasons)

    # Reference: the same int8 codes and scales, dequantized, through the plain HF forward.
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, device_map="cpu")
    ref = ref.dequantize() if hasattr(ref, "dequantize") else ref
    ids = torch.tensor([rt.encode("Hello world, how are you?")])
    with torch.inference_mode():
        ours = rt.model(input_ids=ids).logits
        theirs = ref(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-3)
    assert rt.generate("Hello", temperature=0, max_new_tokens=4).completion_tokens >= 1
