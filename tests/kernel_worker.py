"""Run native-kernel cases in a child process, so a crash fails one case instead of the test run.

The parent (``KernelWorker``) sends one JSON case per line to ``python -m tests.kernel_worker`` and
reads one JSON result per line. A child that dies (segfault, abort, timeout) is reported as a
``KernelCrash`` naming the case and the signal, and the next case starts a fresh child.

Cases:
- ``linear``: one quantized CPU module (``cpu_quant.quantize_linear``) against ``x @ W.T`` with
  ``W`` the dequantized weight of the same codes and scales, in float.
- ``bnb4``: a bitsandbytes NF4/FP4 layer on zlocal's int4 kernel against bitsandbytes' forward.
- ``model``: a random Mistral/Llama checkpoint of the drawn shape, loaded by ``zlocal.load`` with
  every layer on the CPU in the drawn format, teacher-forced through prefill and one-token steps
  and compared with an untouched ``transformers`` model in float32 whose linear layers hold the
  dequantized weights zlocal's modules use.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class KernelCrash(AssertionError):
    """The child process died or hung while running a case."""


class KernelWorker:
    """A persistent child process running cases; restarted after a crash."""

    def __init__(self, timeout: float = 120.0, env: dict[str, str] | None = None):
        self.timeout = timeout
        self.env = env or {}
        self.proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        env = {**os.environ, **self.env}
        env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
        return subprocess.Popen(
            [sys.executable, "-m", "tests.kernel_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )

    def run(self, case: dict) -> dict:
        """The child's result for ``case``; raises KernelCrash if the child died or hung on it."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        proc = self.proc
        proc.stdin.write(json.dumps(case) + "\n")
        proc.stdin.flush()
        deadline = time.monotonic() + self.timeout
        while True:
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                self.close()
                raise KernelCrash(f"case {case} hung for {self.timeout:.0f} s")
            line = proc.stdout.readline()
            if not line:
                proc.wait(timeout=10)
                err = proc.stderr.read()[-2000:]
                self.proc = None
                raise KernelCrash(f"case {case} killed the process ({_describe(proc.returncode)}): {err}")
            if line.startswith("{"):
                result = json.loads(line)
                if "error" in result:
                    raise AssertionError(f"case {case} raised: {result['error']}")
                return result

    def close(self) -> None:
        """Stop the child (if any)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def _describe(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        return f"signal {signal.Signals(-returncode).name}"
    return f"exit status {returncode}"


# ---- the child side ----------------------------------------------------------------------------


def _dequantized(module):
    """The float weight a zlocal CPU module (or a dense Linear) multiplies by (None: unknown module,
    such as a bf16 weight repacked for oneDNN, whose values are the checkpoint's)."""
    from zlocal.kernels.cpu_quant import dequantized_weight

    return dequantized_weight(module)


def run_linear(case: dict) -> dict:
    """One quantized linear layer against the float product of its own dequantized weight."""
    import torch

    from zlocal.kernels import cpu_quant

    torch.manual_seed(case["seed"])
    dtype = getattr(torch, case["dtype"])
    n, k, bits = case["out"], case["in"], case["bits"]
    weight = (torch.randn(n, k) * 0.05).to(dtype)
    if not cpu_quant.can_quantize((n, k), bits, case["group"]):
        return {"layout": "unquantized", "err": 0.0, "weight_err": 0.0}
    layout = None if case.get("layout", "auto") == "auto" else case["layout"]
    module = cpu_quant.quantize_linear(weight, None, bits, dtype, case["group"], layout=layout)
    x = torch.randn(case["tokens"], k).to(dtype)
    w = _dequantized(module).float()
    with torch.inference_mode():
        y = module(x).float()
    ref = x.float() @ w.t()
    scale = ref.abs().max().item() or 1.0
    return {
        "layout": module.layout,
        "err": (y - ref).abs().max().item() / scale if torch.isfinite(y).all() else float("inf"),
        "weight_err": ((w - weight.float()).abs().max() / weight.float().abs().max()).item(),
    }


def run_bnb4(case: dict) -> dict:
    """A bitsandbytes 4-bit layer of the drawn shape moved onto zlocal's int4 kernel (where the
    kernel takes it), against bitsandbytes' own forward of the same layer."""
    import bitsandbytes as bnb
    import torch

    from zlocal.formats.bnb4_cpu import int4_module, kernel_supports

    torch.manual_seed(case["seed"])
    n, k, qt, nested = case["out"], case["in"], case["quant_type"], case["nested"]
    layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type=qt)
    w = torch.randn(n, k) * 0.05
    layer.weight = bnb.nn.Params4bit(
        w, requires_grad=False, compress_statistics=nested, quant_type=qt, blocksize=case["block"]
    )
    layer = layer.to("cpu")
    why = kernel_supports(layer.weight.quant_state, n, k)
    if why:
        return {"swapped": False, "err": 0.0}
    new = int4_module(layer, torch.bfloat16)
    x = torch.randn(case["tokens"], k).to(torch.bfloat16)
    with torch.inference_mode():
        y, ref = new(x).float(), layer(x).float()
    scale = ref.abs().max().item() or 1.0
    return {"swapped": True, "err": (y - ref).abs().max().item() / scale if torch.isfinite(y).all() else 1e9}


