"""The model prepared once, at load, into what the lean forward and the one-call decode kernel consume.

For each decoder layer a ``LayerWeights``: its norms and four projection modules - q/k/v fused, o,
gate/up fused, down - each a module of the layer's format (zlocal's int4/int8 CPU modules, a dense
or oneDNN-packed bf16 weight). Fusing concatenates the weights along the outputs; the HF modules are
re-pointed at views of the fused weights (or replaced by ``PackedLinear`` views of the packed ones)
so memory is not doubled and the HF forward keeps computing the same thing. ``prepare_decoder`` does
this once per model (the loader calls it; later calls return the same preparation), so nothing
changes the HF modules after load.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from zlocal.kernels import cpu_quant
from zlocal.kernels.dense_kernels import DenseLinear, PackedLinear, _packs, pack_weight
from zlocal.kernels.heap import release_freed_memory

_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()




def _plain(lin) -> bool:
    return type(lin) is nn.Linear and lin.weight.dtype in (torch.float32, torch.bfloat16, torch.float16)


class ConcatLinear(nn.Module):
    """Several projections of one input that cannot be fused (their kernels differ), called in turn."""

    def __init__(self, linears: list[nn.Module]):
        super().__init__()
        self.parts = list(linears)  # not registered: the HF layer owns them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([lin(x) for lin in self.parts], dim=-1)


def _projection(owner: nn.Module, names: list[str]) -> nn.Module:
    """One module computing the concatenated outputs of ``owner``'s linears ``names``.

    Plain float Linears are fused into one weight. In bf16 on a CPU where oneDNN's packed layout
    is the fastest kernel (``dense_kernel``), the fused weight is packed and the HF modules are
    replaced by ``PackedLinear`` views of it; otherwise they are re-pointed at views of the fused
    weight. Either way memory is not doubled. Quantized modules (zlocal's CPU int8/int4 kernels)
    are fused when their packing allows, else called in turn.
    """
    linears = [getattr(owner, n) for n in names]
    if not all(_plain(lin) for lin in linears):
        if len(linears) == 1:
            return linears[0]
        fused_q = _fuse_quantized(linears)
        return fused_q if fused_q is not None else ConcatLinear(linears)
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
        return PackedLinear(packed, linears[0].in_features, fused.shape[0])  # all rows, one call
    if len(linears) > 1:
        start = 0
        for lin in linears:
            n = lin.weight.shape[0]
            lin.weight = nn.Parameter(fused[start : start + n], requires_grad=False)
            start += n
    return DenseLinear(fused)


def _fuse_quantized(linears: list):
    """One zlocal CPU int8/int4 module for several with the same input (q/k/v, gate/up), or None.

    Both kernels compute each output channel from its own rows of the packed weight (and its own
    scales), so concatenating along the output dimension gives bit-identical results with one
    kernel call instead of several. The int4 packings interleave output channels in blocks (torch's:
    64 rows with AVX-512, 32 with AVX2; zlocal's: 4), so int4 parts are only joined when each is a
    whole number of blocks (``row_block``). The originals are re-pointed at views of the fused
    weight, so memory is not doubled; their small scale tensors stay separate copies.
    """
    from zlocal.kernels.cpu_quant import Int4WeightOnlyLinear, Int8WeightOnlyLinear

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
    qkv: nn.Module  # fused q/k/v projection
    o: nn.Module
    attn_scale: float
    post_norm: torch.Tensor
    post_eps: float
    gate_up: nn.Module  # fused gate/up projection
    down: nn.Module

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
        mods = (self.qkv, self.o, self.gate_up, self.down)
        return [None if isinstance(m, ConcatLinear) else m for m in mods]


@dataclass(frozen=True)
class PreparedDecoder:
    """A Llama/Mistral decoder as the lean forward consumes it: embeddings, layers, final norm, head."""

    embed: nn.Embedding
    layers: list[LayerWeights]
    norm: nn.Module
    lm_head: nn.Module


def prepare_decoder(model) -> PreparedDecoder:
    """Fuse and collect ``model``'s decoder once (later calls return the same preparation, so the HF
    modules are changed at most once, when the loader calls this)."""
    prepared = _PREPARED.get(model)
    if prepared is None:
        inner = model.model
        layers = []
        for layer in inner.layers:
            layers.append(LayerWeights.of(layer))
            # the unfused originals just freed stay in the C heap, where the next (larger) fused
            # weights cannot reuse them: return them per layer, or the heap grows by every fused copy
            release_freed_memory()
        prepared = PreparedDecoder(
            embed=inner.embed_tokens,
            layers=layers,
            norm=inner.norm,
            lm_head=_head(model),
        )
        _PREPARED[model] = prepared
    return prepared


def register_prepared(model, prepared: PreparedDecoder) -> None:
    """Record ``prepared`` as ``model``'s preparation (a decoder rebuilt from its prepared form)."""
    _PREPARED[model] = prepared


def _head(model) -> nn.Module:
    head = model.lm_head
    if not (_plain(head) and head.bias is None):
        return head
    if _packs(head.weight):
        # A head tied to the embeddings gets its own packed copy (the lookup keeps reading the dense
        # table); an untied head's dense weight is freed.
        w = head.weight
        model.lm_head = PackedLinear(pack_weight(w), w.shape[1], w.shape[0])
        return model.lm_head
    return DenseLinear(head.weight)
