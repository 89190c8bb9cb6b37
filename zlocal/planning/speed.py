"""The planner's decode-speed model: bytes read per token on each device over its effective
bandwidth, plus per-layer overheads (Python and kernel launches, or a captured CUDA graph) and, for
split plans, the hidden state's crossings between the devices. The GPU constants come from the
anchors (public measurements), not from measurements of zlocal on a GPU."""

from __future__ import annotations

from zlocal.formats import get_format, source_format
from zlocal.planning.loadplan import LoadPlan, head_format_for
from zlocal.planning.memory import DTYPE_BYTES, kv_bytes_per_layer

GPU_LAYER_OVERHEAD_S = 0.0003  # python + kernel launches per decoder layer, eager mode
# the same when the one-token step is a captured CUDA graph (zlocal.inference.decode_step; dense and
# int4 layers; a split plan captures its GPU layers): only the gaps between a layer's kernels. From
# the anchors, not measured: captured decoders reach 197-241 tok/s on A100/H100 where eager ones stop near 60.
GPU_GRAPH_LAYER_OVERHEAD_S = 0.00003
# a split plan moves the hidden state between the devices SPLIT_CROSSINGS times per token (embedding
# on the CPU -> first GPU layer, last GPU layer -> first CPU layer, last CPU layer -> the head on the
# GPU); each is a synchronous copy: latency (assumed, not measured) plus its bytes over PCIe
SPLIT_CROSSINGS = 3
CROSSING_LATENCY_S = 0.00005
PCIE_GBS = 12.0
# Python + small ops per decoder layer on the CPU (the lean forward): SmolLM2-135M's 30 layers cost
# 3.6-3.8 ms per token beyond their matrix products on a 2-core AMD EPYC VM, in bf16, int8 and int4
CPU_LAYER_OVERHEAD_S = 0.00013
# the same on zlocal's one-call decode kernel (bf16 int8/int4 layers on its own kernels): norms,
# rotary, attention and barriers, about 1 ms for SmolLM2's 30 layers at short context
CPU_KERNEL_LAYER_OVERHEAD_S = 0.00003


def _bits(fmt: str | None, source_quant: dict | None, compute: str) -> int:
    f = get_format(fmt or compute)
    if source_quant and not f.dense:
        return source_format(source_quant)[1]
    return f.bits


def step_seconds(spec, ctx: int, g: int, gpu_fmt: str | None, cpu_fmt: str | None) -> dict[str, float]:
    """Predicted seconds per decoded token on each part (gpu, cpu, crossing): the bandwidth model,
    bytes read per token on each device over its effective bandwidth, plus per-layer overheads."""
    from zlocal.planning.memory import head_read_bytes, layer_weight_bytes

    shape, b, group_size = spec.shape, spec.budget, spec.group_size
    compute_bytes = DTYPE_BYTES[spec.compute]
    bits = _bits(gpu_fmt if g else cpu_fmt, spec.source_quant, spec.compute)
    n = shape.num_layers
    kv_half = kv_bytes_per_layer(shape, max(1, ctx // 2), compute_bytes)  # a half-full context on average
    head_fmt = head_format_for(g, cpu_fmt, bool(spec.source_quant))
    head = head_read_bytes(shape, compute_bytes, head_fmt)
    out = {"gpu": 0.0, "cpu": 0.0, "crossing": 0.0}
    if g:
        fmt = get_format(gpu_fmt)
        eff = fmt.gpu_share or 0.6
        per_layer = layer_weight_bytes(shape, gpu_fmt, compute_bytes, bits, group_size)
        graph = fmt.in_gpu_graph()  # the captured one-token step (a split plan: its GPU layers)
        overhead = GPU_GRAPH_LAYER_OVERHEAD_S if graph else GPU_LAYER_OVERHEAD_S
        out["gpu"] = g * (
            per_layer / (b.gpu_bw * 1e9 * eff) + kv_half / (b.gpu_bw * 1e9 * 0.75) + overhead
        ) + head / (b.gpu_bw * 1e9 * 0.75)
    if n - g:
        cpu = get_format(cpu_fmt)
        eff = cpu.cpu_share(b.cores, b.own_int4, spec.compute)
        per_layer = layer_weight_bytes(shape, cpu_fmt, compute_bytes, bits, group_size)
        # every layer on the CPU in int8/int4 over bf16 runs on the decode kernel (fastpath)
        one_call = not g and cpu.one_call_decode(b.own_int4) and spec.compute == "bf16"
        overhead = CPU_KERNEL_LAYER_OVERHEAD_S if one_call else CPU_LAYER_OVERHEAD_S
        per_layer_s = per_layer / (b.cpu_bw * 1e9 * eff) + kv_half / (b.cpu_bw * 1e9 * 0.9) + overhead
        out["cpu"] = (n - g) * per_layer_s
        if not g:
            out["cpu"] += head / (b.cpu_bw * 1e9 * get_format(head_fmt or "bf16").cpu_share(b.cores))
    if g and n - g:
        hop = shape.hidden_size * compute_bytes / (PCIE_GBS * 1e9)
        out["crossing"] = SPLIT_CROSSINGS * (CROSSING_LATENCY_S + hop)
    return out


def predict_tok_s(spec, ctx: int, g: int, gpu_fmt: str | None, cpu_fmt: str | None) -> float:
    """Predicted decode speed: one over the summed ``step_seconds``."""
    t = sum(step_seconds(spec, ctx, g, gpu_fmt, cpu_fmt).values())
    return round(1.0 / t, 2) if t > 0 else 0.0


def split_reason(spec, p: LoadPlan) -> str | None:
    """The plan line saying where a split plan splits and what each side and the crossings cost."""
    n, g = spec.shape.num_layers, p.gpu_layers
    if not g or not p.cpu_layers:
        return None
    secs = step_seconds(spec, p.max_context, g, p.gpu_format, p.cpu_format)
    ms = {k: v * 1000 for k, v in secs.items()}
    kib = spec.shape.hidden_size * DTYPE_BYTES[spec.compute] / 1024
    return (
        f"split after layer {g - 1}: layers 0-{g - 1} on the GPU ({p.gpu_format}), {g}-{n - 1} on the CPU "
        f"({p.cpu_format}); per token the GPU part takes ~{ms['gpu']:.1f} ms, the CPU part "
        f"~{ms['cpu']:.1f} ms, and the hidden state ({kib:g} KiB) crosses between them {SPLIT_CROSSINGS} "
        f"times, once per boundary (~{ms['crossing']:.2f} ms)"
    )


def gpu_lines(hw, p: LoadPlan) -> list[str]:
    """The plan line saying which kernels run the GPU layers, and whether a decode step is one graph."""
    if not p.gpu_layers or hw.gpu is None:
        return []
    fmt = get_format(p.gpu_format)
    if fmt.in_gpu_graph():
        how = "each decode step is one captured CUDA graph" + (
            "" if not p.cpu_layers else " for the GPU layers, the CPU layers running between replays"
        )
    else:
        how = "decode steps launch each layer's kernels from Python"
    line = f"GPU layers run on {fmt.gpu_kernel()}; {how}"
    if not fmt.dense and not hw.kernels.get("torch_int4_cuda"):
        line += f" (compute capability {hw.gpu.compute_capability or '?'}: PyTorch's int4 kernel needs 8.0+)"
    return [line]
