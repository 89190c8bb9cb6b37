"""The prepared form: a loaded CPU model saved in its kernels' layout, memory-mapped on later loads.

Quantizing a 7B model on load takes half a minute or more; llama.cpp maps a file already in its
kernels' layout. After a load whose decoder runs on zlocal's int4/int8 modules the model's tensors
are written once, as they sit in memory
after ``prepare_decoder`` - packed codes, scales, the fused q/k/v and gate/up weights - to
``weights.bin``, each storage once, at page-aligned offsets; ``prepared.json`` records every tensor
(offset, dtype, shape, stride) and every module that is not the plain HF one (which quantized module,
which fused projection). A later load builds the HF skeleton on the meta device, points every tensor
at the mapped file (no copy) and rebuilds the prepared decoder from the record.

This is zlocal's own layout, tied to the kernels' packing, the zlocal and torch versions; it is not a
checkpoint format and nothing outside zlocal reads it. The cache key (``prepared_key``) covers all of
them, so an entry written by another build is never loaded, only evicted.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import mmap
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from zlocal.checkpoint.checkpoint_io import ST_DTYPES, dtype_name
from zlocal.checkpoint.prepared_cache import ENTRY_META, ENTRY_WEIGHTS, TMP_PREFIX
from zlocal.kernels.cpu_quant import Int4WeightOnlyLinear, Int8WeightOnlyLinear
from zlocal.kernels.dense_kernels import DenseLinear
from zlocal.progress import report

FORM_VERSION = 1
_ALIGN = 4096
_PROJECTIONS = ("qkv", "o", "gate_up", "down")
_QUANT = {cls.__name__: cls for cls in (Int4WeightOnlyLinear, Int8WeightOnlyLinear)}


class NotPreparable(Exception):
    """The loaded model holds something the prepared form cannot record (the reason is the message)."""


def _quant_spec(m: nn.Module) -> dict:
    spec = {
        "kind": type(m).__name__,
        "in": m.in_features,
        "out": m.out_features,
        "bias": m.bias is not None,
        "dtype": dtype_name(m.dtype),
        "layout": m.layout,
    }
    if isinstance(m, Int4WeightOnlyLinear):
        spec["group_size"] = m.group_size
    return spec


def _projection_spec(proj: nn.Module, names: dict[int, str], prefix: str, tensors: dict) -> dict:
    """How to rebuild one projection of the prepared decoder: an HF module by name, a fused module
    whose tensors are recorded under ``prefix``, or a dense weight."""
    from zlocal.inference.prepare import ConcatLinear

    if id(proj) in names:
        return {"module": names[id(proj)]}
    if isinstance(proj, ConcatLinear):
        if not all(id(p) in names for p in proj.parts):
            raise NotPreparable("a concatenated projection of unregistered modules")
        return {"concat": [names[id(p)] for p in proj.parts]}
    if type(proj) in (Int4WeightOnlyLinear, Int8WeightOnlyLinear):
        for key, buf in proj.named_buffers():
            tensors[f"{prefix}.{key}"] = buf
        return {"fused": _quant_spec(proj), "tensors": prefix}
    if isinstance(proj, DenseLinear):
        tensors[f"{prefix}.weight"] = proj.weight
        return {"dense": f"{prefix}.weight"}
    raise NotPreparable(f"a {type(proj).__name__} projection (oneDNN-packed or foreign weights)")


def describe(model: nn.Module, prepared) -> tuple[dict, dict[str, torch.Tensor]]:
    """The record of ``model`` and its prepared decoder, and every tensor to save by name.
    Raises NotPreparable when some module is neither an HF module built from the config nor one of
    zlocal's int4/int8 modules."""
    names = {id(m): n for n, m in model.named_modules()}
    modules, tensors = {}, {}
    for name, m in model.named_modules():
        if type(m) in (Int4WeightOnlyLinear, Int8WeightOnlyLinear):
            modules[name] = _quant_spec(m)
        elif m.__class__.__module__.split(".")[0] not in ("torch", "transformers"):
            raise NotPreparable(f"{name} is a {type(m).__name__}")
    if not modules:
        raise NotPreparable("no layer runs on zlocal's int4/int8 modules")
    for key, t in [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]:
        tensors[key] = t
    layers = []
    for i, lw in enumerate(prepared.layers):
        layers.append(
            {p: _projection_spec(getattr(lw, p), names, f"prepared.{i}.{p}", tensors) for p in _PROJECTIONS}
        )
    head = prepared.lm_head
    if id(head) not in names:
        raise NotPreparable("the head is not a module of the model")
    record = {"modules": modules, "layers": layers, "head": names[id(head)]}
    gen = getattr(model, "generation_config", None)
    if gen is not None:  # from_pretrained read it; the mapped load's from_config would not
        record["generation_config"] = gen.to_dict()
    return record, tensors


