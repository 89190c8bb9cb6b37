"""Benchmark zlocal's CPU weight-only kernels; writes JSON.

1. One Linear of each Mistral-7B shape at batch 1: bf16 (``F.linear``), bf16 packed for oneDNN
   (what the lean forward runs, where the CPU supports it), int8 and int4 (zlocal's AVX-512 BF16
   kernels where they run, plus ``_weight_int8pack_mm`` / ``_weight_int4pack_mm_for_cpu`` as
   "int8-torch" / "int4-torch"; elsewhere PyTorch's as "int8" / "int4"): median ms, weight bytes
   read, effective GB/s. bitsandbytes' CPU path is left out on purpose (125-400 ms, see anchors).
2. Whole-model greedy decode on SmolLM2-135M through ``zlocal.load`` with a dense bf16 plan and
   int8 / int4 quantize-on-load plans: measured tok/s next to the planner's prediction.

Usage: python scripts/bench_cpu_kernels.py [--output bench-results/cpu_kernels.json] [--skip-model]
Run on a quiet machine: the load average is recorded because other processes skew the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from zlocal.kernels import dense_kernels
from zlocal.kernels.cpu_quant import quantize_linear

MISTRAL_LINEARS = {
    "q_proj/o_proj 4096x4096": (4096, 4096),
    "k_proj/v_proj 1024x4096": (1024, 4096),
    "gate/up_proj 14336x4096": (14336, 4096),
    "down_proj 4096x14336": (4096, 14336),
}


def _time_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def _module_bytes(m: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])


@torch.inference_mode()
def bench_linears(repeats: int) -> list[dict]:
    """Median ms per call for each Mistral-7B linear shape and kernel."""
    rows = []
    for label, (out_f, in_f) in MISTRAL_LINEARS.items():
        w = torch.randn(out_f, in_f, dtype=torch.bfloat16)
        x = torch.randn(1, in_f, dtype=torch.bfloat16)
        dense = torch.nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16)
        dense.weight.data.copy_(w)
        kernels = {"bf16": dense}
        if dense_kernels.packing_supported(torch.bfloat16):
            kernels["bf16-packed"] = dense_kernels.PackedLinear(dense_kernels.pack_weight(w), in_f, out_f)
        kernels["int8"] = quantize_linear(w, None, 8, torch.bfloat16)
        if kernels["int8"].layout != "torch":  # zlocal's own kernel runs here: time torch's too
            kernels["int8-torch"] = quantize_linear(w, None, 8, torch.bfloat16, layout="torch")
        kernels["int4"] = quantize_linear(w, None, 4, torch.bfloat16, group_size=128)
        if kernels["int4"].layout != "torch":  # zlocal's own kernel runs here: time torch's too
            kernels["int4-torch"] = quantize_linear(w, None, 4, torch.bfloat16, 128, layout="torch")
        for name, mod in kernels.items():
            ms = _time_ms(lambda mod=mod, x=x: mod(x), repeats)
            nbytes = _module_bytes(mod)
            rows.append(
                {
                    "shape": label,
                    "kernel": name,
                    "ms": round(ms, 3),
                    "weight_bytes": nbytes,
                    "effective_gb_s": round(nbytes / ms / 1e6, 2),
                }
            )
            print(f"{label:26s} {name:11s} {ms:8.3f} ms  {nbytes / ms / 1e6:6.1f} GB/s")
        del w, dense, kernels
    return rows


def bench_model(tokens: int) -> list[dict]:
    """Greedy decode tok/s of SmolLM2-135M with bf16, int8 and int4 plans through zlocal.load."""
    import zlocal
    from zlocal.checkpoint.resolve import resolve_model
    from zlocal.inference.loader import current_hardware, load_config, plan_for

    resolved = resolve_model("smollm2-135m")
    config = load_config(resolved)
    hw = current_hardware("cpu")
    base = plan_for(
        resolved, config, plan="auto", dtype="bfloat16", device="cpu", max_context=1024, hardware=hw
    )
    rows = []
    prompt = [{"role": "user", "content": "Write a short paragraph about the history of the bicycle."}]
    for fmt in ("bf16", "int8", "int4"):
        plan = dataclasses.replace(base, cpu_format=fmt, reasons=[])
        from zlocal.planning.memory import ModelShape
        from zlocal.planning.plan import _Budget, _Spec, predict_tok_s

        spec = _Spec(
            ModelShape.from_config(config),
            _Budget(0, 0, 0.0, hw.cpu.bandwidth_gbs, hw.cpu.cores, bool(hw.kernels.get("zlocal_int4_cpu"))),
            "bf16",
            None,
            plan.group_size,
        )
        predicted = predict_tok_s(spec, 1024, 0, None, fmt)
        t0 = time.perf_counter()
        rt = zlocal.load("smollm2-135m", plan=plan)
        load_s = time.perf_counter() - t0
        best = 0.0
        for _ in range(2):
            rt.engine.reset()
            c = rt.chat_completion(prompt, temperature=0, max_new_tokens=tokens)
            best = max(best, c.generation_tps)
        rows.append(
            {
                "format": fmt,
                "group_size": plan.group_size if fmt == "int4" else None,
                "decode_tok_s": round(best, 2),
                "predicted_tok_s": predicted,
                "load_s": round(load_s, 2),
                "resident_bytes": _module_bytes(rt.model),
                "sample": c.text[:80],
            }
        )
        print(f"SmolLM2 {fmt:5s} decode {best:6.2f} tok/s (predicted {predicted:.1f}), load {load_s:.1f} s")
        del rt
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default="bench-results/cpu_kernels.json")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        # with other processes on the cores, one thread avoids waiting at OpenMP barriers
        torch.set_num_threads(args.threads)
    from zlocal.planning.hardware import profile_machine

    hw = profile_machine()
    result = {
        "machine": {
            "cpu": hw.cpu.model,
            "cores": hw.cpu.cores,
            "isa": hw.cpu.isa,
            "bandwidth_gb_s": hw.cpu.bandwidth_gbs,
            "torch_threads": torch.get_num_threads(),
            "load_average_before": list(os.getloadavg()),
            "torch": torch.__version__,
        },
        "linears": bench_linears(args.repeats),
    }
    if not args.skip_model:
        result["smollm2_decode"] = bench_model(args.tokens)
    result["machine"]["load_average_after"] = list(os.getloadavg())
    dest = Path(args.output)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}-", dir=dest.parent.resolve())
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
    os.replace(tmp, dest)
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
