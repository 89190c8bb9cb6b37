"""Out-of-memory step-down: the next smaller plan after a load ran out of memory.

Order: fewer GPU layers, then a smaller context, then fewer bits. An already-quantized checkpoint
keeps its own format and bits; it loads whole on one device, so only the device and the context
can give.
"""

from __future__ import annotations

from dataclasses import replace

from zlocal.formats import cpu_format_beside, get_format, quantization_config_for
from zlocal.planning.hardware import HardwareReport
from zlocal.planning.loadplan import LoadPlan
from zlocal.planning.memory import ModelShape
from zlocal.planning.plan import MIN_CONTEXT, _Budget, _candidate, _formats, _Spec


def step_down(plan: LoadPlan, shape: ModelShape, hw: HardwareReport | None = None) -> LoadPlan | None:
    """The next smaller plan after an out-of-memory error, or None when there is nothing left to
    give up. Order: fewer GPU layers, then a smaller context, then fewer bits."""
    n = shape.num_layers
    b = _Budget(
        plan.usable_vram_bytes,
        plan.usable_ram_bytes,
        hw.gpu.bandwidth_gbs if hw and hw.gpu else 300.0,
        hw.cpu.bandwidth_gbs if hw else 20.0,
        hw.cpu.cores if hw else 4,
        bool(hw and hw.kernels.get("zlocal_int4_cpu")),
    )
    if plan.source_quantized:
        return _step_down_quantized(plan, shape, b, hw)
    gf = plan.gpu_format
    cf = plan.cpu_format or cpu_format_beside(gf or plan.compute_dtype)
    g, ctx = plan.gpu_layers, plan.max_context
    if g > 0:
        change = f"gpu_layers {g} -> {max(0, g - max(1, n // 8))}"
        g = max(0, g - max(1, n // 8))
    elif ctx > MIN_CONTEXT:
        change = f"max_context {ctx} -> {max(MIN_CONTEXT, ctx // 2)}"
        ctx = max(MIN_CONTEXT, ctx // 2)
    elif get_format(cf).smaller_on_cpu:
        change = f"CPU weights {cf} -> {get_format(cf).smaller_on_cpu}"
        cf = get_format(cf).smaller_on_cpu
    else:
        return None
    compute = plan.compute_dtype
    if get_format(cf).dense and get_format(cf).bits < 32 and compute == "fp32":
        compute = cf  # dense weights are held in the compute dtype
    spec = _Spec(shape, b, compute, None, plan.group_size)
    new = _candidate(spec, ctx, g, gf if g else None, cf)
    return replace(
        new,
        model=plan.model,
        hardware=plan.hardware,
        reasons=[*plan.reasons, f"out of memory: stepped down ({change})"],
    )


def _source_quant_of(plan: LoadPlan) -> dict:
    """The quantization_config the plan was made for (a plan keeps its format and bits)."""
    fmt = plan.source_format
    return quantization_config_for(fmt, plan.source_bits or get_format(fmt).bits)


def _step_down_quantized(
    plan: LoadPlan, shape: ModelShape, b: _Budget, hw: HardwareReport | None
) -> LoadPlan | None:
    """step_down for an already-quantized checkpoint: its weights keep their format and bits (there
    is no full-precision source to quantize again) and it loads whole on one device, so only the
    device (GPU -> CPU) and the context can give."""
    fmt = plan.source_format
    source = _source_quant_of(plan)
    # without the machine's kernels, do not assume the CPU runs the format: keep the device
    on_cpu = hw is not None and fmt in _formats(hw, plan.compute_dtype, source)[1]
    g, ctx = plan.gpu_layers, plan.max_context
    if g > 0 and on_cpu:
        change = f"gpu_layers {g} -> 0 (a quantized checkpoint loads whole on one device)"
        g = 0
    elif ctx > MIN_CONTEXT:
        change = f"max_context {ctx} -> {max(MIN_CONTEXT, ctx // 2)}"
        ctx = max(MIN_CONTEXT, ctx // 2)
    else:
        return None
    spec = _Spec(shape, b, plan.compute_dtype, source, plan.group_size)
    new = _candidate(spec, ctx, g, fmt if g else None, None if g else fmt)
    return replace(
        new,
        model=plan.model,
        hardware=plan.hardware,
        reasons=[*plan.reasons, f"out of memory: stepped down ({change})"],
    )
