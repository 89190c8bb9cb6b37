"""One command for the GPU machine: the gpu-marked tests, then zlocal against transformers on a 7B-shaped
random Mistral built there, written to one JSON file.

    python scripts/gpu_check.py --out DIR          # GPU machine: 7B shapes, bf16 / int4 / nf4, offload
    python scripts/gpu_check.py --cpu --out DIR    # here: tiny shapes on the CPU, same stages (~30 s)

On the lent GPU machine (Python 3.12, torch 2.11, transformers 5.17, no network) the newer packages
come as wheels in the ignored .fixtures/wheels (transformers 5.24.0, huggingface_hub 2.4.0, httpx2,
tokenizers 0.23.3, safetensors 0.8.0, accelerate 1.15.0, bitsandbytes 0.50.2, psutil 7.2.2; 62 MB),
with the tokenizer fixture .fixtures/mistral-tokenizer-v1 (3.5 MB), both carried:

    pip install -q --no-index --no-deps .fixtures/wheels/*.whl; python scripts/gpu_check.py --out $OUT

Stages (each recorded, a failing one does not stop the others; a deadline skips what is left):
1. ``pytest -m gpu`` (on the CPU: only this check's own test files, which then skip);
2. a random Mistral (7B shapes on the GPU) saved as a bf16 safetensors checkpoint with the Mistral
   tokenizer from ``tests/fixtures.py``;
3. for each format (GPU: bf16, int4 on PyTorch's int4 kernel, nf4 on bitsandbytes; CPU: bf16, int4)
   loaded by ``zlocal.load`` with an explicit plan: zlocal's prefill and decode tok/s (the engine, on
   CUDA through the captured decode step), the decode step's own loop with on-device sampling,
   ``transformers.generate`` on the same model object (same weights, same run), greedy agreement,
   and peak memory against the plan's estimate;
4. one partial-offload point (GPU only): the last layers on the CPU in int4 on zlocal's CPU kernels,
   decode tok/s against the planner's prediction and its split line.
The numbers are for random weights: speed and memory mean what they would on Zephyr-7B, tokens do not.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEVEN_B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=32000, sliding_window=4096)
TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, head_dim=32, vocab_size=32000, sliding_window=4096)
# prompt tokens, new tokens, HF new tokens, context, GPU layers of the offload point, seconds allowed
GPU_RUN = dict(prompt=512, new=128, hf_new=64, ctx=2048, offload_gpu_layers=28, budget_s=450)
CPU_RUN = dict(prompt=32, new=8, hf_new=8, ctx=256, offload_gpu_layers=0, budget_s=120)
# the CPU run collects only this check's own test files (fast); the GPU run every file marking gpu tests
CPU_TEST_FILES = ("tests/test_decode_step.py", "tests/test_cuda_int4.py")


def gpu_test_files() -> list[str]:
    """Test files holding gpu-marked tests (collecting only these keeps dev-only imports out)."""
    return sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in p.read_text()
    )


def environment(cpu: bool) -> dict:
    """Versions, the device and which optional packages import."""
    import importlib.util

    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "mode": "cpu" if cpu else "gpu",
           "cuda": torch.cuda.is_available()}
    for name in ("accelerate", "bitsandbytes", "gptqmodel"):
        env[name] = importlib.util.find_spec(name) is not None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}",
                   vram_gib=round(props.total_memory / 2**30, 1),
                   int4_kernel=hasattr(torch, "_weight_int4pack_mm"))
    return env


def run_gpu_tests(cpu: bool, timeout: int) -> dict:
    """``pytest -m gpu``; its summary line and exit code."""
    files = CPU_TEST_FILES if cpu else gpu_test_files()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", *files]
    t0 = time.perf_counter()
    try:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False,
                           env=env)  # zlocal from this checkout, installed or not
    except subprocess.TimeoutExpired:
        return {"command": " ".join(cmd[1:]), "timed_out": True, "seconds": timeout}
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    return {"command": " ".join(cmd[1:]), "returncode": r.returncode, "summary": lines[-1] if lines else "",
            "seconds": round(time.perf_counter() - t0, 1),
            "failures": [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))][:20]}


def build_checkpoint(dest: Path, shape: dict, device: str) -> dict:
    """A random MistralForCausalLM in bf16, built on ``device``, saved with the Mistral tokenizer."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from tests import fixtures

    t0 = time.perf_counter()
    torch.manual_seed(0)
    config = MistralConfig(**shape, max_position_embeddings=32768, rope_theta=10000.0, rms_norm_eps=1e-5,
                           tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    with torch.device(device):
        model = MistralForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(dest, max_shard_size="2GB")
    for f in fixtures.tokenizer_dir().iterdir():
        if f.is_file() and not f.name.startswith("."):
            shutil.copy(f, dest / f.name)
    params = sum(p.numel() for p in model.parameters())
    del model
    _free()
    return {"parameters": params, "seconds": round(time.perf_counter() - t0, 1)}


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _peak_bytes(cpu: bool) -> int:
    import torch

    if cpu:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's, so far
    return torch.cuda.max_memory_allocated()


def plan_for(shape: dict, ctx: int, gpu_layers: int, gpu_fmt, cpu_fmt):
    """The planner's own candidate for this placement on this machine: estimates, speed, reasons."""
    import torch

    from zlocal.planning.hardware import profile_machine
    from zlocal.planning.memory import ModelShape
    from zlocal.planning.plan import _budget, _candidate, _Spec, split_reason, usable_memory

    hw = profile_machine(measure_bandwidth=torch.cuda.is_available())  # the CPU run stays short
    ms = ModelShape.from_config({**shape, "max_position_embeddings": 32768})
    spec = _Spec(ms, _budget(hw, *usable_memory(hw)), "bf16", None, 128, 512)
    lp = _candidate(spec, ctx, gpu_layers, gpu_fmt, cpu_fmt)
    lp.reasons = [r for r in [split_reason(spec, lp)] if r]
    return lp


def _hf_generate(model, ids: list[int], n: int) -> tuple[list[int], float]:
    import torch

    device = model.get_input_embeddings().weight.device
    x = torch.tensor([ids], device=device)
    _sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    _sync()
    return out[0, len(ids):].tolist(), time.perf_counter() - t0


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def transformers_speed(model, ids: list[int], n: int) -> dict:
    """transformers.generate on the same model object: prefill (one new token) and decode tok/s."""
    _hf_generate(model, ids[:16], 2)  # warm-up
    _, t1 = _hf_generate(model, ids, 1)
    tokens, tn = _hf_generate(model, ids, n)
    return {"tokens": tokens, "prefill_tok_s": round(len(ids) / t1, 1),
            "decode_tok_s": round((n - 1) / max(tn - t1, 1e-9), 1)}


def zlocal_speed(rt, ids: list[int], n: int) -> dict:
    """The engine (graph-captured decode step on CUDA) after a warm-up, then the step's own loop."""
    engine = rt.engine
    with engine.without_stop_tokens():
        t0 = time.perf_counter()
        rt.generate(ids[:16], temperature=0, max_new_tokens=4)  # warm-up: capture, compile
        warm_up = time.perf_counter() - t0
        engine.reset()
        res = rt.generate(ids, temperature=0, max_new_tokens=n)
    out = {"tokens": res.token_ids, "prefill_tok_s": round(res.prompt_tps, 1),
           "decode_tok_s": round(res.generation_tps, 1), "decode_step": engine.step is not None,
           "warm_up_seconds": round(warm_up, 2)}
    if engine.step is not None:  # the same engine without the step: the lean (or HF) forward, eager
        saved, engine.step = engine.step, None
        try:
            with engine.without_stop_tokens():
                engine.reset()
                eager = rt.generate(ids, temperature=0, max_new_tokens=n)
            out["eager_decode_tok_s"] = round(eager.generation_tps, 1)
        finally:
            engine.step = saved
    out.update(step_loop(rt, ids, n))
    return out


def step_loop(rt, ids: list[int], n: int) -> dict:
    """``DecodeStep.decode`` (on-device greedy sampling, one .item() per token) after a prefill."""
    import torch

    from zlocal.inference.decode_step import DecodeStep

    engine = rt.engine
    step = engine.step or DecodeStep(rt.model, engine.cache, engine.max_context)
    engine.reset()
    first = int(torch.argmax(engine.prefill(ids)))
    step.decode(first, 2)  # warm-up
    engine.reset()
    engine.prefill(ids)
    _sync()
    t0 = time.perf_counter()
    tokens = step.decode(first, n)
    _sync()
    engine.reset()
    return {"step_loop_tok_s": round(n / (time.perf_counter() - t0), 1), "step_graph": step.graph,
            "step_crossings": step.crossings, "step_tokens": tokens[:8]}


def measure_format(ckpt: Path, shape: dict, run: dict, fmt: str, cpu: bool, gpu_layers=None) -> dict:
    """Load ``ckpt`` in ``fmt`` with an explicit plan, time zlocal and transformers, compare memory."""
    import torch

    import zlocal

    n = shape["num_hidden_layers"]
    g = (0 if cpu else n) if gpu_layers is None else gpu_layers
    cpu_fmt = None if g == n else (fmt if g == 0 else "int4")  # CPU layers beside GPU ones: int4
    lp = plan_for(shape, run["ctx"], g, fmt if g else None, cpu_fmt)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    rt = zlocal.load(str(ckpt), plan=lp, cache=False)
    load_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, shape["vocab_size"], (run["prompt"],), generator=gen).tolist()
    ours = zlocal_speed(rt, ids, run["new"])
    peak = _peak_bytes(cpu)
    theirs = transformers_speed(rt.model, ids, run["hf_new"])
    k = min(len(ours["tokens"]), len(theirs["tokens"]))
    agree = next((i for i in range(k) if ours["tokens"][i] != theirs["tokens"][i]), k)
    estimate = lp.estimated_ram_bytes if cpu else lp.estimated_vram_bytes
    result = {
        "format": fmt, "gpu_layers": lp.gpu_layers, "cpu_layers": lp.cpu_layers,
        "load_seconds": round(load_s, 1),
        "zlocal": {k2: v for k2, v in ours.items() if k2 != "tokens"},
        "transformers": {k2: v for k2, v in theirs.items() if k2 != "tokens"},
        "greedy_prefix_agreement": f"{agree}/{k}",
        "speedup_decode": round(ours["decode_tok_s"] / max(theirs["decode_tok_s"], 1e-9), 2),
        "predicted_decode_tok_s": lp.predicted_decode_tok_s,
        "peak_bytes": peak, "estimated_bytes": estimate,
        "peak_over_estimate": round(peak / max(estimate, 1), 3),
        "memory": "process max RSS (includes Python, torch)" if cpu else "torch.cuda.max_memory_allocated",
        "plan_reasons": lp.reasons, "plan_notes": rt.plan.reasons[-3:],
    }
    del rt
    _free()
    return result


