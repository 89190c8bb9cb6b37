"""``zlocal convert``: quantize a checkpoint into a new, verified, self-describing directory.

Every check that can fail (where OUT is and what --overwrite would delete, architecture, shard
integrity, shapes against the config, layer shapes bitsandbytes cannot run on the CPU, group size,
free disk) runs before any work. The output is written into a temporary directory beside OUT and
renamed into place only after the manifest (hashes plus quality report) is written, so an
interrupted run never leaves a half-written OUT; stale temp dirs of dead runs are removed by the
next run (zlocal.conversion.convert_output).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from zlocal.checkpoint.checkpoint_io import ST_DTYPES, TensorEntry, read_header, write_safetensors
from zlocal.checkpoint.manifest import Manifest, library_versions, read_manifest, sha256_file, write_manifest
from zlocal.conversion.convert_methods import ConversionOptions
from zlocal.conversion.convert_output import TMP_MARK, check_disk, check_output, clean_stale_temp, install
from zlocal.conversion.quantize_gptq import GPTAQ_ALPHA
from zlocal.errors import CheckpointError, ConversionError, InvalidArgumentError, ZlocalError
from zlocal.formats import convert_format, convert_methods
from zlocal.progress import report as report_progress

METHODS = convert_methods()  # method -> bits
CONVERTIBLE_TYPES = {"mistral", "llama", "qwen2"}
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf"}
_SKIP_FILES = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "config.json", "zlocal.json"}
_FLOAT_DTYPES = {"F32", "F16", "BF16"}


@dataclass
class ConvertResult:
    """What ``convert`` produced (also printed as JSON by ``zlocal convert --json``)."""

    out: str
    method: str
    bits: int
    group_size: int | None
    seconds: float
    source_bytes: int
    output_bytes: int
    files: list[str]
    quality: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- source inspection ---------------------------------------------------------------------------
def source_shards(path: Path, weights_format: str) -> list[Path]:
    """The weight files of a checkpoint, in index order when there is an index."""
    index = path / (
        "model.safetensors.index.json" if weights_format == "safetensors" else "pytorch_model.bin.index.json"
    )
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index.name} is not a valid shard index; download it again") from exc
        names = list(dict.fromkeys(weight_map.values()))
        for n in names:
            if Path(n).name != n or not (path / n).is_file():
                raise CheckpointError(f"{index.name} lists {n}, which is missing from {path}")
        return [path / n for n in names]
    suffixes = {".safetensors"} if weights_format == "safetensors" else {".bin", ".pt", ".pth", ".ckpt"}
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in suffixes)
    if not files:
        raise CheckpointError(f"{path}: no weight files found")
    return files


def _text_config(config: dict) -> dict:
    return config.get("text_config", config)


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Shapes a Llama/Mistral/Qwen2-style checkpoint must have, derived from its config."""
    c = _text_config(config)
    h, inter, layers = int(c["hidden_size"]), int(c["intermediate_size"]), int(c["num_hidden_layers"])
    heads = int(c["num_attention_heads"])
    kv = int(c.get("num_key_value_heads") or heads)
    hd = int(c.get("head_dim") or h // heads)
    vocab = int(c["vocab_size"])
    shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    if not c.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, h)
    per_layer = {
        "self_attn.q_proj.weight": (heads * hd, h),
        "self_attn.k_proj.weight": (kv * hd, h),
        "self_attn.v_proj.weight": (kv * hd, h),
        "self_attn.o_proj.weight": (h, heads * hd),
        "mlp.gate_proj.weight": (inter, h),
        "mlp.up_proj.weight": (inter, h),
        "mlp.down_proj.weight": (h, inter),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
    }
    for i in range(layers):
        for k, s in per_layer.items():
            shapes[f"model.layers.{i}.{k}"] = s
    return shapes


def check_tensors(entries: dict[str, tuple[Path, str, tuple[int, ...]]], config: dict) -> None:
    """Refuse tensors whose shape or dtype disagrees with the config, and missing tensors."""
    expected = expected_shapes(config)
    layers = int(_text_config(config)["num_hidden_layers"])
    for name, (path, dtype, shape) in entries.items():
        if dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{path.name}: tensor {name} has dtype {dtype}; expected F32, F16 or BF16")
        want = expected.get(name)
        if want is not None and tuple(shape) != want:
            raise CheckpointError(
                f"{path.name}: tensor {name} has shape {list(shape)} but config.json implies {list(want)}"
            )
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m and int(m.group(1)) >= layers:
            raise CheckpointError(
                f"{path.name}: tensor {name} is beyond num_hidden_layers={layers} in config.json"
            )
    missing = [k for k in expected if k not in entries]
    if missing:
        raise CheckpointError(
            f"checkpoint is missing tensor {missing[0]} (and {len(missing) - 1} more)"
            if len(missing) > 1
            else f"checkpoint is missing tensor {missing[0]}"
        )


