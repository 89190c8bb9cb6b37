"""GPTQ quantization (4 or 8 bits) through gptqmodel, written in the GPTQ checkpoint format.

gptqmodel quantizes one decoder layer at a time and offloads finished layers to disk, so peak
memory is about one layer's activations for the calibration batch plus the layer being solved.
The group size is the largest of the kernels' sizes dividing every linear layer's input features,
else per-channel (-1), and a given one is checked against both before any work starts.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from zlocal.errors import ConversionError, DependencyError, InvalidArgumentError

if TYPE_CHECKING:
    from zlocal.conversion.tune_scales import TuneReport

# 32/64/128 run on every kernel that reads GPTQ: PyTorch's CPU int4 kernel (zlocal.kernels.cpu_quant),
# gptqmodel's torch kernel, Marlin and ExLlama on GPUs. Larger groups save little and fail on
# some kernels; per-channel (-1) has no CPU int4 kernel.
KERNEL_GROUP_SIZES = (128, 64, 32)
# The last resort when no size above divides every layer's input features: one group per output
# row (gptqmodel's torch kernel and transformers run it; zlocal's int4 kernel does not).
PER_CHANNEL = -1
DEFAULT_SAMPLES = 16
DEFAULT_SEQ_LEN = 256
# Grid search of each group's clipping range, minimising the |w - q(w)|^2.4 error (the GPTQ paper's
# --mse option). On SmolLM2-135M gptq4 g64 it took perplexity from +26% (symmetric, no search) to
# +12.7% together with asymmetric groups (Intel VM; +15.7% on an AMD VM).
MSE_NORM = 2.4
# GPTAQ (asymmetric calibration): each layer is solved against the inputs the full-precision model
# gives it, not only those of the already-quantized layers below. Same checkpoint format. On
# SmolLM2-135M gptq4 g64 (AMD VM) +15.7% -> +10.1% perplexity; FOEM on top gave +12.3%.
GPTAQ_ALPHA = 0.25
# Scale tuning (zlocal.conversion.tune_scales) runs on the CPU at about 26 s per epoch for SmolLM2's 106M
# linear weights on 2 cores and grows with the weights: a 7B would take hours, so it is opt-in above this.
TUNE_EPOCHS = 8
TUNE_DEFAULT_MAX_PARAMS = 2_000_000_000
# The tuner holds the source's float16 log-probabilities for every calibration token.
TUNE_MAX_REFERENCE_BYTES = 2 << 30


@dataclass
class GptqPlan:
    """Validated GPTQ settings, decided before any work starts."""

    bits: int
    group_size: int
    samples: int
    seq_len: int
    calibration: str | None  # file path, or None for the built-in text
    # Asymmetric groups (a zero point per group) halve the error on small models; symmetric ones are
    # what GPU Marlin kernels require (ExLlama and the CPU kernels read both).
    sym: bool = False
    # epochs of end-to-end scale tuning after GPTQ (zlocal.conversion.tune_scales); 0 keeps GPTQ's scales
    tune_epochs: int = 0
    tune_note: str | None = None  # why the default left tuning off
    group_note: str = ""  # which group size and why (printed, and kept in zlocal.json)

    def to_dict(self) -> dict:
        return asdict(self)


def linear_in_features(config: dict) -> dict[str, int]:
    """Input features of each kind of linear layer in a Llama/Mistral/Qwen2 decoder block."""
    c = config.get("text_config", config)
    h, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
    hd = int(c.get("head_dim") or h // heads)
    return {
        "q_proj/k_proj/v_proj": h,
        "o_proj": heads * hd,
        "gate_proj/up_proj": h,
        "down_proj": int(c["intermediate_size"]),
    }


def linear_params(config: dict) -> int:
    """Weights in the decoder layers' linear projections (what GPTQ quantizes)."""
    c = config.get("text_config", config)
    h, inter, layers = int(c["hidden_size"]), int(c["intermediate_size"]), int(c["num_hidden_layers"])
    heads = int(c["num_attention_heads"])
    kv = int(c.get("num_key_value_heads") or heads)
    hd = int(c.get("head_dim") or h // heads)
    return layers * (2 * h * heads * hd + 2 * h * kv * hd + 3 * h * inter)


def default_group_size(config: dict) -> int:
    """Largest kernel-supported group size dividing every layer's input features, else per-channel
    (``PER_CHANNEL``, one group spanning each layer's whole input)."""
    feats = linear_in_features(config).values()
    return next((g for g in KERNEL_GROUP_SIZES if all(f % g == 0 for f in feats)), PER_CHANNEL)


def group_size_note(config: dict, group_size: int, given: bool) -> str:
    """The one line that says which group size GPTQ uses and why (printed and kept in zlocal.json)."""
    feats = ", ".join(f"{k}={v}" for k, v in linear_in_features(config).items())
    sizes = ", ".join(map(str, KERNEL_GROUP_SIZES))
    if given:
        what = " (per channel)" if group_size == PER_CHANNEL else ""
        return f"GPTQ group size {group_size}{what}: given with --group-size"
    if group_size == PER_CHANNEL:
        return (
            f"GPTQ group size -1 (per channel): none of {sizes} divides every layer's input features "
            f"({feats}); per-channel scales lose more quality than groups and run on gptqmodel's kernel"
        )
    return (
        f"GPTQ group size {group_size}: the largest of {sizes} "
        f"dividing every layer's input features ({feats})"
    )


def check_group_size(config: dict, group_size: int) -> None:
    """Refuse a group size the kernels cannot run or that does not divide some layer's inputs."""
    if group_size != PER_CHANNEL and group_size not in KERNEL_GROUP_SIZES:
        raise InvalidArgumentError(
            f"--group-size {group_size} is not supported; use one of "
            f"{', '.join(map(str, KERNEL_GROUP_SIZES))} "
            "(the sizes the CPU int4, Marlin and ExLlama kernels all run), or -1 for per-channel"
        )
    if group_size == PER_CHANNEL:
        return  # one group per row divides any input width
    for name, f in linear_in_features(config).items():
        if f % group_size:
            raise InvalidArgumentError(
                f"--group-size {group_size} does not divide {name} input features {f}; "
                f"try --group-size {default_group_size(config)}"
            )


def plan_gptq(
    config: dict,
    *,
    bits: int,
    group_size: int | None,
    samples: int | None,
    seq_len: int | None,
    calibration,
    sym: bool = False,
    tune_epochs: int | None = None,
) -> GptqPlan:
    """Validate GPTQ options against the model; raise before any expensive step."""
    if bits not in (4, 8):
        raise InvalidArgumentError(f"GPTQ bits must be 4 or 8, got {bits}")
    gs = default_group_size(config) if group_size is None else int(group_size)
    check_group_size(config, gs)
    group_note = group_size_note(config, gs, given=group_size is not None)
    max_pos = int(config.get("text_config", config).get("max_position_embeddings") or 4096)
    seq = seq_len or DEFAULT_SEQ_LEN
    if seq > max_pos:
        raise InvalidArgumentError(f"--seq-len {seq} exceeds the model's context of {max_pos} tokens")
    n_samples = samples or DEFAULT_SAMPLES
    epochs, note = _tune_epochs(config, bits, gs, tune_epochs, n_samples, seq)
    require_gptqmodel()
    return GptqPlan(
        bits=bits,
        group_size=gs,
        samples=n_samples,
        seq_len=seq,
        calibration=str(calibration) if calibration else None,
        sym=bool(sym),
        tune_epochs=epochs,
        tune_note=note,
        group_note=group_note,
    )


def _tune_epochs(
    config: dict, bits: int, group_size: int, tune_epochs: int | None, n_samples: int, seq: int
) -> tuple[int, str | None]:
    """Epochs of scale tuning and, when the default leaves it off, why; raise for a request the
    tuner cannot honour."""
    note = None
    if tune_epochs is not None:
        epochs = int(tune_epochs)
    elif bits == 4 and group_size == PER_CHANNEL:
        # the tuner fits one scale per group of rows and reads only grouped layouts
        epochs, note = 0, "scale tuning is off: it needs groups, and this model is quantized per channel"
    elif bits == 4 and linear_params(config) > TUNE_DEFAULT_MAX_PARAMS:
        epochs = 0
        note = (
            f"scale tuning is off by default above {TUNE_DEFAULT_MAX_PARAMS / 1e9:.0f}B weights "
            f"(it runs on the CPU, hours for this model); --tune-epochs {TUNE_EPOCHS} runs it"
        )
    else:  # 4 bits lose enough to be worth the tuning time; 8 bits are within a fraction of a percent
        epochs = TUNE_EPOCHS if bits == 4 else 0
    if epochs < 0:
        raise InvalidArgumentError(f"--tune-epochs must be >= 0, got {epochs}")
    if epochs and group_size == PER_CHANNEL:
        raise InvalidArgumentError(
            "scale tuning needs GPTQ groups and this model is quantized per channel (--group-size -1); "
            "use --tune-epochs 0"
        )
    vocab = int(config.get("text_config", config).get("vocab_size") or 0)
    ref_bytes = n_samples * seq * vocab * 2
    if epochs and ref_bytes > TUNE_MAX_REFERENCE_BYTES:
        raise InvalidArgumentError(
            f"scale tuning keeps the source's log-probabilities in memory: {ref_bytes / 2**30:.1f} GiB for "
            f"{n_samples} x {seq} tokens (limit {TUNE_MAX_REFERENCE_BYTES / 2**30:.0f} GiB); "
            "use fewer --samples or a shorter --seq-len, or --tune-epochs 0"
        )
    if epochs and n_samples < 2:
        raise InvalidArgumentError(
            "scale tuning holds out part of the calibration windows: use --samples 2 or more, "
            "or --tune-epochs 0"
        )
    return epochs, note


def require_gptqmodel() -> None:
    """Raise DependencyError when gptqmodel (and optimum) are missing."""
    import importlib.util

    missing = [m for m in ("gptqmodel", "optimum") if importlib.util.find_spec(m) is None]
    if missing:
        raise DependencyError(
            f"GPTQ needs {' and '.join(missing)}; install with `pip install 'zlocal[gptq]'` "
            "(or `pip install gptqmodel optimum`)"
        )


def calibration_samples(tokenizer, text: str, samples: int, seq_len: int) -> list[dict]:
    """Cut ``samples`` windows of ``seq_len`` tokens from the text.

    When the text is shorter than samples * seq_len, windows overlap with an even stride rather
    than repeating the same tokens, so every sample still differs.
    """
    ids = tokenizer(text)["input_ids"]
    if len(ids) < 16:
        raise InvalidArgumentError("calibration text is too short (needs at least 16 tokens)")
    seq = min(seq_len, len(ids))
    stride = 0 if samples == 1 else max(1, (len(ids) - seq) // (samples - 1))
    out = []
    for i in range(samples):
        start = min(i * stride, len(ids) - seq)
        chunk = ids[start : start + seq]
        out.append({"input_ids": chunk, "attention_mask": [1] * len(chunk)})
    return out


def _import_gptqmodel():
    # gptqmodel's CPU loader pool wants 2 workers but defaults to cores/2: on a 2-core machine
    # that is 1 and it refuses to start. A larger explicit value is harmless elsewhere.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, (os.cpu_count() or 2) // 2)))
    try:
        from gptqmodel import GPTQModel, QuantizeConfig
    except ImportError as exc:
        raise DependencyError(f"cannot import gptqmodel ({exc}); `pip install 'zlocal[gptq]'`") from exc
    return GPTQModel, QuantizeConfig


def quantize_gptq(
    src: Path,
    out: Path,
    plan: GptqPlan,
    *,
    compute_dtype: torch.dtype = torch.bfloat16,
    quiet: bool = False,
    allow_pickle: bool = False,
) -> TuneReport | None:
    """Run GPTQ on SRC with ``plan`` and save the quantized checkpoint into ``out``, then tune its
    scales when ``plan.tune_epochs`` (returns the tuning report, or None)."""
    from transformers import AutoTokenizer

    from zlocal.conversion.quality import builtin_text

    GPTQModel, QuantizeConfig = _import_gptqmodel()
    text = (
        Path(plan.calibration).read_text(encoding="utf-8")
        if plan.calibration
        else builtin_text("calibration.txt")
    )
    tok = AutoTokenizer.from_pretrained(src)
    data = calibration_samples(tok, text, plan.samples, plan.seq_len)
    offload = out / ".gptq-offload"
    qc = QuantizeConfig(
        bits=plan.bits,
        group_size=plan.group_size,
        desc_act=False,
        sym=plan.sym,
        mse=MSE_NORM,
        gptaq={"alpha": GPTAQ_ALPHA},
        offload_to_disk=True,
        offload_to_disk_path=str(offload),
        # group-aware reordering (gptqmodel's default) reorders rows inside groups and refuses
        # per-channel, which has one group per row; None keeps the default for real groups
        act_group_aware=False if plan.group_size == PER_CHANNEL else None,
    )
    dtype = torch.bfloat16 if compute_dtype == torch.float16 else compute_dtype
    # gptqmodel prints a banner and a per-layer bar on stdout; keep stdout clean for --json.
    sink = io.StringIO() if quiet else sys.stderr
    with contextlib.redirect_stdout(sink):
        model = GPTQModel.load(str(src), qc, dtype=dtype)
        model.quantize(data, batch_size=1)
        model.save(str(out))
    del model
    import shutil

    shutil.rmtree(offload, ignore_errors=True)
    if not any(out.glob("*.safetensors")):
        raise ConversionError("gptqmodel finished but wrote no safetensors weights")
    _drop_offload_path(out)
    if plan.group_size == PER_CHANNEL and plan.bits == 4:
        _pin_torch_backend(out)
    if not plan.tune_epochs:
        return None
    if allow_pickle:
        # the tuner streams source layers from safetensors; pickle sources keep GPTQ's scales
        print("scale tuning skipped: the source weights are pickle, not safetensors", file=sys.stderr)
        return None
    from zlocal.conversion.tune_scales import tune_scales

    return tune_scales(src, out, [d["input_ids"] for d in data], epochs=plan.tune_epochs, quiet=quiet)


def _drop_offload_path(out: Path) -> None:
    """Remove the temporary offload directory gptqmodel records in the saved configs.

    It names the temp dir beside OUT, which is gone after the rename and says nothing about the
    weights.
    """
    for name, nested in (("quantize_config.json", False), ("config.json", True)):
        path = out / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        qc = data.get("quantization_config", {}) if nested else data
        meta = qc.get("meta") if isinstance(qc, dict) else None
        if isinstance(meta, dict) and meta.pop("offload_to_disk_path", None) is not None:
            path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _pin_torch_backend(out: Path) -> None:
    """Make transformers load a per-channel 4-bit checkpoint with gptqmodel's plain torch kernel.

    On the CPU gptqmodel picks its fused kernel, which accepts per-channel layers but then runs
    aten's int4 matmul with the layer's whole input as one group, and that op takes groups of 32,
    64, 128 or 256 only (a 200-feature layer fails at the first forward). The torch kernel runs any
    shape on any device; ``backend`` in ``quantization_config`` is read by ``from_pretrained``.
    """
    path = out / "config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["quantization_config"]["backend"] = "torch"
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
