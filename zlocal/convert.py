"""``zlocal convert``: quantize a checkpoint into a new, verified, self-describing directory.

Every check that can fail (architecture, shard integrity, shapes against the config, group size,
free disk) runs before any work. The output is written into a temporary directory beside OUT and
renamed into place only after the manifest (hashes plus quality report) is written, so an
interrupted run never leaves a half-written OUT; stale temp dirs of dead runs are removed by the
next run.
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

from .errors import CheckpointError, ConversionError, InvalidArgumentError, ZlocalError
from .manifest import Manifest, read_manifest, sha256_file, write_manifest
from .quantize_bnb import (
    BNB_METHODS,
    DEFAULT_MAX_SHARD_BYTES,
    ST_DTYPES,
    TensorEntry,
    bnb_quantization_config,
    estimate_output_bytes,
    quantize_bnb,
    read_header,
)
from .quantize_gptq import GPTAQ_ALPHA

METHODS = {"nf4": 4, "fp4": 4, "int8": 8, "gptq4": 4, "gptq8": 8}
CONVERTIBLE_TYPES = {"mistral", "llama", "qwen2"}
TMP_MARK = ".zlocal-tmp-"
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
    from safetensors.torch import save_file

    out = []
    stage = tmp / ".stage"
    stage.mkdir(exist_ok=True)
    for i, shard in enumerate(shards):
        sd = {k: v.contiguous() for k, v in _load_pickle(shard).items()}
        p = stage / f"src-{i:05d}.safetensors"
        save_file(sd, str(p))
        del sd
        out.append((p, read_header(p)[0]))
    return out


# -- temp dirs and disk --------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temp(out: Path) -> list[Path]:
    """Remove temp dirs left beside OUT by conversions whose process is gone; return them."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.glob(f".{out.name}{TMP_MARK}*"):
        try:
            pid = int((p / ".pid").read_text().strip())
        except (OSError, ValueError):
            pid = -1
        if pid > 0 and _pid_alive(pid):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def free_bytes(path: Path) -> int:
    """Free space on the filesystem holding ``path`` (a function so tests can stand in a full disk)."""
    return shutil.disk_usage(path).free


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
) -> ConvertResult:
    """Quantize SRC into OUT with ``method`` (nf4, fp4, int8, gptq4, gptq8); see the module doc."""
    from .resolve import resolve_model

    t0 = time.time()
    if method not in METHODS:
        raise InvalidArgumentError(f"--method must be one of {', '.join(METHODS)}; got {method!r}")
    bits = METHODS[method]
    if method in BNB_METHODS and (group_size is not None or sym or tune_epochs is not None):
        raise InvalidArgumentError("--group-size, --sym and --tune-epochs apply to gptq4/gptq8 only")
    for flag, value in (("--samples", samples), ("--seq-len", seq_len)):
        if value is not None and value <= 0:
            raise InvalidArgumentError(f"{flag} must be > 0, got {value}")
    for flag, f in (("--calibration", calibration), ("--eval-text", eval_text)):
        if f is not None and not Path(f).is_file():
            raise InvalidArgumentError(f"{flag} {f}: no such file")

    resolved = resolve_model(src, allow_pickle=allow_pickle)
    src_path = resolved.path
    out_path = Path(out).expanduser().absolute()
    if out_path.resolve() == src_path.resolve() or src_path.resolve() in out_path.resolve().parents:
        raise ConversionError(
            f"OUT {out_path} is inside SRC; choose a directory outside the source checkpoint"
        )
    if out_path.exists() and not overwrite:
        raise ConversionError(
            f"{out_path} already exists; pass --overwrite to replace it or choose another OUT"
        )
    if out_path.exists() and not out_path.is_dir():
        raise ConversionError(f"{out_path} is a file; OUT must be a directory path")
    if not out_path.parent.is_dir():
        raise ConversionError(f"parent directory {out_path.parent} does not exist; create it first")
    clean_stale_temp(out_path)

    config = json.loads((src_path / "config.json").read_text(encoding="utf-8"))
    model_type = _text_config(config).get("model_type") or config.get("model_type")
    if model_type not in CONVERTIBLE_TYPES:
        raise ConversionError(
            f"architecture '{model_type}' cannot be converted "
            f"(supported: {', '.join(sorted(CONVERTIBLE_TYPES))})"
        )
    if config.get("quantization_config"):
        raise ConversionError(
            f"{resolved.name} is already quantized "
            f"({config['quantization_config'].get('quant_method', '?')}); convert the original"
        )
    try:
        shards, parsed, flat = inspect_source(src_path, resolved.weights_format, config)
    except KeyError as exc:
        raise CheckpointError(f"config.json lacks {exc.args[0]}; cannot check tensor shapes") from exc

    gptq_plan = None
    if method.startswith("gptq"):
        from .quantize_gptq import plan_gptq

        gptq_plan = plan_gptq(
            config,
            bits=bits,
            group_size=group_size,
            samples=samples,
            seq_len=seq_len,
            calibration=calibration,
            sym=sym,
            tune_epochs=tune_epochs,
        )
        group_size = gptq_plan.group_size
        if gptq_plan.tune_note and not quiet:
            print(gptq_plan.tune_note, file=sys.stderr)

    source_bytes = sum(p.stat().st_size for p in shards)
    entries = [TensorEntry(n, d, s, 0, _numel(s) * _itemsize(d)) for n, (_, d, s) in flat.items()]
    need = estimate_output_bytes(entries, "int8" if bits == 8 else "nf4")
    if resolved.weights_format == "pickle" or method.startswith("gptq"):
        # a staged safetensors copy of pickle weights; gptqmodel offloads layers to disk as it goes
        need += source_bytes
    need = int(need * 1.05) + (64 << 20)
    have = free_bytes(out_path.parent)
    if have < need:
        raise ConversionError(
            f"not enough disk space in {out_path.parent}: need about {need / 1e9:.2f} GB, "
            f"{have / 1e9:.2f} GB free; free some space or choose another OUT"
        )

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}{TMP_MARK}", dir=out_path.parent))
    try:
        (tmp / ".pid").write_text(str(os.getpid()))
        tuning = None
        source_hashes = {p.name: sha256_file(p) for p in shards}
        compute_dtype = _compute_dtype(config)
        if method in BNB_METHODS:
            if resolved.weights_format == "pickle":
                parsed = _pickle_to_safetensors(shards, tmp)
            total = sum(e.nbytes for _, ents in parsed for e in ents.values())
            with _progress(total, len(flat), f"{method}", quiet) as tick:
                quantize_bnb(
                    parsed,
                    tmp,
                    method,
                    compute_dtype,
                    progress=tick,
                    max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES,
                )
            shutil.rmtree(tmp / ".stage", ignore_errors=True)
            _copy_aux_files(src_path, tmp)
            new_config = dict(config)
            new_config["quantization_config"] = bnb_quantization_config(method, compute_dtype)
            (tmp / "config.json").write_text(json.dumps(new_config, indent=2) + "\n", encoding="utf-8")
        else:
            from .quantize_gptq import quantize_gptq

            tuning = quantize_gptq(
                src_path,
                tmp,
                gptq_plan,
                compute_dtype=compute_dtype,
                quiet=quiet,
                allow_pickle=resolved.weights_format == "pickle",
            )
            _copy_aux_files(src_path, tmp, keep_existing=True)
        (tmp / ".pid").unlink()
        if tuning is not None and not quiet:
            print(
                f"scale tuning: held-out KL {tuning.heldout_kl_before:.5f} -> "
                f"{tuning.heldout_kl_after:.5f} (epoch {tuning.best_epoch} of {tuning.epochs}; "
                f"0 keeps GPTQ's scales), {tuning.seconds:.0f} s",
                file=sys.stderr,
            )
        quality = None
        if evaluate:
            from .quality import evaluate as run_eval

            report = run_eval(tmp, src_path, text=eval_text, quiet=quiet)
            quality = report.to_dict()
            if not quiet:
                print(report.table(), file=sys.stderr)
        manifest = Manifest(
            method=method,
            bits=bits,
            group_size=group_size,
            source={
                "name": resolved.name,
                "path": str(src_path),
                "repo_id": resolved.repo_id,
                "model_type": model_type,
                "weights_format": resolved.weights_format,
                "shards": source_hashes,
            },
            quality=quality,
            conversion={
                "seconds": round(time.time() - t0, 2),
                "options": {
                    "samples": getattr(gptq_plan, "samples", None),
                    "seq_len": getattr(gptq_plan, "seq_len", None),
                    "sym": getattr(gptq_plan, "sym", None),
                    "gptaq_alpha": GPTAQ_ALPHA if gptq_plan else None,
                    "tune_epochs": getattr(gptq_plan, "tune_epochs", None),
                    "calibration": str(calibration) if calibration else "builtin",
                },
                "scale_tuning": tuning.to_dict() if tuning is not None else None,
            },
        )
        from .manifest import library_versions

        manifest.versions = library_versions()
        write_manifest(tmp, manifest)
        _install(tmp, out_path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, ZlocalError | KeyboardInterrupt | SystemExit):
            raise
        raise ConversionError(
            f"conversion failed, nothing was written: {exc.__class__.__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        ) from exc
    m = read_manifest(out_path)
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


def _install(tmp: Path, out: Path) -> None:
    """Move the finished temp dir to OUT; an old OUT (with --overwrite) is removed only afterwards."""
    # mkdtemp and some writers create private (0700/0600) entries; give OUT the usual umask modes.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    for p in tmp.iterdir():
        if p.is_file():
            os.chmod(p, 0o666 & ~umask)
    if out.exists():
        old = out.parent / f".{out.name}{TMP_MARK}old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def _compute_dtype(config: dict) -> torch.dtype:
    name = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16").replace("torch.", "")
    return {"float32": torch.float32, "float16": torch.float16}.get(name, torch.bfloat16)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _itemsize(dtype: str) -> int:
    from .quantize_bnb import ST_ITEMSIZE

    return ST_ITEMSIZE.get(dtype, 4)


class _progress:
    """tqdm over bytes with the tensor count as a postfix; ETA comes from the byte rate."""

    def __init__(self, total_bytes: int, total_tensors: int, desc: str, quiet: bool):
        self.total_bytes, self.total_tensors, self.desc, self.quiet = total_bytes, total_tensors, desc, quiet
        self.done = 0

    def __enter__(self):
        from tqdm import tqdm

        self.bar = tqdm(
            total=self.total_bytes,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=self.desc,
            disable=self.quiet,
            file=sys.stderr,
            dynamic_ncols=True,
        )

        def tick(entry: TensorEntry) -> None:
            self.done += 1
            self.bar.set_postfix_str(f"{self.done}/{self.total_tensors} tensors", refresh=False)
            self.bar.update(entry.nbytes)

        return tick

    def __exit__(self, *exc):
        self.bar.close()
        return False
