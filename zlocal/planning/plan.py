"""The load planner: hardware + model + wanted context -> a ``LoadPlan`` saying how to run it.

Candidates are every (GPU format, CPU format) pair the machine has kernels for, each with as many
decoder layers on the GPU as fit. A candidate fits when its estimates stay within the usable VRAM
and RAM (free memory minus a reserve). Among those that fit, the default policy ("quality") takes
the best quality that still fits with headroom and decodes at reading speed; "speed" takes the
fastest. If nothing fits at the wanted context the context is halved (down to 512) and, failing
that, the plan says it does not fit instead of pretending.
"""

from __future__ import annotations

from dataclasses import dataclass

from zlocal.errors import PlanError
from zlocal.formats import (
    formats_for_checkpoint,
    formats_on_load,
    get_format,
    source_format,
    why_checkpoint_cannot_run,
)
from zlocal.planning.hardware import HardwareReport
from zlocal.planning.loadplan import LoadPlan, head_format_for
from zlocal.planning.memory import DTYPE_BYTES, GIB, MIB, ModelShape, estimate, load_transient_bytes
from zlocal.planning.speed import (  # noqa: F401  (the speed model's names, as before it moved)
    CPU_KERNEL_LAYER_OVERHEAD_S,
    CPU_LAYER_OVERHEAD_S,
    GPU_GRAPH_LAYER_OVERHEAD_S,
    GPU_LAYER_OVERHEAD_S,
    _bits,
    gpu_lines,
    predict_tok_s,
    split_reason,
    step_seconds,
)

MIN_CONTEXT = 512
MIN_TOK_S = 8.0  # about reading speed: below it the quality policy gives way to speed
HEADROOM = 0.10  # quality plans keep this share of usable memory free
SPEED_SHARE = 0.5  # quality may cost at most half the speed of the fastest plan
GPU_RESERVE_MIN = 256 * MIB
RAM_RESERVE_MIN = 512 * MIB

_DTYPE_FORMAT = {
    "float32": "fp32",
    "fp32": "fp32",
    "bfloat16": "bf16",
    "bf16": "bf16",
    "float16": "fp16",
    "fp16": "fp16",
}


# -- the planner ---------------------------------------------------------------------------------
@dataclass
class _Budget:
    vram: int
    ram: int
    gpu_bw: float
    cpu_bw: float
    cores: int
    own_int4: bool = False  # zlocal's own int4/int8 CPU kernels (and the decode kernel) run here


@dataclass
class _Spec:
    """What stays fixed while the planner tries placements."""

    shape: ModelShape
    budget: _Budget
    compute: str
    source_quant: dict | None = None
    group_size: int = 128
    chunk: int = 512


def usable_memory(hw: HardwareReport, max_vram_bytes: int | None = None) -> tuple[int, int]:
    """(usable VRAM, usable RAM): free memory minus the allocator / OS reserve."""
    vram = 0
    if hw.gpu is not None:
        free = hw.gpu.free_bytes if max_vram_bytes is None else min(hw.gpu.free_bytes, max_vram_bytes)
        vram = max(0, free - max(GPU_RESERVE_MIN, int(0.05 * hw.gpu.total_bytes)))
    ram = max(0, hw.ram_available_bytes - max(RAM_RESERVE_MIN, int(0.10 * hw.ram_available_bytes)))
    return vram, ram


def _formats(hw: HardwareReport, dense: str, source_quant: dict | None) -> tuple[list[str], list[str]]:
    """(GPU formats, CPU formats) the planner tries on this machine."""
    k = hw.kernels
    if source_quant:
        # an already-quantized checkpoint is loaded as it is, whole, on one device
        gpu = formats_for_checkpoint(k, source_quant, "cuda") if hw.gpu else []
        return gpu, formats_for_checkpoint(k, source_quant, "cpu")
    gpu = formats_on_load(k, dense, "cuda") if hw.gpu else []
    return gpu, formats_on_load(k, dense, "cpu")


