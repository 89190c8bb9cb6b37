"""Load a resolved checkpoint into a transformers model, following a LoadPlan.

The planner (zlocal.planning.plan) decides formats and where layers go; this module carries it out:
a dense single-device plan goes through ``from_pretrained``; a quantized or split plan is
streamed tensor by tensor from the safetensors files into an empty (meta) model, quantizing each
Linear as it arrives, so peak memory is the final model plus one tensor. CPU layers use zlocal's
fused int8/int4 kernels (zlocal.kernels.cpu_quant), never bitsandbytes' slow CPU path; GPU layers use
bitsandbytes CUDA modules; accelerate's hooks move activations between devices. An
out-of-memory error while loading or on the warm-up forward steps the plan down and retries.
"""

from __future__ import annotations

import gc
import os
import pickle
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

# transformers' model base (and the integrations it pulls in: 1-3 s) is imported with the loader, when
# an app first touches ``zlocal.load``, not inside each load call, which then only builds the model.
import transformers.generation.utils
import transformers.masking_utils
import transformers.modeling_layers
import transformers.modeling_utils
import transformers.tokenization_utils_tokenizers  # noqa: F401

from zlocal.checkpoint.resolve import ResolvedModel
from zlocal.errors import CheckpointError, InvalidArgumentError, PlanError
from zlocal.formats import checkpoint_format, get_format
from zlocal.inference.fastpath import unsupported_reason
from zlocal.inference.loader_prepared import cache_enabled, load_cached, prepared_key, save_cached
from zlocal.inference.loader_stream import first_line, is_oom, stream_load
from zlocal.inference.prepare import prepare_decoder
from zlocal.kernels.heap import release_freed_memory
from zlocal.progress import report

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
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{resolved.name}: cannot read config.json: {first}") from exc
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
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"{resolved.name}: cannot load weights: {first_line(exc)}") from exc
    model.eval()
    return LoadedModel(model=model, device=device, dtype=torch_dtype, device_map=kwargs["device_map"])


_PLAN_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_MAX_OOM_RETRIES = 8


@lru_cache(maxsize=1)
def _this_machine_static():
    # Bandwidth and kernels do not change while the process runs; free memory does.
    from zlocal.planning.hardware import profile_machine

    return profile_machine(measure_bandwidth=True)


def current_hardware(device: str | None = None):
    """This machine's HardwareReport with fresh free-memory numbers; ``device='cpu'`` hides GPUs."""
    import dataclasses

    import psutil

    hw = dataclasses.replace(_this_machine_static())
    hw.ram_available_bytes = int(psutil.virtual_memory().available)
    if device is not None and device.startswith("cpu"):
        hw.gpus = []
    elif hw.gpus and torch.cuda.is_available():
        hw.gpus = [
            dataclasses.replace(g, free_bytes=int(torch.cuda.mem_get_info(g.index)[0])) for g in hw.gpus
        ]
    return hw


