"""Load a resolved checkpoint into a transformers model: config checks, dtype/device choice.

The planner decides where layers go; this module turns that decision into ``from_pretrained``
arguments and converts loading failures into CheckpointError messages that name the file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import CheckpointError, InvalidArgumentError
from .resolve import ResolvedModel

SUPPORTED_MODEL_TYPES = {"mistral", "llama", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "granite", "olmo2"}

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """Map 'bf16', 'float16', ... (or a torch.dtype) to a torch.dtype; None means 'auto'."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return None
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise InvalidArgumentError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {name!r}") from None


def default_device() -> str:
    """'cuda' when a CUDA device is usable, else 'cpu'."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    """bf16 where the hardware computes it natively (Ampere+ GPUs), fp16 on older GPUs, bf16 on CPU."""
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


def load_config(resolved: ResolvedModel):
    """Read and check the model config; raise CheckpointError for unsupported architectures."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolved.path, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{resolved.name}: cannot read config.json: {exc}") from exc
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{resolved.name}: architecture '{model_type}' is not supported "
            f"(supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))})"
        )
    return config


@dataclass
class LoadedModel:
    """The model plus the concrete choices made while loading it."""

    model: object
    device: str
    dtype: torch.dtype
    device_map: dict | str | None = None
    max_context: int | None = None
    plan: object = None


def load_model(
    resolved: ResolvedModel,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    device_map: dict | str | None = None,
    quantization_config=None,
) -> LoadedModel:
    """Load weights with ``from_pretrained`` (safetensors unless the user opted into pickle)."""
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    torch_dtype = parse_dtype(dtype) or default_dtype(device)
    kwargs = {
        "dtype": torch_dtype,
        "trust_remote_code": False,
        "use_safetensors": resolved.weights_format == "safetensors",
        "device_map": device_map or device,
    }
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(resolved.path, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        raise CheckpointError(f"{resolved.name}: cannot load weights: {_first_line(exc)}") from exc
    model.eval()
    return LoadedModel(model=model, device=device, dtype=torch_dtype, device_map=kwargs["device_map"])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0] if text else ''}"


def load_for_runtime(
    resolved: ResolvedModel,
    config,
    *,
    plan=None,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    max_context: int | None = None,
) -> LoadedModel:
    """Load the model the way the runtime will use it; returns the model and the context to allocate.

    ``plan`` ("auto", a LoadPlan, or a path to a plan JSON) decides devices and formats; with no
    planner decision, everything goes on ``device`` (default: CUDA if present, else CPU).
    """
    model_ctx = int(getattr(config, "max_position_embeddings", 4096) or 4096)
    ctx = min(model_ctx, 4096) if max_context is None else int(max_context)
    if ctx <= 0 or ctx > model_ctx:
        raise InvalidArgumentError(f"max_context must be in 1..{model_ctx} for this model, got {max_context}")
    loaded = load_model(resolved, dtype=dtype, device=device)
    loaded.max_context = ctx
    return loaded
