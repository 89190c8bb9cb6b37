"""Measure a loaded Runtime: prefill, decode, time to first token, memory, and multi-turn prefix reuse.

Numbers are medians over ``repeats`` runs. Stop tokens are ignored while measuring so that every
run decodes exactly ``new_tokens`` tokens (a random or chatty model would otherwise stop at a
different point each time). ``os.getloadavg()`` is recorded because on a shared machine background
load moves the numbers more than any optimisation does.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import resource
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from zlocal.errors import InvalidArgumentError
from zlocal.formats import quantized_on_load
from zlocal.inference.engine import common_prefix

# Plain English filler for synthetic prompts; its content does not matter for speed.
_FILLER = (
    "The lighthouse keeper climbed the spiral stairs at dusk, trimmed the wick, polished the lens and "
    "wrote the weather, the passing ships and the state of the lamp into the log before midnight. "
)

# Shorthand plans for `zlocal bench --plan`: every layer on the CPU in this weight format.
# The formats `zlocal bench --plan` can put every layer in: those the CPU quantizes into at load.
CPU_FORMATS = tuple(quantized_on_load({}, "cpu"))


@dataclass
class MultiTurnReport:
    """Time to first token of the last turn of a chat, with prefix reuse and re-prefilling it all."""

    turns: int
    conversation_tokens: int  # prompt tokens of the last turn
    reused_tokens: int  # cache positions reused at the last turn
    prefilled_tokens_reuse: int  # tokens the last turn prefilled with reuse
    prefilled_tokens_full: int  # tokens it prefilled without
    ttft_reuse_s: float
    ttft_full_s: float
    speedup: float


@dataclass
class BenchReport:
    """What `zlocal bench` prints; plain data, serializable to JSON."""

    model: str
    device: str
    dtype: str
    plan: dict | None
    load_seconds: float
    prompt_tokens: int
    new_tokens: int
    repeats: int
    prefill_tok_s: float
    decode_tok_s: float
    time_to_first_token_s: float
    peak_rss_bytes: int
    peak_vram_bytes: int | None
    torch_threads: int
    loadavg_before: list[float]
    loadavg_after: list[float]
    machine: dict[str, Any] = field(default_factory=dict)
    runs: list[dict] = field(default_factory=list)
    multiturn: MultiTurnReport | None = None
    decode_path: str = ""  # which forward generated the tokens (see ``decode_path``)

    def to_dict(self) -> dict:
        return asdict(self)


def decode_path(engine) -> str:
    """Which forward generates tokens on ``engine``, and why not a faster one."""
    fast = engine.fast
    if fast is None:
        return f"transformers forward (lean forward off: {engine.fast_reason})"
    if fast.stack_reason is None:
        return "zlocal decode kernel (every layer in one call per token)"
    return f"zlocal lean forward (decode kernel off: {fast.stack_reason})"


def machine_info() -> dict[str, Any]:
    """Platform, CPU count, torch version and GPU name (if any) for a benchmark record."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def loadavg() -> list[float]:
    """The 1/5/15 minute load averages (zeros where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return [0.0, 0.0, 0.0]


def synthetic_prompt(rt, n_tokens: int) -> list[int]:
    """Exactly ``n_tokens`` token ids of plain text (starting with BOS when the tokenizer adds one)."""
    if n_tokens < 1:
        raise InvalidArgumentError(f"--prompt-tokens must be >= 1, got {n_tokens}")
    text = _FILLER
    ids = rt.encode(text)
    while len(ids) < n_tokens:
        text += _FILLER
        ids = rt.encode(text)
    return ids[:n_tokens]


def measure_once(rt, ids: list[int], new_tokens: int) -> dict:
    """One cold run (empty cache): prefill + ``new_tokens`` greedy decode steps."""
    rt.engine.reset()
    with rt.engine.without_stop_tokens():
        c = rt.generate(ids, temperature=0, max_new_tokens=new_tokens)
    return {
        "prefill_tok_s": c.prompt_tps,
        "decode_tok_s": c.generation_tps,
        "ttft_s": c.time_to_first_token,
        "generated": c.completion_tokens,
    }


def conversation(turns: int, target_tokens: int, rt) -> list[dict[str, str]]:
    """A deterministic ``turns``-turn chat (user/assistant pairs, then the last user message) whose
    rendered prompt is about ``target_tokens`` long."""
    per_msg_tokens = max(8, target_tokens // (2 * turns) - 8)  # minus the template's tokens per message
    words = _FILLER.split()
    tokens_per_word = len(rt.encode(_FILLER, add_special_tokens=False)) / len(words)
    n_words = max(1, int(per_msg_tokens / tokens_per_word))
    text = " ".join(words[i % len(words)] for i in range(n_words))
    msgs: list[dict[str, str]] = []
    for t in range(turns):
        msgs.append({"role": "user", "content": f"Question {t + 1}. {text}"})
        if t < turns - 1:
            msgs.append({"role": "assistant", "content": f"Answer {t + 1}. {text}"})
    return msgs


def measure_multiturn(rt, turns: int = 5, target_tokens: int = 2048, repeats: int = 3) -> MultiTurnReport:
    """TTFT of turn ``turns`` after the earlier turns ran on the same engine (prefix reuse) vs on an
    empty cache (the whole history prefilled). Earlier turns leave their prompt and the assistant's reply
    in the cache, as a chat session does, so turn ``turns`` only prefills the new user message."""
    msgs = conversation(turns, target_tokens, rt)
    prompts = [rt.encode_chat(msgs[: 2 * k + 1]) for k in range(turns)]
    # What a chat session's cache holds after each earlier turn: its prompt plus the assistant's
    # reply and end-of-turn token, as if the engine had generated them.
    history = [rt.template.encode(msgs[: 2 * k + 2], add_generation_prompt=False) for k in range(turns - 1)]
    last = prompts[-1]
    need = len(last) + 1
    if need > rt.max_context:
        raise InvalidArgumentError(
            f"the {turns}-turn conversation needs {need} tokens but the context is {rt.max_context}; "
            "load with a larger --max-context or measure a shorter conversation"
        )
    e = rt.engine
    reuse_t, full_t = [], []
    reused = prefilled_reuse = prefilled_full = 0
    with e.without_stop_tokens():
        for _ in range(repeats):
            e.reset()
            for h in history:
                rt.generate(h, temperature=0, max_new_tokens=1)
            shared = common_prefix(e.cached_ids, last)
            expect = e.reusable(last)
            c = rt.generate(last, temperature=0, max_new_tokens=1)
            reuse_t.append(c.time_to_first_token)
            reused, prefilled_reuse = e.stats.last_reused, e.stats.last_prefilled
            # The engine keeps what full aligned prefill chunks wrote of the shared prefix: at
            # most one chunk of it is prefilled again (see zlocal.inference.engine).
            if reused != expect or not 0 <= shared - reused <= e.prefill_chunk:
                raise RuntimeError(f"engine reused {reused} tokens of the {shared} the cache shared")
            e.reset()
            c = rt.generate(last, temperature=0, max_new_tokens=1)
            full_t.append(c.time_to_first_token)
            prefilled_full = e.stats.last_prefilled
    r, f = statistics.median(reuse_t), statistics.median(full_t)
    return MultiTurnReport(
        turns=turns,
        conversation_tokens=len(last),
        reused_tokens=reused,
        prefilled_tokens_reuse=prefilled_reuse,
        prefilled_tokens_full=prefilled_full,
        ttft_reuse_s=round(r, 5),
        ttft_full_s=round(f, 5),
        speedup=round(f / max(r, 1e-9), 2),
    )


def run_bench(
    rt,
    *,
    prompt_tokens: int = 512,
    new_tokens: int = 64,
    repeats: int = 3,
    multiturn: bool = True,
    multiturn_tokens: int = 2048,
    turns: int = 5,
) -> BenchReport:
    """Benchmark a loaded Runtime. One warm-up run, then ``repeats`` measured runs (medians)."""
    if new_tokens < 2:
        raise InvalidArgumentError(f"--new-tokens must be >= 2 to time decode, got {new_tokens}")
    if repeats < 1:
        raise InvalidArgumentError(f"--repeats must be >= 1, got {repeats}")
    if prompt_tokens + new_tokens > rt.max_context:
        raise InvalidArgumentError(
            f"--prompt-tokens {prompt_tokens} + --new-tokens {new_tokens} exceed the context of "
            f"{rt.max_context} tokens; lower them or raise --max-context"
        )
    before = loadavg()
    ids = synthetic_prompt(rt, prompt_tokens)
    measure_once(rt, ids[: min(len(ids), 16)], 2)  # warm-up: allocations, kernel selection
    runs = [measure_once(rt, ids, new_tokens) for _ in range(repeats)]
    mt = measure_multiturn(rt, turns, multiturn_tokens, repeats) if multiturn else None
    rt.engine.reset()
    vram = None
    if torch.cuda.is_available() and str(rt.info.device).startswith("cuda"):
        vram = int(torch.cuda.max_memory_allocated())
    plan = getattr(rt, "plan", None)
    if dataclasses.is_dataclass(plan):
        plan = asdict(plan)

    def med(key: str) -> float:
        return round(statistics.median(r[key] for r in runs), 4)

    return BenchReport(
        model=rt.info.model,
        device=rt.info.device,
        dtype=rt.info.dtype,
        plan=plan,
        load_seconds=round(rt.info.load_seconds, 3),
        prompt_tokens=len(ids),
        new_tokens=new_tokens,
        repeats=repeats,
        prefill_tok_s=med("prefill_tok_s"),
        decode_tok_s=med("decode_tok_s"),
        time_to_first_token_s=med("ttft_s"),
        peak_rss_bytes=peak_rss_bytes(),
        peak_vram_bytes=vram,
        torch_threads=torch.get_num_threads(),
        loadavg_before=before,
        loadavg_after=loadavg(),
        machine=machine_info(),
        runs=runs,
        multiturn=mt,
        decode_path=decode_path(rt.engine),
    )


def model_context(model: str) -> int:
    """The model's maximum context (max_position_embeddings) from its config."""
    from zlocal.checkpoint.resolve import resolve_model
    from zlocal.inference.loader import load_config

    return int(load_config(resolve_model(model)).max_position_embeddings)


def cpu_plan(
    model: str,
    fmt: str,
    *,
    dtype: str | None = None,
    max_context: int | None = None,
    group_size: int | None = None,
):
    """The auto plan for ``model`` with every layer on the CPU in ``fmt`` (int8, int4 or the dense
    compute dtype), for comparing formats on one machine."""
    from zlocal.checkpoint.resolve import resolve_model
    from zlocal.inference.loader import current_hardware, load_config, plan_for
    from zlocal.planning.memory import ModelShape
    from zlocal.planning.plan import all_on_cpu

    resolved = resolve_model(model)
    config = load_config(resolved)
    lp = plan_for(resolved, config, plan="auto", dtype=dtype, device="cpu", max_context=max_context)
    shape = ModelShape.from_config(config)
    fmt = fmt if fmt in CPU_FORMATS else lp.compute_dtype
    lp = all_on_cpu(lp, shape, current_hardware("cpu"), fmt, None if group_size is None else int(group_size))
    lp.reasons.append(f"zlocal bench: all {shape.num_layers} layers on the CPU in {fmt}")
    return lp
