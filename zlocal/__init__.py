"""zlocal: run Zephyr-7B (and other Mistral/Llama chat models) quantized on one consumer machine.

Pipeline: profile -> plan -> convert -> load -> generate -> serve.

    import zlocal
    rt = zlocal.load("smollm2-135m")
    print(rt.chat([{"role": "user", "content": "Hi!"}], max_new_tokens=32))
"""

from __future__ import annotations

__version__ = "0.1.0"

from zlocal.errors import (
    BusyError,
    CheckpointError,
    ContextOverflowError,
    InvalidArgumentError,
    ModelNotFoundError,
    TemplateError,
    ZlocalError,
)
from zlocal.inference.engine import GenerationResponse
from zlocal.inference.runtime import ChatSession, Completion, Runtime, load
from zlocal.inference.sampling import SamplingParams

__all__ = [
    "BusyError",
    "ChatSession",
    "CheckpointError",
    "Completion",
    "ContextOverflowError",
    "GenerationResponse",
    "InvalidArgumentError",
    "ModelNotFoundError",
    "Runtime",
    "SamplingParams",
    "TemplateError",
    "ZlocalError",
    "__version__",
    "load",
]
