"""Dense (bf16/fp16/fp32) weights for one-token products: oneDNN's packed layout, ``torch.mv`` or
``F.linear``, whichever this CPU runs fastest, all bit-identical to ``F.linear`` (checked once per CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zlocal.kernels.cpu_prompt import bf16_gemm_is_fast

_KERNEL: dict[torch.dtype, str] = {}
_EXACT: dict[torch.dtype, bool] = {}


def _packs(weight: torch.Tensor) -> bool:
    """Whether the lean forward keeps ``weight`` packed for oneDNN (see ``dense_kernel``)."""
    return weight.device.type == "cpu" and dense_kernel(weight.dtype) == "packed"


def packing_supported(dtype: torch.dtype) -> bool:
    """Whether oneDNN can pack a ``dtype`` weight on this CPU with results bit-identical to
    ``F.linear`` (which goes through oneDNN unpacked). Only bf16 is packed, and only after a
    one-time check on this CPU that both calls agree bit for bit, so zlocal's bf16 numbers stay
    those of transformers' own matmuls."""
    if dtype != torch.bfloat16 or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    if not bf16_gemm_is_fast():
        return False
    if dtype not in _EXACT:
        _EXACT[dtype] = _packing_is_exact(dtype)
    return _EXACT[dtype]


@torch.inference_mode()
def _packing_is_exact(dtype: torch.dtype) -> bool:
    # The reduction length is what could change the summation order; 576, 1536 and 4096 are the
    # inner sizes of SmolLM2's and Mistral-7B's projections.
    gen = torch.Generator().manual_seed(0)
    for k in (576, 1536, 4096):
        w = torch.randn(128, k, generator=gen).to(dtype)
        packed = pack_weight(w)
        for t in (1, 5):
            x = torch.randn(1, t, k, generator=gen).to(dtype)
            if not torch.equal(_packed_linear(x, packed), F.linear(x, w)):
                return False
    return True


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [out, in] reordered into oneDNN's blocked layout (an opaque CPU tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)


def _packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


class PackedLinear(nn.Module):
    """A bias-free Linear whose weight lives in oneDNN's packed layout.

    ``F.linear`` in bf16 goes through oneDNN too, but reorders the weight on every call; keeping
    it packed reads it up to 2x faster for one token (SmolLM2's output layer: 3.4 -> 2.0 ms on a
    2-core AMD EPYC VM) with bit-identical results. Several projections of one input (q/k/v,
    gate/up) share one packed weight; ``rows`` selects this module's outputs of it, so the HF
    forward stays correct while the lean forward makes one call (``full_forward``).
    """

    def __init__(self, packed: torch.Tensor, in_features: int, out_features: int, rows=None):
        super().__init__()
        # a non-persistent buffer: counted in model.buffers() once however many modules share it
        self.register_buffer("packed", packed, persistent=False)
        self.in_features, self.out_features, self.rows = in_features, out_features, rows

    def full_forward(self, x: torch.Tensor) -> torch.Tensor:
        """All rows of the shared packed weight (the fused projection)."""
        return _packed_linear(x, self.packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _packed_linear(x, self.packed)
        return y if self.rows is None else y[..., self.rows[0] : self.rows[1]]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rows={self.rows}"


def dense_kernel(dtype: torch.dtype) -> str:
    """The fastest one-token kernel for a dense ``dtype`` weight on this CPU, timed once per dtype:
    "packed" (oneDNN's packed layout), "mv" (``torch.mv``) or "linear" (``F.linear``).

    All three give bit-identical results (tested), but which is fastest depends on the CPU: on an
    Intel AVX-512 VM the GEMV read bf16 weights ~1.5x faster than the GEMM, on an AMD EPYC VM the
    GEMM was ~1.6x faster than the GEMV and the packed layout ~2x faster than the GEMM. A
    4096x1024 probe takes a few milliseconds.
    """
    if dtype not in _KERNEL:
        import time

        w = torch.randn(4096, 1024).to(dtype)
        x = torch.randn(1, 1024).to(dtype)
        candidates = {"linear": lambda: F.linear(x, w), "mv": lambda: torch.mv(w, x[0])}
        if packing_supported(dtype):
            packed = pack_weight(w)
            candidates["packed"] = lambda: _packed_linear(x, packed)
        best = {}
        for name, fn in candidates.items():
            fn()
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            best[name] = min(times)
        # a kernel other than F.linear must win clearly: timings of a few hundred us are noisy
        fastest = min(best, key=best.get)
        _KERNEL[dtype] = fastest if best[fastest] < 0.9 * best["linear"] else "linear"
    return _KERNEL[dtype]


class DenseLinear(nn.Module):
    """``F.linear(x, weight)``, through ``torch.mv`` for one token where that kernel is faster.

    Decode is bound by reading the weights, and on some CPUs a [1, K] x [K, N] ``mm`` goes through
    a general GEMM that reads them slower than the matrix-vector kernel (see ``dense_kernel``).
    """

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight  # a plain attribute: the HF modules own the parameters (or views of them)
        self.mv = weight.device.type == "cpu" and dense_kernel(weight.dtype) == "mv"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mv and x.numel() == x.shape[-1]:
            return torch.mv(self.weight, x.reshape(-1)).view(*x.shape[:-1], self.weight.shape[0])
        return F.linear(x, self.weight)
