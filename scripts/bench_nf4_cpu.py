"""A bitsandbytes nf4 checkpoint on zlocal's CPU int4 kernels: quality against bitsandbytes' own
dequantization, and decode against llama.cpp on the same model, in one run.

The checkpoint is SmolLM2-135M-Instruct (the embedded model) converted with `zlocal convert --method
nf4` under ``zlocal.paths.cache_dir()/bench``. Quality: perplexity on zlocal's four evaluation texts
(windows of 512 tokens) through zlocal's modules and through the untouched checkpoint in
transformers + bitsandbytes (which dequantizes each weight to bf16 for every product). Speed: zlocal
(default plan) against llama.cpp (llama-cpp-python) on the embedded SmolLM2 GGUF, which is Q4_1,
runs interleaved so background load hits both alike; medians reported with the load average.

    python scripts/bench_nf4_cpu.py --out bench-results/nf4_cpu.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

import zlocal
from zlocal.checkpoint.embedded import gguf_path
from zlocal.checkpoint.resolve import resolve_model
from zlocal.conversion.convert import convert
from zlocal.conversion.quality import eval_texts
from zlocal.inference.bench import loadavg, machine_info
from zlocal.paths import cache_dir

WINDOW = 512


def _llama_bench():
    """scripts/bench_vs_llamacpp.py as a module (one llama.cpp driver and timing loop for every
    bench script)."""
    path = Path(__file__).with_name("bench_vs_llamacpp.py")
    spec = importlib.util.spec_from_file_location("bench_vs_llamacpp", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def nf4_checkpoint() -> Path:
    """SmolLM2 converted to nf4 by zlocal (once; reused after)."""
    out = cache_dir() / "bench" / "smollm2-135m-nf4"
    if not (out / "zlocal.json").exists():
        convert(resolve_model("smollm2-135m").path, out, "nf4", evaluate=False, quiet=True, overwrite=True)
    return out


@torch.inference_mode()
def nll(model, windows: list[torch.Tensor]) -> tuple[float, int]:
    """(summed next-token NLL, tokens scored) over all windows."""
    total, count = 0.0, 0
    for w in windows:
        logits = model(input_ids=w[None]).logits[0, :-1].float()
        total += torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum").item()
        count += w.numel() - 1
    return total, count


def dense_fp32_models(path: Path):
    """Two float32 copies of the checkpoint with dense weights: bitsandbytes' own dequantization (in
    float32) and the weights zlocal's int4 modules hold (bf16 table values times bf16 scales)."""
    from transformers import AutoModelForCausalLM

    from zlocal.formats.bnb4_cpu import block_absmax, int4_module
    from zlocal.kernels.cpu_quant import dequantized_weight

    models = []
    for use_ours in (False, True):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu").eval()
        for name, mod in list(model.named_modules()):
            if type(mod).__name__ != "Linear4bit":
                continue
            qs = mod.weight.quant_state
            if use_ours:
                w = dequantized_weight(int4_module(mod, torch.bfloat16))
            else:
                w = torch.ops.bitsandbytes.dequantize_4bit.default(
                    mod.weight.data.view(torch.uint8),
                    block_absmax(qs),
                    qs.blocksize,
                    qs.quant_type,
                    qs.shape,
                    torch.float32,
                )
            dense = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            dense.weight = torch.nn.Parameter(w.float(), requires_grad=False)
            if mod.bias is not None:
                dense.bias = torch.nn.Parameter(mod.bias.float(), requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, dense)
        for param in model.parameters():  # the unquantized weights load in the checkpoint's dtype
            param.data = param.data.float()
        models.append(model)
    return models


def _rel(a: float, b: float) -> float:
    return round(a / b - 1, 6)


