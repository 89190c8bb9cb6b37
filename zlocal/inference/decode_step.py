"""One decode step - every decoder layer, one token - as a captured CUDA graph; the same code eager
or compiled on the CPU.

``DecodeStep`` runs a Llama/Mistral decoder prepared by ``zlocal.inference.prepare`` over the
engine's preallocated ``KVCache`` with static shapes: the token and its position are device tensors,
K/V are written with ``index_copy_`` at that position, and attention reads a fixed span of the
static buffer under a mask (causal, plus Mistral's sliding window) instead of a prefix whose length
changes every step: spans double from ``MIN_SPAN`` up to the context, one graph each, so a short
conversation does not read the whole context's cache every token. Nothing in the step reads a
value back to the host, so on CUDA it is captured once per span and each token is one
``CUDAGraph.replay()``; picking the token (greedy, or temperature/top-k with a device
``torch.Generator``: ``sample_on_device``) stays on the device too, and the one host sync per token is
the ``.item()`` that streaming and stop checks need.

Why ``torch.cuda.CUDAGraph`` rather than ``torch.compile(mode="reduce-overhead")``: the KV buffers
belong to the engine's cache and are mutated in place every step; reduce-overhead's cudagraph trees
treat such tensors as graph inputs and skip or re-record graphs around mutated inputs, and its
warm-up and memory pools are hard to reason about without a GPU at hand. A graph captured by hand
holds exactly the kernels of one eager step, its input addresses are the engine's own buffers, and
capture takes about a second instead of a compile. ``compile_backend`` (e.g. "inductor") wraps the
step in ``torch.compile`` *without* graphs first, to fuse the small ops; the capture then records the
compiled kernels. On the CPU the same function runs eager or compiled (tests compare both with the
HF forward); there the one-call C decode kernel of ``fastpath`` remains the engine's decode path.

Layers may sit on different devices (a plan that offloads the last layers to the CPU): each device
gets its own rotary tables, positions and mask once per step, and the hidden state crosses between
devices once per boundary (``crossings``), not once per op as with accelerate's per-layer hooks. The
GPU run of layers is captured as its own graph (per span); the CPU layers run eager between replays.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from zlocal.errors import ContextOverflowError
from zlocal.inference.fastpath import unsupported_reason
from zlocal.inference.prepare import prepare_decoder

# the shortest attention span (cache positions) a step reads; spans double up to the context
MIN_SPAN = 256
# reasons of fastpath.unsupported_reason this step handles itself (it moves the hidden state)
_SPLIT_REASONS = ("layers split across devices", "accelerate hooks (offload)")


def step_unsupported(model) -> str | None:
    """Why ``DecodeStep`` cannot run ``model`` (None when it can)."""
    why = unsupported_reason(model)
    if why is not None and why not in _SPLIT_REASONS:
        return why
    if any(p.device.type == "meta" for p in model.parameters()):
        return "weights offloaded to disk"
    return None


def crossings(devices: list[str]) -> int:
    """How many times the hidden state changes device through embedding, layers and head."""
    return sum(a != b for a, b in itertools.pairwise(devices))


def sample_on_device(
    logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The next token as a 1-element long tensor on ``logits``' device: argmax when ``temperature``
    is 0, else a draw from the top-k (0: all) of softmax(logits / temperature). No host sync."""
    logits = logits.float().reshape(-1)
    if temperature < 1e-5:
        return torch.argmax(logits).reshape(1)
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def _runs(devices: list) -> list:
    """(device, start index, items) for each run of equal consecutive ``devices``."""
    out, start = [], 0
    for d, run in itertools.groupby(devices):
        items = list(run)
        out.append((d, start, items))
        start += len(items)
    return out


def _rms(x, w, eps):
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return w * x32.to(dtype)


def _rope(x, cos, sin):
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


