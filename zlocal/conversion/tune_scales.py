"""Scale tuning of a GPTQ checkpoint: keep every code GPTQ chose, fit the per-group scales end to end.

GPTQ solves one layer at a time against that layer's own output error; the errors of 30 quantized
layers still add up, and with integer zero points a group's grid can sit half a step off the weights
it stands for. With the codes fixed, the dequantized weight s * (q - z) is linear in each group's
scale s, so the scales can be fitted by gradient descent on what matters downstream: the KL
divergence from the source model's next-token distribution on the calibration windows. Only the
float16 scales in the checkpoint change, so its format, size and kernels stay exactly as GPTQ wrote
them. (Same idea as PEQA / EfficientQAT's end-to-end scale training, here on a finished GPTQ result.)

Memory: the source's log-probabilities are computed layer by layer, streaming each layer's weights
from its safetensors shards; the student keeps GPTQ's packed codes and rebuilds one layer's weights
at a time (per-layer gradient checkpointing), so the peak is about the packed model plus one layer.

Safety: a held-out share of the calibration windows is scored before training and after every
epoch; the best epoch's scales are written, and when no epoch beats GPTQ's own scales the
checkpoint is left untouched.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from zlocal.checkpoint.checkpoint_io import MappedShard, TensorStore, read_header, write_safetensors
from zlocal.errors import ConversionError
from zlocal.formats.gptq_cpu import act_order, stores_v1_zeros, unpack, zero_points

DEFAULT_EPOCHS = 8
DEFAULT_LR = 1e-3
# Log-scale steps are clamped so no group can drift far from GPTQ's scale (exp(0.5) = 1.65x).
MAX_LOG_STEP = 0.5


@dataclass
class TuneReport:
    """What scale tuning did; stored in the conversion manifest."""

    epochs: int
    best_epoch: int  # 0: GPTQ's scales were kept
    train_windows: int
    heldout_windows: list[int]  # indices of the windows that chose the epoch
    heldout_kl_before: float
    heldout_kl_after: float
    seconds: float
    modules: int

    def to_dict(self) -> dict:
        return asdict(self)


class ScaledGptqLinear(nn.Module):
    """A GPTQ layer whose weight is rebuilt as s0 * exp(theta) * (q - z) on every call; only
    ``theta`` (one value per group and output) trains."""

    def __init__(self, qweight, qzeros, scales, bits: int, group_size: int, v1_zeros: bool, bias=None):
        super().__init__()
        n = qweight.shape[1]
        self.bits, self.group_size = bits, group_size
        self.register_buffer("qweight", qweight.contiguous(), persistent=False)
        zeros = zero_points(qzeros, bits, n, v1_zeros)
        self.register_buffer("zeros", zeros, persistent=False)  # [K/G, N]
        self.register_buffer("s0", scales.float(), persistent=False)  # [K/G, N]
        self.register_buffer("bias", None if bias is None else bias.float(), persistent=False)
        self.theta = nn.Parameter(torch.zeros_like(self.s0))

    def scales(self) -> torch.Tensor:
        return self.s0 * torch.exp(self.theta)

    def weight(self) -> torch.Tensor:
        codes = unpack(self.qweight, self.bits, 0).float()  # [K, N]
        k, n = codes.shape
        # broadcast over each group's rows instead of materialising [K, N] zeros and scales
        groups = codes.view(k // self.group_size, self.group_size, n)
        w = (groups - self.zeros[:, None]) * self.scales()[:, None]
        return w.reshape(k, n).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight().to(x.dtype), b)


def build_student(out: Path, dtype: torch.dtype = torch.float32):
    """The checkpoint in ``out`` as a transformers model whose GPTQ layers are ScaledGptqLinear."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(out)
    qc = config.quantization_config
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    bits, group = int(qc["bits"]), int(qc["group_size"])
    v1_zeros = stores_v1_zeros(qc)
    del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    keys = TensorStore(out)
    prefixes = sorted(k[: -len(".qweight")] for k in keys if k.endswith(".qweight"))
    if not prefixes:
        raise ConversionError(f"{out} holds no GPTQ layers (.qweight tensors) to tune")
    for prefix in prefixes:
        parent_name, _, child = prefix.rpartition(".")
        bias = keys.get(f"{prefix}.bias")
        if f"{prefix}.g_idx" in keys and act_order(keys[f"{prefix}.g_idx"], group):
            raise ConversionError(f"{prefix}: act-order groups are not supported by scale tuning")
        module = ScaledGptqLinear(
            keys[f"{prefix}.qweight"],
            keys[f"{prefix}.qzeros"],
            keys[f"{prefix}.scales"],
            bits,
            group,
            v1_zeros,
            bias,
        )
        setattr(model.get_submodule(parent_name), child, module)
    quant = {f"{p}.{s}" for p in prefixes for s in ("qweight", "qzeros", "scales", "g_idx", "bias")}
    rest = {k: keys[k].to(dtype) for k in keys if k not in quant}
    model.load_state_dict(rest, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    # rotary tables are buffers built at init; the meta-device ones hold no values
    inner = model.get_decoder()
    inner.rotary_emb = type(inner.rotary_emb)(config=config)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise ConversionError(f"{out}: tensor {name} is missing from the checkpoint")
    for p in model.parameters():
        p.requires_grad_(False)
    tuned = [m for m in model.modules() if isinstance(m, ScaledGptqLinear)]
    for m in tuned:
        m.theta.requires_grad_(True)
    return model, tuned, bits, group


class _Capture(nn.Module):
    """Stands in for a decoder layer to record the arguments the model passes it (causal or
    sliding-window mask, positions, rotary tables) without running it."""

    def __init__(self, layer: nn.Module, store: list):
        super().__init__()
        self.store = store
        if hasattr(layer, "attention_type"):  # models with mixed layer types pick the mask by it
            self.attention_type = layer.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        self.store.append(kwargs)
        return hidden_states


@torch.no_grad()
def _layer_kwargs(model, ids: torch.Tensor) -> list[dict]:
    """The keyword arguments each decoder layer receives for a batch-1 window shaped like ``ids``."""
    layers = model.get_decoder().layers
    originals, store = list(layers), []
    try:
        for i, layer in enumerate(originals):
            layers[i] = _Capture(layer, store)
        model(input_ids=ids, use_cache=False)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    if len(store) != len(originals):
        raise ConversionError(f"expected {len(originals)} decoder layers to run, saw {len(store)}")
    return store


@torch.no_grad()
def source_logprobs(model, src: Path, windows: torch.Tensor, progress=None) -> list[torch.Tensor]:
    """Log-probabilities of the source model on ``windows`` [S, T], computed with the student's
    skeleton (embeddings, norms and head are GPTQ's copies of the source's) and each decoder
    layer's linear weights streamed from SRC's safetensors, one layer at a time."""
    src_keys = TensorStore(src)
    if not src_keys:
        raise ConversionError(f"{src}: scale tuning needs safetensors source weights")
    inner = model.get_decoder()
    layer_kwargs = _layer_kwargs(model, windows[:1])
    hidden = inner.embed_tokens(windows).float()
    for i, layer in enumerate(inner.layers):
        saved = {}
        for name, m in layer.named_modules():
            if isinstance(m, ScaledGptqLinear):
                full = f"model.layers.{i}.{name}"
                if f"{full}.weight" not in src_keys:
                    raise ConversionError(f"{src}: tensor {full}.weight not found for scale tuning")
                lin = nn.Linear(1, 1, bias=m.bias is not None)
                lin.weight = nn.Parameter(src_keys[f"{full}.weight"].float(), requires_grad=False)
                if m.bias is not None:
                    lin.bias = nn.Parameter(m.bias.clone(), requires_grad=False)
                saved[name] = m
                parent, _, child = name.rpartition(".")
                setattr(layer.get_submodule(parent), child, lin)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = torch.cat(
                [layer(hidden[j : j + 1], **layer_kwargs[i]).float() for j in range(windows.shape[0])]
            )
        for name, m in saved.items():
            parent, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent), child, m)
        if progress:
            progress()
    out = []
    for j in range(windows.shape[0]):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model.lm_head(inner.norm(hidden[j])).float()
        out.append(torch.log_softmax(logits, -1).to(torch.float16))
    return out


