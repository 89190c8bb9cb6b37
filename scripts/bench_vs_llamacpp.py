"""zlocal vs llama.cpp (llama-cpp-python) on the same weights at comparable bits, CPU, same threads.

Models: SmolLM2-135M-Instruct (the real weights) and a random Mistral with the 7B layer shape
(hidden 4096, intermediate 14336, 32/8 heads, vocab 32000; decode speed does not depend on the
values). ``--mistral-layers`` sets its depth: 32 is the real 7B; fewer layers keep the same
per-layer matrices (so the same kernels and the same bytes per layer) at a fraction of the disk and
build time. Each model is converted once to GGUF with llama.cpp's own converter (from the
llama-cpp-python source distribution) and quantized with llama.cpp's quantizer; everything lives
under ``zlocal.paths.cache_dir()/bench``.

Pairs compared: zlocal int8 (per-channel) vs Q8_0, and zlocal int4 with group 64 (4.5 bits per
weight, like Q4_0) vs Q4_0. Runs are interleaved (zlocal, llama.cpp, zlocal, ...) so background
load hits both alike; medians are reported with ``os.getloadavg()``. The bandwidth bound is the
measured read bandwidth over the bytes of weights each side reads per generated token.

    python scripts/bench_vs_llamacpp.py --out bench-results/vs_llamacpp.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

import zlocal
from zlocal.inference.bench import cpu_plan, loadavg, machine_info, measure_once, synthetic_prompt
from zlocal.paths import cache_dir
from zlocal.planning.hardware import measure_cpu_bandwidth

LLAMA_CPP_PYTHON = "0.3.36"
PAIRS = {8: ("int8", "Q8_0"), 4: ("int4", "Q4_0")}
INT4_GROUP = 64  # 4 bits + a bf16 scale and zero per 64 weights = 4.5 bits per weight, as Q4_0


def bench_dir() -> Path:
    d = cache_dir() / "bench"
    d.mkdir(parents=True, exist_ok=True)
    return d


def llama_cpp_source(dest: Path) -> Path:
    """llama.cpp's tree from the llama-cpp-python sdist (for convert_hf_to_gguf.py and gguf-py)."""
    root = dest / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if (root / "convert_hf_to_gguf.py").is_file():
        return root
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-d",
            str(dest),
            "--index-url",
            "https://pypi.org/simple",
            f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
        ],
        check=True,
    )
    with tarfile.open(dest / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz") as tar:
        tar.extractall(dest, filter="data")
    return root


def build_mistral(layers: int, tokenizer_dir: Path) -> Path:
    """A random bf16 Mistral with the 7B layer shape and ``layers`` layers (built once)."""
    out = bench_dir() / f"mistral-7b-shape-l{layers}"
    if (out / ".complete").exists():
        return out
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=32768,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        sliding_window=4096,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = MistralForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="2GB")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    (out / ".complete").write_text("1")
    return out


def gguf_files(model_dir: Path, name: str, src: Path, head: str = "default") -> dict[str, Path]:
    """f16 GGUF via llama.cpp's converter, then Q8_0 and Q4_0 via llama.cpp's quantizer (cached).
    ``head="q8_0"`` keeps the Q4_0 file's output layer at Q8_0 (llama.cpp's default there is Q6_K),
    the same 8 bits as zlocal's int8 output layer."""
    d = bench_dir() / "gguf"
    d.mkdir(exist_ok=True)
    f16 = d / f"{name}-f16.gguf"
    if not f16.exists():
        hf_to_gguf(src, model_dir, "f16", f16)
    out = {}
    for _bits, (_, qtype) in PAIRS.items():
        q8_head = head == "q8_0" and qtype == "Q4_0"
        q = d / f"{name}-{qtype.lower()}{'-head-q8_0' if q8_head else ''}.gguf"
        if not q.exists():
            quantize_gguf(f16, q, qtype, q8_head=q8_head)
        out[qtype] = q
    return out