def run_torch_kernel(case: dict) -> dict:
    """PyTorch's weight-only kernel alone on one shape, whatever zlocal's predicates say (how the
    predicates were derived, and the check that they still hold on this torch)."""
    import torch

    from zlocal.kernels import cpu_kernels, cpu_quant

    torch.manual_seed(case["seed"])
    dtype = getattr(torch, case["dtype"])
    n, k, g = case["out"], case["in"], case["group"]
    x = torch.randn(case["tokens"], k).to(dtype)
    if case["bits"] == 8:
        q, scales = cpu_quant.quantize_int8(torch.randn(n, k))
        ref = x.float() @ (q.float() * scales.to(dtype).float()[:, None]).t()
        y = torch._weight_int8pack_mm(x, q, scales.to(dtype))
    else:
        q, sz = cpu_quant.quantize_int4(torch.randn(n, k), g)
        ref = x.float() @ cpu_kernels.dequantize_int4(q, sz.to(dtype), g).t()
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 8)
        y = torch._weight_int4pack_mm_for_cpu(x, packed, g, sz.to(dtype))
    y = y.float()
    scale = ref.abs().max().item() or 1.0
    return {"err": (y - ref).abs().max().item() / scale if torch.isfinite(y).all() else float("inf")}


def run_c_arguments(case: dict) -> dict:
    """The C entry points called directly with arguments they do not support (null pointers, so a
    missing check crashes): each must return ZL_EBADSHAPE; then the Python wrappers must raise."""
    import ctypes

    import torch

    from zlocal.errors import InvalidArgumentError
    from zlocal.kernels import cpu_kernels

    k = cpu_kernels.kernels()
    if k is None:
        return {"skipped": cpu_kernels.kernel_status()}
    null = None
    codes = {
        "int4 K=100": k._int4(null, null, null, null, null, 1, 16, 100, 32, 1),
        "int4 G=48": k._int4(null, null, null, null, null, 1, 16, 192, 48, 1),
        "int4 N=6": k._int4(null, null, null, null, null, 1, 6, 64, 32, 1),
        "int4 M=0": k._int4(null, null, null, null, null, 0, 16, 64, 32, 1),
        "int4 4098 groups": k._int4(null, null, null, null, null, 1, 4, 64 * 2049, 32, 1),
        "int8 K=100": k._int8(null, null, null, null, 1, 16, 100, 1),
        "int8 N=6": k._int8(null, null, null, null, 1, 6, 64, 1),
        "dequant rows=6": k._dequant4(null, null, null, null, 6, 64, 32, 1),
        "decode null dims": k._decode(null, null, null, 0, null, null, 1),
    }
    table = torch.zeros(16, dtype=torch.bfloat16)  # a real code table: the shape check still comes first
    codes["int4 G=48 with a table"] = k._int4(null, null, null, table.data_ptr(), null, 1, 16, 192, 48, 1)
    codes["dequant rows=6 with a table"] = k._dequant4(null, null, table.data_ptr(), null, 6, 64, 32, 1)
    dims = cpu_kernels._Dims(1, 64, 4, 2, 12, 128, 16, 0, 0.25)  # head_dim 12: not a multiple of 16
    layers = (cpu_kernels._Layer * 1)()
    h = torch.zeros(64, dtype=torch.bfloat16)
    codes["decode head_dim 12"] = k._decode(
        ctypes.addressof(dims), ctypes.addressof(layers), h.data_ptr(), 0, h.data_ptr(), h.data_ptr(), 1
    )
    raised = []
    x = torch.zeros(2, 100, dtype=torch.bfloat16)
    x4, w4 = torch.zeros(1, 64, dtype=torch.bfloat16), torch.zeros(4, 32, dtype=torch.uint8)
    sz4 = torch.zeros(1, 1, 4, 2, dtype=torch.bfloat16)
    for call in (
        lambda: k.int8_mm(x, torch.zeros(16, 100, dtype=torch.int8), torch.zeros(16, dtype=torch.bfloat16)),
        lambda: k.int4_mm(
            x, torch.zeros(16, 50, dtype=torch.uint8), torch.zeros(8, dtype=torch.bfloat16), 32
        ),
        lambda: k.int8_mm(x.float(), torch.zeros(16, 100, dtype=torch.int8), torch.zeros(16)),
        # a code table of the wrong size or dtype, or not in host memory, never reaches C
        lambda: k.int4_mm(x4, w4, sz4, 64, torch.zeros(8, dtype=torch.bfloat16)),
        lambda: k.int4_mm(x4, w4, sz4, 64, torch.zeros(16)),
        lambda: k.int4_mm(x4, w4, sz4, 64, torch.zeros(32, dtype=torch.bfloat16)[::2]),
        lambda: k.int4_mm(x4, w4, sz4, 64, torch.zeros(16, dtype=torch.bfloat16, device="meta")),
        lambda: k.int4_mm(x4.to("meta"), w4, sz4, 64),
    ):
        try:
            call()
        except InvalidArgumentError:
            raised.append(True)
        else:
            raised.append(False)
    return {"codes": codes, "raised": raised}


