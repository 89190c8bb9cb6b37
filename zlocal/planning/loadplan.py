"""``LoadPlan``: how a model will be loaded and run, and its JSON file (``zlocal plan --json``).

A plan stores decisions: how many layers go on each device and in which format, the context, the
compute dtype, the group size and the checkpoint's own format (for an already-quantized one). Beside
them it records what the planner predicted for that placement on the machine it saw (memory, speed,
quality, the usable budget) and why. Everything else - the main weights format, its bits, whether the
load quantizes, the output layer's format, the KV cache dtype - is derived from the decisions, so no
two fields can disagree.

Files carry ``plan_version`` (3). Files written by earlier versions (1: no version field, 2) still load:
their derived fields are checked against their decisions and then dropped, so a hand-edited plan that
contradicts itself is refused with the field named.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from zlocal.errors import PlanError
from zlocal.formats import HEAD_FORMAT, get_format
from zlocal.planning.memory import GIB

PLAN_VERSION = 3
# what versions 1 and 2 stored beside the decisions; derived now
_DERIVED_V2 = (
    "weights_format",
    "bits",
    "kv_cache_dtype",
    "quantize_on_load",
    "source_quantized",
    "head_format",
)
_REQUIRED = ("gpu_layers", "cpu_layers", "max_context", "compute_dtype")
_COUNTS = ("gpu_layers", "cpu_layers", "max_context", "estimated_vram_bytes", "estimated_ram_bytes")


def head_format_for(gpu_layers: int, cpu_format: str | None, source_quantized: bool) -> str | None:
    """ "int8" when the output layer should run on the CPU int8 kernel, else None (dense).

    With every layer on the CPU in int8 or int4, a dense head is the largest single read of a
    decode step on small models (SmolLM2: 57 MB of 170 MB); per-channel int8 halves it and barely
    moves the output (perplexity -0.3%, mean KL 0.002 on SmolLM2), and llama.cpp too keeps its
    output layer at 8 bits (Q8_0 / Q6_K) in its 4- and 8-bit files.
    """
    on_kernel = cpu_format is not None and get_format(cpu_format).zlocal_kernel
    return HEAD_FORMAT if gpu_layers == 0 and on_kernel and not source_quantized else None


@dataclass
class LoadPlan:
    """How a model will be loaded and run: the decisions, then what the planner predicted for them."""

    # -- decisions ----------------------------------------------------------------------------------
    gpu_layers: int
    cpu_layers: int
    max_context: int
    compute_dtype: str
    gpu_format: str | None = None
    cpu_format: str | None = None
    group_size: int = 128
    # the format and bits an already-quantized checkpoint is stored in (None: full precision)
    source_format: str | None = None
    source_bits: int | None = None
    gpu_device: str | None = None
    # -- what the planner predicted for this placement, on the machine it saw --------------------------
    estimated_vram_bytes: int = 0
    estimated_ram_bytes: int = 0
    predicted_decode_tok_s: float = 0.0
    fits: bool = True
    quality: float = 1.0
    usable_vram_bytes: int = 0
    usable_ram_bytes: int = 0
    model: str = ""
    hardware: str = ""
    reasons: list[str] = field(default_factory=list)

    # -- derived --------------------------------------------------------------------------------------
    @property
    def weights_format(self) -> str:
        """The format of the decoder layers on the main device (the GPU's when it has any)."""
        fmt = self.gpu_format if self.gpu_layers else self.cpu_format
        return fmt or self.compute_dtype

    @property
    def bits(self) -> int:
        """Bits per weight of the main format (a quantized checkpoint's own width)."""
        fmt = get_format(self.weights_format)
        return self.source_bits if self.source_bits and not fmt.dense else fmt.bits

    @property
    def source_quantized(self) -> bool:
        """Whether the checkpoint is stored quantized (its layers keep that format)."""
        return self.source_format is not None

    @property
    def quantize_on_load(self) -> bool:
        """Whether loading quantizes full-precision weights (some planned format is not dense)."""
        return not self.source_quantized and any(not get_format(f).dense for f in self._placed_formats())

    @property
    def head_format(self) -> str | None:
        """ "int8": the output layer runs on the CPU int8 kernel (see ``head_format_for``)."""
        return head_format_for(self.gpu_layers, self.cpu_format, self.source_quantized)

    @property
    def kv_cache_dtype(self) -> str:
        """The KV cache is kept in the compute dtype."""
        return self.compute_dtype

    def _placed_formats(self) -> list[str]:
        return [
            f for f, n in ((self.gpu_format, self.gpu_layers), (self.cpu_format, self.cpu_layers)) if n and f
        ]

    # -- JSON -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The plan's JSON object: the stored fields plus the derived ones, for readers of the file
        (``from_dict`` recomputes the derived ones)."""
        derived = {name: getattr(self, name) for name in _DERIVED_V2}
        return {"plan_version": PLAN_VERSION, **asdict(self), **derived}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> LoadPlan:
        """Rebuild a plan; PlanError naming the problem when keys or types are wrong, or when derived
        fields in the file contradict its decisions."""
        if not isinstance(data, dict):
            raise PlanError("a plan must be a JSON object")
        version = data.get("plan_version", 1)  # version 1 files carry no version field
        if version not in (1, 2, PLAN_VERSION):
            raise PlanError(
                f"plan_version {version!r} is not one this zlocal reads (1 to {PLAN_VERSION}); write the "
                "plan again with `zlocal plan MODEL --json`, or upgrade zlocal"
            )
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise PlanError(
                f"plan is missing {', '.join(missing)}; write one with `zlocal plan MODEL --json`"
            )
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        if version < PLAN_VERSION and data.get("source_quantized"):
            kwargs["source_format"] = (
                data.get("gpu_format") or data.get("cpu_format") or data.get("weights_format")
            )
            kwargs["source_bits"] = data.get("bits")
        _check_types(kwargs)
        plan = cls(**kwargs)
        plan.check_consistent(data)
        return plan

    def check_consistent(self, data: dict | None = None) -> None:
        """PlanError when the placement names unknown formats or leaves a device without one, or when
        ``data`` (a plan file) holds derived fields that disagree with the decisions."""
        for fmt in (self.gpu_format, self.cpu_format, self.source_format):
            if fmt is not None:
                get_format(fmt)  # PlanError naming the known formats
        used = [f for f, n in ((self.gpu_format, self.gpu_layers), (self.cpu_format, self.cpu_layers)) if n]
        if any(f is None for f in used):
            raise PlanError("plan places layers on a device without a format (gpu_format / cpu_format)")
        for name in _DERIVED_V2:
            if data and name in data and data[name] != getattr(self, name):
                raise PlanError(
                    f"plan field {name} is {data[name]!r} but the plan's layers and formats give "
                    f"{getattr(self, name)!r}; write the plan again with `zlocal plan MODEL --json`"
                )

    def summary(self) -> str:
        """Human-readable plan for ``zlocal plan``."""
        lines = [
            f"model: {self.model}   hardware: {self.hardware}",
            f"fits: {'yes' if self.fits else 'NO'}",
            f"weights: {self.weights_format} ({self.bits}-bit)"
            + (", quantized on load" if self.quantize_on_load else ""),
            f"layers: {self.gpu_layers} on GPU ({self.gpu_format or '-'}), {self.cpu_layers} on CPU "
            f"({self.cpu_format or '-'})",
            f"compute dtype: {self.compute_dtype}   "
            f"KV cache: {self.kv_cache_dtype}, {self.max_context} tokens",
            f"VRAM: {self.estimated_vram_bytes / GIB:.2f} GiB of {self.usable_vram_bytes / GIB:.2f} usable   "
            f"RAM: {self.estimated_ram_bytes / GIB:.2f} GiB of {self.usable_ram_bytes / GIB:.2f} usable "
            "(the process's peak resident set)",
            f"predicted decode: {self.predicted_decode_tok_s:.1f} tok/s",
        ]
        return "\n".join(lines + [f"- {r}" for r in self.reasons])


def _check_types(kwargs: dict) -> None:
    for key in _COUNTS:
        value = kwargs.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise PlanError(f"plan field {key} must be a non-negative integer, got {value!r}")
    if kwargs["max_context"] < 1:
        raise PlanError("plan field max_context must be at least 1")
    if not isinstance(kwargs.get("reasons", []), list):
        raise PlanError("plan field reasons must be a list of strings")


def save_plan(plan: LoadPlan, path: str | os.PathLike) -> Path:
    """Write the plan JSON atomically (temp file + rename)."""
    dest = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}-", dir=dest.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(plan.to_json())
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def load_plan(path: str | os.PathLike) -> LoadPlan:
    """Read a plan JSON written by ``zlocal plan --json`` or ``save_plan``."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlanError(f"cannot read plan {p.name}: {exc.__class__.__name__}: {exc}") from exc
    return LoadPlan.from_dict(data)
