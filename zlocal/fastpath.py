"""A lean forward for Llama-style decoders (Llama, Mistral/Zephyr, SmolLM2) on the HF model's own weights.

Same math as the HF forward with far fewer Python-level ops per token: q/k/v and gate/up projections
fused into one matmul each (the HF modules are re-pointed at views of the fused weights, so memory is
not doubled; in bf16 on CPUs where oneDNN supports it, the weights are packed in its blocked layout
and the HF modules become views of them), rotary tables precomputed once from the model's own rotary
module, grouped-query attention without repeating K/V (for one token, the query heads of each K/V
head packed as rows: the CPU flash kernel is up to 12x slower with one row per head), and the KV
cache written straight into the engine's preallocated buffers. Greedy outputs are tested identical
to the HF forward. Anything it does not handle (biases, other activations, layers offloaded with
accelerate hooks) keeps the HF forward; quantized linear modules are called as they are.

When every projection runs on zlocal's own int4/int8 CPU kernels (bf16), a one-token step goes
through all decoder layers in one call of ``cpu_kernels.DecodeStack``: same math and rounding points,
none of the ~40 Python-level ops per layer (SmolLM2-135M int4: 10.0 -> 3.7 ms per token).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cpu_prompt import bf16_gemm_is_fast
from .errors import ContextOverflowError
from .kvcache import KVCache

_TYPES = {"llama", "mistral"}


def unsupported_reason(model) -> str | None:
    """Why the fast path cannot run this model (None when it can)."""
    cfg = model.config
    if cfg.model_type not in _TYPES:
        return f"architecture {cfg.model_type}"
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        return "biases"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act}"
    if getattr(model, "hf_device_map", None) and len(set(model.hf_device_map.values())) > 1:
        return "layers split across devices"
    for layer in model.model.layers:
        if getattr(layer, "_hf_hook", None) is not None:
            return "accelerate hooks (offload)"
    return None


def _plain(lin) -> bool:
    return type(lin) is nn.Linear and lin.weight.dtype in (torch.float32, torch.bfloat16, torch.float16)


def _projection(owner: nn.Module, names: list[str]):
    """One callable computing the concatenated outputs of ``owner``'s linears ``names``.

    Plain float Linears are fused into one weight. In bf16 on a CPU where oneDNN's packed layout
    is the fastest kernel (``dense_kernel``), the fused weight is packed and the HF modules are
    replaced by ``PackedLinear`` views of it; otherwise they are re-pointed at views of the fused
    weight. Either way memory is not doubled. Quantized modules (zlocal's CPU int8/int4 kernels)
    are fused when their packing allows, else called in turn.
    """
    linears = [getattr(owner, n) for n in names]
    if not all(_plain(lin) for lin in linears):
        # Bound ``forward`` methods skip nn.Module.__call__ (hook checks), a few us per call.
        if len(linears) == 1:
            return linears[0].forward
        fused_q = _fuse_quantized(linears)
        if fused_q is not None:
            return fused_q.forward
        return lambda x: torch.cat([lin(x) for lin in linears], dim=-1)
    if len(linears) == 1:
        fused = linears[0].weight.detach()
    else:
        fused = torch.cat([lin.weight.detach() for lin in linears], dim=0)
    if _packs(fused):
        packed = pack_weight(fused)
        start = 0
        for name, lin in zip(names, linears, strict=True):
            n = lin.weight.shape[0]
            rows = None if len(linears) == 1 else (start, start + n)
            setattr(owner, name, PackedLinear(packed, lin.in_features, n, rows))
            start += n
        return getattr(owner, names[0]).full_forward
    if len(linears) > 1:
        start = 0
        for lin in linears:
            n = lin.weight.shape[0]
            lin.weight = nn.Parameter(fused[start : start + n], requires_grad=False)
            start += n
    return _dense(fused)


_KERNEL: dict[torch.dtype, str] = {}
_EXACT: dict[torch.dtype, bool] = {}


def _packs(weight: torch.Tensor) -> bool:
    """Whether the lean forward keeps ``weight`` packed for oneDNN (see ``dense_kernel``)."""
    return weight.device.type == "cpu" and dense_kernel(weight.dtype) == "packed"


def packing_supported(dtype: torch.dtype) -> bool:
    """Whether oneDNN can pack a ``dtype`` weight on this CPU with results bit-identical to
    ``F.linear`` (which goes through oneDNN unpacked). Only bf16 is packed, and only after a
    one-time check on this CPU that both calls agree bit for bit, so zlocal's bf16 numbers stay
    those of transformers' own matmuls."""
    if dtype != torch.bfloat16 or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    if not bf16_gemm_is_fast():
        return False
    if dtype not in _EXACT:
        _EXACT[dtype] = _packing_is_exact(dtype)
    return _EXACT[dtype]


@torch.inference_mode()
def _packing_is_exact(dtype: torch.dtype) -> bool:
    # The reduction length is what could change the summation order; 576, 1536 and 4096 are the
    # inner sizes of SmolLM2's and Mistral-7B's projections.
    gen = torch.Generator().manual_seed(0)
    for k in (576, 1536, 4096):
        w = torch.randn(128, k, generator=gen).to(dtype)
        packed = pack_weight(w)
        for t in (1, 5):
            x = torch.randn(1, t, k, generator=gen).to(dtype)
            if not torch.equal(_packed_linear(x, packed), F.linear(x, w)):
                return False
    return True


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [out, in] reordered into oneDNN's blocked layout (an opaque CPU tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)


def _packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


class PackedLinear(nn.Module):
    """A bias-free Linear whose weight lives in oneDNN's packed layout.

    ``F.linear`` in bf16 goes through oneDNN too, but reorders the weight on every call; keeping
    it packed reads it up to 2x faster for one token (SmolLM2's output layer: 3.4 -> 2.0 ms on a
    2-core AMD EPYC VM) with bit-identical results. Several projections of one input (q/k/v,
    gate/up) share one packed weight; ``rows`` selects this module's outputs of it, so the HF
    forward stays correct while the lean forward makes one call (``full_forward``).
    """

    def __init__(self, packed: torch.Tensor, in_features: int, out_features: int, rows=None):
        super().__init__()
        # a non-persistent buffer: counted in model.buffers() once however many modules share it
        self.register_buffer("packed", packed, persistent=False)
        self.in_features, self.out_features, self.rows = in_features, out_features, rows

    def full_forward(self, x: torch.Tensor) -> torch.Tensor:
        """All rows of the shared packed weight (the fused projection)."""
        return _packed_linear(x, self.packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _packed_linear(x, self.packed)
        return y if self.rows is None else y[..., self.rows[0] : self.rows[1]]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rows={self.rows}"


def dense_kernel(dtype: torch.dtype) -> str:
    """The fastest one-token kernel for a dense ``dtype`` weight on this CPU, timed once per dtype:
    "packed" (oneDNN's packed layout), "mv" (``torch.mv``) or "linear" (``F.linear``).

    All three give bit-identical results (tested), but which is fastest depends on the CPU: on an
    Intel AVX-512 VM the GEMV read bf16 weights ~1.5x faster than the GEMM, on an AMD EPYC VM the
    GEMM was ~1.6x faster than the GEMV and the packed layout ~2x faster than the GEMM. A
    4096x1024 probe takes a few milliseconds.
    """
    if dtype not in _KERNEL:
        import time

        w = torch.randn(4096, 1024).to(dtype)
        x = torch.randn(1, 1024).to(dtype)
        candidates = {"linear": lambda: F.linear(x, w), "mv": lambda: torch.mv(w, x[0])}
        if packing_supported(dtype):
            packed = pack_weight(w)
            candidates["packed"] = lambda: _packed_linear(x, packed)
        best = {}
        for name, fn in candidates.items():
            fn()
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            best[name] = min(times)
        # a kernel other than F.linear must win clearly: timings of a few hundred us are noisy
        fastest = min(best, key=best.get)
        _KERNEL[dtype] = fastest if best[fastest] < 0.9 * best["linear"] else "linear"
    return _KERNEL[dtype]


def _dense(weight: torch.Tensor):
    """``F.linear(x, weight)``, through ``torch.mv`` for one token where that kernel is faster.

    Decode is bound by reading the weights, and on some CPUs a [1, K] x [K, N] ``mm`` goes through
    a general GEMM that reads them slower than the matrix-vector kernel (see ``dense_kernel``).
    """
    if weight.device.type != "cpu" or dense_kernel(weight.dtype) != "mv":
        return lambda x: F.linear(x, weight)

    def proj(x: torch.Tensor) -> torch.Tensor:
        if x.numel() == x.shape[-1]:
            return torch.mv(weight, x.reshape(-1)).view(*x.shape[:-1], weight.shape[0])
        return F.linear(x, weight)

    return proj


def _fuse_quantized(linears: list):
    """One zlocal CPU int8/int4 module for several with the same input (q/k/v, gate/up), or None.

    Both kernels compute each output channel from its own rows of the packed weight (and its own
    scales), so concatenating along the output dimension gives bit-identical results with one
    kernel call instead of several. The int4 packings interleave output channels in blocks (torch's:
    64 rows with AVX-512, 32 with AVX2; zlocal's: 4), so int4 parts are only joined when each is a
    whole number of blocks (``row_block``). The originals are re-pointed at views of the fused
    weight, so memory is not doubled; their small scale tensors stay separate copies.
    """
    from . import cpu_quant
    from .cpu_quant import Int4WeightOnlyLinear, Int8WeightOnlyLinear

    first = linears[0]
    kind = type(first)
    if kind not in (Int8WeightOnlyLinear, Int4WeightOnlyLinear):
        return None
    for lin in linears:
        if type(lin) is not kind or lin.bias is not None or lin.dtype != first.dtype:
            return None
        same_groups = getattr(lin, "group_size", 0) == getattr(first, "group_size", 0)
        if lin.in_features != first.in_features or not same_groups:
            return None
        if lin.weight.device.type != "cpu":
            return None
        if lin.layout != first.layout or lin.out_features % lin.row_block:
            return None
        if not cpu_quant.same_codes(lin, first):
            return None
    out_f = sum(lin.out_features for lin in linears)
    if kind is Int8WeightOnlyLinear:
        fused = Int8WeightOnlyLinear(first.in_features, out_f, False, first.dtype, first.layout)
        fused.scales = torch.cat([lin.scales for lin in linears])
    else:
        fused = Int4WeightOnlyLinear(
            first.in_features, out_f, False, first.dtype, first.group_size, first.layout, first.codes
        )
        dim = 0 if fused.layout == "zlocal" else 1  # the output rows: tiles, or torch's dim 1
        fused.scales_and_zeros = torch.cat([lin.scales_and_zeros for lin in linears], dim=dim).contiguous()
    fused.weight = torch.cat([lin.weight for lin in linears])
    start = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight = fused.weight[start : start + n]
        start += n
    return fused


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer as the lean forward and the one-call decode kernel consume it."""

    input_norm: torch.Tensor
    input_eps: float
    qkv: Callable[[torch.Tensor], torch.Tensor]  # fused q/k/v projection
    o: Callable[[torch.Tensor], torch.Tensor]
    attn_scale: float
    post_norm: torch.Tensor
    post_eps: float
    gate_up: Callable[[torch.Tensor], torch.Tensor]  # fused gate/up projection
    down: Callable[[torch.Tensor], torch.Tensor]

    @classmethod
    def of(cls, layer: nn.Module) -> LayerWeights:
        """Fuse and collect the weights of one HF Llama/Mistral decoder layer."""
        attn, mlp = layer.self_attn, layer.mlp
        return cls(
            input_norm=layer.input_layernorm.weight,
            input_eps=layer.input_layernorm.variance_epsilon,
            qkv=_projection(attn, ["q_proj", "k_proj", "v_proj"]),
            o=_projection(attn, ["o_proj"]),
            attn_scale=attn.scaling,
            post_norm=layer.post_attention_layernorm.weight,
            post_eps=layer.post_attention_layernorm.variance_epsilon,
            gate_up=_projection(mlp, ["gate_proj", "up_proj"]),
            down=_projection(mlp, ["down_proj"]),
        )

    def projection_modules(self) -> list[nn.Module | None]:
        """The module behind each projection (qkv, o, gate_up, down) where it is one module's
        forward (quantized kernels: what the decode kernel reads), else None."""
        return [getattr(f, "__self__", None) for f in (self.qkv, self.o, self.gate_up, self.down)]


class FastForward:
    """Decode/prefill forward writing into a KVCache; returns last-position logits."""

    def __init__(self, model, cache: KVCache, max_context: int):
        cfg = model.config
        self.model = model
        self.cache = cache
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.group = self.heads // self.kv_heads
        self.window = getattr(cfg, "sliding_window", None) if cfg.model_type == "mistral" else None
        self.embed = model.model.embed_tokens
        self.norm = model.model.norm
        head = model.lm_head
        if not (_plain(head) and head.bias is None):
            self.lm_head = head
        elif _packs(head.weight):
            # A head tied to the embeddings gets its own packed copy (the lookup keeps reading
            # the dense table); an untied head's dense weight is freed.
            w = head.weight
            model.lm_head = PackedLinear(pack_weight(w), w.shape[1], w.shape[0])
            self.lm_head = model.lm_head.full_forward
        else:
            self.lm_head = _dense(head.weight)
        self.layers = [LayerWeights.of(layer) for layer in model.model.layers]
        self._stack = None
        self.stack_reason = self._stack_reason()
        weight = self.embed.weight
        with torch.inference_mode():
            pos = torch.arange(max_context, device=weight.device)[None]
            probe = torch.zeros(1, 1, dtype=weight.dtype, device=weight.device)
            cos, sin = model.model.rotary_emb(probe, position_ids=pos)
        self.cos = cos[0]  # [max_context, head_dim], in the model dtype like HF
        # rotate_half(x) * sin == roll(x, d/2) * sin with the first half of sin negated (negation is
        # exact), so the rotation is one roll instead of two slices, a negation and a cat.
        half = self.cos.shape[-1] // 2
        self.sin = torch.cat((-sin[0][:, :half], sin[0][:, half:]), dim=-1)

    def _stack_reason(self) -> str | None:
        """Why one-token steps cannot run on ``cpu_kernels.DecodeStack`` (None when they can)."""
        from . import cpu_kernels

        if self.embed.weight.dtype != torch.bfloat16 or self.embed.weight.device.type != "cpu":
            return "needs bf16 weights on the CPU"
        if self.heads % self.kv_heads:
            return "query heads not a multiple of K/V heads"
        if any(m is None for lay in self.layers for m in lay.projection_modules()):
            return "needs every projection on zlocal's int4/int8 kernels"  # some are not one module
        if cpu_kernels.kernels() is None:
            return cpu_kernels.kernel_status()
        return cpu_kernels.stack_supported(self._stack_layers(empty=True), self.head_dim)

    def _stack_layers(self, empty: bool = False):
        from .cpu_kernels import StackLayer

        out = []
        for lay, cached in zip(self.layers, self.cache.layers, strict=True):
            qkv, o, gate_up, down = lay.projection_modules()
            keys, values = (None, None) if empty else (cached.keys, cached.values)
            out.append(
                StackLayer(lay.input_norm, lay.input_eps, qkv, o, lay.post_norm, lay.post_eps, gate_up,
                           down, keys, values)
            )
        return out

    def _stack_step(self, token: int, start: int) -> torch.Tensor:
        """One token through every layer in one ``DecodeStack`` call; returns the hidden state."""
        from .cpu_kernels import DecodeStack, kernels

        if self._stack is None:
            probe = torch.empty(1, self.kv_heads, 1, self.head_dim, dtype=torch.bfloat16)
            for layer in self.cache.layers:
                if not layer.is_initialized:
                    layer.lazy_initialization(probe, probe)
            self._stack = DecodeStack(
                kernels(), self._stack_layers(), heads=self.heads, kv_heads=self.kv_heads,
                head_dim=self.head_dim, window=self.window, scale=self.layers[0].attn_scale,
            )
        h = self.embed.weight[token].clone()
        self._stack(h, start, self.cos[start], self.sin[start])
        for layer in self.cache.layers:
            layer.length = start + 1
        return h.view(1, 1, -1)

    @staticmethod
    def _rms(x, w, eps):
        dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return w * x32.to(dtype)

    @staticmethod
    def _rope(x, cos, sin):
        return x * cos + x.roll(x.shape[-1] // 2, -1) * sin

    @torch.inference_mode()
    def __call__(self, ids: list[int]) -> torch.Tensor:
        cache = self.cache
        start, t = cache.length, len(ids)
        end = start + t
        if end > cache.max_tokens:
            raise ContextOverflowError(f"KV cache full: {end} tokens do not fit in {cache.max_tokens}")
        if t == 1 and self.stack_reason is None:
            h = self._stack_step(ids[0], start)
            h = self._rms(h, self.norm.weight, self.norm.variance_epsilon)
            return self.lm_head(h)[0, -1]
        h = self.embed(torch.tensor([ids], dtype=torch.long, device=self.embed.weight.device))
        cos = self.cos[start:end][None, :, None, :]  # [1, t, 1, d]
        sin = self.sin[start:end][None, :, None, :]
        nq, nkv, d = self.heads, self.kv_heads, self.head_dim
        mask = None
        if t == 1 and self.window and end >= self.window:
            mask = (torch.arange(end, device=h.device) > end - 1 - self.window)[None, None, None, :]
        elif t > 1:
            q_pos = torch.arange(start, end, device=h.device)[:, None]
            k_pos = torch.arange(0, end, device=h.device)[None, :]
            mask = k_pos <= q_pos
            if self.window:
                mask = mask & (k_pos > q_pos - self.window)
        for i, lay in enumerate(self.layers):
            scale = lay.attn_scale
            x = self._rms(h, lay.input_norm, lay.input_eps)
            qkv = lay.qkv(x).view(1, t, nq + 2 * nkv, d)
            qk = self._rope(qkv[:, :, : nq + nkv], cos, sin)
            q = qk[:, :, :nq].transpose(1, 2)
            k = qk[:, :, nq:].transpose(1, 2)
            v = qkv[:, :, nq + nkv :].transpose(1, 2)
            layer = cache.layers[i]
            if not layer.is_initialized:
                layer.lazy_initialization(k, v)
            layer.keys[:, :, start:end] = k
            layer.values[:, :, start:end] = v
            layer.length = end
            keys, values = layer.keys[:, :, :end], layer.values[:, :, :end]
            if t == 1:
                # One query per head: the query heads sharing a K/V head go in as rows of one
                # attention. The CPU flash kernel handles one row per head very slowly (Mistral-7B
                # shape, 1000 keys: 4.8 ms per layer, packed 0.38 ms); transformers itself packs
                # this way past the sliding window. Rounding can differ from the unpacked call in
                # the last bit; greedy outputs are tested equal to the HF forward.
                o = F.scaled_dot_product_attention(
                    q.reshape(1, nkv, self.group, d), keys, values, attn_mask=mask, scale=scale
                )
            elif mask is None:
                o = F.scaled_dot_product_attention(q, keys, values, scale=scale, enable_gqa=True)
            else:
                o = F.scaled_dot_product_attention(
                    q, keys, values, attn_mask=mask, scale=scale, enable_gqa=True
                )
            o = o.view(1, 1, nq * d) if t == 1 else o.reshape(1, nq, t, d).transpose(1, 2).reshape(1, t, -1)
            h = h + lay.o(o)
            x = self._rms(h, lay.post_norm, lay.post_eps)
            gate, up = lay.gate_up(x).chunk(2, dim=-1)
            h = h + lay.down(F.silu(gate) * up)
        h = self._rms(h[:, -1:], self.norm.weight, self.norm.variance_epsilon)
        return self.lm_head(h)[0, -1]