def _build_checkpoint(case: dict, dest: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    from tests.fixtures import build_tokenizer

    torch.manual_seed(case["seed"])
    common = dict(
        vocab_size=32000,
        hidden_size=case["hidden"],
        intermediate_size=case["inter"],
        num_hidden_layers=case.get("layers", 2),
        num_attention_heads=case["heads"],
        num_key_value_heads=case["kv_heads"],
        head_dim=case["head_dim"],
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    if case["arch"] == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=case.get("window")))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    with torch.no_grad():  # larger than the default init, so every layer moves the logits
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5 / p.shape[1] ** 0.5)
    model.to(torch.bfloat16).save_pretrained(dest, safe_serialization=True)
    build_tokenizer(dest, "zephyr")


def _reference(path: Path, rt):
    """An untouched float32 transformers model with zlocal's dequantized weights."""
    import torch
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ours = dict(rt.model.named_modules())
    with torch.no_grad():
        for name, module in ref.named_modules():
            weight = (
                _dequantized(ours[name]) if isinstance(module, torch.nn.Linear) and name in ours else None
            )
            if weight is not None:
                module.weight.copy_(weight)
    return ref.eval()


def run_model(case: dict) -> dict:
    """Teacher-forced logits of zlocal's engine against the float reference, position by position."""
    import torch

    import zlocal
    from zlocal.inference.bench import cpu_plan, decode_path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        _build_checkpoint(case, path)
        ctx = case["prompt"] + case["steps"] + 8
        plan = cpu_plan(
            str(path), case["fmt"], dtype="bfloat16", max_context=ctx, group_size=case.get("group")
        )
        rt = zlocal.load(str(path), plan=plan, dtype="bfloat16", max_context=ctx)
        gen = torch.Generator().manual_seed(case["seed"])
        ids = torch.randint(3, 32000, (case["prompt"] + case["steps"],), generator=gen).tolist()
        e = rt.engine
        e.reset()
        got = [e.prefill(ids[: case["prompt"]]).float()]
        got += [e._forward([t]).float() for t in ids[case["prompt"] : -1]]
        ref = _reference(path, rt)
        with torch.inference_mode():
            want = ref(torch.tensor([ids[:-1]])).logits[0, case["prompt"] - 1 :].float()
        errs = [((g - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want, strict=True)]
        finite = all(torch.isfinite(g).all().item() for g in got)
        top = [int(g.argmax() == w.argmax()) for g, w in zip(got, want, strict=True)]
        return {
            "err": max(errs) if finite else float("inf"),
            "top1": sum(top) / len(top),
            "path": decode_path(rt.engine),
            "layouts": sorted({getattr(m, "layout", "") for m in rt.model.modules() if hasattr(m, "layout")}),
        }


def main() -> None:
    """Serve cases from stdin, one JSON object per line, until EOF."""
    import torch

    torch.set_num_threads(int(os.environ.get("ZLOCAL_TEST_THREADS", "2")))
    runners = {
        "linear": run_linear,
        "model": run_model,
        "torch_kernel": run_torch_kernel,
        "bnb4": run_bnb4,
        "c_arguments": run_c_arguments,
    }
    for line in sys.stdin:
        case = json.loads(line)
        try:
            result = runners[case["kind"]](case)
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the case with it
            result = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
