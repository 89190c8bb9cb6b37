"""How each ``zlocal convert --method`` writes its format: one object per family, asked by ``convert``.

A format object hands out its conversion (``WeightFormat.conversion``): bitsandbytes formats stream
the checkpoint tensor by tensor through bitsandbytes' own quantizer; GPTQ plans its calibration and
group size, then runs GPTQ (and scale tuning) layer by layer. ``convert`` calls the same four steps on
either and never asks which it has.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from zlocal.checkpoint.checkpoint_io import DEFAULT_MAX_SHARD_BYTES
from zlocal.errors import InvalidArgumentError
from zlocal.progress import report


@dataclass
class ConversionOptions:
    """The user's options that only some methods take (None: not given)."""

    group_size: int | None = None
    samples: int | None = None
    seq_len: int | None = None
    calibration: str | None = None
    sym: bool = False
    tune_epochs: int | None = None


@dataclass
class BnbConversion:
    """bitsandbytes nf4 / fp4 / int8, in exactly the layout transformers saves."""

    method: str
    bits: int
    plan = None  # no calibration plan: the manifest records none
    progress: Callable | None = None  # zlocal.progress events, per tensor written

    def check_options(self, opts: ConversionOptions) -> None:
        """Refuse options this method does not take."""
        if opts.group_size is not None or opts.sym or opts.tune_epochs is not None:
            raise InvalidArgumentError("--group-size, --sym and --tune-epochs apply to gptq4/gptq8 only")

    def check_source(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Refuse, before any work, layers bitsandbytes could not run on the CPU."""
        from zlocal.conversion.quantize_bnb import check_cpu_loadable

        check_cpu_loadable(shapes, self.method)

    def prepare(self, config: dict, opts: ConversionOptions, quiet: bool) -> int | None:
        """Decide what the method needs before writing; returns the group size (None: not grouped)."""
        return None

    def write(self, resolved, tmp: Path, config: dict, source, quiet: bool, max_shard_bytes) -> None:
        """Stream SRC through bitsandbytes into ``tmp`` with the config transformers would write.
        ``source``: ``inspect_source``'s (shards, parsed headers, flat tensor table). Returns None
        (no scale tuning)."""
        from zlocal.conversion.convert import _compute_dtype, _copy_aux_files, _pickle_to_safetensors
        from zlocal.conversion.quantize_bnb import ByteProgress, bnb_quantization_config, quantize_bnb

        shards, parsed, flat = source
        compute_dtype = _compute_dtype(config)
        if resolved.weights_format == "pickle":
            parsed = _pickle_to_safetensors(shards, tmp)
        total = sum(e.nbytes for _, ents in parsed for e in ents.values())
        with ByteProgress(total, len(flat), self.method, quiet, self.progress) as tick:
            quantize_bnb(
                parsed,
                tmp,
                self.method,
                compute_dtype,
                progress=tick,
                max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES,
            )
        shutil.rmtree(tmp / ".stage", ignore_errors=True)
        _copy_aux_files(resolved.path, tmp)
        new_config = dict(config)
        new_config["quantization_config"] = bnb_quantization_config(self.method, compute_dtype)
        (tmp / "config.json").write_text(json.dumps(new_config, indent=2) + "\n", encoding="utf-8")


@dataclass
class GptqConversion:
    """GPTQ 4/8-bit with calibration, GPTAQ and scale tuning (zlocal.conversion.quantize_gptq)."""

    method: str
    bits: int
    plan: object = None  # the checked GptqPlan, once prepared
    progress: Callable | None = None  # zlocal.progress events (gptqmodel reports no finer steps)

    def check_options(self, opts: ConversionOptions) -> None:
        """GPTQ takes every option; their values are checked when the plan is made."""

    def check_source(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """GPTQ runs any shape the kernels do not take as it is (gptqmodel's kernels load it)."""

    def prepare(self, config: dict, opts: ConversionOptions, quiet: bool) -> int | None:
        """The checked GPTQ plan; prints which group size it chose and why (and any tuning note)."""
        from zlocal.conversion.quantize_gptq import plan_gptq

        self.plan = plan_gptq(
            config,
            bits=self.bits,
            group_size=opts.group_size,
            samples=opts.samples,
            seq_len=opts.seq_len,
            calibration=opts.calibration,
            sym=opts.sym,
            tune_epochs=opts.tune_epochs,
        )
        for note in (self.plan.group_note, self.plan.tune_note):
            if note and not quiet:
                print(note, file=sys.stderr)
        return self.plan.group_size

    def write(self, resolved, tmp: Path, config: dict, source, quiet: bool, max_shard_bytes):
        """Run GPTQ (and scale tuning) into ``tmp``; return the tuning report or None."""
        from zlocal.conversion.convert import _compute_dtype, _copy_aux_files
        from zlocal.conversion.quantize_gptq import quantize_gptq

        report(self.progress, "convert", 0, 1, "steps", f"GPTQ {self.bits}-bit")
        tuning = quantize_gptq(
            resolved.path,
            tmp,
            self.plan,
            compute_dtype=_compute_dtype(config),
            quiet=quiet,
            allow_pickle=resolved.weights_format == "pickle",
        )
        _copy_aux_files(resolved.path, tmp, keep_existing=True)
        report(self.progress, "convert", 1, 1, "steps", f"GPTQ {self.bits}-bit")
        if tuning is not None and not quiet:
            print(
                f"scale tuning: held-out KL {tuning.heldout_kl_before:.5f} -> "
                f"{tuning.heldout_kl_after:.5f} (epoch {tuning.best_epoch} of {tuning.epochs}; "
                f"0 keeps GPTQ's scales), {tuning.seconds:.0f} s",
                file=sys.stderr,
            )
        return tuning
