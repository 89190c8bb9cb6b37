"""Memory estimator from the model config alone: weights per format, KV cache, activations, overheads.

Every number is bytes. Formats (``weights_format``):

- ``bf16`` / ``fp16`` / ``fp32``: dense weights in that dtype;
- ``int8`` / ``int4``: zlocal's CPU weight-only kernels (int8 per-channel scale; int4 asymmetric
  groups with a scale and a zero per group, both in the compute dtype);
- ``bnb-int8``: bitsandbytes LLM.int8 (int8 + one fp32 statistic per output row);
- ``nf4`` / ``fp4``: bitsandbytes 4-bit, blocks of 64 with double-quantized absmax statistics;
- ``gptq``: packed ``bits`` codes, fp16 scales and packed zeros per group, an int32 g_idx per input.

Embeddings and norms stay in the compute dtype in every format (as bitsandbytes, GPTQ and our CPU
kernels leave them); so does lm_head, except that a plan with every layer on the CPU in int8 or int4
runs it on the int8 kernel (``head_format="int8"``, a separate copy when it is tied to the embeddings),
and a dense 16-bit head on the CPU counts a packed copy when tied (see ``dense_kernels.PackedLinear``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from zlocal.formats import get_format

GIB = 1024**3
MIB = 1024**2

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}

# CUDA context (cuBLAS handles, kernels) that torch does not count but nvidia-smi does.
CUDA_CONTEXT_BYTES = 450 * MIB
# Host process: python, torch, transformers, tokenizer. Measured on the 2-core VM with torch and
# transformers imported and nothing loaded: ~430 MiB anonymous plus ~330 MiB of shared-library pages
# (file-backed: VmRSS counts them, RssAnon does not); the estimate's KV cache and activations are
# upper bounds that the first generation does not fill, which the lower figure absorbs.
HOST_RUNTIME_BYTES = 700 * MIB
HOST_LIBRARY_BYTES = 330 * MIB


@dataclass(frozen=True)
class ModelShape:
    """The shapes that decide memory; built from a transformers config or a model profile."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    max_position_embeddings: int = 4096
    attention_bias: bool = False

    @classmethod
    def from_config(cls, config) -> ModelShape:
        """Read the shape from a transformers config (or any object with the same attributes)."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        return cls(
            hidden_size=hidden,
            intermediate_size=int(get("intermediate_size")),
            num_layers=int(get("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(get("head_dim") or hidden // heads),
            vocab_size=int(get("vocab_size")),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            sliding_window=get("sliding_window") or None,
            max_position_embeddings=int(get("max_position_embeddings", 4096) or 4096),
            attention_bias=bool(get("attention_bias", False)),
        )

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(out_features, in_features) of the seven Linear layers of one decoder block."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]


def linear_bytes(
    out_f: int, in_f: int, fmt: str, *, compute_bytes: int = 2, bits: int = 4, group_size: int = 128
) -> int:
    """Resident bytes of one (out_f, in_f) Linear weight in ``fmt`` (its format object decides)."""
    return get_format(fmt).linear_bytes(
        out_f, in_f, compute_bytes=compute_bytes, bits=bits, group_size=group_size
    )


def layer_weight_bytes(
    shape: ModelShape, fmt: str, compute_bytes: int = 2, bits: int = 4, group_size: int = 128
) -> int:
    """One decoder block: seven Linears in ``fmt`` plus two norms in the compute dtype."""
    total = 2 * shape.hidden_size * compute_bytes
    for out_f, in_f in shape.linear_shapes():
        total += linear_bytes(out_f, in_f, fmt, compute_bytes=compute_bytes, bits=bits, group_size=group_size)
    if shape.attention_bias:
        total += (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim * compute_bytes
    return total


def embedding_bytes(shape: ModelShape, compute_bytes: int = 2) -> int:
    return shape.vocab_size * shape.hidden_size * compute_bytes


def head_bytes(shape: ModelShape, compute_bytes: int = 2, head_format: str | None = None) -> int:
    """lm_head plus the final norm. A dense head tied to the embeddings adds nothing; an int8 head
    is its own copy (int8 codes and one scale per row)."""
    if head_format is not None:  # its own quantized copy
        v, h = shape.vocab_size, shape.hidden_size
        lm = linear_bytes(v, h, head_format, compute_bytes=compute_bytes, bits=8, group_size=h)
    else:
        lm = 0 if shape.tie_word_embeddings else shape.vocab_size * shape.hidden_size * compute_bytes
    return lm + shape.hidden_size * compute_bytes


def head_read_bytes(shape: ModelShape, compute_bytes: int = 2, head_format: str | None = None) -> int:
    """Bytes the output layer reads per token (a tied dense head reads the embedding matrix)."""
    tied_dense = shape.tie_word_embeddings and head_format is None
    return head_bytes(shape, compute_bytes, head_format) + (
        embedding_bytes(shape, compute_bytes) if tied_dense else 0
    )


def kv_tokens(shape: ModelShape, ctx: int, honor_window: bool = False) -> int:
    """Positions a cache holds for ``ctx`` tokens. zlocal's cache keeps every position (exact
    rollback), so the window only bounds it when ``honor_window`` (a rolling cache) is asked for."""
    if honor_window and shape.sliding_window:
        return min(ctx, int(shape.sliding_window))
    return ctx


def kv_bytes_per_layer(shape: ModelShape, ctx: int, kv_bytes: float = 2, honor_window: bool = False) -> int:
    """2 (K and V) x kv_heads x head_dim x tokens x bytes for one layer."""
    return int(2 * shape.num_kv_heads * shape.head_dim * kv_tokens(shape, ctx, honor_window) * kv_bytes)


def kv_cache_bytes(shape: ModelShape, ctx: int, kv_bytes: float = 2, honor_window: bool = False) -> int:
    return shape.num_layers * kv_bytes_per_layer(shape, ctx, kv_bytes, honor_window)


def activation_bytes(shape: ModelShape, ctx: int, chunk: int = 512, compute_bytes: int = 2) -> int:
    """Peak transient memory of one prefill chunk: hidden states, MLP intermediates, attention
    mask / score tiles against the whole context, and the last-token logits in fp32."""
    chunk = min(chunk, ctx)
    hidden = chunk * shape.hidden_size * compute_bytes * 4
    mlp = chunk * shape.intermediate_size * compute_bytes * 3
    qkv = chunk * (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim * compute_bytes
    mask = chunk * ctx * 4
    scores = shape.num_heads * chunk * min(ctx, 1024) * 4  # attention kernels work in tiles
    logits = shape.vocab_size * 4 * 2
    return hidden + mlp + qkv + mask + scores + logits


@dataclass
class MemoryEstimate:
    """Bytes on the GPU and in host RAM for one placement of a model."""

    gpu_weights: int = 0
    cpu_weights: int = 0
    gpu_kv: int = 0
    cpu_kv: int = 0
    gpu_activations: int = 0
    cpu_activations: int = 0
    gpu_overhead: int = 0
    cpu_overhead: int = 0

    @property
    def vram_bytes(self) -> int:
        return self.gpu_weights + self.gpu_kv + self.gpu_activations + self.gpu_overhead

    @property
    def ram_bytes(self) -> int:
        return self.cpu_weights + self.cpu_kv + self.cpu_activations + self.cpu_overhead

    def to_dict(self) -> dict:
        return {**asdict(self), "vram_bytes": self.vram_bytes, "ram_bytes": self.ram_bytes}


def estimate(
    shape: ModelShape,
    *,
    ctx: int,
    gpu_layers: int = 0,
    gpu_format: str = "bf16",
    cpu_format: str = "bf16",
    compute_bytes: int = 2,
    kv_bytes: float = 2,
    bits: int = 4,
    group_size: int = 128,
    prefill_chunk: int = 512,
    include_overheads: bool = True,
    head_format: str | None = None,
) -> MemoryEstimate:
    """Estimate resident memory. The first ``gpu_layers`` blocks go to the GPU; with every block on
    the GPU the embeddings and head go too; with a split, the embedding lookup stays on the CPU
    (a cheap gather) and the norm + lm_head go to the GPU (a large matmul every token).
    """
    n = shape.num_layers
    g = max(0, min(gpu_layers, n))
    cpu_layers = n - g
    est = MemoryEstimate()
    est.gpu_weights = g * layer_weight_bytes(shape, gpu_format, compute_bytes, bits, group_size)
    est.cpu_weights = cpu_layers * layer_weight_bytes(shape, cpu_format, compute_bytes, bits, group_size)
    emb, head = embedding_bytes(shape, compute_bytes), head_bytes(shape, compute_bytes, head_format)
    if g == 0:
        est.cpu_weights += emb + head
        if compute_bytes == 2 and head_format is None and shape.tie_word_embeddings:
            # the lean forward packs a dense bf16 head for oneDNN where that kernel is fastest, a
            # copy when tied (counted for every 16-bit CPU head: an upper bound where not packed)
            est.cpu_weights += emb
    elif cpu_layers == 0:
        est.gpu_weights += emb + head
    else:
        est.cpu_weights += emb
        # a tied lm_head on the GPU needs its own copy of the embedding matrix
        est.gpu_weights += head + (emb if shape.tie_word_embeddings else 0)
    per_layer_kv = kv_bytes_per_layer(shape, ctx, kv_bytes)
    est.gpu_kv, est.cpu_kv = g * per_layer_kv, cpu_layers * per_layer_kv
    act = activation_bytes(shape, ctx, prefill_chunk, compute_bytes)
    if include_overheads:
        if g:
            est.gpu_activations = act
            est.gpu_overhead = CUDA_CONTEXT_BYTES
        est.cpu_activations = act if cpu_layers else act // 4
        libraries = max(get_format(f).library_bytes for f in {gpu_format, cpu_format})
        est.cpu_overhead = HOST_RUNTIME_BYTES + libraries
    return est


def load_transient_bytes(shape: ModelShape, head_format: str | None = None) -> int:
    """Bytes in flight on top of the loaded model while a checkpoint is read and quantized on load.

    Each weight is quantized straight from the mapped checkpoint (its pages dropped once consumed)
    in row blocks of a few MiB, so what is in flight is the largest weight's codes and part of their
    packed copy: 1.5 bytes per weight of the largest matrix quantized (the head when it is quantized,
    else a decoder projection), calibrated on SmolLM2 and the 7B shape (``scripts/bench_load.py``:
    the peaks over the mapped load's were 0.03-0.23 GiB). A load from the prepared form maps weights
    already packed and has none of this.
    """
    biggest = max(o * i for o, i in shape.linear_shapes())
    if head_format is not None:
        biggest = max(biggest, shape.vocab_size * shape.hidden_size)
    return 3 * biggest // 2
