"""zlocal bench: the command reports sane JSON and the multi-turn measurement counts tokens right."""

from __future__ import annotations

import json

import pytest

from zlocal import cli
from zlocal.errors import InvalidArgumentError
from zlocal.inference.bench import conversation, measure_multiturn, run_bench, synthetic_prompt
from zlocal.inference.engine import common_prefix
from zlocal.kernels import cpu_kernels


def test_bench_command_json(tiny_zephyr, capsys):
    rc = cli.main([
        "bench", str(tiny_zephyr), "--plan", "int8", "--prompt-tokens", "40", "--new-tokens", "6",
        "--repeats", "1", "--conversation-tokens", "240", "--threads", "2", "--json",
    ])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    assert r["plan"]["cpu_format"] == "int8" and r["plan"]["gpu_layers"] == 0
    assert r["prompt_tokens"] == 40 and r["new_tokens"] == 6
    assert r["runs"][0]["generated"] == 6  # stop tokens are ignored while measuring
    for key in ("prefill_tok_s", "decode_tok_s", "time_to_first_token_s", "load_seconds"):
        assert r[key] > 0, key
    assert r["peak_rss_bytes"] > 50 * 2**20
    assert r["peak_vram_bytes"] is None  # CPU run
    assert len(r["loadavg_before"]) == 3 and r["torch_threads"] == 2
    # bf16 int8 layers on zlocal's own kernels decode in one call per token; else the lean forward
    on_kernel = r["dtype"] == "bfloat16" and cpu_kernels.kernels() is not None
    assert r["decode_path"].startswith("zlocal decode kernel" if on_kernel else "zlocal lean forward ("), r
    m = r["multiturn"]
    assert m["turns"] == 5
    assert m["prefilled_tokens_full"] == m["conversation_tokens"]
    assert m["reused_tokens"] + m["prefilled_tokens_reuse"] == m["conversation_tokens"]
    # speedup is rounded to two decimals
    assert m["speedup"] == pytest.approx(m["ttft_full_s"] / m["ttft_reuse_s"], rel=0.02, abs=0.006)


def test_bench_command_rejects_bad_numbers(tiny_zephyr, capsys):
    rc = cli.main(["bench", str(tiny_zephyr), "--new-tokens", "1"])
    assert rc != 0
    err = capsys.readouterr().err
    assert "--new-tokens" in err and "Traceback" not in err


def test_synthetic_prompt_length(tiny_runtime):
    assert len(synthetic_prompt(tiny_runtime, 123)) == 123
    with pytest.raises(InvalidArgumentError):
        synthetic_prompt(tiny_runtime, 0)


def test_multiturn_counts_reused_and_prefilled_tokens(tiny_runtime):
    rt = tiny_runtime
    msgs = conversation(5, 300, rt)
    prompts = [rt.encode_chat(msgs[: 2 * k + 1]) for k in range(5)]
    # After turn 4 the cache holds its prompt plus the assistant's reply, as a session's would.
    turn4 = rt.template.encode(msgs[:8], add_generation_prompt=False)
    shared = common_prefix(turn4, prompts[4])
    assert shared > len(prompts[3])  # the cache holds the reply too
    # Reused: the shared prefix that full prefill chunks aligned to the chunk size wrote.
    c = rt.engine.prefill_chunk
    expect = min(shared, len(turn4) // c * c, len(prompts[4]) - 1) // c * c
    assert expect > 0 and shared - expect < c
    m = measure_multiturn(rt, turns=5, target_tokens=300, repeats=1)
    assert m.conversation_tokens == len(prompts[4])
    assert m.reused_tokens == expect
    assert m.prefilled_tokens_reuse == len(prompts[4]) - expect
    assert m.prefilled_tokens_full == len(prompts[4])
    assert rt.engine.stats.last_reused == 0  # the last measured call started from an empty cache


def test_multiturn_too_long_for_context(tiny_runtime):
    with pytest.raises(InvalidArgumentError, match="context"):
        measure_multiturn(tiny_runtime, turns=5, target_tokens=5000, repeats=1)


def test_run_bench_restores_stop_tokens(tiny_runtime):
    stops = tiny_runtime.engine.stop_token_ids
    r = run_bench(tiny_runtime, prompt_tokens=20, new_tokens=4, repeats=1, multiturn=False)
    assert tiny_runtime.engine.stop_token_ids == stops
    assert r.multiturn is None and r.runs[0]["generated"] == 4
    assert r.decode_tok_s > 0