def _candidate(spec: _Spec, ctx: int, g: int, gpu_fmt: str | None, cpu_fmt: str | None) -> LoadPlan:
    shape, b, compute, source_quant = spec.shape, spec.budget, spec.compute, spec.source_quant
    group_size, chunk = spec.group_size, spec.chunk
    cb = DTYPE_BYTES[compute]
    n = shape.num_layers
    bits_gpu, bits_cpu = _bits(gpu_fmt, source_quant, compute), _bits(cpu_fmt, source_quant, compute)
    head_fmt = head_format_for(g, cpu_fmt, bool(source_quant))
    est = estimate(
        shape,
        ctx=ctx,
        gpu_layers=g,
        gpu_format=gpu_fmt or compute,
        cpu_format=cpu_fmt or compute,
        compute_bytes=cb,
        kv_bytes=cb,
        bits=bits_gpu if g else bits_cpu,
        group_size=group_size,
        prefill_chunk=chunk,
        head_format=head_fmt,
    )
    # the process's peak: the loaded model plus what quantizing it on load keeps in flight
    ram = est.ram_bytes + load_transient_bytes(shape, head_fmt)
    gpu_q, cpu_q = get_format(gpu_fmt or compute).quality, get_format(cpu_fmt or compute).quality
    quality = (g * gpu_q + (n - g) * cpu_q) / n
    source = source_format(source_quant) if source_quant else (None, None)
    return LoadPlan(
        gpu_layers=g,
        cpu_layers=n - g,
        max_context=ctx,
        compute_dtype=compute,
        gpu_format=gpu_fmt if g else None,
        cpu_format=cpu_fmt if n - g else None,
        group_size=group_size,
        source_format=source[0],
        source_bits=source[1],
        gpu_device="cuda:0" if g else None,
        estimated_vram_bytes=est.vram_bytes,
        estimated_ram_bytes=ram,
        predicted_decode_tok_s=predict_tok_s(spec, ctx, g, gpu_fmt, cpu_fmt),
        usable_vram_bytes=b.vram,
        usable_ram_bytes=b.ram,
        quality=round(quality, 4),
    )


def _fits(p: LoadPlan, b: _Budget, headroom: float = 0.0) -> bool:
    return p.estimated_vram_bytes <= b.vram * (1 - headroom) and p.estimated_ram_bytes <= b.ram * (
        1 - headroom
    )


def _candidates(spec: _Spec, ctx: int, hw: HardwareReport) -> list[LoadPlan]:
    gpu_fmts, cpu_fmts = _formats(hw, spec.compute, spec.source_quant)
    n, b = spec.shape.num_layers, spec.budget
    out = []
    if spec.source_quant:
        pairs = [(gf, None) for gf in gpu_fmts] + [(None, cf) for cf in cpu_fmts]
    else:
        pairs = [(gf, cf) for gf in gpu_fmts for cf in cpu_fmts if get_format(cf).bits <= get_format(gf).bits]
        pairs += [(None, cf) for cf in cpu_fmts]
    for gf, cf in pairs:
        if gf is None:
            out.append(_candidate(spec, ctx, 0, None, cf))
            continue
        lo = 1 if cf is not None else n
        best = None
        for g in range(n, lo - 1, -1):  # most GPU layers first: each one on the GPU is faster
            p = _candidate(spec, ctx, g, gf, cf)
            if p.estimated_vram_bytes <= b.vram:
                best = p
                break
        if best is not None:
            out.append(best)
    return out


def _choose(
    cands: list[LoadPlan], b: _Budget, prefer: str, keep_dtype: bool = False
) -> tuple[LoadPlan | None, str]:
    fit = [p for p in cands if _fits(p, b)]
    if not fit:
        return None, ""
    if keep_dtype:
        # an explicit dtype asks for weights in that dtype: honor it whenever it fits with headroom
        dense = [
            p for p in fit if not p.quantize_on_load and not p.source_quantized and _fits(p, b, HEADROOM)
        ]
        if dense:
            return max(dense, key=lambda p: (p.gpu_layers, p.predicted_decode_tok_s)), (
                "unquantized weights in the requested dtype fit with headroom"
            )
    speed_key = lambda p: (p.predicted_decode_tok_s, p.quality)  # noqa: E731
    if prefer == "speed":
        return max(fit, key=speed_key), "fastest plan that fits (--prefer speed)"
    fastest = max(p.predicted_decode_tok_s for p in fit)
    floor = max(MIN_TOK_S, SPEED_SHARE * fastest)
    good = [p for p in fit if _fits(p, b, HEADROOM) and p.predicted_decode_tok_s >= floor]
    if good:
        return max(good, key=lambda p: (p.quality, p.predicted_decode_tok_s)), (
            f"best quality that fits with {HEADROOM:.0%} headroom and keeps >= {floor:.1f} tok/s "
            f"(reading speed, and at least {SPEED_SHARE:.0%} of the fastest plan)"
        )
    why = f"no plan reaches {MIN_TOK_S:g} tok/s with headroom, so the fastest plan that fits"
    return max(fit, key=speed_key), why