def _kl(model, ids: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids[None], use_cache=False).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    r = ref.float()
    return (r.exp() * (r - lp)).sum(-1).mean()


def _heldout_kl(model, windows, refs, idx) -> float:
    with torch.no_grad():
        return sum(_kl(model, windows[i], refs[i]).item() for i in idx) / len(idx)


def _write_scales(out: Path, tuned_by_prefix: dict[str, torch.Tensor]) -> None:
    """Rewrite the shards holding tuned scales (float16, same names); other tensors are copied."""
    wanted = {f"{p}.scales": scales for p, scales in tuned_by_prefix.items()}
    for shard in sorted(out.glob("*.safetensors")):
        entries, meta = read_header(shard)
        if wanted.keys().isdisjoint(entries):
            continue
        mapped = MappedShard(shard, entries)
        try:
            tensors = {k: mapped.tensor(k) for k in sorted(entries, key=lambda k: entries[k].start)}
        finally:
            mapped.close()
        for key in wanted.keys() & tensors.keys():
            tensors[key] = wanted[key].to(tensors[key].dtype).contiguous()
        part = shard.with_name(shard.name + ".part")
        write_safetensors(part, tensors, meta or {"format": "pt"})
        os.replace(part, shard)


def tune_scales(
    src: Path,
    out: Path,
    windows: list[list[int]],
    *,
    epochs: int = DEFAULT_EPOCHS,
    lr: float = DEFAULT_LR,
    seed: int = 0,
    quiet: bool = False,
) -> TuneReport:
    """Fit the scales of the GPTQ checkpoint in ``out`` against SRC on the calibration ``windows``
    (token id lists of equal length) and rewrite them in place; see the module doc."""
    from tqdm import tqdm

    t0 = time.time()
    if epochs < 1:
        raise ConversionError("scale tuning needs at least one epoch")
    if len(windows) < 2:
        raise ConversionError("scale tuning needs at least 2 calibration windows (--samples 2)")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor(windows, dtype=torch.long)
    model, tuned, _, _ = build_student(out)
    n_layers = len(model.get_decoder().layers)
    with tqdm(total=n_layers, desc="reference logits", unit="layer", disable=quiet, file=sys.stderr) as bar:
        refs = source_logprobs(model, src, ids, progress=lambda: bar.update(1))
    # every 8th window (at least one) is held out to choose the epoch
    order = torch.randperm(len(windows), generator=gen).tolist()
    n_held = max(1, len(windows) // 8)
    held, train = order[:n_held], order[n_held:]
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [m.theta for m in tuned]
    opt = torch.optim.Adam(params, lr=lr)
    steps = epochs * len(train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    before = best = _heldout_kl(model, ids, refs, held)
    best_epoch, best_theta = 0, None
    with tqdm(total=steps, desc="tuning scales", unit="window", disable=quiet, file=sys.stderr) as bar:
        for epoch in range(1, epochs + 1):
            for i in torch.randperm(len(train), generator=gen).tolist():
                loss = _kl(model, ids[train[i]], refs[train[i]])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                with torch.no_grad():
                    for p in params:
                        p.clamp_(-MAX_LOG_STEP, MAX_LOG_STEP)
                bar.update(1)
            kl = _heldout_kl(model, ids, refs, held)
            bar.set_postfix_str(f"held-out KL {before:.4f} -> {kl:.4f}", refresh=False)
            if kl < best:
                best, best_epoch = kl, epoch
                best_theta = [p.detach().clone() for p in params]
    if best_theta is not None:
        names = {id(m): n for n, m in model.named_modules()}
        _write_scales(
            out,
            {names[id(m)]: m.s0 * torch.exp(t) for m, t in zip(tuned, best_theta, strict=True)},
        )
    return TuneReport(
        epochs=epochs,
        best_epoch=best_epoch,
        train_windows=len(train),
        heldout_windows=sorted(held),
        heldout_kl_before=round(before, 6),
        heldout_kl_after=round(best, 6),
        seconds=round(time.time() - t0, 1),
        modules=len(tuned),
    )