def inspect_source(path: Path, weights_format: str, config: dict):
    """Read and check every shard header; return [(shard, {name: TensorEntry})] for safetensors."""
    shards = source_shards(path, weights_format)
    flat: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
    parsed = []
    if weights_format == "safetensors":
        for shard in shards:
            entries, _ = read_header(shard)
            for name, e in entries.items():
                if name in flat:
                    raise CheckpointError(f"{shard.name}: tensor {name} also appears in {flat[name][0].name}")
                flat[name] = (shard, e.dtype, e.shape)
            parsed.append((shard, entries))
    else:
        for shard in shards:
            sd = _load_pickle(shard)
            for name, t in sd.items():
                flat[name] = (shard, _st_dtype(t.dtype), tuple(t.shape))
            del sd
    check_tensors(flat, config)
    return shards, parsed, flat


def _st_dtype(dtype: torch.dtype) -> str:
    return {v: k for k, v in ST_DTYPES.items()}.get(dtype, str(dtype))


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path.name}: cannot read pickle weights safely ({exc.__class__.__name__})"
        ) from exc
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path.name}: pickle file is not a plain state dict of tensors")
    return sd


def _pickle_to_safetensors(shards: list[Path], tmp: Path) -> list[tuple[Path, dict[str, TensorEntry]]]:
    """Re-save opted-in pickle shards as safetensors in the temp dir so streaming code is shared."""
    out = []
    stage = tmp / ".stage"
    stage.mkdir(exist_ok=True)
    for i, shard in enumerate(shards):
        sd = {k: v.contiguous() for k, v in _load_pickle(shard).items()}
        p = stage / f"src-{i:05d}.safetensors"
        write_safetensors(p, sd, {"format": "pt"})
        del sd
        out.append((p, read_header(p)[0]))
    return out


# -- output ----------------------------------------------------------------------------------------
def _copy_aux_files(src: Path, dst: Path, *, keep_existing: bool = False) -> None:
    """Tokenizer, chat template, generation config and other small files; never weights.

    ``keep_existing``: after a library save, only add the files the library did not write itself.
    """
    for p in src.iterdir():
        if (
            p.is_file()
            and p.suffix not in _WEIGHT_SUFFIXES
            and p.name not in _SKIP_FILES
            and not p.name.startswith(".")
            and not (keep_existing and (dst / p.name).exists())
        ):
            shutil.copy2(p, dst / p.name)


