"""Streaming load for quantized and split plans: tensors read one at a time from the checkpoint,
each placed on its device and, where the plan says so, quantized into its format's module as it
arrives (the full-precision model is never held whole)."""

from __future__ import annotations

from pathlib import Path

import torch

from zlocal.checkpoint.checkpoint_io import TensorStore
from zlocal.checkpoint.resolve import ResolvedModel
from zlocal.errors import CheckpointError
from zlocal.formats import get_format
from zlocal.kernels.heap import release_freed_memory
from zlocal.progress import report


def first_line(exc: BaseException) -> str:
    """The exception's class and the first line of its message (one-line errors)."""
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0] if text else ''}"


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error (CUDA's, or the CPU allocator's RuntimeError)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def layer_device_map(lp, config) -> dict[str, str]:
    """Module -> device. With a split the embedding lookup stays on the CPU (a cheap gather) and the
    final norm + lm_head run on the GPU (a large matmul every token)."""
    n = lp.gpu_layers + lp.cpu_layers
    gpu = lp.gpu_device or "cuda:0"
    if lp.gpu_layers == 0 or lp.cpu_layers == 0:
        dev = gpu if lp.gpu_layers else "cpu"
        return {"": dev}
    dm = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": gpu, "lm_head": gpu}
    for i in range(n):
        dm[f"model.layers.{i}"] = gpu if i < lp.gpu_layers else "cpu"
    return dm


def _device_of(name: str, device_map: dict[str, str]) -> str:
    best, best_len = device_map.get("", "cpu"), -1
    for prefix, dev in device_map.items():
        if prefix and (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
            best, best_len = dev, len(prefix)
    return best


def stream_load(resolved: ResolvedModel, config, lp, dtype: torch.dtype, progress=None):
    """Build the model on the meta device and fill it from the safetensors files one tensor at a
    time, quantizing decoder Linears as the plan says. Returns (model, device_map)."""
    from accelerate import dispatch_model, init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    device_map = layer_device_map(lp, config)
    expected = dict(model.state_dict())
    seen: set[str] = set()
    # Each tensor is copied out of the shard's map and its pages dropped (checkpoint_io.TensorStore),
    # so the mapped source does not stay resident while the model fills.
    try:
        store = TensorStore(Path(resolved.path))
    except CheckpointError as exc:
        raise CheckpointError(f"{resolved.name}: cannot load weights: {exc}") from exc
    key = None
    total, done = store.nbytes(), 0
    try:
        for key in store:
            if key not in expected:
                raise CheckpointError(
                    f"{resolved.name}: {store.shard_name(key)} holds {key}, which the config does "
                    "not define; the checkpoint and config.json disagree"
                )
            # a weight about to be quantized is read straight from the map (its pages dropped after),
            # so no full-precision copy of it is held in anonymous memory
            quantized = _quantized_here(model, key, lp, device_map)
            tensor = store.view(key) if quantized else store[key]
            _place(
                model,
                key,
                tensor,
                expected[key],
                lp=lp,
                device_map=device_map,
                dtype=dtype,
                set_tensor=set_module_tensor_to_device,
                owned=not quantized,
            )
            del tensor
            if quantized:  # its source pages, and the heap its temporaries used, go back now
                store.release(key)
                release_freed_memory()
            seen.add(key)
            done += store.entry_bytes(key)
            report(progress, "read", done, total)
    except (OSError, ValueError, RuntimeError) as exc:
        if is_oom(exc):
            raise
        where = f"{store.shard_name(key)}: " if key in store else ""
        raise CheckpointError(f"{resolved.name}: cannot load weights: {where}{first_line(exc)}") from exc
    finally:
        store.close()
    _finish_tied(model, config, seen, device_map, dtype)
    missing = [k for k, v in model.state_dict().items() if v.device.type == "meta"]
    if missing:
        raise CheckpointError(
            f"{resolved.name}: the checkpoint lacks {len(missing)} tensors (first: {missing[0]})"
        )
    if set(device_map) != {""}:
        model = dispatch_model(model, device_map=device_map, skip_keys=["cache", "past_key_values"])
    else:
        model.to(device_map[""])
    model.eval()
    return model, device_map


def _format_of(module_name: str, device: str, lp) -> str | None:
    """The format a Linear called ``module_name`` on ``device`` is built in (None: dense)."""
    if ".layers." in f".{module_name}":
        return lp.gpu_format if device != "cpu" else lp.cpu_format
    if module_name == "lm_head" and device == "cpu":
        return lp.head_format
    return None


def _quantized_here(model, key: str, lp, device_map) -> bool:
    module_name, _, pname = key.rpartition(".")
    fmt = _format_of(module_name, _device_of(module_name, device_map), lp)
    return (
        pname == "weight"
        and fmt is not None
        and not get_format(fmt).dense
        and isinstance(model.get_submodule(module_name), torch.nn.Linear)
    )


def _place(model, key, tensor, meta, *, lp, device_map, dtype, set_tensor, owned: bool = True) -> None:
    if tuple(tensor.shape) != tuple(meta.shape):
        raise CheckpointError(
            f"{key} has shape {tuple(tensor.shape)} but the config implies {tuple(meta.shape)}"
        )
    module_name, _, pname = key.rpartition(".")
    module = model.get_submodule(module_name)
    device = _device_of(module_name, device_map)
    fmt = _format_of(module_name, device, lp)
    if isinstance(module, torch.nn.Linear) and pname == "weight" and fmt is not None:
        new = get_format(fmt).build_linear(
            module, tensor, dtype=dtype, device=device, group_size=lp.group_size
        )
        if new is not None:
            replace_module(model, module_name, new)
            return
    if not owned:  # a view of the map that the model would keep: copy it
        tensor = tensor.clone()
    quantized_cpu = module.__class__.__module__.startswith("zlocal.kernels.cpu_quant")
    if not isinstance(module, torch.nn.Linear) and quantized_cpu:
        module.register_buffer(pname, tensor.to(dtype))  # the bias of a quantized CPU Linear
        return
    if module.__class__.__module__.startswith("bitsandbytes") and pname == "bias":
        module.bias = torch.nn.Parameter(tensor.to(dtype).to(device), requires_grad=False)
        return
    value = tensor.to(dtype) if tensor.is_floating_point() else tensor
    set_tensor(model, key, device, value=value, clear_cache=False)


def replace_module(model, name: str, new) -> None:
    """Put ``new`` in place of the submodule called ``name``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _finish_tied(model, config, seen: set[str], device_map, dtype) -> None:
    # Tied checkpoints store only the embedding; the head needs its own copy when it lives on
    # another device, else it shares the embedding's storage.
    if "lm_head.weight" in seen or not getattr(config, "tie_word_embeddings", False):
        return
    emb = model.get_input_embeddings().weight
    head_dev = _device_of("lm_head", device_map)
    if str(emb.device) == head_dev or (head_dev == "cpu" and emb.device.type == "cpu"):
        model.lm_head.weight = emb
    else:
        model.lm_head.weight = torch.nn.Parameter(emb.detach().to(head_dev, dtype), requires_grad=False)