def _storages(tensors: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], dict[str, dict]]:
    """Each distinct storage once (as a uint8 tensor over it) and where every tensor sits in one."""
    blobs, where, index = [], {}, {}
    for name, t in tensors.items():
        if t.device.type != "cpu" or t.layout != torch.strided or t.is_quantized or t.is_meta:
            raise NotPreparable(f"{name} is not a plain CPU tensor")
        if dtype_name(t.dtype) not in ST_DTYPES:
            raise NotPreparable(f"{name} has dtype {t.dtype}")
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in index:
            index[ptr] = len(blobs)
            blobs.append(torch.empty(0, dtype=torch.uint8).set_(st))
        where[name] = {
            "blob": index[ptr],
            "dtype": dtype_name(t.dtype),
            "shape": list(t.shape),
            "stride": list(t.stride()),
            "offset": t.storage_offset(),
        }
    return blobs, where


@dataclass(frozen=True)
class Layout:
    """Where everything of one prepared form goes: the record, each storage once and its offset."""

    record: dict
    blobs: list[torch.Tensor]  # uint8 views of the storages, in file order
    where: dict[str, dict]  # tensor name -> storage index, dtype, shape, stride, offset
    offsets: list[int]
    size: int  # bytes of weights.bin


def layout(model: nn.Module, prepared) -> Layout:
    """Lay out ``model`` and its prepared decoder for saving (nothing is written or copied).
    Raises NotPreparable for a model the form cannot record."""
    record, tensors = describe(model, prepared)
    blobs, where = _storages(tensors)
    offsets, pos = [], 0
    for b in blobs:
        offsets.append(pos)
        pos += -(-b.numel() // _ALIGN) * _ALIGN
    return Layout(record, blobs, where, offsets, pos)


def save_prepared(folder: Path, lay: Layout, meta: dict, progress=None) -> int:
    """Write the laid-out form into ``folder`` (which must not exist: it is built beside it and
    renamed into place); returns its size in bytes."""
    blobs, offsets, pos = lay.blobs, lay.offsets, lay.size
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{folder.name}-", dir=folder.parent))
    try:
        with open(tmp / ENTRY_WEIGHTS, "wb") as f:
            for i, (b, off) in enumerate(zip(blobs, offsets, strict=True)):
                f.seek(off)
                f.write(memoryview(b.numpy()))
                report(progress, "save", off + b.numel(), pos, message=f"storage {i + 1}/{len(blobs)}")
            f.truncate(pos)
            f.flush()
            os.fsync(f.fileno())  # renamed into place only once its bytes are on disk
        doc = {
            **meta,
            "form_version": FORM_VERSION,
            "created": time.time(),
            "size": pos,
            "blobs": [{"offset": o, "bytes": b.numel()} for o, b in zip(offsets, blobs, strict=True)],
            "tensors": lay.where,
            **lay.record,
        }
        (tmp / ENTRY_META).write_text(json.dumps(doc))
        os.replace(tmp, folder)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return pos


def _mapped_tensors(folder: Path, doc: dict) -> dict[str, torch.Tensor]:
    path = folder / ENTRY_WEIGHTS
    if path.stat().st_size != doc["size"]:
        raise ValueError(f"{path} has {path.stat().st_size} bytes, its record says {doc['size']}")
    with open(path, "rb") as f:
        # private and copy-on-write: the tensors are writable for torch, the file is never changed
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if doc["size"] else None
    _populate(mm, doc["size"])
    bases: dict[tuple[int, str], torch.Tensor] = {}
    out = {}
    for name, w in doc["tensors"].items():
        dtype = ST_DTYPES[w["dtype"]]
        key = (w["blob"], w["dtype"])
        if key not in bases:
            blob = doc["blobs"][w["blob"]]
            item = torch.empty(0, dtype=dtype).element_size()
            count = blob["bytes"] // item
            bases[key] = (
                torch.frombuffer(mm, dtype=dtype, count=count, offset=blob["offset"])
                if count
                else torch.empty(0, dtype=dtype)
            )
        out[name] = bases[key].as_strided(w["shape"], w["stride"], w["offset"])
    return out


def _populate(mm, size: int) -> None:
    """Map the file's pages into the process in the background (MADV_POPULATE_READ, Linux 5.14+,
    through ctypes so the GIL is released), instead of one fault per 16 pages while the first tokens
    run; the load returns at once, as llama.cpp's does, and the first generation overlaps the rest.
    Older kernels and other systems get read-ahead (MADV_WILLNEED) only."""
    if mm is None:
        return
    with contextlib.suppress(OSError, ValueError, AttributeError):
        mm.madvise(mmap.MADV_WILLNEED)
    madvise = _libc_madvise()
    if madvise is None:
        return
    whole = torch.frombuffer(mm, dtype=torch.uint8, count=size)  # holds the map while the call runs
    threading.Thread(
        target=madvise,
        args=(whole.data_ptr(), size, _MADV_POPULATE_READ, whole),
        daemon=True,
        name="zlocal-populate",
    ).start()


_MADV_POPULATE_READ = 22


@functools.cache
def _libc_madvise():
    if not sys.platform.startswith("linux"):  # the advice's number is Linux's
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int

    def call(addr: int, size: int, advice: int, keep) -> None:
        fn(addr, size, advice)  # an old kernel's EINVAL only loses the head start
        del keep

    return call


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _quant_module(spec: dict) -> nn.Module:
    cls = _QUANT[spec["kind"]]
    args = [spec["in"], spec["out"], spec["bias"], ST_DTYPES[spec["dtype"]]]
    if "group_size" in spec:
        args.append(spec["group_size"])
    with torch.device("meta"):  # the buffers are the mapped tensors, assigned next
        return cls(*args, layout=spec["layout"])


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    m = model.get_submodule(owner) if owner else model
    if attr in m._parameters:
        m._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        m._buffers[attr] = value


def _fused(spec: dict, prefix: str, tensors: dict[str, torch.Tensor]) -> nn.Module:
    m = _quant_module(spec)
    for key, buf in list(m._buffers.items()):
        name = f"{prefix}.{key}"
        if name in tensors:  # the code table too, where the module had one
            m._buffers[key] = tensors[name]
        elif buf is not None:
            raise KeyError(f"the prepared form lacks {name}")
    return m


def _projection(spec: dict, model: nn.Module, tensors: dict) -> nn.Module:
    from zlocal.inference.prepare import ConcatLinear

    if "module" in spec:
        return model.get_submodule(spec["module"])
    if "concat" in spec:
        return ConcatLinear([model.get_submodule(n) for n in spec["concat"]])
    if "fused" in spec:
        return _fused(spec["fused"], spec["tensors"], tensors)
    return DenseLinear(tensors[spec["dense"]])


def load_prepared(folder: Path, config, progress=None):
    """The model saved in ``folder`` with every tensor mapped from its file, and its prepared decoder
    registered (``prepare_decoder(model)`` returns it). Raises ValueError/KeyError/OSError on an
    entry that does not match its record (the caller then loads from the checkpoint)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from zlocal.inference.prepare import LayerWeights, PreparedDecoder, register_prepared

    doc = json.loads((folder / ENTRY_META).read_text())
    if doc.get("form_version") != FORM_VERSION:
        raise ValueError(f"prepared form version {doc.get('form_version')}, this zlocal reads {FORM_VERSION}")
    dtype = ST_DTYPES[doc["compute_dtype"]]
    with init_empty_weights(include_buffers=True):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, spec in doc["modules"].items():
        _set_module(model, name, _quant_module(spec))
    tensors = _mapped_tensors(folder, doc)
    report(progress, "map", doc["size"], doc["size"])
    for name in [*dict(model.named_parameters(remove_duplicate=False)), *dict(model.named_buffers())]:
        if name not in tensors:
            raise KeyError(f"the prepared form lacks {name}")
    for name, value in tensors.items():
        if not name.startswith("prepared."):
            _assign(model, name, value)
    inner = model.model
    layers = []
    for hf_layer, specs in zip(inner.layers, doc["layers"], strict=True):
        attn = hf_layer.self_attn
        proj = {p: _projection(specs[p], model, tensors) for p in _PROJECTIONS}
        layers.append(
            LayerWeights(
                input_norm=hf_layer.input_layernorm.weight,
                input_eps=hf_layer.input_layernorm.variance_epsilon,
                attn_scale=attn.scaling,
                post_norm=hf_layer.post_attention_layernorm.weight,
                post_eps=hf_layer.post_attention_layernorm.variance_epsilon,
                **proj,
            )
        )
    register_prepared(
        model,
        PreparedDecoder(
            embed=inner.embed_tokens, layers=layers, norm=inner.norm, lm_head=model.get_submodule(doc["head"])
        ),
    )
    if "generation_config" in doc:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_dict(doc["generation_config"])
    model.eval()
    return model, doc