class DecodeStep:
    """Prefill chunks and one-token steps over a static KV cache (see the module docstring).

    ``graph``: capture one-token steps in a CUDA graph (default: when every layer, the embedding and
    the head are on one CUDA device). ``compile_backend``: wrap the step in ``torch.compile`` with
    that backend (no graphs) before running or capturing it.
    """

    def __init__(self, model, cache, max_context: int, *, graph: bool | None = None,
                 compile_backend: str | None = None, min_span: int = MIN_SPAN):
        cfg = model.config
        self.cache, self.max_context = cache, int(max_context)
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.group = self.heads // self.kv_heads
        self.window = getattr(cfg, "sliding_window", None) if cfg.model_type == "mistral" else None
        prepared = prepare_decoder(model)
        self.embed, self.norm, self.lm_head = prepared.embed, prepared.norm, prepared.lm_head
        self.layers = prepared.layers
        self.devices = [lay.input_norm.device for lay in self.layers]
        self.embed_device = self.embed.weight.device
        self.head_device = self.norm.weight.device
        path = [self.embed_device, *self.devices, self.head_device]
        self.crossings = crossings([str(d) for d in path])
        self.dtype = self.embed.weight.dtype
        self._tables = self._rotary_tables(model)
        one_cuda = len(set(path)) == 1 and self.embed_device.type == "cuda"
        self.graph = one_cuda if graph is None else bool(graph)
        # runs of consecutive layers on one device: (device, first layer, end)
        self.segments = [(d, lo, lo + len(list(run))) for d, lo, run in _runs(self.devices)]
        # a split model's GPU runs are captured one graph each (per span); its CPU layers run eager
        self.segment_graphs = graph is None and not one_cuda and any(d.type == "cuda" for d in self.devices)
        self._fn = self._run
        if compile_backend is not None:
            self._fn = torch.compile(self._run, backend=compile_backend, dynamic=False)
        self.min_span = max(1, int(min_span))
        self._graphs: dict[int, tuple] = {}  # span -> (graph, token, position, logits), once captured
        self._zeroed: set[int] = set()  # cache buffers (by address) whose unwritten part is zeroed

    @torch.inference_mode()
    def _rotary_tables(self, model) -> dict:
        """Per device: (cos, sin with its first half negated, positions 0..max_context-1)."""
        rot = model.model.rotary_emb
        dev = next((b.device for b in rot.buffers()), self.embed_device)
        pos = torch.arange(self.max_context, device=dev)[None]
        probe = torch.zeros(1, 1, dtype=self.dtype, device=dev)
        cos, sin = rot(probe, position_ids=pos)
        half = cos.shape[-1] // 2
        sin = torch.cat((-sin[0][:, :half], sin[0][:, half:]), dim=-1)
        tables = {}
        for d in dict.fromkeys(self.devices):
            tables[d] = (cos[0].to(d), sin.to(d), torch.arange(self.max_context, device=d))
        return tables

    @torch.inference_mode()
    def _init_cache(self) -> None:
        """Allocate the cache buffers where needed, and zero what was never written: attention reads
        the whole buffer, and a masked position's weight (0) times uninitialized memory (NaN) is NaN."""
        for layer, dev in zip(self.cache.layers, self.devices, strict=True):
            if not layer.is_initialized:
                probe = torch.empty(1, self.kv_heads, 1, self.head_dim, dtype=self.dtype, device=dev)
                layer.lazy_initialization(probe, probe)
            if layer.keys.data_ptr() not in self._zeroed:
                layer.keys[:, :, layer.length :].zero_()
                layer.values[:, :, layer.length :].zero_()
                self._zeroed.add(layer.keys.data_ptr())

    def span(self, end: int) -> int:
        """Cache positions a step ending at ``end`` attends over: the smallest power-of-two multiple
        of ``min_span`` holding them (at most the context), so short contexts read short buffers and
        a few graphs (one per span) cover every length."""
        s = self.min_span
        while s < end:
            s *= 2
        return min(s, self.max_context)

    def _masks(self, pos: torch.Tensor, span: int, devices=None) -> dict:
        """Per device (all, or ``devices``): (positions, cos, sin, mask [group*t, span]) for query
        positions ``pos``."""
        out = {}
        for dev in devices or self._tables:
            cos, sin, positions = self._tables[dev]
            p = pos.to(dev)
            k_pos = positions[:span]
            mask = k_pos[None, :] <= p[:, None]
            if self.window:
                mask = mask & (k_pos[None, :] > p[:, None] - self.window)
            rows = mask.repeat(self.group, 1)[None, None]  # the query heads of a K/V head as rows
            out[dev] = (p, cos.index_select(0, p)[None, :, None], sin.index_select(0, p)[None, :, None], rows)
        return out

    def _run(self, tokens: torch.Tensor, pos: torch.Tensor, span: int) -> torch.Tensor:
        """Tokens at positions ``pos`` (both [t], device tensors, all below ``span``) through every
        layer; writes K/V at ``pos``, attends over cache positions [0, span) under the mask and returns
        the last position's logits. No host sync (graph-capturable)."""
        h = self._layers(self.embed(tokens)[None], self._masks(pos, span), 0, len(self.layers), span)
        return self._head(h)

    def _layers(self, h: torch.Tensor, per_dev: dict, lo: int, hi: int, span: int) -> torch.Tensor:
        """Layers [lo, hi) on hidden states ``h`` [1, t, hidden] (see ``_run``)."""
        t = h.shape[1]
        nq, nkv, d, g = self.heads, self.kv_heads, self.head_dim, self.group
        for i in range(lo, hi):
            lay, dev, layer = self.layers[i], self.devices[i], self.cache.layers[i]
            if h.device != dev:
                h = h.to(dev)  # a device boundary: the one crossing there
            p, cos, sin, mask = per_dev[dev]
            x = _rms(h, lay.input_norm, lay.input_eps)
            qkv = lay.qkv(x).view(1, t, nq + 2 * nkv, d)
            qk = _rope(qkv[:, :, : nq + nkv], cos, sin)
            q = qk[:, :, :nq].transpose(1, 2).reshape(1, nkv, g * t, d)
            layer.keys.index_copy_(2, p, qk[:, :, nq:].transpose(1, 2).to(layer.keys.dtype))
            layer.values.index_copy_(2, p, qkv[:, :, nq + nkv :].transpose(1, 2).to(layer.values.dtype))
            o = F.scaled_dot_product_attention(
                q, layer.keys[:, :, :span], layer.values[:, :, :span], attn_mask=mask, scale=lay.attn_scale
            )
            o = o.reshape(1, nq, t, d).transpose(1, 2).reshape(1, t, nq * d)
            h = h + lay.o(o)
            x = _rms(h, lay.post_norm, lay.post_eps)
            gate, up = lay.gate_up(x).chunk(2, dim=-1)
            h = h + lay.down(F.silu(gate) * up)
        return h

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        h = h[:, -1:].to(self.head_device)
        h = _rms(h, self.norm.weight, self.norm.variance_epsilon)
        return self.lm_head(h)[0, -1]

    def _check(self, start: int, t: int) -> None:
        room = min(self.max_context, self.cache.max_tokens)
        if start + t > room:
            raise ContextOverflowError(f"KV cache full: {start + t} tokens do not fit in {room}")

    def _advance(self, end: int) -> None:
        for layer in self.cache.layers:
            layer.length = end

    @torch.inference_mode()
    def __call__(self, ids: list[int]) -> torch.Tensor:
        """Run ``ids`` after what the cache holds (a prefill chunk, or one token); return the logits."""
        start, t = self.cache.length, len(ids)
        self._check(start, t)
        self._init_cache()
        tokens = torch.tensor(ids, dtype=torch.long, device=self.embed_device)
        if t == 1:
            return self.one(tokens, start).clone()
        pos = torch.arange(start, start + t, device=self.embed_device)
        logits = self._run(tokens, pos, self.span(start + t))
        self._advance(start + t)
        return logits

    @torch.inference_mode()
    def one(self, token: torch.Tensor, start: int) -> torch.Tensor:
        """One token (a 1-element tensor on the embedding's device) at position ``start``: through the
        captured graph, the split path (its GPU segments captured) or the step function. The logits
        may be a graph's static buffer, overwritten by the next step."""
        self._check(start, 1)
        self._init_cache()
        span = self.span(start + 1)
        if self.graph:
            graph, (tok, pos), logits = self._graphs.get(span) or self._capture_full(span)
            tok.copy_(token.reshape(1))
            pos.fill_(start)
            graph.replay()
        elif self.segment_graphs:
            logits = self._split_one(token, start, span)
        else:
            logits = self._fn(token, torch.arange(start, start + 1, device=self.embed_device), span)
        self._advance(start + 1)
        return logits

    def _split_one(self, token: torch.Tensor, start: int, span: int) -> torch.Tensor:
        """One token through a split model: each run of layers on one device in turn, the hidden state
        moved once per boundary; runs on a CUDA device replay their captured graph."""
        h = self.embed(token.reshape(1))[None]
        for dev, lo, hi in self.segments:
            h = h.to(dev)
            if dev.type == "cuda":
                key = (lo, span)
                graph, (h_in, pos), h_out = self._graphs.get(key) or self._capture_segment(key, h, dev, hi)
                h_in.copy_(h)
                pos.fill_(start)
                graph.replay()
                h = h_out
            else:
                pos = torch.arange(start, start + 1, device=dev)
                h = self._layers(h, self._masks(pos, span, [dev]), lo, hi, span)
        return self._head(h)

    def _capture(self, key, dev, fn, inputs: tuple) -> tuple:
        """Capture ``fn(*inputs)`` (static input tensors on ``dev``) as a CUDA graph, after two
        warm-up runs on a side stream; stored under ``key`` as (graph, inputs, output)."""
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):  # allocator and compile warm-up outside the capture
                fn(*inputs)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn(*inputs)
        self._graphs[key] = (graph, inputs, out)
        return self._graphs[key]

    # Warm-up runs write cache slot span - 1, at or past the filled prefix (the span holds the step's
    # own position): every later step writes a slot before any query reads it.
    def _capture_full(self, span: int) -> tuple:
        dev = self.embed_device
        token = torch.zeros(1, dtype=torch.long, device=dev)
        pos = torch.full((1,), span - 1, dtype=torch.long, device=dev)
        return self._capture(span, dev, lambda tok, p: self._fn(tok, p, span), (token, pos))

    def _capture_segment(self, key: tuple, h: torch.Tensor, dev, hi: int) -> tuple:
        lo, span = key
        h_in = torch.zeros_like(h)
        pos = torch.full((1,), span - 1, dtype=torch.long, device=dev)

        def segment(x, p):
            return self._layers(x, self._masks(p, span, [dev]), lo, hi, span)

        return self._capture(key, dev, segment, (h_in, pos))

    @torch.inference_mode()
    def decode(self, first: int, steps: int, temperature: float = 0.0, top_k: int = 0,
               generator: torch.Generator | None = None, stop_ids: frozenset = frozenset()) -> list[int]:
        """Feed ``first`` and sample ``steps`` tokens on the device (one ``.item()`` each, for the stop
        check a streaming caller makes); returns the sampled tokens."""
        out: list[int] = []
        token = torch.tensor([first], device=self.embed_device)
        for _ in range(steps):
            logits = self.one(token, self.cache.length)
            token = sample_on_device(logits, temperature, top_k, generator).to(self.embed_device)
            out.append(int(token.item()))
            if out[-1] in stop_ids:
                break
        return out


