"""Every weight format zlocal knows, by name."""

from __future__ import annotations

from zlocal.errors import InvalidArgumentError, PlanError
from zlocal.formats.base import WeightFormat
from zlocal.formats.bnb import BNB_INT8, FP4, NF4
from zlocal.formats.cpu_int import INT4, INT8
from zlocal.formats.dense import BF16, FP16, FP32
from zlocal.formats.gptq import GPTQ

# Order matters: the planner tries formats in this order (full precision first).
FORMATS: dict[str, WeightFormat] = {
    f.name: f for f in (FP32, BF16, FP16, INT8, INT4, BNB_INT8, NF4, FP4, GPTQ)
}

# An output layer quantized apart from the decoder layers runs on zlocal's per-channel int8 kernel.
HEAD_FORMAT = INT8.name

_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}

# `zlocal convert --method` name -> (the format it writes, bits), in the order the CLI lists them.
CONVERT_METHODS: dict[str, tuple[WeightFormat, int]] = {
    method: (f, bits) for f in (NF4, FP4, BNB_INT8, GPTQ) for method, bits in f.convert_methods
}


def convert_format(method: str) -> WeightFormat:
    """The format ``zlocal convert --method METHOD`` writes."""
    if method not in CONVERT_METHODS:
        raise InvalidArgumentError(f"--method must be one of {', '.join(CONVERT_METHODS)}; got {method!r}")
    return CONVERT_METHODS[method][0]


def convert_methods(quant_method: str | None = None) -> dict[str, int]:
    """``zlocal convert`` methods and their bits; only those writing ``quant_method`` checkpoints
    (e.g. "bitsandbytes", "gptq") when given."""
    return {m: bits for m, (f, bits) in CONVERT_METHODS.items() if quant_method in (None, f.quant_method)}


def get_format(name: str) -> WeightFormat:
    """The format called ``name`` (a plan's or CLI's format string, or a dtype name)."""
    fmt = FORMATS.get(_DTYPE_NAMES.get(name, name))
    if fmt is None:
        raise PlanError(f"unknown weights format {name!r}; known: {', '.join(FORMATS)}")
    return fmt


def dense_format(dtype: str) -> WeightFormat:
    """The full-precision format of a compute dtype ("bf16" or "bfloat16", ...)."""
    fmt = get_format(dtype)
    if not fmt.dense:
        raise PlanError(f"{dtype!r} is not a floating-point dtype")
    return fmt


def _quant_method(quantization_config: dict) -> str:
    # transformers' config objects hold a str enum (QuantizationMethod.GPTQ), whose str() is its name
    method = quantization_config.get("quant_method", "")
    return str(getattr(method, "value", method)).lower()


def source_format(quantization_config: dict) -> tuple[str, int]:
    """(format name, bits) of an already-quantized checkpoint's ``quantization_config``."""
    method = _quant_method(quantization_config)
    if method == "bitsandbytes":
        if quantization_config.get("load_in_4bit"):
            return str(quantization_config.get("bnb_4bit_quant_type") or NF4.name), 4
        return BNB_INT8.name, 8
    return GPTQ.name, int(quantization_config.get("bits") or GPTQ.bits)


def checkpoint_format(quantization_config: dict | None) -> WeightFormat | None:
    """The format of a checkpoint with this ``quantization_config`` (None: full precision, or a
    quantization method zlocal does not know)."""
    if not quantization_config:
        return None
    known = {f.quant_method for f in FORMATS.values() if f.quant_method}
    if _quant_method(quantization_config) not in known:
        return None
    return FORMATS.get(source_format(quantization_config)[0])  # None: a 4-bit type zlocal lacks


def quantization_config_for(name: str, bits: int) -> dict:
    """The part of a ``quantization_config`` that ``source_format`` reads, for a format and width:
    what a plan made for a quantized checkpoint needs to be planned again (full-precision formats
    give a config marking the source as quantized and dequantized on load)."""
    fmt = get_format(name)
    if fmt is GPTQ:
        return {"quant_method": "gptq", "bits": bits}
    if fmt in (NF4, FP4):
        return {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": fmt.name}
    if fmt is BNB_INT8:
        return {"quant_method": "bitsandbytes", "load_in_8bit": True}
    return {"quant_method": "dequantized"}


def cpu_format_beside(gpu_format: str) -> str:
    """The CPU format for layers moved off the GPU: the widest CPU on-load format no wider than
    the GPU's (int4 beside 4-bit GPU layers, int8 beside 8 and 16 bits)."""
    width = get_format(gpu_format).bits
    fits = [f for f in FORMATS.values() if f.quantized_on_load({}, "cpu") and f.bits <= width]
    return max(fits, key=lambda f: f.bits).name


def quantized_on_load(kernels: dict, device: str) -> list[str]:
    """Formats this machine can quantize a full-precision checkpoint into at load on ``device``,
    in ``FORMATS`` order (``kernels``: HardwareReport.kernels; {} assumes PyTorch's defaults)."""
    return [n for n, f in FORMATS.items() if f.quantized_on_load(kernels, device)]


def formats_on_load(kernels: dict, dense: str, device: str) -> list[str]:
    """Formats a full-precision checkpoint can run in on ``device``: its own dtype, then
    ``quantized_on_load``."""
    return [dense, *quantized_on_load(kernels, device)]


def why_checkpoint_cannot_run(kernels: dict, quantization_config: dict, devices: list[str]) -> str | None:
    """Why no device of ``devices`` runs an already-quantized checkpoint (None: one does)."""
    fmt = get_format(source_format(quantization_config)[0])
    reasons = [fmt.why_not_on(kernels, d) for d in devices]
    return None if any(r is None for r in reasons) else "; ".join(dict.fromkeys(reasons))


def formats_for_checkpoint(kernels: dict, quantization_config: dict, device: str) -> list[str]:
    """An already-quantized checkpoint runs in its own format, where the machine has its kernels."""
    name, _ = source_format(quantization_config)
    return [name] if get_format(name).runs_on(kernels, device) else []
