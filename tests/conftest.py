"""Session-scoped, cached fixtures shared by every test module (see tests/fixtures.py)."""

from __future__ import annotations

import os

import pytest
import torch

from tests import fixtures

# Loads in tests read their checkpoints, not a prepared form left by an earlier test or run (this
# reaches the CLI's subprocesses too); tests of the prepared form turn it on with their own folder.
os.environ["ZLOCAL_PREPARED_CACHE"] = "0"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tokenizer_dir():
    return fixtures.tokenizer_dir()


@pytest.fixture(scope="session")
def mistral_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_zephyr():
    """Path of the tiny random Mistral checkpoint with the Zephyr chat template."""
    return fixtures.tiny_zephyr_dir()


@pytest.fixture(scope="session")
def tiny_zephyr_no_template():
    return fixtures.tiny_zephyr_no_template_dir()


@pytest.fixture(scope="session")
def smollm2():
    """Path of the real SmolLM2-135M-Instruct checkpoint (bf16 safetensors)."""
    return fixtures.smollm2_dir()


@pytest.fixture(scope="session")
def tiny_runtime(tiny_zephyr):
    import zlocal

    return zlocal.load(str(tiny_zephyr), plan=None, dtype="float32", max_context=512)


@pytest.fixture(scope="session")
def smollm2_runtime(smollm2):
    import zlocal

    return zlocal.load(str(smollm2), plan=None, dtype="float32", max_context=2048)


@pytest.fixture(params=["torch", "zlocal"])
def kernel_layout(request, monkeypatch):
    """Run an int4/int8 test with PyTorch's CPU kernels and with zlocal's own (where this CPU runs
    them); the value is the layout the quantized modules get."""
    from zlocal.kernels import cpu_kernels, cpu_quant

    if request.param == "zlocal":
        if cpu_kernels.kernels() is None:
            pytest.skip(f"needs zlocal's AVX-512 BF16 kernels: {cpu_kernels.kernel_status()}")
    else:
        monkeypatch.setattr(cpu_quant, "int4_layout", lambda *shape: "torch")
        monkeypatch.setattr(cpu_quant, "int8_layout", lambda *shape: "torch")
    return request.param
