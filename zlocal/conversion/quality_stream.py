"""The quality report's streamed path: reference and converted model run one decoder layer at a time.

Loading a 7B bf16 reference whole for the report peaked at 17.1 GB of RAM where the conversion needs
under 3 GB. Here each side runs on a meta-device skeleton of the model: its embedding, then every
decoder layer materialised from that side's safetensors shards, run over all evaluation windows and
dropped again, then its final norm. Only the windows' hidden states are kept between layers (a few
tens of MB on a 7B), so each side holds one decoder layer at a time, and the two never overlap. The
masks, positions and rotary tables each layer receives are the model's own, captured from its forward
pass (tune_scales._layer_kwargs), so the result matches the whole-model forward.

Converted layers are rebuilt as dense weights in the evaluation dtype: bitsandbytes nf4/fp4 through
bitsandbytes' own dequantization from the stored quant state, int8 as codes * SCB / 127, GPTQ as
s * (q - z) per group. That is what the weight-only CPU kernels compute, and what the whole-model path
measured for bitsandbytes after ``model.dequantize()``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from zlocal.checkpoint.checkpoint_io import TensorStore, checkpoint_shards
from zlocal.conversion.tune_scales import _layer_kwargs
from zlocal.formats import checkpoint_format
from zlocal.formats.gptq_cpu import stores_v1_zeros, unpack, zero_points
from zlocal.kernels.heap import release_freed_memory

# Architectures whose forward is exactly embed -> decoder layers -> norm -> lm_head (no embedding
# scale or other step between them that the skeleton would miss).
STREAMABLE_TYPES = {"llama", "mistral", "qwen2"}


def _config(path: Path) -> dict:
    cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    return cfg.get("text_config", cfg) | {"quantization_config": cfg.get("quantization_config")}


def _quant_method(cfg: dict) -> str | None:
    qc = cfg.get("quantization_config") or {}
    return qc.get("quant_method")


def why_not_streamable(model: Path, reference: Path) -> str | None:
    """Why the streamed path cannot compare MODEL with REFERENCE, or None when it can."""
    ref_cfg, cfg = _config(reference), _config(model)
    kind = ref_cfg.get("model_type")
    if kind not in STREAMABLE_TYPES:
        return f"architecture '{kind}' is not streamed (streamed: {', '.join(sorted(STREAMABLE_TYPES))})"
    if cfg.get("model_type") != kind:
        return f"the model is '{cfg.get('model_type')}' but the reference is '{kind}'"
    if _quant_method(ref_cfg) is not None:
        return "the reference is quantized"
    if _quant_method(cfg) is not None and checkpoint_format(cfg.get("quantization_config")) is None:
        return f"'{_quant_method(cfg)}' checkpoints are not streamed (bitsandbytes and GPTQ are)"
    for name, p in (("reference", reference), ("model", model)):
        if not checkpoint_shards(p):
            return f"the {name} has no safetensors weights"
    return None


def _bnb4_weight(store: TensorStore, name: str) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    # absmax, quant_map, nested_* and quant_state.bitsandbytes__<type>, as transformers saves them
    state = {k[len(name) + 1 :]: store[k] for k in store.names(f"{name}.")}
    state = bnbf.QuantState.from_dict(state, torch.device("cpu"))
    return bnbf.dequantize_4bit(store[name], state)


def _int8_weight(store: TensorStore, name: str) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    scb = store[f"{name[: -len('weight')]}SCB"]
    return bnbf.int8_vectorwise_dequant(store[name], scb)  # codes * SCB / 127, as model.dequantize()


def gptq_weight(store: TensorStore, prefix: str, qc: dict) -> torch.Tensor:
    """The dense [out, in] float32 weight s * (q - z) of the GPTQ layer at ``prefix``."""
    bits, group = int(qc["bits"]), int(qc["group_size"])
    codes = unpack(store[f"{prefix}.qweight"], bits, 0).float()  # [K, N]
    k, n = codes.shape
    zeros = zero_points(store[f"{prefix}.qzeros"], bits, n, stores_v1_zeros(qc))  # [K/G, N]
    scales = store[f"{prefix}.scales"].float()
    g_idx = store[f"{prefix}.g_idx"].long() if f"{prefix}.g_idx" in store else None
    if g_idx is None or torch.equal(g_idx, torch.arange(k) // group):
        # in-order groups: broadcast each group's zero and scale over its rows, no [K, N] copies
        groups = codes.view(k // group, group, n)
        groups.sub_(zeros[:, None]).mul_(scales[:, None])
    else:  # act-order: each row names its group
        codes.sub_(zeros[g_idx]).mul_(scales[g_idx])
    return codes.t()


class Side:
    """One checkpoint's tensors, any quantized linear weight rebuilt dense, in the evaluation dtype."""

    def __init__(self, path: Path, dtype: torch.dtype):
        cfg = _config(path)
        self.qc = cfg.get("quantization_config") or {}
        self.dtype = dtype
        self.store = TensorStore(path)
        fmt = checkpoint_format(self.qc)
        self.mode = f"weight-only ({fmt.label} weights dequantized)" if fmt else "native"

    def __contains__(self, name: str) -> bool:
        base = name.removesuffix(".weight")
        return name in self.store or f"{base}.qweight" in self.store

    def dense(self, name: str) -> torch.Tensor:
        """The tensor NAME as the unquantized model would hold it."""
        base = name.removesuffix(".weight")
        if name.endswith(".weight") and f"{base}.qweight" in self.store:
            w = gptq_weight(self.store, base, self.qc)
        elif f"{name}.absmax" in self.store:
            w = _bnb4_weight(self.store, name)
        elif f"{base}.SCB" in self.store:
            w = _int8_weight(self.store, name)
        elif name in self.store:
            w = self.store[name]
        else:
            raise KeyError(name)
        return w.to(self.dtype)

    def head(self, tied: bool) -> torch.Tensor:
        """The output projection (the input embedding when the model ties them)."""
        if "lm_head.weight" in self:
            return self.dense("lm_head.weight")
        if tied:
            return self.dense("model.embed_tokens.weight")
        raise KeyError("lm_head.weight")


