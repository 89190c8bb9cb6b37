"""Weight formats as objects: one per format, asked by the planner and the memory estimate.

Each ``WeightFormat`` owns what is true of its format wherever it is used: bits and resident bytes
for a layer shape, its quality prior, the share of memory bandwidth its kernels reach per device,
whether this machine can run it, and the next smaller format to step down to. ``get_format(name)``
returns the object; no caller compares format names.
"""

from zlocal.formats.base import WeightFormat
from zlocal.formats.gptq import GPTQ
from zlocal.formats.registry import (
    FORMATS,
    HEAD_FORMAT,
    checkpoint_format,
    convert_format,
    convert_methods,
    cpu_format_beside,
    dense_format,
    formats_for_checkpoint,
    formats_on_load,
    get_format,
    quantization_config_for,
    quantized_on_load,
    source_format,
    why_checkpoint_cannot_run,
)

__all__ = [
    "FORMATS",
    "GPTQ",
    "HEAD_FORMAT",
    "WeightFormat",
    "checkpoint_format",
    "convert_format",
    "convert_methods",
    "cpu_format_beside",
    "dense_format",
    "formats_for_checkpoint",
    "formats_on_load",
    "get_format",
    "quantization_config_for",
    "quantized_on_load",
    "source_format",
    "why_checkpoint_cannot_run",
]
