"""``LoadPlan``: how a model will be loaded and run, and its JSON file (``zlocal plan --json``).

Files carry ``plan_version``; version 1 files (no version field) still load. Fields that follow from
the layer placement (``weights_format``, ``quantize_on_load``) are checked against it when a file is
read, so a hand-edited plan cannot make the loader and the summary disagree.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .errors import PlanError
from .formats import HEAD_FORMAT, get_format
from .memory import GIB

PLAN_VERSION = 2


@dataclass
class LoadPlan:
    """How a model will be loaded and run. The first eleven fields are the documented contract."""

    weights_format: str
    bits: int
    gpu_layers: int
    cpu_layers: int
    kv_cache_dtype: str
    max_context: int
    compute_dtype: str
    estimated_vram_bytes: int
    estimated_ram_bytes: int
    predicted_decode_tok_s: float
    reasons: list[str] = field(default_factory=list)
    # extras
    fits: bool = True
    model: str = ""
    hardware: str = ""
    gpu_format: str | None = None
    cpu_format: str | None = None
    group_size: int = 128
    quantize_on_load: bool = False
    gpu_device: str | None = None
    usable_vram_bytes: int = 0
    usable_ram_bytes: int = 0
    quality: float = 1.0
    source_quantized: bool = False
    # "int8": lm_head on the CPU int8 kernel (plans with every layer on the CPU in int8 or int4).
    head_format: str | None = None

    def to_dict(self) -> dict:
        return {"plan_version": PLAN_VERSION, **asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> LoadPlan:
        """Rebuild a plan; PlanError naming the problem when keys or types are wrong."""
        if not isinstance(data, dict):
            raise PlanError("a plan must be a JSON object")
        version = data.get("plan_version", 1)  # version 1 files carry no version field
        if version not in (1, PLAN_VERSION):
            raise PlanError(
                f"plan_version {version!r} is not one this zlocal reads (1 or {PLAN_VERSION}); write the "
                "plan again with `zlocal plan MODEL --json`, or upgrade zlocal"
            )
        known = {f.name: f for f in fields(cls)}
        required = [f.name for f in fields(cls)][:10]
        missing = [k for k in required if k not in data]
        if missing:
            raise PlanError(
                f"plan is missing {', '.join(missing)}; write one with `zlocal plan MODEL --json`"
            )
        kwargs = {k: v for k, v in data.items() if k in known}
        for key in (
            "bits",
            "gpu_layers",
            "cpu_layers",
            "max_context",
            "estimated_vram_bytes",
            "estimated_ram_bytes",
        ):
            if not isinstance(kwargs[key], int) or isinstance(kwargs[key], bool) or kwargs[key] < 0:
                raise PlanError(f"plan field {key} must be a non-negative integer, got {kwargs[key]!r}")
        if kwargs["max_context"] < 1:
            raise PlanError("plan field max_context must be at least 1")
        if not isinstance(kwargs.get("reasons", []), list):
            raise PlanError("plan field reasons must be a list of strings")
        if kwargs.get("head_format") not in (None, HEAD_FORMAT):
            raise PlanError(
                f'plan field head_format must be null or "{HEAD_FORMAT}", got {kwargs["head_format"]!r}'
            )
        plan = cls(**kwargs)
        plan.check_consistent()
        return plan

    def check_consistent(self) -> None:
        """PlanError when the fields that follow from the layer placement disagree with it (a plan
        edited by hand): the loader acts on the per-device formats, the summary on the rest."""
        for fmt in (self.gpu_format, self.cpu_format, self.weights_format):
            if fmt is not None:
                get_format(fmt)  # PlanError naming the known formats
        used = [f for f, n in ((self.gpu_format, self.gpu_layers), (self.cpu_format, self.cpu_layers)) if n]
        if any(f is None for f in used):
            raise PlanError("plan places layers on a device without a format (gpu_format / cpu_format)")
        main = self.gpu_format if self.gpu_layers else self.cpu_format
        if main is not None and self.weights_format != main:
            raise PlanError(
                f"plan field weights_format is {self.weights_format!r} but the layers are planned in "
                f"{main!r}; write the plan again with `zlocal plan MODEL --json`"
            )
        quantizes = not self.source_quantized and any(not get_format(f).dense for f in used)
        if self.quantize_on_load != quantizes:
            raise PlanError(
                f"plan field quantize_on_load is {self.quantize_on_load} but its formats say {quantizes}; "
                "write the plan again with `zlocal plan MODEL --json`"
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
            f"RAM: {self.estimated_ram_bytes / GIB:.2f} GiB of {self.usable_ram_bytes / GIB:.2f} usable",
            f"predicted decode: {self.predicted_decode_tok_s:.1f} tok/s",
        ]
        return "\n".join(lines + [f"- {r}" for r in self.reasons])


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
