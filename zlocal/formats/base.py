"""The interface every weight format implements (see zlocal.formats)."""

from __future__ import annotations

from dataclasses import dataclass

# Share of the CPU's RAM bandwidth one core's worth of a weight-only kernel reaches at batch 1, and
# the ceiling with many cores (measured on the 2-core AMD EPYC VM; see README, Benchmarks).
CPU_SHARE_PER_CORE = 0.5
CPU_SHARE_MAX = 0.9


def kernel_move_note(what: str, swapped: int, why_not: str | None, theirs: str) -> str | None:
    """The plan line after moving a checkpoint's layers onto zlocal's CPU int4 kernel: how many
    moved, and why the others stayed on ``theirs`` (None when nothing is to say)."""
    lines = [f"{what} ({swapped}) run on zlocal's CPU int4 kernel"] if swapped else []
    lines += [f"{what} left on {theirs}: {why_not}"] if why_not else []
    return "; ".join(lines) or None


@dataclass(frozen=True)
class WeightFormat:
    """One way of storing a Linear layer's weight, and what the planner needs to know about it.

    ``name`` is the string plans and CLI flags use. ``quality`` is the prior the planner ranks
    formats by (1.0 = the full-precision model). ``gpu_share`` is the share of the GPU's memory
    bandwidth its CUDA kernels reach at batch 1 (None: it has none). ``smaller_on_cpu`` is the format
    an out-of-memory step-down moves CPU layers to. ``zlocal_kernel``: runs on zlocal's own CPU
    kernels (and its one-call decode kernel).
    """

    name: str
    bits: int
    quality: float
    gpu_share: float | None = None
    smaller_on_cpu: str | None = None
    dense: bool = False
    zlocal_kernel: bool = False
    grouped: bool = False  # per-group scales whose group size the plan states
    # `zlocal convert --method` names that write checkpoints in this format, with their bits
    convert_methods: tuple[tuple[str, int], ...] = ()
    # the ``quant_method`` of the quantization_config its checkpoints carry (None: not a saved format)
    quant_method: str | None = None
    label: str = ""  # how reports name the checkpoints' family ("bitsandbytes", "GPTQ")
    # its CUDA modules run inside zlocal's captured one-token decode graph (zlocal.inference.decode_step)
    gpu_graph: bool = False
    # host memory its library adds once imported (gptqmodel brings torchao and triton), in bytes
    library_bytes: int = 0

    def linear_bytes(self, out_f: int, in_f: int, *, compute_bytes: int, bits: int, group_size: int) -> int:
        """Resident bytes of one (out_f, in_f) Linear weight."""
        raise NotImplementedError

    def cpu_share(self, cores: int, own_kernels: bool = False, compute: str = "bf16") -> float:
        """Share of the CPU's RAM bandwidth this format's CPU kernel reaches with ``cores`` cores
        (``compute``: the plan's compute dtype)."""
        return min(CPU_SHARE_MAX, self._cpu_share_per_core(own_kernels) * max(1, cores))

    def _cpu_share_per_core(self, own_kernels: bool) -> float:
        return CPU_SHARE_PER_CORE

    def one_call_decode(self, own_kernels: bool) -> bool:
        """Whether CPU layers in this format run on zlocal's one-call decode kernel (with bf16
        compute, every layer on the CPU) when this machine has zlocal's kernels."""
        return own_kernels and self.zlocal_kernel

    def runs_on(self, kernels: dict, device: str) -> bool:
        """Whether a machine with these kernel capabilities (HardwareReport.kernels) runs this
        format on ``device`` ("cuda" or "cpu") when the checkpoint is stored in it."""
        return self.why_not_on(kernels, device) is None

    def why_not_on(self, kernels: dict, device: str) -> str | None:
        """Why this machine cannot run the format on ``device``, saying what would fix it (None: it
        can)."""
        return None

    def in_gpu_graph(self) -> bool:
        """Whether its CUDA layers run inside the captured one-token decode graph (dense layers do)."""
        return self.dense or self.gpu_graph

    def gpu_kernel(self) -> str:
        """What runs this format's layers on a CUDA GPU, for plan lines."""
        return "PyTorch's dense kernels" if self.dense else f"{self.label or self.name} CUDA kernels"

    def quantized_on_load(self, kernels: dict, device: str) -> bool:
        """Whether the planner may quantize a full-precision checkpoint into this format at load."""
        return False

    def build_linear(self, module, weight, *, dtype, device: str, group_size: int):
        """The module that runs ``weight`` (a full-precision checkpoint tensor for ``module``, an
        ``nn.Linear`` on the meta device) in this format on ``device``, quantized now; or None to
        keep ``module`` a plain Linear (full-precision formats, shapes the kernels do not take)."""
        return None

    def conversion(self, method: str, bits: int):
        """What ``zlocal convert --method METHOD`` runs to write this format
        (zlocal.conversion.convert_methods)."""
        raise NotImplementedError(f"{self.name} is not written by zlocal convert")

    def use_cpu_kernels(self, model, path, dtype) -> str | None:
        """Move ``model``'s layers loaded in this format (a checkpoint stored in it, loaded on the
        CPU from ``path``) onto zlocal's CPU kernels where they take them; returns the plan line
        saying what moved and what did not, or None when nothing did."""
        return None

    def bits_of(self, source_bits: int | None) -> int:
        """Bits per weight: the checkpoint's own (formats with several widths) or the format's."""
        return self.bits
