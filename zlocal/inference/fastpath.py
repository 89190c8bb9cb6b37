"""A lean forward for Llama-style decoders (Llama, Mistral/Zephyr, SmolLM2) on the HF model's own weights.

Same math as the HF forward with far fewer Python-level ops per token: q/k/v and gate/up projections
fused into one matmul each (``zlocal.inference.prepare``, done once at load: the HF modules become views of
the fused weights, so memory is not doubled, and nothing changes them afterwards), rotary tables
precomputed once from the model's own rotary module, grouped-query attention without repeating K/V
(for one token, the query heads of each K/V head packed as rows: the CPU flash kernel is up to 12x
slower with one row per head), and the KV
cache written straight into the engine's preallocated buffers. Greedy outputs are tested identical
to the HF forward. Anything it does not handle (biases, other activations, layers offloaded with
accelerate hooks) keeps the HF forward; quantized linear modules are called as they are.

When every projection runs on zlocal's own int4/int8 CPU kernels (bf16), a one-token step goes
through all decoder layers in one call of ``cpu_kernels.DecodeStack``: same math and rounding points,
none of the ~40 Python-level ops per layer (SmolLM2-135M int4: 10.0 -> 3.7 ms per token).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zlocal.errors import ContextOverflowError
from zlocal.inference.kvcache import KVCache
from zlocal.inference.prepare import prepare_decoder

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
        prepared = prepare_decoder(model)  # done at load; the same object here
        self.embed, self.norm = prepared.embed, prepared.norm
        # bound forward methods skip nn.Module.__call__ (hook checks), a few us per call
        self.lm_head = prepared.lm_head.forward
        self.layers = prepared.layers
        self._calls = [
            (lay.qkv.forward, lay.o.forward, lay.gate_up.forward, lay.down.forward) for lay in self.layers
        ]
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
        from zlocal.kernels import cpu_kernels

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
        from zlocal.kernels.cpu_kernels import StackLayer

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
        from zlocal.kernels.cpu_kernels import DecodeStack, kernels

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
        for i, (lay, (qkv_proj, o_proj, gate_up_proj, down_proj)) in enumerate(
            zip(self.layers, self._calls, strict=True)
        ):
            scale = lay.attn_scale
            x = self._rms(h, lay.input_norm, lay.input_eps)
            qkv = qkv_proj(x).view(1, t, nq + 2 * nkv, d)
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
            h = h + o_proj(o)
            x = self._rms(h, lay.post_norm, lay.post_eps)
            gate, up = gate_up_proj(x).chunk(2, dim=-1)
            h = h + down_proj(F.silu(gate) * up)
        h = self._rms(h[:, -1:], self.norm.weight, self.norm.variance_epsilon)
        return self.lm_head(h)[0, -1]