def graph_safe(module) -> bool:
    """Whether a projection module's kernels may be captured: PyTorch's own (dense, int4); not
    bitsandbytes' or gptqmodel's, which the planner counts as eager (``WeightFormat.in_gpu_graph``)."""
    parts = getattr(module, "parts", None)
    if parts is not None:  # prepare.ConcatLinear
        return all(graph_safe(p) for p in parts)
    return not type(module).__module__.startswith(("bitsandbytes", "gptqmodel", "auto_gptq"))


def for_engine(model, cache, max_context: int) -> DecodeStep | None:
    """The step the engine uses on CUDA machines, or None: where the model cannot run it, has no layer
    on a CUDA device, or sits on one GPU with layers that cannot be captured (the lean forward, which
    reads only the filled prefix, is then faster than an eager static step). ``ZLOCAL_DECODE_GRAPH=0``
    turns the step off; ``ZLOCAL_DECODE_COMPILE=inductor`` compiles it before capture."""
    import os

    if os.environ.get("ZLOCAL_DECODE_GRAPH", "1") == "0":
        return None
    if not any(p.device.type == "cuda" for p in model.parameters()) or step_unsupported(model):
        return None
    backend = os.environ.get("ZLOCAL_DECODE_COMPILE") or None
    step = DecodeStep(model, cache, max_context, compile_backend=backend)
    mods = [m for lay in step.layers for m in (lay.qkv, lay.o, lay.gate_up, lay.down)]
    if not all(graph_safe(m) for m in mods):
        if step.graph:
            return None
        step.segment_graphs = False  # a split step still moves the hidden state once per boundary
    return step