def _stage(report: dict, name: str, deadline: float, fn) -> None:
    if time.perf_counter() > deadline:
        report[name] = {"skipped": "deadline reached"}
        return
    t0 = time.perf_counter()
    try:
        report[name] = fn()
    except Exception as exc:  # noqa: BLE001  (recorded; the other stages still run)
        report[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000],
                        "traceback": traceback.format_exc()[-4000:]}
    if isinstance(report[name], dict):
        report[name].setdefault("stage_seconds", round(time.perf_counter() - t0, 1))
    print(f"[gpu_check] {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for gpu_check.json")
    ap.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (the test's reduced run)")
    ap.add_argument("--skip-tests", action="store_true", help="skip the pytest stage")
    ap.add_argument("--work", help="where the checkpoint goes (default: a temp dir, removed after)")
    ap.add_argument("--compile", metavar="BACKEND",
                    help="torch.compile the decode step with BACKEND (e.g. inductor) before capture")
    args = ap.parse_args(argv)
    if args.compile:
        os.environ["ZLOCAL_DECODE_COMPILE"] = args.compile
    import torch

    cpu = args.cpu or not torch.cuda.is_available()
    shape, run = (TINY, CPU_RUN) if cpu else (SEVEN_B, GPU_RUN)
    t_start = time.perf_counter()
    deadline = t_start + run["budget_s"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"environment": environment(cpu), "shape": shape, "run": run,
                    "requested_cpu": args.cpu, "compile_backend": args.compile}
    if not args.skip_tests:
        _stage(report, "gpu_tests", deadline, lambda: run_gpu_tests(cpu, 150 if cpu else 180))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="zlocal-gpu-check-"))
    ckpt = work / "random-mistral"
    try:
        device = "cpu" if cpu else "cuda"
        _stage(report, "checkpoint", deadline, lambda: build_checkpoint(ckpt, shape, device))
        formats = ("bf16", "int4") if cpu else ("bf16", "int4", "nf4")
        for fmt in formats:
            _stage(report, f"format_{fmt}", deadline, lambda f=fmt: measure_format(ckpt, shape, run, f, cpu))
        if cpu:
            report["offload"] = {"skipped": "partial offload needs a GPU"}
        else:
            g = run["offload_gpu_layers"]
            _stage(report, "offload", deadline, lambda: measure_format(ckpt, shape, run, "int4", cpu, g))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    report["total_seconds"] = round(time.perf_counter() - t_start, 1)
    path = out / "gpu_check.json"
    path.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    print(f"[gpu_check] wrote {path} in {report['total_seconds']} s", file=sys.stderr)
    failed = [k for k, v in report.items() if isinstance(v, dict) and "error" in v]
    tests = report.get("gpu_tests", {})
    return 1 if failed or tests.get("returncode", 0) not in (0, 5) else 0


if __name__ == "__main__":
    sys.exit(main())
