"""zlocal: run Zephyr-7B (and other Mistral/Llama chat models) quantized on one consumer machine.

Pipeline: profile -> plan -> convert -> load -> generate -> serve.

    import zlocal
    rt = zlocal.load("smollm2-135m")
    print(rt.chat([{"role": "user", "content": "Hi!"}], max_new_tokens=32))
"""

from __future__ import annotations

__version__ = "0.1.0"

import importlib
import logging

from zlocal.errors import (
    BusyError,
    CheckpointError,
    ContextOverflowError,
    InvalidArgumentError,
    ModelNotFoundError,
    RuntimeClosedError,
    TemplateError,
    ZlocalError,
)

# The runtime's names import torch (seconds): they are loaded on first use, so `zlocal --help`, the
# CLI's argument errors and `import zlocal` by an app that only checks the version stay fast.
_LAZY = {
    "GenerationResponse": "zlocal.inference.engine",
    "ChatSession": "zlocal.inference.runtime",
    "Completion": "zlocal.inference.runtime",
    "Runtime": "zlocal.inference.runtime",
    "GenerationStream": "zlocal.inference.runtime_stream",
    "load": "zlocal.inference.runtime",
    "SamplingParams": "zlocal.inference.sampling",
}


# Import-time advisories of libraries zlocal loads (torchao's pytree registrations, pulled in through
# gptqmodel; bitsandbytes' note that the optional `kernels` package is missing, which zlocal's own CPU
# kernels make moot) say nothing a zlocal user can act on, and they land on every app's stderr.
for _name in ("torch.utils._pytree", "bitsandbytes"):
    logging.getLogger(_name).setLevel(logging.ERROR)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'zlocal' has no attribute {name!r}")

__all__ = [
    "BusyError",
    "ChatSession",
    "CheckpointError",
    "Completion",
    "ContextOverflowError",
    "GenerationResponse",
    "GenerationStream",
    "InvalidArgumentError",
    "ModelNotFoundError",
    "Runtime",
    "RuntimeClosedError",
    "SamplingParams",
    "TemplateError",
    "ZlocalError",
    "__version__",
    "load",
]