def default_group_size(shape: ModelShape) -> int:
    """int4 group size: 128 (the published 7B setting) for large models, 32 for small ones.

    Small models punish coarse 4-bit groups. Measured here on SmolLM2-135M (prose, next-token
    NLL): bf16 3.219, int4 g128/g64 4.246/3.697, int4 g32 3.208.
    """
    return 128 if shape.hidden_size >= 2048 else 32


def _budget(hw: HardwareReport, vram: int, ram: int) -> _Budget:
    return _Budget(
        vram,
        ram,
        hw.gpu.bandwidth_gbs if hw.gpu else 0.0,
        hw.cpu.bandwidth_gbs,
        hw.cpu.cores,
        bool(hw.kernels.get("zlocal_int4_cpu")),
    )


def all_on_cpu(
    plan: LoadPlan, shape: ModelShape, hw: HardwareReport, fmt: str, group_size: int | None = None
) -> LoadPlan:
    """``plan`` (for a full-precision checkpoint) with every layer on the CPU in ``fmt``: every field
    that follows from the placement (bits, head, quantize-on-load, estimates, speed) computed for it."""
    budget = _budget(hw, 0, plan.usable_ram_bytes)
    spec = _Spec(shape, budget, plan.compute_dtype, None, group_size or plan.group_size)
    new = _candidate(spec, plan.max_context, 0, None, fmt)
    new.model, new.hardware, new.reasons = plan.model, plan.hardware, list(plan.reasons)
    return new


def _compute_dtype(hw: HardwareReport, dtype: str | None) -> tuple[str, str]:
    """(compute dtype, the plan line saying why): as asked, else what the GPU runs fast, else bf16."""
    gpu = hw.gpu
    if dtype is not None:
        if dtype not in _DTYPE_FORMAT:
            raise PlanError(f"dtype must be one of {', '.join(_DTYPE_FORMAT)}, got {dtype!r}")
        compute = _DTYPE_FORMAT[dtype]
        return compute, f"compute dtype {compute} as requested"
    if gpu is not None:
        compute = "bf16" if gpu.bf16 else "fp16"
        return compute, f"compute dtype {compute}: compute capability {gpu.compute_capability or '?'}" + (
            " >= 8.0" if gpu.bf16 else " < 8.0 has no fast bf16"
        )
    return "bf16", "compute dtype bf16 on the CPU (half the bytes of fp32; decode is bandwidth-bound)"