def source_quantization(config) -> dict | None:
    """The quantization_config of an already-quantized checkpoint (GPTQ ...), as a dict."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    return dict(qc) if isinstance(qc, dict) else qc.to_dict()


def plan_for(
    resolved: ResolvedModel,
    config,
    *,
    plan="auto",
    dtype=None,
    device=None,
    max_context=None,
    hardware=None,
    prefer: str = "quality",
):
    """Turn the ``plan`` argument ("auto", a LoadPlan, or a plan JSON path) into a checked LoadPlan."""
    from zlocal.planning.loadplan import LoadPlan, load_plan
    from zlocal.planning.memory import ModelShape
    from zlocal.planning.plan import make_plan

    shape = ModelShape.from_config(config)
    if isinstance(plan, LoadPlan):
        lp = plan
    elif isinstance(plan, (str, os.PathLike)) and str(plan) != "auto":
        if not Path(plan).is_file():
            raise InvalidArgumentError(
                f"plan must be 'auto', a LoadPlan or a plan JSON file; {plan} is not a file"
            )
        lp = load_plan(plan)
    elif plan == "auto":
        if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
            raise InvalidArgumentError(
                "device 'cuda' was asked for but torch sees no CUDA GPU; use device='cpu'"
            )
        hw = hardware or current_hardware(device)
        torch_dtype = parse_dtype(dtype)
        lp = make_plan(
            hw,
            shape,
            model=resolved.name,
            ctx=max_context,
            prefer=prefer,
            dtype=_DTYPE_NAMES.get(torch_dtype) if torch_dtype is not None else None,
            source_quant=source_quantization(config),
        )
    else:
        raise InvalidArgumentError(
            f"plan must be 'auto', a LoadPlan or a plan JSON path, got {type(plan).__name__}"
        )
    if lp.gpu_layers + lp.cpu_layers != shape.num_layers:
        raise PlanError(
            f"the plan places {lp.gpu_layers}+{lp.cpu_layers} layers but {resolved.name} has "
            f"{shape.num_layers}; make a new plan with `zlocal plan`"
        )
    if lp.gpu_layers and not torch.cuda.is_available():
        raise PlanError("the plan puts layers on a GPU but torch sees none; plan again on this machine")
    if lp.compute_dtype not in _PLAN_DTYPES:
        raise PlanError(
            f"plan compute_dtype must be one of {', '.join(_PLAN_DTYPES)}, got {lp.compute_dtype!r}"
        )
    if not lp.fits:
        raise PlanError(f"{resolved.name} cannot load with this plan: {lp.reasons[0] if lp.reasons else ''}")
    if max_context is not None and plan != "auto":
        lp.max_context = int(max_context)
    return lp


def load_for_runtime(
    resolved: ResolvedModel,
    config,
    *,
    plan=None,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    max_context: int | None = None,
    hardware=None,
    prepare: bool = True,
    progress=None,
    cache: bool | None = None,
) -> LoadedModel:
    """Load the model the way the runtime will use it; returns the model and the context to allocate.

    ``progress``: a callback receiving ``zlocal.progress.Progress`` events. ``cache``: read and write
    the prepared (ready-to-map) form of a CPU plan in zlocal's cache (None: on unless
    ``ZLOCAL_PREPARED_CACHE=0``).

    ``prepare=False`` leaves the HF modules as loaded, without the lean forward's fusion (reference
    models in tests and checks).

    ``plan`` ("auto", a LoadPlan, or a path to a plan JSON) decides devices and formats; ``None``
    puts everything on ``device`` (default: CUDA if present, else CPU) in ``dtype``, unquantized.
    On out-of-memory the plan steps down (fewer GPU layers, smaller context, fewer bits), with a
    warning and a line in ``plan.reasons`` saying what changed.
    """
    model_ctx = int(getattr(config, "max_position_embeddings", 4096) or 4096)
    if max_context is not None and (int(max_context) <= 0 or int(max_context) > model_ctx):
        raise InvalidArgumentError(f"max_context must be in 1..{model_ctx} for this model, got {max_context}")
    if plan is None:
        loaded = load_model(resolved, dtype=dtype, device=device)
        loaded.max_context = min(model_ctx, 4096) if max_context is None else int(max_context)
        return _prepare(loaded) if prepare else loaded
    from zlocal.planning.memory import ModelShape
    from zlocal.planning.plan_stepdown import step_down

    lp = plan_for(
        resolved, config, plan=plan, dtype=dtype, device=device, max_context=max_context, hardware=hardware
    )
    use_cache = prepare and cache_enabled(cache)
    if use_cache and (cached := _from_cache(resolved, config, lp, progress)) is not None:
        return cached
    shape = ModelShape.from_config(config)
    for _ in range(_MAX_OOM_RETRIES):
        loaded = None
        try:
            loaded = load_with_plan(resolved, config, lp, progress)
            if prepare:
                report(progress, "prepare", 0, 1, "steps")
                _prepare(loaded)  # before the warm-up: packing allocates too
            release_freed_memory()  # what loading freed: source copies, quantization temporaries
            report(progress, "warm-up", 0, 1, "steps")
            _warm_up(loaded.model)
            preparable = prepare and unsupported_reason(loaded.model) is None  # Llama/Mistral decoders
            if use_cache and preparable and (key := prepared_key(resolved, lp)) is not None:
                note = save_cached(loaded.model, resolved, lp, key, progress)
                lp.reasons += [note] if note else []
            report(progress, "ready", 1, 1, "steps")
            return loaded
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not is_oom(exc):
                raise CheckpointError(f"{resolved.name}: cannot load weights: {first_line(exc)}") from exc
            del loaded
            _free_memory()
            # the machine's kernels and bandwidths decide what the smaller plan may use
            smaller = step_down(lp, shape, hardware or current_hardware("cpu" if not lp.gpu_layers else None))
            if smaller is None:
                raise PlanError(
                    f"{resolved.name}: out of memory even with the smallest plan "
                    f"({lp.cpu_format or lp.gpu_format}, {lp.max_context} tokens); free memory "
                    "or pick a smaller model"
                ) from exc
            warnings.warn(
                f"zlocal: out of memory loading {resolved.name}; {smaller.reasons[-1]}", stacklevel=2
            )
            lp = smaller
    raise PlanError(f"{resolved.name}: still out of memory after {_MAX_OOM_RETRIES} smaller plans")


def _from_cache(resolved, config, lp, progress) -> LoadedModel | None:
    """The model mapped from its prepared form in the cache; None on a miss.

    No warm-up forward: mapped weights allocate nothing that could run out of memory, and their
    pages are brought in by a background thread while the caller goes on (as llama.cpp's mmap load
    returns before the weights are read)."""
    key = prepared_key(resolved, lp)
    hit = load_cached(resolved, config, lp, key, progress) if key is not None else None
    if hit is None:
        return None
    model, note = hit
    # mapped weights come packed: none of quantizing on load's transient memory
    from zlocal.planning.memory import ModelShape, load_transient_bytes

    lp.estimated_ram_bytes -= load_transient_bytes(ModelShape.from_config(config), lp.head_format)
    lp.reasons += [note]
    loaded = LoadedModel(
        model=model,
        device="cpu",
        dtype=_PLAN_DTYPES[lp.compute_dtype],
        device_map={"": "cpu"},
        max_context=lp.max_context,
        plan=lp,
    )
    report(progress, "ready", 1, 1, "steps")
    return loaded


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.inference_mode()
def _warm_up(model) -> None:
    # One token through every layer allocates the activation workspace now, so an OOM shows up
    # here (and steps the plan down) instead of in the user's first request.
    device = model.get_input_embeddings().weight.device
    model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=False, logits_to_keep=1)


def load_with_plan(resolved: ResolvedModel, config, lp, progress=None) -> LoadedModel:
    """Carry out one LoadPlan (no retries)."""
    dtype = _PLAN_DTYPES[lp.compute_dtype]
    n = lp.gpu_layers + lp.cpu_layers
    if lp.source_quantized:
        device = lp.gpu_device or "cpu"
        loaded = load_model(resolved, dtype=dtype, device=device, device_map={"": device})
        fmt = checkpoint_format(source_quantization(config))
        if device == "cpu" and fmt:
            _cast_float_parameters(loaded.model, dtype)
            note = fmt.use_cpu_kernels(loaded.model, resolved.path, dtype)
            lp.reasons += [note] if note else []
    elif _dense(lp.gpu_format) and _dense(lp.cpu_format) and (lp.gpu_layers in (0, n)):
        loaded = load_model(resolved, dtype=dtype, device=lp.gpu_device or "cpu")
    elif resolved.weights_format != "safetensors":
        if lp.gpu_layers:
            raise PlanError(
                f"{resolved.name}: splitting pickle weights across devices is not supported; "
                "convert the checkpoint to safetensors"
            )
        from zlocal.kernels.cpu_quant_handler import WeightOnlyQuantHandler

        loaded = load_model(resolved, dtype=dtype, device="cpu")
        bits = get_format(lp.cpu_format).bits
        WeightOnlyQuantHandler(loaded.model, bits, dtype, lp.group_size).apply()
    else:
        model, device_map = stream_load(resolved, config, lp, dtype, progress)
        device = (
            "cpu" if not lp.gpu_layers else (lp.gpu_device if not lp.cpu_layers else f"{lp.gpu_device}+cpu")
        )
        loaded = LoadedModel(model=model, device=device, dtype=dtype, device_map=device_map)
    if lp.head_format:  # the one head format, zlocal's per-channel int8
        quantize_head_int8(loaded.model, dtype)
    loaded.plan = lp
    loaded.max_context = lp.max_context
    return loaded


def _cast_float_parameters(model, dtype: torch.dtype) -> None:
    # Quantized loads keep the unquantized weights (embeddings, norms, head) in the checkpoint's
    # dtype; the plan's compute dtype is what the kernels and the one-call decode step read.
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def _prepare(loaded: LoadedModel) -> LoadedModel:
    # The one place the decoder is fused into what the lean forward and the decode kernel read;
    # nothing changes the HF modules after load.
    if unsupported_reason(loaded.model) is None:
        prepare_decoder(loaded.model)
    return loaded


def _dense(fmt: str | None) -> bool:
    return fmt is None or get_format(fmt).dense


def quantize_head_int8(model, dtype: torch.dtype) -> bool:
    """Swap a dense CPU ``lm_head`` for zlocal's per-channel int8 module; True when swapped.

    A head tied to the embeddings gets its own int8 copy: the embedding lookup keeps reading the
    dense table, which costs one row per token.
    """
    from zlocal.kernels.cpu_quant import quantize_linear

    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.weight.device.type != "cpu":
        return False
    model.set_output_embeddings(quantize_linear(head.weight, head.bias, 8, dtype))
    return True
