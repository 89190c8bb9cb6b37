"""Benchmark the streaming bitsandbytes converter on a random 7B-shaped (Mistral/Zephyr) checkpoint.

Builds a random bf16 checkpoint with Mistral-7B's shapes once (14.5 GB, 8 shards like
zephyr-7b-beta, Mistral's tokenizer) under the zlocal cache, converts it with each bitsandbytes
method in a fresh child process with the default flags (quality report included; ``--no-eval``
skips it), and writes JSON with wall time, the child's peak RSS, the output size and the report.

    python scripts/bench_convert.py --out bench-results/convert.json [--methods nf4,int8,fp4] [--layers 32]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from zlocal.paths import cache_dir

MISTRAL_7B = dict(
    architectures=["MistralForCausalLM"],
    model_type="mistral",
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=32768,
    sliding_window=4096,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    hidden_act="silu",
    dtype="bfloat16",
)

# Child: run one conversion and report its own peak RSS (ru_maxrss is per process, in KiB on Linux).
_CHILD = """
import json, resource, sys, time
from zlocal.conversion.convert import convert
t = time.time()
r = convert(sys.argv[1], sys.argv[2], sys.argv[3], evaluate=sys.argv[4] == "eval", quiet=True)
print(json.dumps({"seconds": round(time.time() - t, 2), "output_bytes": r.output_bytes, "files": len(r.files),
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "quality": r.quality}))
"""


def _tokenizer_dir() -> Path:
    """Mistral's tokenizer, built like the test fixtures' from mistral-common's file."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests import fixtures

    try:
        return fixtures.tokenizer_dir()
    except RuntimeError as exc:
        raise SystemExit(f"bench_convert: {exc}") from None


def build_checkpoint(dest: Path, layers: int, shards: int = 8) -> Path:
    """Write the random checkpoint once (atomic: a .complete marker is written last)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    if (dest / ".complete").exists():
        if not (dest / "tokenizer_config.json").exists():  # built before the report needed one
            AutoTokenizer.from_pretrained(_tokenizer_dir()).save_pretrained(dest)
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    cfg = {**MISTRAL_7B, "num_hidden_layers": layers}
    h, inter, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_key_value_heads"] * cfg["head_dim"]
    names: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (cfg["vocab_size"], h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        names += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    names += [("model.norm.weight", (h,)), ("lm_head.weight", (cfg["vocab_size"], h))]
    total = sum(2 * torch.Size(s).numel() for _, s in names)
    per_shard = total / shards
    g = torch.Generator().manual_seed(0)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    acc = 0
    for n, s in names:
        if acc >= per_shard * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append((n, s))
        acc += 2 * torch.Size(s).numel()
    weight_map = {}
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        sd = {}
        for n, s in group:
            t = torch.empty(s, dtype=torch.bfloat16)
            if len(s) == 1:
                t.fill_(1.0)
            else:
                t.normal_(0.0, 0.02, generator=g)
            sd[n] = t
            weight_map[n] = fname
        save_file(sd, str(dest / fname), metadata={"format": "pt"})
        del sd
        print(f"built {fname}", file=sys.stderr)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    AutoTokenizer.from_pretrained(_tokenizer_dir()).save_pretrained(dest)
    (dest / ".complete").write_text("ok")
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-results/convert.json", help="JSON result file")
    ap.add_argument("--methods", default="nf4,int8,fp4")
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (32 = Mistral-7B)")
    ap.add_argument("--work", default=None, help="where outputs go (default: zlocal cache/bench)")
    ap.add_argument("--no-eval", action="store_true", help="skip the quality report (not the default)")
    args = ap.parse_args(argv)

    base = cache_dir() / "bench"
    t = time.time()
    src = build_checkpoint(base / f"mistral-7b-random-bf16-l{args.layers}", args.layers)
    build_s = time.time() - t
    work = Path(args.work) if args.work else base / "outputs"
    work.mkdir(parents=True, exist_ok=True)
    source_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    results = []
    for method in args.methods.split(","):
        out = work / f"out-{method}"
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, str(src), str(out), method, "no-eval" if args.no_eval else "eval"],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            results.append({"method": method, "error": proc.stderr.strip().splitlines()[-1:]})
        else:
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(
                {
                    "method": method,
                    **r,
                    "peak_rss_gb": round(r["peak_rss_bytes"] / 2**30, 3),
                    "output_gb": round(r["output_bytes"] / 2**30, 3),
                }
            )
        print(json.dumps(results[-1]), file=sys.stderr)
        shutil.rmtree(out, ignore_errors=True)
    report = {
        "source": str(src),
        "source_gb": round(source_bytes / 2**30, 3),
        "layers": args.layers,
        "build_seconds": round(build_s, 1),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": __import__("os").cpu_count(),
        "torch": torch.__version__,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
