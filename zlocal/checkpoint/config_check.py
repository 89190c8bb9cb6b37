"""Check a checkpoint's config.json before anything builds a model from it.

A config comes from the checkpoint's author, not from zlocal: ``num_attention_heads: 0``,
``hidden_size: "64"``, ``num_hidden_layers: 10**9``, an unknown rope type or JSON nested 100,000
deep otherwise surface as a ZeroDivisionError, a KeyError deep in transformers, a loop that never
ends or a RecursionError. ``read_config`` is called where config.json is first read
(zlocal.checkpoint.resolve, so by load, chat, generate, prompt, plan, convert, bench, eval) and turns each
into a CheckpointError naming the field, the bad value and what was expected.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from zlocal.errors import CheckpointError

MAX_CONFIG_BYTES = 16 * 1024 * 1024  # real configs are a few KB; id2label-heavy ones under 1 MB
MAX_CONFIG_DEPTH = 32  # real configs nest 4-5 deep (text_config > rope_parameters > per-layer > list)

# Architecture sizes zlocal computes with, with sanity ceilings far above any published model:
# a ceiling keeps num_hidden_layers=10**9 from becoming a loop over a billion layers.
_SIZES: dict[str, int] = {
    "hidden_size": 1 << 17,
    "intermediate_size": 1 << 20,
    "num_hidden_layers": 4096,
    "num_attention_heads": 4096,
    "vocab_size": 1 << 23,
    "num_key_value_heads": 4096,
    "head_dim": 1 << 14,
    "max_position_embeddings": 1 << 27,
    "sliding_window": 1 << 27,
}
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_DTYPES = {"float32", "float16", "bfloat16", "float64", "float", "half", "double", "auto"}
_LEGACY_ROPE_TYPES = {"su"}  # Phi-3's old name for longrope; transformers still maps it


def _show(value: Any) -> str:
    text = repr(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    return f"{text} ({type(value).__name__})"


def _bad(where: str, key: str, value: Any, expected: str) -> CheckpointError:
    return CheckpointError(f"{where}: {key} must be {expected}, got {_show(value)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a size


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, walked without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((kid, depth + 1) for kid in (item.values() if isinstance(item, dict) else item))
    return deepest


def _too_deep(where: str) -> str:
    return f"{where} nests deeper than {MAX_CONFIG_DEPTH} levels; not a model config"


def read_config(path: Path, name: str | None = None) -> dict[str, Any]:
    """Read, bound and check ``path`` (a config.json); return the parsed dict.

    Raises CheckpointError for a file over MAX_CONFIG_BYTES, invalid or too deeply nested JSON, a
    non-object, or any field check_config rejects.
    """
    where = f"{name or path.parent.name}/config.json"
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise CheckpointError(f"{where} is {size:,} bytes; a config is at most {MAX_CONFIG_BYTES:,}")
        config = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError as exc:  # json's C parser recurses once per [ or {
        raise CheckpointError(_too_deep(where)) from exc
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # ValueError: JSON, or a 5000-digit int
        raise CheckpointError(f"{where} is not valid JSON ({exc.__class__.__name__})") from exc
    if _depth(config) > MAX_CONFIG_DEPTH:
        raise CheckpointError(_too_deep(where))
    check_config(config, where)
    return config


def check_with_transformers(directory: Path, where: str) -> None:
    """Let transformers parse the config too and word its refusal as one CheckpointError line.

    transformers validates fields zlocal never reads (hidden_act, initializer_range, use_cache,
    rope parameters per rope type ...) with exceptions of its own (StrictDataclassFieldValidationError,
    KeyError) that callers further on do not all catch.
    """
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(directory, trust_remote_code=False)
    except Exception as exc:  # any refusal, whatever its class, is a bad checkpoint config
        text = " ".join(str(exc).split()) or exc.__class__.__name__
        raise CheckpointError(f"{where}: transformers cannot use it: {text[:300]}") from exc


def _supported(model_type: Any) -> bool:
    from zlocal.inference.loader import SUPPORTED_MODEL_TYPES  # lazily: loader imports torch

    return model_type in SUPPORTED_MODEL_TYPES


def check_config(config: Any, where: str = "config.json") -> None:
    """Check the fields zlocal uses: types, ranges, head divisibility, rope type, dtype, token ids.

    Architecture fields live in ``text_config`` when the config has one (multimodal wrappers).
    Required sizes are only demanded of architectures zlocal supports, so an unsupported one is
    reported as unsupported by the loader rather than as a missing field here.
    """
    if not isinstance(config, dict):
        raise CheckpointError(f"{where} must hold a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise _bad(where, "model_type", model_type, "a string")
    text = config.get("text_config")
    if text is not None and not isinstance(text, dict):
        raise _bad(where, "text_config", text, "an object")
    if text is None:
        _check_architecture(config, where, "", required=_supported(model_type))
    else:
        _check_architecture(config, where, "", required=False)
        text_type = text.get("model_type") or model_type
        _check_architecture(text, where, "text_config.", required=_supported(text_type))
    _check_quantization(config.get("quantization_config"), where)


def _check_architecture(c: dict, where: str, prefix: str, required: bool) -> None:
    for key, ceiling in _SIZES.items():
        value = c.get(key)
        if value is None:
            if required and key in _REQUIRED:
                raise CheckpointError(f"{where}: {prefix}{key} is missing; this architecture needs it")
            continue
        if not _is_int(value) or not 1 <= value <= ceiling:
            raise _bad(where, prefix + key, value, f"an integer from 1 to {ceiling:,}")
    hidden, heads = c.get("hidden_size"), c.get("num_attention_heads")
    kv, head_dim = c.get("num_key_value_heads"), c.get("head_dim")
    if hidden and heads and head_dim is None and hidden % heads:
        raise CheckpointError(
            f"{where}: {prefix}hidden_size {hidden} is not divisible by {prefix}num_attention_heads {heads}; "
            "give head_dim or fix the head count"
        )
    if heads and kv and heads % kv:
        raise CheckpointError(
            f"{where}: {prefix}num_attention_heads {heads} is not divisible by "
            f"{prefix}num_key_value_heads {kv}"
        )
    eps = c.get("rms_norm_eps")
    if eps is not None and not (_is_number(eps) and 0 < eps < 1):
        raise _bad(where, prefix + "rms_norm_eps", eps, "a number between 0 and 1")
    theta = c.get("rope_theta")
    if theta is not None and not (_is_number(theta) and theta > 0):
        raise _bad(where, prefix + "rope_theta", theta, "a positive number")
    for key in ("tie_word_embeddings", "attention_bias"):
        if c.get(key) is not None and not isinstance(c[key], bool):
            raise _bad(where, prefix + key, c[key], "true or false")
    for key in ("torch_dtype", "dtype"):
        dtype = c.get(key)
        if dtype is not None and (not isinstance(dtype, str) or dtype.removeprefix("torch.") not in _DTYPES):
            raise _bad(where, prefix + key, dtype, "one of " + ", ".join(sorted(_DTYPES)))
    for key in ("bos_token_id", "eos_token_id"):
        ids = c.get(key)
        listed = ids if isinstance(ids, list) else [ids]
        if ids is not None and not all(_is_int(i) and i >= 0 for i in listed):
            raise _bad(where, prefix + key, ids, "a non-negative integer or a list of them")
    for key in ("rope_scaling", "rope_parameters"):
        _check_rope(c.get(key), where, prefix + key)


def _known_rope_types() -> set[str]:
    try:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    except ImportError:  # the list as of transformers 5; only the message gets less precise
        return {"default", "linear", "dynamic", "yarn", "longrope", "llama3"} | _LEGACY_ROPE_TYPES
    return {"default", *ROPE_INIT_FUNCTIONS} | _LEGACY_ROPE_TYPES


def _check_rope(rope: Any, where: str, key: str) -> None:
    """rope_scaling / rope_parameters: null, one parameter dict, or one per layer type."""
    if rope is None:
        return
    if not isinstance(rope, dict):
        raise _bad(where, key, rope, "an object or null")
    if rope and all(isinstance(v, dict) or v is None for v in rope.values()):  # {"full_attention": {...}}
        for layer_type, params in rope.items():
            _check_rope(params, where, f"{key}.{layer_type}")
        return
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    known = _known_rope_types()
    if rope_type not in known:
        raise _bad(where, key + ".rope_type", rope_type, "one of " + ", ".join(sorted(known)))
    for field in ("rope_theta", "factor"):
        value = rope.get(field)
        if value is not None and not (_is_number(value) and value > 0):
            raise _bad(where, f"{key}.{field}", value, "a positive number")


def _check_quantization(qc: Any, where: str) -> None:
    if qc is None:
        return
    if not isinstance(qc, dict):
        raise _bad(where, "quantization_config", qc, "an object")
    method, bits, group = qc.get("quant_method"), qc.get("bits"), qc.get("group_size")
    if method is not None and not isinstance(method, str):
        raise _bad(where, "quantization_config.quant_method", method, "a string")
    if bits is not None and not (_is_int(bits) and 1 <= bits <= 16):
        raise _bad(where, "quantization_config.bits", bits, "an integer from 1 to 16")
    if group is not None and not (_is_int(group) and (group == -1 or 1 <= group <= 1 << 20)):
        raise _bad(where, "quantization_config.group_size", group, "-1 or a positive integer")
