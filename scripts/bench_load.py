"""Load time and process memory: zlocal from the checkpoint, zlocal from its prepared form, llama.cpp.

Each measurement runs in a fresh process: imports first (timed apart), then the load call (zlocal:
``zlocal.load(MODEL, plan=...)``, llama.cpp: ``llama_cpp.Llama(...)``) to ready, then 8 greedy tokens.
A thread samples /proc/self/status every 5 ms for the peak VmRSS (what a task manager shows), RssAnon
and RssFile over the load and the first generation; the plan's estimate (``estimated_ram_bytes``) is
reported beside them. Runs per model and bit width:

- ``from_source``: the prepared form removed first, so zlocal reads and quantizes the checkpoint
  (and writes the prepared form);
- ``prepared``: the prepared form mapped (``--repeats`` runs, the page cache warm after the first);
- ``llama_cpp``: the same-bit GGUF (Q8_0 / Q4_0, made with llama.cpp's converter and quantizer from
  the same checkpoint), warm: the first run is discarded.

    python scripts/bench_load.py --models smollm2-135m,PATH_TO_7B --out bench-results/load.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
QTYPES = {8: "Q8_0", 4: "Q4_0"}
FORMATS = {8: "int8", 4: "int4"}


class Peaks:
    """Samples VmRSS, RssAnon and RssFile (GiB) every 5 ms in a daemon thread."""

    KEYS = ("VmRSS", "RssAnon", "RssFile")

    def __init__(self):
        self.peak = dict.fromkeys(self.KEYS, 0.0)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def sample(self) -> dict[str, float]:
        now = {}
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in self.KEYS:
                    now[key] = int(line.split()[1]) / 2**20
        for k, v in now.items():
            self.peak[k] = max(self.peak[k], v)
        return now

    def _run(self):
        while not self._stop.wait(0.005):
            self.sample()

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._t.join()
        self.sample()
        return {f"peak_{k}_gib": round(v, 3) for k, v in self.peak.items()}


def child_zlocal(model: str, bits: int) -> dict:
    t0 = time.perf_counter()
    import zlocal
    from zlocal import load
    from zlocal.inference.bench import cpu_plan

    # bits 0: a checkpoint stored quantized (GPTQ, bitsandbytes), loaded in its own format
    plan = cpu_plan(model, FORMATS[bits], group_size=64 if bits == 4 else None) if bits else "auto"
    imports = time.perf_counter() - t0
    peaks = Peaks()
    base = peaks.sample()
    t1 = time.perf_counter()
    rt = load(model, plan=plan)
    ready = time.perf_counter() - t1
    t2 = time.perf_counter()
    rt.generate("The capital of France is", max_new_tokens=1, temperature=0)
    first = time.perf_counter() - t2
    rt.generate("The capital of France is", max_new_tokens=8, temperature=0)
    out = peaks.stop()
    return {
        "imports_and_plan_s": round(imports, 3),
        "load_s": round(ready, 3),
        "first_token_s": round(first, 3),
        "rss_before_load_gib": round(base["VmRSS"], 3),
        "anon_before_load_gib": round(base["RssAnon"], 3),
        "estimated_ram_gib": round(rt.plan.estimated_ram_bytes / 2**30, 3),
        "prepared": any("mapped from the prepared form" in r for r in rt.plan.reasons),
        "zlocal": zlocal.__version__,
        **out,
    }


def child_llama(gguf: str) -> dict:
    t0 = time.perf_counter()
    import llama_cpp

    imports = time.perf_counter() - t0
    peaks = Peaks()
    base = peaks.sample()
    t1 = time.perf_counter()
    m = llama_cpp.Llama(model_path=gguf, n_threads=os.cpu_count(), n_ctx=512, verbose=False)
    ready = time.perf_counter() - t1
    t2 = time.perf_counter()
    m.create_completion("The capital of France is", max_tokens=1, temperature=0)
    first = time.perf_counter() - t2
    m.reset()
    m.create_completion("The capital of France is", max_tokens=8, temperature=0)
    out = peaks.stop()
    return {
        "imports_s": round(imports, 3),
        "load_s": round(ready, 3),
        "first_token_s": round(first, 3),
        "rss_before_load_gib": round(base["VmRSS"], 3),
        **out,
    }


def run_child(*args: str, env: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"bench_load: child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gguf_for(model_dir: Path, name: str, bits: int, gguf_dir: Path) -> Path:
    """Q8_0 straight from llama.cpp's converter; Q4_0 re-quantized from it (the bench reads load
    time and memory, not quality, and this avoids a 14 GB f16 intermediate for the 7B)."""
    sys.path.insert(0, str(HERE))
    from bench_vs_llamacpp import hf_to_gguf, llama_cpp_source, quantize_gguf

    gguf_dir.mkdir(parents=True, exist_ok=True)
    q8 = gguf_dir / f"{name}-q8_0.gguf"
    if not q8.exists():
        hf_to_gguf(llama_cpp_source(gguf_dir.parent / "llama-cpp-src"), model_dir, "q8_0", q8)
    if bits == 8:
        return q8
    q4 = gguf_dir / f"{name}-q4_0.gguf"
    if not q4.exists():
        quantize_gguf(q8, q4, "Q4_0", requantize=True)
    return q4


def drop_prepared(root: Path, model_dir: Path, bits: int | None = None) -> None:
    """Remove the prepared forms of ``model_dir`` (of ``bits`` only, if given) from ``root``."""
    for entry in root.glob("*/prepared.json"):
        meta = json.loads(entry.read_text())
        if meta.get("source") == str(model_dir) and bits in (None, meta.get("bits")):
            shutil.rmtree(entry.parent)


def bench_stored(model: str, model_dir: Path, args, env: dict) -> dict:
    """A checkpoint stored quantized: its first load (moved onto zlocal's kernels) and the mapped
    loads after it; llama.cpp has no file of the same weights."""
    drop_prepared(Path(env["ZLOCAL_PREPARED_DIR"]), model_dir)
    print(f"[{model_dir.name}] from the checkpoint ...", file=sys.stderr, flush=True)
    cold = run_child("zlocal", model, "0", env=env)
    warm = [run_child("zlocal", model, "0", env=env) for _ in range(args.repeats)]
    res = {
        "from_source": cold,
        "prepared": warm,
        "prepared_load_s": statistics.median(r["load_s"] for r in warm),
    }
    print(
        f"  load: from the checkpoint {cold['load_s']} s, then {res['prepared_load_s']} s; peak VmRSS "
        f"{cold['peak_VmRSS_gib']} GiB vs estimate {cold['estimated_ram_gib']}",
        file=sys.stderr,
        flush=True,
    )
    return res


def bench_model(model: str, bits: int, args, env: dict) -> dict:
    from zlocal.checkpoint.resolve import resolve_model

    model_dir = Path(resolve_model(model).path)
    name = model_dir.name
    if "quantization_config" in json.loads((model_dir / "config.json").read_text()):
        return bench_stored(model, model_dir, args, env)
    drop_prepared(Path(env["ZLOCAL_PREPARED_DIR"]), model_dir, bits)  # the first load quantizes
    print(f"[{name} {bits}-bit] from the checkpoint ...", file=sys.stderr, flush=True)
    cold = run_child("zlocal", model, str(bits), env=env)
    warm = [run_child("zlocal", model, str(bits), env=env) for _ in range(args.repeats)]
    gguf = gguf_for(model_dir, name, bits, Path(args.gguf_dir))
    llama = [run_child("llama", str(gguf), env=env) for _ in range(args.repeats + 1)][1:]
    med = statistics.median
    res = {
        "from_source": cold,
        "prepared": warm,
        "llama_cpp": llama,
        "gguf": gguf.name,
        "prepared_load_s": med(r["load_s"] for r in warm),
        "llama_cpp_load_s": med(r["load_s"] for r in llama),
    }
    res["prepared_first_token_s"] = med(r["first_token_s"] for r in warm)
    res["llama_cpp_first_token_s"] = med(r["first_token_s"] for r in llama)
    res["prepared_minus_llama_cpp_s"] = round(res["prepared_load_s"] - res["llama_cpp_load_s"], 3)
    print(
        f"  load: from the checkpoint {cold['load_s']} s, prepared {res['prepared_load_s']} s, "
        f"llama.cpp {res['llama_cpp_load_s']} s; peak VmRSS {cold['peak_VmRSS_gib']} / "
        f"{warm[-1]['peak_VmRSS_gib']} GiB vs estimate {cold['estimated_ram_gib']}",
        file=sys.stderr,
        flush=True,
    )
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--models", default="smollm2-135m", help="comma list of model names or checkpoint dirs")
    ap.add_argument("--bits", default="4,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--gguf-dir", default=None, help="where the GGUF files are made (default: zlocal's bench cache)"
    )
    ap.add_argument(
        "--prepared-dir", default=None, help="the prepared-form cache to use (default: the bench's own)"
    )
    ap.add_argument("--out", default="bench-results/load.json")
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        print(json.dumps(child_zlocal(rest[0], int(rest[1])) if kind == "zlocal" else child_llama(rest[0])))
        return
    from zlocal.paths import cache_dir

    bench = cache_dir() / "bench"
    args.gguf_dir = args.gguf_dir or str(bench / "gguf")
    env = {**os.environ, "ZLOCAL_PREPARED_DIR": args.prepared_dir or str(bench / "prepared")}
    result = {"machine": os.uname().nodename, "cpus": os.cpu_count(), "models": {}}
    for model in args.models.split(","):
        for bits in (int(b) for b in args.bits.split(",")):
            entry = result["models"].setdefault(model, {})
            entry[f"{bits}bit"] = r = bench_model(model, bits, args, env)
            if "llama_cpp" not in r:
                break  # stored quantized: one format whatever --bits says
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(out)


if __name__ == "__main__":
    main()
