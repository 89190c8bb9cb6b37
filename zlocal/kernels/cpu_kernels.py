"""zlocal's own CPU kernels for AVX-512 BF16 CPUs: int4 and int8 weight-only matrix products, and a
one-token decode step through every decoder layer in one call (``DecodeStack``).

Decode reads every weight once per token, so on a CPU it is bound by memory bandwidth. PyTorch's
weight-only kernels fall well short of it on a 2-core AVX-512 VM: on Mistral-7B's gate/up shape
``_weight_int4pack_mm_for_cpu`` reads about 20 GB/s and ``_weight_int8pack_mm`` 23-28 GB/s.
``kernels/cpu_kernels.c`` reads one prefetched sequential stream per thread and computes with bf16
dot-product instructions (the codes are exact in bf16): 44-49 GB/s for both on that shape in the same
run (``scripts/bench_cpu_kernels.py``; the VM's memory speed varies between runs).

The C file ships with the package and is compiled on first use with the system C compiler (about
0.3 s) into zlocal's cache directory, keyed by a hash of the source and flags, then loaded with
ctypes. Before it is used, a self-check compares it with a float reference. Whenever any of that is
impossible (not Linux on x86-64, no AVX-512 BF16, no compiler, a failed build or check, or
``ZLOCAL_CPU_KERNELS=0``), ``kernels()`` returns None and the layers use PyTorch's kernels;
``kernel_status()`` says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from zlocal.errors import InvalidArgumentError
from zlocal.paths import cache_dir

KERNEL_DIR = Path(__file__).resolve().parent  # the C sources sit beside this module
SOURCES = [KERNEL_DIR / "cpu_kernels.c", KERNEL_DIR / "decode.c"]  # one library
HEADERS = [KERNEL_DIR / "cpu_kernels.h"]
CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-fopenmp", "-fPIC"]
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
# the layouts' constraints (see the C file): whole 4-row tiles, whole 64-code chunks per group
TILE_ROWS = 4
CHUNK = 64
MAX_GROUPS = 4096  # int4 groups per row (stack arrays in C)

_status: dict[str, str] = {}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _build(cc: str) -> Path:
    """Compile SOURCES into the cache (once per source, flags and compiler); returns the library."""
    source = b"".join(path.read_bytes() for path in [*SOURCES, *HEADERS])
    key = hashlib.sha256(source + " ".join([cc, *CFLAGS]).encode()).hexdigest()[:16]
    out_dir = cache_dir() / "kernels"
    lib = out_dir / f"cpu_kernels-{key}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".cpu_kernels-", suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        cmd = [cc, *CFLAGS, "-shared", *map(str, SOURCES), "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            last = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
            raise OSError(f"{cc} failed: {last[0]}")
        os.replace(tmp, lib)  # atomic: a concurrent process sees no library or a whole one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


class CpuKernels:
    """The loaded kernels: bf16 activations times weights packed by ``pack_int4`` / ``pack_int8``.

    Every call checks its tensors (dtype, contiguity, shapes) against what the C code supports and
    raises ``InvalidArgumentError`` instead of handing it memory it would read past; the C entry
    points check their shapes again and return ``ZL_EBADSHAPE`` without touching memory."""

    def __init__(self, path: Path):
        self.path = path
        lib = ctypes.CDLL(str(path))
        self._int4 = lib.zl_int4_mm
        self._int4.restype = ctypes.c_int
        self._int4.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 5
        self._int8 = lib.zl_int8_mm
        self._int8.restype = ctypes.c_int
        self._int8.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 4
        self._dequant4 = lib.zl_int4_dequant
        self._dequant4.restype = ctypes.c_int
        self._dequant4.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 4
        self._decode = lib.zl_decode_layers
        self._decode.restype = ctypes.c_int
        pointer, integer = ctypes.c_void_p, ctypes.c_int
        self._decode.argtypes = [pointer] * 3 + [integer] + [pointer] * 2 + [integer]

    # ctypes releases the GIL for the calls, so two runtimes in one process can decode at once
    def int4_mm(
        self, x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
        codes: torch.Tensor | None = None,
    ):
        """``x`` [M, K] bf16 contiguous times the packed weight ([N, K/2] uint8, ``pack_int4``;
        scales and zeros from ``pack_scales``; ``codes``: the values of the 16 codes, ``code_table``,
        or None for 0..15) -> [M, N] bf16."""
        m, k = _rows(x)
        n = packed.shape[0]
        _require(supports_int4(n, k, group_size), f"int4 weight {n}x{k} with group size {group_size}")
        _require_buffer(packed, torch.uint8, n * k // 2, "int4 codes")
        _require_buffer(scales_and_zeros, torch.bfloat16, n * (k // group_size) * 2, "int4 scales")
        y = torch.empty(m, n, dtype=torch.bfloat16)
        err = self._int4(
            x.data_ptr(), packed.data_ptr(), scales_and_zeros.data_ptr(), _codes_ptr(codes), y.data_ptr(),
            m, n, k, group_size, torch.get_num_threads(),
        )
        _raise_for(err, f"int4 product {m}x{k} by {n}x{k}", m * k // group_size)
        return y

    def int8_mm(self, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor):
        """``x`` [M, K] bf16 contiguous times the int8 weight ([N, K], ``pack_int8``) and its
        per-row bf16 ``scales`` -> [M, N] bf16."""
        m, k = _rows(x)
        n = packed.shape[0]
        _require(supports_int8(n, k), f"int8 weight {n}x{k}")
        _require_buffer(packed, torch.int8, n * k, "int8 codes")
        _require_buffer(scales, torch.bfloat16, n, "int8 scales")
        y = torch.empty(m, n, dtype=torch.bfloat16)
        threads = torch.get_num_threads()
        err = self._int8(x.data_ptr(), packed.data_ptr(), scales.data_ptr(), y.data_ptr(), m, n, k, threads)
        _raise_for(err, f"int8 product {m}x{k} by {n}x{k}", 0)
        return y

    def int4_dequantize(
        self, out: torch.Tensor, packed: torch.Tensor, tiled: torch.Tensor, group_size: int,
        codes: torch.Tensor | None = None,
    ):
        """Write the bf16 weights of ``packed`` ([R, K/2], whole tiles) into ``out`` ([R, K] bf16,
        contiguous); ``tiled`` holds those rows' scales and zeros (``pack_scales``' layout), ``codes``
        the code values as for ``int4_mm``."""
        r, k = _rows(out)
        _require(supports_int4(r, k, group_size), f"int4 block {r}x{k} with group size {group_size}")
        _require_buffer(packed, torch.uint8, r * k // 2, "int4 codes")
        _require_buffer(tiled, torch.bfloat16, r * (k // group_size) * 2, "int4 scales")
        err = self._dequant4(packed.data_ptr(), tiled.data_ptr(), _codes_ptr(codes), out.data_ptr(), r, k,
                             group_size, torch.get_num_threads())
        _raise_for(err, f"int4 dequantization of {r}x{k}", 0)


ZL_EBADSHAPE = -2  # kernels/cpu_kernels.h
CODE_COUNT = 16


def code_table(values: torch.Tensor) -> torch.Tensor:
    """The 16 values int4 codes stand for (e.g. bitsandbytes' NF4 table) as the kernels read them:
    16 contiguous bf16 values (each rounded to bf16 once)."""
    _require(values.numel() == CODE_COUNT, f"a code table of {values.numel()} values (it needs 16)")
    return values.detach().reshape(CODE_COUNT).to("cpu", torch.bfloat16).contiguous()


def _codes_ptr(codes: torch.Tensor | None) -> int | None:
    if codes is None:
        return None
    _require_buffer(codes, torch.bfloat16, CODE_COUNT, "int4 code table")
    return codes.data_ptr()


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise InvalidArgumentError(f"zlocal's CPU kernels do not support this {what}; use the torch layout")


def _rows(x: torch.Tensor) -> tuple[int, int]:
    # a pointer to GPU memory would be read as host memory by the C code: refuse it here
    ok = x.dim() == 2 and x.dtype == torch.bfloat16 and x.is_contiguous() and x.device.type == "cpu"
    _require(ok, f"input {x.dtype} {list(x.shape)} on {x.device}")
    _require(x.shape[0] >= 1, "empty input")
    return x.shape[0], x.shape[1]


def _require_buffer(t: torch.Tensor, dtype: torch.dtype, numel: int, what: str) -> None:
    ok = t.dtype == dtype and t.is_contiguous() and t.numel() == numel and t.device.type == "cpu"
    _require(ok, f"{what} ({t.dtype}, {list(t.shape)}, {t.device})")


def _raise_for(err: int, what: str, floats: int) -> None:
    if err == ZL_EBADSHAPE:
        raise InvalidArgumentError(f"zlocal's CPU kernels refused the {what} (unsupported shape)")
    if err:
        raise MemoryError(f"zlocal's CPU kernels could not allocate {floats} floats for the {what}")


class _Mat(ctypes.Structure):
    _fields_ = [
        ("bits", ctypes.c_int), ("N", ctypes.c_int), ("K", ctypes.c_int), ("G", ctypes.c_int),
        ("w", ctypes.c_void_p), ("s", ctypes.c_void_p), ("codes", ctypes.c_void_p),
    ]


class _Layer(ctypes.Structure):
    _fields_ = [
        ("w_in", ctypes.c_void_p), ("w_post", ctypes.c_void_p),
        ("eps_in", ctypes.c_float), ("eps_post", ctypes.c_float),
        ("qkv", _Mat), ("o", _Mat), ("gate_up", _Mat), ("down", _Mat),
        ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p),
    ]


class _Dims(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_int)
        for name in ("layers", "hidden", "heads", "kv_heads", "head_dim", "inter", "max_tokens", "window")
    ] + [("scale", ctypes.c_float)]


@dataclass
class StackLayer:
    """One decoder layer's tensors for ``DecodeStack``: RMSNorm weights and epsilons, the four
    projections as zlocal-layout int4/int8 modules (q/k/v and gate/up fused), and the KV buffers
    ([1, kv_heads, max_tokens, head_dim] bf16)."""

    w_in: torch.Tensor
    eps_in: float
    qkv: torch.nn.Module
    o: torch.nn.Module
    w_post: torch.Tensor
    eps_post: float
    gate_up: torch.nn.Module
    down: torch.nn.Module
    keys: torch.Tensor
    values: torch.Tensor


class DecodeStack:
    """All decoder layers of a Llama/Mistral model for one token in one kernel call
    (``zl_decode_layers``): the same math and rounding points as zlocal's torch forward, without
    the ~40 Python-level ops per layer that dominate a small model's token time."""

    def __init__(self, kernel: CpuKernels, layers: list[StackLayer], *, heads: int, kv_heads: int,
                 head_dim: int, window: int | None, scale: float):
        first = layers[0]
        self._kernel = kernel
        self._layers = layers  # keeps every tensor the pointers below refer to alive
        self._dims = _Dims(
            len(layers), first.w_in.numel(), heads, kv_heads, head_dim, first.down.in_features,
            first.keys.shape[2], window or 0, scale,
        )
        self._array = (_Layer * len(layers))(*(self._layer(lay) for lay in layers))

    @staticmethod
    def _mat(mod) -> _Mat:
        if mod.bits == 8:
            return _Mat(8, mod.out_features, mod.in_features, 0, mod.weight.data_ptr(), mod.scales.data_ptr())
        return _Mat(4, mod.out_features, mod.in_features, mod.group_size, mod.weight.data_ptr(),
                    mod.scales_and_zeros.data_ptr(), _codes_ptr(getattr(mod, "codes", None)))

    def _layer(self, lay: StackLayer) -> _Layer:
        return _Layer(
            lay.w_in.data_ptr(), lay.w_post.data_ptr(), lay.eps_in, lay.eps_post,
            self._mat(lay.qkv), self._mat(lay.o), self._mat(lay.gate_up), self._mat(lay.down),
            lay.keys.data_ptr(), lay.values.data_ptr(),
        )

    def __call__(self, h: torch.Tensor, pos: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Run every layer for the token whose embedding is ``h`` ([hidden] bf16, contiguous;
        overwritten with the last layer's output) at position ``pos``; ``cos``/``sin`` are that
        position's rotary rows (``sin`` with its first half negated). Writes the KV caches."""
        d = self._dims
        _require(0 <= pos < d.max_tokens, f"position {pos} (the cache holds {d.max_tokens})")
        _require_buffer(h, torch.bfloat16, d.hidden, "hidden state")
        for t in (cos, sin):
            _require_buffer(t, torch.bfloat16, d.head_dim, "rotary row")
        err = self._kernel._decode(
            ctypes.addressof(self._dims), ctypes.addressof(self._array), h.data_ptr(), pos,
            cos.data_ptr(), sin.data_ptr(), torch.get_num_threads(),
        )
        _raise_for(err, "decode step", 0)


def stack_supported(layers: list[StackLayer], head_dim: int) -> str | None:
    """Why ``DecodeStack`` cannot run these layers (None when it can)."""
    if head_dim % 16 or head_dim > 256:
        return f"head_dim {head_dim} (needs a multiple of 16, at most 256)"
    for i, lay in enumerate(layers):
        for name in ("qkv", "o", "gate_up", "down"):
            mod = getattr(lay, name)
            quantized = getattr(mod, "layout", None) == "zlocal" and mod.dtype == torch.bfloat16
            if not quantized or mod.bias is not None:
                return f"layer {i} {name} is not a bias-free bf16 int4/int8 layer on zlocal's kernels"
            if not all(t.is_contiguous() and t.device.type == "cpu" for t in mod.buffers()):
                return f"layer {i} {name} has non-contiguous or non-CPU tensors"
        if lay.w_in.dtype != torch.bfloat16 or lay.w_post.dtype != torch.bfloat16:
            return f"layer {i} norms are not bf16"
    return None


def supports_int8(out_features: int, in_features: int) -> bool:
    """Whether an int8 layer's shape fits the kernel's layout."""
    return out_features > 0 and in_features > 0 and out_features % TILE_ROWS == 0 and in_features % CHUNK == 0


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """int8 codes [N, K] -> the kernel's layout: 4-row tiles of 64-byte chunks, [N/4][K/64][4][64]
    (same shape and bytes, so one sequential stream per thread)."""
    n, k = q.shape
    return q.reshape(n // TILE_ROWS, TILE_ROWS, k // CHUNK, CHUNK).transpose(1, 2).contiguous().reshape(n, k)


def unpack_int8(out: torch.Tensor, packed: torch.Tensor) -> None:
    """Write the codes of ``packed`` ([R, K] in ``pack_int8``'s layout, R % 4 == 0) into ``out``."""
    r, k = out.shape
    tiles = packed.view(r // TILE_ROWS, k // CHUNK, TILE_ROWS, CHUNK).transpose(1, 2)
    out.view(r // TILE_ROWS, TILE_ROWS, k // CHUNK, CHUNK).copy_(tiles)


def supports_int4(out_features: int, in_features: int, group_size: int) -> bool:
    """Whether an int4 layer's shape fits the kernel's layout (``zl_int4_shape_ok`` in C)."""
    return (
        out_features > 0
        and in_features > 0
        and out_features % TILE_ROWS == 0
        and in_features % CHUNK == 0
        and group_size > 0
        and (group_size == CHUNK // 2 or group_size % CHUNK == 0)
        and in_features % group_size == 0
        and in_features // group_size <= MAX_GROUPS
    )


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 [N, K] -> the kernel's layout, [N, K/2] uint8 (4-row tiles of 64-code chunks)."""
    n, k = codes.shape
    v = codes.to(torch.uint8).reshape(n // TILE_ROWS, TILE_ROWS, k // CHUNK, 2, CHUNK // 2)
    packed = v[:, :, :, 0] | (v[:, :, :, 1] << 4)  # [tiles, rows, chunks, 32]
    return packed.transpose(1, 2).contiguous().reshape(n, k // 2)


def pack_scales(scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """torch's [K/G, N, 2] scales and zeros -> the kernel's tiles, [N/4, K/G, 4, 2]: one sequential
    stream per thread, like the weights."""
    groups, n, _ = scales_and_zeros.shape
    return scales_and_zeros.reshape(groups, n // TILE_ROWS, TILE_ROWS, 2).transpose(0, 1).contiguous()


def scales_by_row(tiled: torch.Tensor) -> torch.Tensor:
    """The kernel's [N/4, K/G, 4, 2] scales and zeros as a [N, K/G, 2] view-or-copy."""
    tiles, groups, rows, _ = tiled.shape
    return tiled.transpose(1, 2).reshape(tiles * rows, groups, 2)


def unpack_int4(out: torch.Tensor, packed: torch.Tensor) -> None:
    """Write the codes of ``packed`` ([R, K/2], this layout, R % 4 == 0) into ``out`` [R, K]."""
    r, k = out.shape
    v = packed.view(r // TILE_ROWS, k // CHUNK, TILE_ROWS, CHUNK // 2).transpose(1, 2)
    o = out.view(r // TILE_ROWS, TILE_ROWS, k // CHUNK, 2, CHUNK // 2)
    o[:, :, :, 0].copy_(v & 15)
    o[:, :, :, 1].copy_(v >> 4)


def dequantize_int4(
    codes: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, table: torch.Tensor | None = None
) -> torch.Tensor:
    """Float weights [N, K] from codes [N, K] and torch's [K/G, N, 2] scales and zeros: table[q] * scale
    + zero - 8 * scale per group (``table``: ``code_table`` values; None: the integers 0..15)."""
    n, k = codes.shape
    sz = scales_and_zeros.float()
    values = codes.float() if table is None else table.float()[codes.long()]
    w = (values - 8).view(n, k // group_size, group_size) * sz[..., 0].t()[..., None]
    return (w + sz[..., 1].t()[..., None]).view(n, k)


@functools.cache
def kernels() -> CpuKernels | None:
    """The compiled and checked kernels, or None (then ``kernel_status()`` says why)."""
    reason = None
    cc = _compiler()
    if os.environ.get("ZLOCAL_CPU_KERNELS", "1") == "0":
        reason = "disabled by ZLOCAL_CPU_KERNELS=0"
    elif platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        reason = f"needs Linux on x86-64, not {platform.system()} on {platform.machine()}"
    elif missing := [f for f in REQUIRED_CPU_FLAGS if f not in _cpu_flags()]:
        reason = f"CPU lacks {', '.join(missing)}"
    elif cc is None:
        reason = "no C compiler (set CC or install gcc)"
    if reason is None:
        try:
            kernel = CpuKernels(_build(cc))
            from zlocal.kernels.cpu_kernels_check import self_check

            reason = self_check(kernel)
        except (OSError, subprocess.SubprocessError) as exc:
            reason = f"build failed: {exc}"
    if reason is None:
        _status["cpu"] = f"zlocal's AVX-512 BF16 kernels ({kernel.path.name})"
        return kernel
    _status["cpu"] = f"PyTorch's kernels: {reason}"
    return None


def kernel_status() -> str:
    """Which int4/int8 CPU kernels run, and why (builds them if that has not been tried yet)."""
    kernels()
    return _status["cpu"]