# -- main entry ----------------------------------------------------------------------------------
def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    method: str,
    *,
    group_size: int | None = None,
    calibration: str | os.PathLike | None = None,
    samples: int | None = None,
    seq_len: int | None = None,
    sym: bool = False,
    tune_epochs: int | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    eval_text: str | os.PathLike | None = None,
    evaluate: bool = True,
    quiet: bool = False,
    max_shard_bytes: int | None = None,
    progress=None,
) -> ConvertResult:
    """Quantize SRC into OUT with ``method`` (nf4, fp4, int8, gptq4, gptq8); see the module doc.

    ``progress``: a callback receiving ``zlocal.progress.Progress`` events: ``convert`` (source bytes
    written; GPTQ: its start and end), ``quality`` (the report's start and end), ``ready``."""
    from zlocal.checkpoint.resolve import resolve_model

    t0 = time.time()
    bits = _check_options(method, samples, seq_len, calibration, eval_text)
    opts = ConversionOptions(group_size, samples, seq_len, calibration, sym, tune_epochs)
    conversion = convert_format(method).conversion(method, bits)
    conversion.progress = progress
    conversion.check_options(opts)
    resolved = resolve_model(src, allow_pickle=allow_pickle)
    src_path = resolved.path
    out_path = check_output(src_path, out, overwrite)
    clean_stale_temp(out_path, protect=src_path)
    config, model_type = _read_config(src_path, resolved.name)
    try:
        shards, parsed, flat = inspect_source(src_path, resolved.weights_format, config)
    except KeyError as exc:
        raise CheckpointError(f"config.json lacks {exc.args[0]}; cannot check tensor shapes") from exc
    conversion.check_source({n: s for n, (_, _, s) in flat.items()})
    group_size = conversion.prepare(config, opts, quiet)
    source_bytes = check_disk(flat, shards, bits, method, resolved.weights_format, out_path.parent)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}{TMP_MARK}", dir=out_path.parent))
    try:
        (tmp / ".pid").write_text(str(os.getpid()))
        source_hashes = {p.name: sha256_file(p) for p in shards}
        tuning = conversion.write(resolved, tmp, config, (shards, parsed, flat), quiet, max_shard_bytes)
        (tmp / ".pid").unlink()
        quality = None
        if evaluate:
            from zlocal.conversion.quality import evaluate as run_eval

            report_progress(progress, "quality", 0, 1, "steps")
            report = run_eval(tmp, src_path, text=eval_text, quiet=quiet, allow_pickle=allow_pickle)
            report_progress(progress, "quality", 1, 1, "steps")
            quality = report.to_dict()
            if not quiet:
                print(report.table(), file=sys.stderr)
        source = _source_record(resolved, model_type, source_hashes)
        manifest = Manifest(method=method, bits=bits, group_size=group_size, source=source, quality=quality)
        manifest.versions = library_versions()
        manifest.conversion = _conversion_record(t0, conversion.plan, calibration, tuning)
        write_manifest(tmp, manifest)
        install(tmp, out_path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, ZlocalError | KeyboardInterrupt | SystemExit):
            raise
        raise ConversionError(
            f"conversion failed, nothing was written: {exc.__class__.__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        ) from exc
    m = read_manifest(out_path)
    report_progress(progress, "ready", 1, 1, "steps", str(out_path))
    return ConvertResult(
        out=str(out_path),
        method=method,
        bits=bits,
        group_size=group_size,
        seconds=round(time.time() - t0, 2),
        source_bytes=source_bytes,
        output_bytes=sum(f.bytes for f in m.files.values()),
        files=sorted(m.files),
        quality=quality,
    )


def _check_options(method, samples, seq_len, calibration, eval_text) -> int:
    """Refuse option values that cannot work, before SRC is even resolved; return the bit width."""
    if method not in METHODS:
        raise InvalidArgumentError(f"--method must be one of {', '.join(METHODS)}; got {method!r}")
    for flag, value in (("--samples", samples), ("--seq-len", seq_len)):
        if value is not None and value <= 0:
            raise InvalidArgumentError(f"{flag} must be > 0, got {value}")
    for flag, f in (("--calibration", calibration), ("--eval-text", eval_text)):
        if f is not None and not Path(f).is_file():
            raise InvalidArgumentError(f"{flag} {f}: no such file")
    return METHODS[method]


def _read_config(src_path: Path, name: str) -> tuple[dict, str]:
    """SRC's config.json and model type; refuse architectures we cannot convert and quantized sources."""
    config = json.loads((src_path / "config.json").read_text(encoding="utf-8"))
    model_type = _text_config(config).get("model_type") or config.get("model_type")
    if model_type not in CONVERTIBLE_TYPES:
        raise ConversionError(
            f"architecture '{model_type}' cannot be converted "
            f"(supported: {', '.join(sorted(CONVERTIBLE_TYPES))})"
        )
    if config.get("quantization_config"):
        raise ConversionError(
            f"{name} is already quantized "
            f"({config['quantization_config'].get('quant_method', '?')}); convert the original"
        )
    return config, model_type


def _source_record(resolved, model_type: str, shard_hashes: dict[str, str]) -> dict[str, Any]:
    """What the manifest says about SRC: its name and shard hashes, never where it sat.

    A local directory is named by its own name (the path says where it was, not what it is).
    """
    return {
        "name": resolved.path.name if resolved.source == "local" else resolved.name,
        "repo_id": resolved.repo_id,
        "model_type": model_type,
        "weights_format": resolved.weights_format,
        "shards": shard_hashes,
    }


def _conversion_record(t0: float, plan, calibration, tuning) -> dict[str, Any]:
    """The manifest's ``conversion`` block: time, options, and the group size and why.

    Files given on the command line are kept by name and hash, not path: the manifest travels with
    the checkpoint and should say what went in, not where it sat on this machine.
    """
    return {
        "seconds": round(time.time() - t0, 2),
        "options": {
            "samples": getattr(plan, "samples", None),
            "seq_len": getattr(plan, "seq_len", None),
            "sym": getattr(plan, "sym", None),
            "gptaq_alpha": GPTAQ_ALPHA if plan else None,
            "tune_epochs": getattr(plan, "tune_epochs", None),
            "calibration": Path(calibration).name if calibration else "builtin",
            "calibration_sha256": sha256_file(Path(calibration)) if calibration else None,
        },
        "group_size_note": plan.group_note if plan else None,
        "scale_tuning": tuning.to_dict() if tuning is not None else None,
    }


def _compute_dtype(config: dict) -> torch.dtype:
    name = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16").replace("torch.", "")
    return {"float32": torch.float32, "float16": torch.float16}.get(name, torch.bfloat16)
