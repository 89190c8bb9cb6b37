"""Cost of constrained decoding: per-token decode time with a grammar vs free, and schema compile time.

SmolLM2-135M-Instruct, int8 on the CPU kernels (every layer on zlocal's one-call decode kernel where
the CPU runs it). Free and constrained runs alternate (free, constrained, free, ...) so background load
hits both alike; medians are reported. Both run exactly ``--tokens`` decode steps (stop tokens off;
the schemas are long enough that the grammar is not complete before). ``--compare`` adds the mask cost
and JSON-schema coverage of xgrammar beside llguidance on the same vocabulary (pip install xgrammar).

    python scripts/bench_grammar.py --out bench-results/grammar.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper, as JSON."}]
SCHEMAS = {
    # one long free string: the mask is cheap to compute (any string token), applied every step
    "long string": {
        "type": "object",
        "properties": {"story": {"type": "string", "minLength": 4000}},
        "required": ["story"],
        "additionalProperties": False,
    },
    # many small objects: keys, enums, integer ranges, short strings (the grammar works every step)
    "array of records": {
        "type": "array",
        "minItems": 200,
        "items": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 12},
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                "color": {"enum": ["red", "green", "blue"]},
                "ok": {"type": "boolean"},
            },
            "required": ["name", "age", "color", "ok"],
            "additionalProperties": False,
        },
    },
}


def _decode_ms(rt, tokens: int, response_format=None, temperature=0.0) -> float:
    rt.engine.reset()
    with rt.engine.without_stop_tokens():
        done = rt.chat_completion(
            PROMPT, response_format=response_format, temperature=temperature, seed=0, max_tokens=tokens
        )
    assert done.completion_tokens == tokens, (done.completion_tokens, done.finish_reason)
    return 1000.0 / done.generation_tps


def decode_cost(rt, tokens: int, repeats: int) -> dict:
    """Median ms per decode step, free and constrained, greedy and sampled, per schema."""
    out = {}
    _decode_ms(rt, tokens, SCHEMAS["long string"])  # warm-up: first-call costs hit neither side
    for temperature in (0.0, 0.7):
        for name, schema in SCHEMAS.items():
            free, constrained = [], []
            for _ in range(repeats):
                free.append(_decode_ms(rt, tokens, None, temperature))
                constrained.append(_decode_ms(rt, tokens, schema, temperature))
            f, c = statistics.median(free), statistics.median(constrained)
            key = f"{name}, {'greedy' if temperature == 0 else 'temperature 0.7'}"
            out[key] = {
                "free_ms_per_token": round(f, 3),
                "constrained_ms_per_token": round(c, 3),
                "slowdown_percent": round(100 * (c / f - 1), 1),
            }
    return out


def compile_cost(rt, count: int) -> dict:
    """Compile time of distinct schemas on an already built vocabulary (the first one apart)."""
    from zlocal.inference.grammar import GrammarCompiler

    t0 = time.perf_counter()
    n_vocab = rt.model.config.get_text_config(decoder=True).vocab_size
    compiler = GrammarCompiler(rt.tokenizer, n_vocab, rt.template.stop_token_ids)
    vocab_s = time.perf_counter() - t0
    times = []
    for i in range(count):
        schema = json.loads(json.dumps(SCHEMAS["array of records"]))
        schema["items"]["properties"]["age"]["maximum"] = 100 + i  # a new schema: no cache hit
        schema["items"]["properties"][f"extra{i}"] = {"type": "string", "pattern": "^[a-z]{2,5}$"}
        t0 = time.perf_counter()
        compiler.json_schema(schema)
        times.append(1000 * (time.perf_counter() - t0))
    t0 = time.perf_counter()
    compiler.json_schema(schema)
    cached = 1000 * (time.perf_counter() - t0)
    later = times[1:]
    return {
        "vocabulary_build_s": round(vocab_s, 3),
        "first_schema_ms": round(times[0], 3),
        "later_schemas_median_ms": round(statistics.median(later), 3),
        "later_schemas_max_ms": round(max(later), 3),
        "cache_hit_ms": round(cached, 4),
    }


# keyword: (schema, a valid value, a value the keyword forbids)
COVERAGE = {
    "pattern": ({"type": "string", "pattern": "^[0-9]{3}$"}, "123", "12a"),
    "format date-time": ({"type": "string", "format": "date-time"}, "2024-01-02T03:04:05Z", "soon"),
    "minLength/maxLength": ({"type": "string", "minLength": 2, "maxLength": 3}, "abc", "abcd"),
    "minimum/maximum": ({"type": "integer", "minimum": 5, "maximum": 9}, 5, 10),
    "exclusiveMinimum": ({"type": "integer", "exclusiveMinimum": 5}, 6, 5),
    "multipleOf": ({"type": "integer", "multipleOf": 3}, 9, 10),
    "minItems/maxItems": (
        {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2},
        [1],
        [1, 2, 3],
    ),
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 2], [1, 1]),
    "enum/const": ({"enum": ["x", "y"]}, "x", "z"),
    "anyOf/oneOf": ({"oneOf": [{"type": "integer"}, {"type": "string"}]}, 1, True),
    "allOf": ({"allOf": [{"type": "integer"}, {"minimum": 3}]}, 3, 2),
    "not": ({"not": {"type": "integer"}}, "a", 1),
    "$ref/$defs (recursive)": (
        {
            "$defs": {
                "n": {
                    "type": "object",
                    "properties": {"c": {"type": "array", "items": {"$ref": "#/$defs/n"}}},
                    "required": ["c"],
                    "additionalProperties": False,
                }
            },
            "$ref": "#/$defs/n",
        },
        {"c": [{"c": []}]},
        {"c": [{}]},
    ),
    "required/additionalProperties": (
        {
            "type": "object",
            "properties": {"a": {"type": "integer"}},
            "required": ["a"],
            "additionalProperties": False,
        },
        {"a": 1},
        {"b": 1},
    ),
    "patternProperties": (
        {"type": "object", "patternProperties": {"^x": {"type": "integer"}}, "additionalProperties": False},
        {"xa": 1},
        {"xa": "s"},
    ),
    "minProperties/maxProperties": ({"type": "object", "minProperties": 1, "maxProperties": 1}, {"a": 1}, {}),
    "if/then": ({"if": {"type": "integer"}, "then": {"minimum": 3}}, 3, 2),
    "dependentRequired": (
        {"type": "object", "properties": {"a": {}, "b": {}}, "dependentRequired": {"a": ["b"]}},
        {"a": 1, "b": 1},
        {"a": 1},
    ),
    "contains": ({"type": "array", "contains": {"const": 1}}, [1], [2]),
    "prefixItems": (
        {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
        [1, "a"],
        ["a", 1],
    ),
}


def _verdict(accepts, schema, good, bad) -> str:
    """enforced / IGNORED (accepts what the keyword forbids) / refused (an error naming it)."""
    try:
        ok, wrong = accepts(schema, good), accepts(schema, bad)
    except Exception as exc:  # noqa: BLE001 - any refusal is a verdict
        return "refused: " + str(exc).splitlines()[0][:80]
    if ok and not wrong:
        return "enforced"
    return "IGNORED" if ok else "rejects valid input"


def compare(tokenizer) -> dict:
    """llguidance vs xgrammar on this vocabulary: mask time per token along a valid document, compile
    time, and what each does with each JSON-schema keyword."""
    import llguidance
    import llguidance.hf
    import torch
    import xgrammar as xgr

    n = len(tokenizer)
    schema = SCHEMAS["array of records"] | {"minItems": 1}
    rows = [{"name": f"n{i}", "age": 20 + i, "color": "green", "ok": i % 2 == 0} for i in range(6)]
    ids = tokenizer(json.dumps(rows), add_special_tokens=False)["input_ids"]
    layout = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    t0 = time.perf_counter()
    lt = llguidance.hf.from_tokenizer(tokenizer, n_vocab=n)
    llg_vocab = time.perf_counter() - t0
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=n)
    comp = xgr.GrammarCompiler(info, max_threads=1)
    xgr_vocab = time.perf_counter() - t0
    t0 = time.perf_counter()
    lgram = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=layout)
    llguidance.LLMatcher(lt, lgram)
    llg_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    cg = comp.compile_json_schema(json.dumps(schema), any_whitespace=False)
    xgr_compile = time.perf_counter() - t0
    bits = torch.zeros((n + 31) // 32, dtype=torch.int32)
    xbits = xgr.allocate_token_bitmask(1, n)

    def llg_walk():
        m, ts = llguidance.LLMatcher(lt, lgram), []
        for t in ids:
            t0 = time.perf_counter()
            m.unsafe_compute_mask_ptr(bits.data_ptr(), bits.numel() * 4)
            ts.append(time.perf_counter() - t0)
            m.consume_token(t)
        return ts

    def xgr_walk():
        m, ts = xgr.GrammarMatcher(cg), []
        for t in ids:
            t0 = time.perf_counter()
            m.fill_next_token_bitmask(xbits)
            ts.append(time.perf_counter() - t0)
            m.accept_token(t)
        return ts

    def llg_accepts(s, value):
        m = llguidance.LLMatcher(lt, llguidance.LLMatcher.grammar_from_json_schema(s, defaults=layout))
        if m.is_error():
            raise ValueError(m.get_error())
        return (
            m.consume_tokens(tokenizer(json.dumps(value), add_special_tokens=False)["input_ids"])
            and m.is_accepting()
        )

    def xgr_accepts(s, value):
        m = xgr.GrammarMatcher(comp.compile_json_schema(json.dumps(s), any_whitespace=False))
        return m.accept_string(json.dumps(value)) and m.accept_token(tokenizer.eos_token_id)

    out = {}
    for name, walk, vocab, comp_s in (("llguidance", llg_walk, llg_vocab, llg_compile),
                                       ("xgrammar", xgr_walk, xgr_vocab, xgr_compile)):  # fmt: skip
        walk()  # warm
        ts = [1000 * t for _ in range(5) for t in walk()]
        out[name] = {
            "mask_ms_mean": round(statistics.mean(ts), 4),
            "mask_ms_p95": round(sorted(ts)[int(0.95 * len(ts))], 4),
            "mask_ms_max": round(max(ts), 4),
            "vocabulary_build_s": round(vocab, 3),
            "first_compile_ms": round(1000 * comp_s, 3),
        }
    out["coverage"] = {
        kw: {"llguidance": _verdict(llg_accepts, *case), "xgrammar": _verdict(xgr_accepts, *case)}
        for kw, case in COVERAGE.items()
    }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128, help="decode steps per run")
    ap.add_argument("--repeats", type=int, default=3, help="runs per side (medians)")
    ap.add_argument("--compiles", type=int, default=20, help="distinct schemas compiled")
    ap.add_argument("--compare", action="store_true", help="also measure xgrammar (mask cost, coverage)")
    ap.add_argument("--out", default="bench-results/grammar.json")
    args = ap.parse_args(argv)

    import torch

    import zlocal
    from zlocal.checkpoint.embedded import ensure_embedded_model
    from zlocal.inference.bench import cpu_plan, decode_path, machine_info

    path = str(ensure_embedded_model())
    plan = cpu_plan(path, "int8", dtype="bfloat16", max_context=2048)
    rt = zlocal.load(path, plan=plan, dtype="bfloat16", max_context=2048)
    report = {
        "model": "SmolLM2-135M-Instruct int8 (CPU)",
        "decode_path": decode_path(rt.engine),
        "threads": torch.get_num_threads(),
        "machine": machine_info(),
        "tokens": args.tokens,
        "repeats": args.repeats,
        "decode": decode_cost(rt, args.tokens, args.repeats),
        "compile": compile_cost(rt, args.compiles),
    }
    if args.compare:
        report["compare"] = compare(rt.tokenizer)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: report[k] for k in ("decode_path", "decode", "compile")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