def hf_to_gguf(src: Path, model_dir: Path, outtype: str, out: Path) -> None:
    """``model_dir`` converted by llama.cpp's own converter (from its source ``src``) to ``out``,
    written beside it and renamed when complete."""
    tmp = out.with_suffix(".tmp")
    subprocess.run(
        [
            sys.executable,
            str(src / "convert_hf_to_gguf.py"),
            str(model_dir),
            "--outtype",
            outtype,
            "--outfile",
            str(tmp),
        ],
        check=True,
        env={**_env(), "PYTHONPATH": str(src / "gguf-py")},
        stdout=subprocess.DEVNULL,
    )
    tmp.rename(out)


def quantize_gguf(
    src: Path, out: Path, qtype: str, *, q8_head: bool = False, requantize: bool = False
) -> None:
    """``src`` quantized to ``qtype`` (Q8_0, Q4_0) by llama.cpp's quantizer into ``out``, written beside
    it and renamed when complete; ``q8_head`` keeps the output layer at Q8_0, ``requantize`` lets the
    source be quantized already."""
    tmp = out.with_suffix(".tmp")
    code = (
        "import llama_cpp as l, sys\n"
        "p = l.llama_model_quantize_default_params()\n"
        f"p.ftype = l.LLAMA_FTYPE_MOSTLY_{qtype}; p.nthread = 2; p.allow_requantize = {requantize}\n"
        + ("p.output_tensor_type = l.GGML_TYPE_Q8_0\n" if q8_head else "")
        + "sys.exit(l.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(src), str(tmp)],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    tmp.rename(out)


def _env() -> dict:
    return dict(os.environ)


def gguf_bytes_per_token(path: Path) -> int:
    """Bytes of weights llama.cpp reads per token: every tensor but the embedding table (one row is
    gathered), unless the embedding doubles as the output matrix (tied)."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    sizes = {t.name: int(t.n_bytes) for t in r.tensors}
    total = sum(sizes.values())
    if "output.weight" in sizes:
        total -= sizes.get("token_embd.weight", 0)
    return total


def zlocal_bytes_per_token(rt) -> int:
    """Bytes of weights the zlocal runtime reads per token (the embedding table unless tied)."""
    model = rt.model
    seen, total = set(), 0
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings().weight
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        if t is emb and emb.data_ptr() != out.data_ptr():
            continue
        total += t.numel() * t.element_size()
    return total


def cpu_has_amx() -> bool:
    """True when /proc/cpuinfo lists AMX tiles (False where it cannot be read)."""
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


class LlamaCppSide:
    """llama.cpp through llama-cpp-python: prefill = one eval of the prompt, decode = greedy steps."""

    def __init__(self, path: Path, threads: int, n_ctx: int, extra_buffers: bool = False):
        import llama_cpp
        import llama_cpp.llama_cpp as low

        # ggml's AMX int8 path (an "extra buffer type", like weight repacking) segfaulted in
        # ggml_backend_amx_mul_mat on an Intel VM of this project whose CPU reports AMX; without extra
        # buffer types llama.cpp runs its plain AVX-512/AVX2 kernels (slower: on an AMD VM, SmolLM2
        # Q4_0 decoded at 147 tok/s without them and 200 with them).
        defaults = low.llama_model_default_params

        def params():
            p = defaults()
            p.use_extra_bufts = extra_buffers
            return p

        low.llama_model_default_params = params
        t0 = time.perf_counter()
        try:
            self.m = llama_cpp.Llama(
                model_path=str(path),
                n_threads=threads,
                n_threads_batch=threads,
                n_ctx=n_ctx,
                n_batch=512,
                n_ubatch=512,
                verbose=False,
            )
        finally:
            low.llama_model_default_params = defaults
        self.load_seconds = time.perf_counter() - t0
        self.n_vocab = self.m.n_vocab()

    def _argmax(self) -> int:
        logits = np.ctypeslib.as_array(self.m._ctx.get_logits(), shape=(self.n_vocab,))
        return int(logits.argmax())

    def run(self, ids: list[int], new_tokens: int) -> dict:
        m = self.m
        m.reset()
        m._ctx.kv_cache_clear()
        t0 = time.perf_counter()
        m.eval(ids)
        tok = self._argmax()
        t_prefill = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            m.eval([tok])
            tok = self._argmax()
        t_decode = time.perf_counter() - t1
        return {
            "prefill_tok_s": len(ids) / t_prefill,
            "decode_tok_s": (new_tokens - 1) / t_decode,
            "ttft_s": t_prefill,
        }


def interleaved_runs(rt, ll: LlamaCppSide, args) -> tuple[list[dict], list[dict], list[float]]:
    """(zlocal runs, llama.cpp runs, 1-minute load averages): both warmed up, then ``args.repeats``
    alternating prefill + greedy-decode runs on the same ``args.prompt_tokens`` prompt ids."""
    ids = synthetic_prompt(rt, args.prompt_tokens)
    measure_once(rt, ids[:16], 4)  # warm-up both
    ll.run(ids[:16], 4)
    z, c, loads = [], [], []
    for _ in range(args.repeats):
        loads.append(loadavg()[0])
        z.append(measure_once(rt, ids, args.new_tokens))
        time.sleep(0.2)  # let the other side's worker threads go idle
        c.append(ll.run(ids, args.new_tokens))
        time.sleep(0.2)
    return z, c, loads


def bench_pair(model_dir: Path, gguf: Path, fmt: str, args, bw_gbs: float) -> dict:
    """Interleaved runs of zlocal (``fmt``) and llama.cpp (``gguf``) on the same prompt ids."""
    n_ctx = args.prompt_tokens + args.new_tokens + 8
    plan = cpu_plan(
        str(model_dir),
        fmt,
        dtype="bfloat16",
        max_context=n_ctx,
        group_size=INT4_GROUP if fmt == "int4" else None,
    )
    t0 = time.perf_counter()
    rt = zlocal.load(str(model_dir), plan=plan, dtype="bfloat16", max_context=n_ctx)
    z_load = time.perf_counter() - t0
    ll = LlamaCppSide(gguf, args.threads, n_ctx, args.llama_extra_buffers)
    z, c, loads = interleaved_runs(rt, ll, args)

    def med(rows, key):
        return round(statistics.median(r[key] for r in rows), 3)

    zb, cb = zlocal_bytes_per_token(rt), gguf_bytes_per_token(gguf)
    res = {
        "zlocal": {
            "format": fmt,
            "group_size": plan.group_size if fmt == "int4" else None,
            "prefill_tok_s": med(z, "prefill_tok_s"),
            "decode_tok_s": med(z, "decode_tok_s"),
            "ttft_s": med(z, "ttft_s"),
            "load_seconds": round(z_load, 2),
            "weight_bytes_per_token": zb,
            "bandwidth_bound_tok_s": round(bw_gbs * 1e9 / zb, 2),
        },
        "llama_cpp": {
            "format": gguf.name,
            "prefill_tok_s": med(c, "prefill_tok_s"),
            "decode_tok_s": med(c, "decode_tok_s"),
            "ttft_s": med(c, "ttft_s"),
            "load_seconds": round(ll.load_seconds, 2),
            "weight_bytes_per_token": cb,
            "bandwidth_bound_tok_s": round(bw_gbs * 1e9 / cb, 2),
        },
        "loadavg_1min": loads,
        "runs": {"zlocal": z, "llama_cpp": c},
    }
    for side in ("zlocal", "llama_cpp"):
        s = res[side]
        s["fraction_of_bound"] = round(s["decode_tok_s"] / s["bandwidth_bound_tok_s"], 3)
    res["decode_ratio"] = round(res["zlocal"]["decode_tok_s"] / res["llama_cpp"]["decode_tok_s"], 3)
    res["prefill_ratio"] = round(res["zlocal"]["prefill_tok_s"] / res["llama_cpp"]["prefill_tok_s"], 3)
    del rt, ll
    gc.collect()
    return res


def _tokenizer_dir(given: str | None) -> Path:
    """The tokenizer for the random Mistral: ``given``, or the test fixtures' copy, built on a fresh
    checkout from mistral-common's tokenizer file (one line and a non-zero exit when that is missing)."""
    if given:
        return Path(given)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests import fixtures

    try:
        return fixtures.tokenizer_dir()
    except RuntimeError as exc:
        raise SystemExit(f"bench_vs_llamacpp: {exc}") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,mistral", help="comma list of smollm2, mistral")
    ap.add_argument("--bits", default="8,4", help="comma list of 8, 4")
    ap.add_argument("--mistral-layers", type=int, default=32, help="32 = the 7B; fewer = same layer shape")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--tokenizer",
        default=None,
        help="Mistral tokenizer dir for the random model (default: built like the test fixtures, from "
        "mistral-common's tokenizer file)",
    )
    ap.add_argument(
        "--llama-extra-buffers",
        choices=["auto", "on", "off"],
        default="auto",
        help="llama.cpp's extra buffer types (weight repacking, AMX); auto: on unless the CPU reports "
        "AMX, whose ggml path crashed on a VM here",
    )
    ap.add_argument(
        "--llama-head",
        choices=["default", "q8_0"],
        default="default",
        help="llama.cpp's output layer in the 4-bit files: its default (Q6_K) or Q8_0, the same 8 bits "
        "as zlocal's int8 output layer",
    )
    ap.add_argument("--out", default="bench-results/vs_llamacpp.json")
    args = ap.parse_args()
    args.llama_extra_buffers = (
        not cpu_has_amx() if args.llama_extra_buffers == "auto" else args.llama_extra_buffers == "on"
    )
    src = llama_cpp_source(bench_dir() / "llama-cpp-src")
    # The bound uses the machine's read bandwidth with every core reading (one core alone does not
    # saturate RAM, and llama.cpp at one thread was seen beating a one-thread measurement).
    torch.set_num_threads(os.cpu_count() or 1)
    bw = max(measure_cpu_bandwidth(512) for _ in range(2))
    torch.set_num_threads(args.threads)
    result = {
        "machine": {**machine_info(), "read_bandwidth_gbs": bw, "threads": args.threads},
        "llama_cpp_extra_buffers": args.llama_extra_buffers,
        "llama_head": args.llama_head,
        "loadavg_start": loadavg(),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "models": {},
    }
    for name in args.models.split(","):
        if name == "smollm2":
            from zlocal.checkpoint.resolve import resolve_model

            model_dir, key = Path(resolve_model("smollm2-135m").path), "smollm2-135m-instruct"
        elif name == "mistral":
            model_dir = build_mistral(args.mistral_layers, _tokenizer_dir(args.tokenizer))
            key = f"mistral-7b-shape-l{args.mistral_layers}"
        else:
            raise SystemExit(f"unknown model {name!r}; use smollm2 or mistral")
        ggufs = gguf_files(model_dir, key, src, args.llama_head)
        entry = result["models"].setdefault(key, {})
        for bits in (int(b) for b in args.bits.split(",")):
            fmt, qtype = PAIRS[bits]
            print(f"[{key}] zlocal {fmt} vs llama.cpp {qtype} ...", file=sys.stderr, flush=True)
            entry[f"{bits}bit"] = r = bench_pair(model_dir, ggufs[qtype], fmt, args, bw)
            print(
                f"  decode {r['zlocal']['decode_tok_s']} vs {r['llama_cpp']['decode_tok_s']} tok/s "
                f"({r['decode_ratio']}x), prefill {r['prefill_ratio']}x",
                file=sys.stderr,
                flush=True,
            )
    result["loadavg_end"] = loadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "models"}, indent=2))
    for key, entry in result["models"].items():
        for bits, r in entry.items():
            z, c = r["zlocal"], r["llama_cpp"]
            print(
                f"{key} {bits}: zlocal {z['decode_tok_s']} / llama.cpp {c['decode_tok_s']} tok/s decode "
                f"({r['decode_ratio']}x), prefill {z['prefill_tok_s']} / {c['prefill_tok_s']} "
                f"({r['prefill_ratio']}x)"
            )


if __name__ == "__main__":
    main()