class Skeleton:
    """The model built on the meta device from the reference's config; sides lend it their weights
    one module at a time."""

    def __init__(self, reference: Path, dtype: torch.dtype):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.config = AutoConfig.from_pretrained(reference)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        self.model.eval()
        for p in self.model.parameters():  # weights lent in no_grad stay plain tensors
            p.requires_grad_(False)
        self.inner = self.model.get_decoder()
        # rotary tables are buffers computed at init; the meta-device ones hold no values
        self.inner.rotary_emb = type(self.inner.rotary_emb)(config=self.config)
        self.tied = bool(getattr(self.config.get_text_config(), "tie_word_embeddings", False))
        self._kwargs: dict[int, list[dict]] = {}

    def lend(self, module: torch.nn.Module, side: Side, prefix: str) -> None:
        """Give MODULE its weights from SIDE (names under PREFIX)."""
        names = list(module.state_dict())
        state = {n: side.dense(f"{prefix}{n}") for n in names}
        module.load_state_dict(state, strict=True, assign=True)

    def layer_kwargs(self, length: int) -> list[dict]:
        """What each decoder layer receives for a window of LENGTH tokens (needs a lent embedding)."""
        if length not in self._kwargs:
            self._kwargs[length] = _layer_kwargs(self.inner, torch.zeros(1, length, dtype=torch.long))
        return self._kwargs[length]


@torch.no_grad()
def final_hidden(
    sk: Skeleton, side: Side, windows: list[torch.Tensor], progress: Callable[[], None] | None = None
) -> list[torch.Tensor]:
    """Each window's last hidden state (after the final norm) under SIDE's weights, computed one
    decoder layer at a time."""
    inner = sk.inner
    sk.lend(inner.embed_tokens, side, "model.embed_tokens.")
    sk.lend(inner.norm, side, "model.norm.")
    kwargs = {n: sk.layer_kwargs(n) for n in sorted({w.numel() for w in windows})}
    hidden = [inner.embed_tokens(w[None]) for w in windows]
    inner.embed_tokens.to("meta")  # a 7B's embedding is 250 MB; the tied head is reloaded at the end
    for i, layer in enumerate(inner.layers):
        sk.lend(layer, side, f"model.layers.{i}.")
        hidden = [layer(h, **kwargs[h.shape[1]][i]) for h in hidden]
        layer.to("meta")  # one decoder layer at a time
        release_freed_memory()
        if progress:
            progress()
    out = [inner.norm(h)[0] for h in hidden]
    inner.norm.to("meta")
    return out


def stream_logprobs(
    model: Path, reference: Path, windows: list[torch.Tensor], dtype: torch.dtype, *, quiet: bool = True
) -> tuple[Iterator[tuple[torch.Tensor, torch.Tensor]], str]:
    """(iterator of (reference, model) log-probabilities per window, kernel mode of the model).

    Both sides run to their final hidden states first; the heads then turn one window at a time
    into float32 log-probabilities, so no side's full set of log-probabilities is ever held."""
    from tqdm import tqdm

    release_freed_memory()  # what the conversion before us freed
    sk = Skeleton(reference, dtype)
    finals = []
    sides = [Side(reference, dtype), Side(model, dtype)]
    n_layers = len(sk.inner.layers)
    for label, side in zip(("reference", "converted"), sides, strict=True):
        with tqdm(
            total=n_layers, desc=f"{label} (layer by layer)", unit="layer", disable=quiet, file=sys.stderr
        ) as bar:
            finals.append(final_hidden(sk, side, windows, progress=lambda b=bar: b.update(1)))

    def pairs():
        release_freed_memory()
        heads = [s.head(sk.tied) for s in sides]
        try:
            with torch.no_grad():
                for hr, hq in zip(*finals, strict=True):
                    # no locals: the frame must not keep this pair alive while the next is computed
                    yield (
                        torch.log_softmax(F.linear(hr[:-1], heads[0]).float(), -1),
                        torch.log_softmax(F.linear(hq[:-1], heads[1]).float(), -1),
                    )
        finally:
            for s in sides:
                s.store.close()

    return pairs(), sides[1].mode