def _fit_context(spec: _Spec, want: int, hw: HardwareReport, prefer: str, keep_dtype: bool):
    """(context, candidates, chosen plan or None, why): halve the context until a plan is chosen
    or MIN_CONTEXT is reached."""
    ctx = want
    while True:
        cands = _candidates(spec, ctx, hw)
        chosen, why = _choose(cands, spec.budget, prefer, keep_dtype=keep_dtype)
        if chosen is not None or ctx <= MIN_CONTEXT or ctx <= 1:
            return ctx, cands, chosen, why
        ctx = max(MIN_CONTEXT, ctx // 2)


def _placement_reasons(shape: ModelShape, p: LoadPlan, on_gpu_machine: bool) -> list[str]:
    """The plan lines saying where the layers go and in what form."""
    reasons: list[str] = []
    if p.gpu_layers == shape.num_layers:
        reasons.append(f"all {p.gpu_layers} layers fit on the GPU in {p.gpu_format}")
    elif p.gpu_layers:
        reasons.append(
            f"{p.gpu_layers} of {shape.num_layers} layers fit on the GPU in {p.gpu_format}; the other "
            f"{p.cpu_layers} run on the CPU in {p.cpu_format} with zlocal's fused kernels"
        )
    else:
        why = "; nothing fits on the GPU" if on_gpu_machine else ""
        reasons.append(f"all layers on the CPU in {p.cpu_format}{why}")
    grouped = [f for f in (p.gpu_format, p.cpu_format) if f and get_format(f).grouped]
    if grouped and not p.source_quantized:
        reasons.append(f"{grouped[0]} uses groups of {p.group_size} weights (scale + zero per group)")
    if p.cpu_layers and p.cpu_format and get_format(p.cpu_format).zlocal_kernel:
        reasons += _kernel_fallbacks(shape, p)
    if p.head_format:
        reasons.append(
            "lm_head on the int8 kernel (per-channel, as llama.cpp keeps its output layer at 8 bits): "
            "it reads half the bytes of the dense head every token"
        )
    if p.quantize_on_load:
        reasons.append("quantized on load from the full-precision checkpoint (streamed tensor by tensor)")
    return reasons


def _devices(hw: HardwareReport) -> list[str]:
    return ["cuda", "cpu"] if hw.gpu else ["cpu"]


def _cannot_run(spec: _Spec, ctx: int, model: str, hw: HardwareReport, why: str) -> LoadPlan:
    """The plan for a quantized checkpoint no device here has kernels for: not fitting, saying why."""
    fmt = source_format(spec.source_quant)[0]
    p = _candidate(spec, ctx, 0, None, fmt)
    p.fits, p.model, p.hardware = False, model, hw.source
    p.reasons = [f"cannot run here: {why}"]
    return p


def make_plan(
    hw: HardwareReport,
    shape: ModelShape,
    *,
    model: str = "",
    ctx: int | None = None,
    max_vram_bytes: int | None = None,
    prefer: str = "quality",
    dtype: str | None = None,
    source_quant: dict | None = None,
    group_size: int | None = None,
    prefill_chunk: int = 512,
) -> LoadPlan:
    """Plan how to load ``shape`` on ``hw``. Never returns a plan whose estimates exceed the usable
    memory while claiming ``fits``; a model that cannot fit gets ``fits=False`` and says why."""
    if prefer not in ("quality", "speed"):
        raise PlanError(f"--prefer must be quality or speed, got {prefer!r}")
    model_ctx = shape.max_position_embeddings
    want = min(model_ctx, 4096) if ctx is None else int(ctx)
    if want < 1 or want > model_ctx:
        raise PlanError(f"context must be in 1..{model_ctx} for this model, got {ctx}")
    vram, ram = usable_memory(hw, max_vram_bytes)
    b = _budget(hw, vram, ram)
    gpu = hw.gpu
    compute, why_dtype = _compute_dtype(hw, dtype)
    if source_quant:
        group_size = int(source_quant.get("group_size") or group_size or 128)
    elif group_size is None:
        group_size = default_group_size(shape)
    spec = _Spec(shape, b, compute, source_quant, group_size, prefill_chunk)
    if source_quant and (blocked := why_checkpoint_cannot_run(hw.kernels, source_quant, _devices(hw))):
        return _cannot_run(spec, want, model, hw, blocked)
    ctx_try, cands, chosen, why = _fit_context(spec, want, hw, prefer, keep_dtype=dtype is not None)
    where = f"{gpu.name} with {vram / GIB:.1f} GiB usable VRAM, " if gpu else "no GPU, "
    where += f"{ram / GIB:.1f} GiB usable RAM"
    if chosen is None:
        smallest = min(cands, key=lambda p: p.estimated_ram_bytes + p.estimated_vram_bytes) if cands else None
        p = smallest or _candidate(spec, ctx_try, 0, None, compute)
        p.fits = False
        p.model, p.hardware = model, hw.source
        p.reasons = [
            f"does not fit: the smallest plan needs {p.estimated_vram_bytes / GIB:.2f} GiB VRAM and "
            f"{p.estimated_ram_bytes / GIB:.2f} GiB RAM even at {ctx_try} tokens; {where}",
            "free memory (close other programs), use a smaller model, or a machine with more memory",
        ]
        return p
    p = chosen
    p.model, p.hardware = model, hw.source
    reasons = [where, why_dtype, f"chose: {why}"]
    if ctx_try < want:
        reasons.append(f"context reduced from {want} to {ctx_try} tokens: nothing fits at {want}")
    reasons += _placement_reasons(shape, p, on_gpu_machine=gpu is not None)
    reasons += gpu_lines(hw, p) + [r for r in [split_reason(spec, p)] if r]
    def where(c: LoadPlan) -> str:
        return f"{c.gpu_format or '-'} GPU x{c.gpu_layers} / {c.cpu_format or '-'} CPU x{c.cpu_layers}"

    # one line per placement (a GPU-only plan comes once per CPU format tried), the chosen one left out
    lines = dict.fromkeys(
        f"alternative: {where(c)}: quality {c.quality:.3f}, {c.predicted_decode_tok_s:.1f} tok/s"
        for c in sorted((c for c in cands if _fits(c, b) and where(c) != where(p)), key=lambda c: -c.quality)
    )
    reasons += list(lines)[:3]
    p.reasons = reasons
    return p


def _kernel_fallbacks(shape, p: LoadPlan) -> list[str]:
    """The plan line naming CPU projections that no weight-only kernel runs on this machine."""
    import torch

    from zlocal.kernels.cpu_quant import fallback_note

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(p.compute_dtype, torch.float32)
    note = fallback_note(shape.linear_shapes(), get_format(p.cpu_format).bits, dtype, p.group_size)
    return [note] if note else []