def quality(path: Path, rt) -> dict:
    """Perplexity per text kind. ``weights``: float32 forwards of bitsandbytes' dequantized weights and
    of the weights zlocal's modules hold (what the format conversion changes). ``bf16``: zlocal's
    kernels against transformers + bitsandbytes' CPU path and against bitsandbytes' weights dequantized
    to bf16 in transformers' bf16 forward (bf16 activations round differently in each path)."""
    from transformers import AutoModelForCausalLM

    bnb_cpu = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cpu").eval()
    bnb_bf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cpu").eval()
    bnb_bf16 = bnb_bf16.dequantize().to(torch.bfloat16)
    theirs32, ours32 = dense_fp32_models(path)
    kinds, sums = {}, {}
    for kind, text in eval_texts():
        ids = rt.encode(text)
        windows = [torch.tensor(ids[i : i + WINDOW]) for i in range(0, len(ids) - 1, WINDOW)]
        windows = [w for w in windows if w.numel() >= 2]
        runs = (
            ("zlocal_kernels", rt.model),
            ("bnb_cpu", bnb_cpu),
            ("bnb_dequantized_bf16", bnb_bf16),
            ("bnb_weights_fp32", theirs32),
            ("zlocal_weights_fp32", ours32),
        )
        scored = {name: nll(m, windows) for name, m in runs}
        for name, (total, count) in scored.items():
            sums[name] = (sums.get(name, (0.0, 0))[0] + total, sums.get(name, (0.0, 0))[1] + count)
        kinds[kind] = _comparison({name: math.exp(t / c) for name, (t, c) in scored.items()})
    kinds["all texts"] = _comparison({name: math.exp(t / c) for name, (t, c) in sums.items()})
    return kinds


def _comparison(p: dict[str, float]) -> dict:
    return {
        **{k: round(v, 4) for k, v in p.items()},
        "weights_relative_difference": _rel(p["zlocal_weights_fp32"], p["bnb_weights_fp32"]),
        "kernels_vs_bnb_cpu": _rel(p["zlocal_kernels"], p["bnb_cpu"]),
        "kernels_vs_bnb_dequantized_bf16": _rel(p["zlocal_kernels"], p["bnb_dequantized_bf16"]),
        "bnb_cpu_vs_bnb_dequantized_bf16": _rel(p["bnb_cpu"], p["bnb_dequantized_bf16"]),
    }


def speed(rt, gguf: Path, args) -> dict:
    """Interleaved prefill + greedy decode runs of zlocal and llama.cpp on the same prompt ids."""
    n_ctx = args.prompt_tokens + args.new_tokens + 8
    bench = _llama_bench()
    z, c, loads = bench.interleaved_runs(rt, bench.LlamaCppSide(gguf, args.threads, n_ctx), args)

    def med(rows, key):
        return round(statistics.median(r[key] for r in rows), 2)

    res = {
        side: {key: med(rows, key) for key in ("prefill_tok_s", "decode_tok_s")}
        for side, rows in (("zlocal_nf4", z), ("llama_cpp_q4_1", c))
    }
    res["decode_ratio"] = round(res["zlocal_nf4"]["decode_tok_s"] / res["llama_cpp_q4_1"]["decode_tok_s"], 3)
    res["loadavg_1min"] = loads
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-quality", action="store_true", help="speed only")
    ap.add_argument("--out", default="bench-results/nf4_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = nf4_checkpoint()
    t0 = time.perf_counter()
    rt = zlocal.load(str(path))  # default flags
    result = {
        "machine": machine_info(),
        "checkpoint": str(path),
        "load_seconds": round(time.perf_counter() - t0, 2),
        "plan_reasons": rt.plan.reasons,
        "loadavg_start": loadavg(),
    }
    if not args.skip_quality:
        result["perplexity"] = q = quality(path, rt)
        result["weights_max_abs_relative_difference"] = max(
            abs(v["weights_relative_difference"]) for v in q.values()
        )
    if importlib.util.find_spec("llama_cpp") is None:
        print(
            "bench_nf4_cpu: llama-cpp-python is missing (pip install -e '.[bench]'); speed skipped",
            file=sys.stderr,
        )
    else:
        result["speed"] = speed(rt, gguf_path(), args)
    result["loadavg_end"] = loadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
