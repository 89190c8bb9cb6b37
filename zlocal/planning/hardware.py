"""Hardware profiler: what this machine has (GPUs, CPU, RAM, disk, usable kernels), as a
``HardwareReport`` that round-trips through JSON, and simulated machines from ``profiles/*.toml``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from zlocal.errors import PlanError
from zlocal.paths import cache_dir, profiles_dir

GB = 1000**3
GIB = 1024**3
# Used when a GPU is not in profiles/ and NVML gives no bus width/clock: a mid-range card.
DEFAULT_GPU_BANDWIDTH_GBS = 300.0
DEFAULT_CPU_BANDWIDTH_GBS = 20.0


@dataclass
class GpuInfo:
    """One accelerator as torch (and NVML when present) reports it."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int
    compute_capability: str = ""
    bf16: bool = False
    bandwidth_gbs: float = DEFAULT_GPU_BANDWIDTH_GBS
    backend: str = "cuda"  # "cuda", "rocm" or "mps"


@dataclass
class CpuInfo:
    """The host CPU; ``bandwidth_gbs`` is measured (or taken from a profile)."""

    model: str
    cores: int
    threads: int
    isa: list[str] = field(default_factory=list)
    bandwidth_gbs: float = DEFAULT_CPU_BANDWIDTH_GBS


@dataclass
class HardwareReport:
    """Everything the planner needs to know about a machine."""

    source: str
    cpu: CpuInfo
    ram_total_bytes: int
    ram_available_bytes: int
    disk_free_bytes: int = 0
    gpus: list[GpuInfo] = field(default_factory=list)
    kernels: dict[str, bool] = field(default_factory=dict)
    torch_version: str = ""
    platform: str = ""

    @property
    def gpu(self) -> GpuInfo | None:
        """The GPU the planner uses (the one with the most free memory)."""
        return max(self.gpus, key=lambda g: g.free_bytes) if self.gpus else None

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> HardwareReport:
        """Rebuild a report from ``to_dict`` output; raises PlanError on malformed data."""
        try:
            d = dict(data)
            d["cpu"] = CpuInfo(**d["cpu"])
            d["gpus"] = [GpuInfo(**g) for g in d.get("gpus", [])]
            return cls(**d)
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(
                f"not a hardware report ({exc.__class__.__name__}: {exc}); "
                "create one with `zlocal profile --json > FILE.json`"
            ) from exc

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> HardwareReport:
        """Read a report written by ``zlocal profile --json``."""
        p = Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PlanError(f"cannot read hardware file {p.name}: {exc.__class__.__name__}: {exc}") from exc
        if not isinstance(data, dict):
            raise PlanError(f"{p.name} is not a hardware report (expected a JSON object)")
        return cls.from_dict(data)


# -- profiles ------------------------------------------------------------------------------------
def list_profiles(kind: str | None = None) -> dict[str, dict]:
    """All profiles in ``profiles/`` keyed by name, optionally only one kind (gpu, cpu, model)."""
    out = {}
    directory = profiles_dir()
    for path in sorted(directory.glob("*.toml")) if directory.is_dir() else []:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise PlanError(f"profile {path.name} is not valid TOML: {exc}") from exc
        if kind is None or data.get("kind") == kind:
            out[data.get("name", path.stem)] = data
    return out


def hardware_from_profile(name: str) -> HardwareReport:
    """A simulated machine from a gpu or cpu profile."""
    machines = {**list_profiles("gpu"), **list_profiles("cpu")}
    if name not in machines:
        raise PlanError(f"unknown machine profile {name!r}; known: {', '.join(sorted(machines)) or 'none'}")
    prof = machines[name]
    host = prof["host"]
    cpu = CpuInfo(
        model=host.get("cpu", "CPU"),
        cores=int(host["cpu_cores"]),
        threads=int(host["cpu_cores"]),
        isa=list(host.get("isa", [])),
        bandwidth_gbs=float(host["cpu_bandwidth_gbs"]),
    )
    gpus = []
    if prof["kind"] == "gpu":
        g = prof["gpu"]
        cc = str(g["compute_capability"])
        gpus.append(
            GpuInfo(
                index=0,
                name=g["name"],
                total_bytes=int(g["vram_gb"] * GIB),
                free_bytes=int(g["free_vram_gb"] * GIB),
                compute_capability=cc,
                bf16=float(cc) >= 8.0,
                bandwidth_gbs=float(g["bandwidth_gbs"]),
            )
        )
    report = HardwareReport(
        source=f"profile:{name}",
        cpu=cpu,
        ram_total_bytes=int(host["ram_gb"] * GIB),
        ram_available_bytes=int(host["ram_available_gb"] * GIB),
        disk_free_bytes=200 * GIB,
        gpus=gpus,
    )
    report.kernels = _assumed_kernels(report)
    return report


def _assumed_kernels(report: HardwareReport) -> dict[str, bool]:
    """Kernels a simulated machine would have with zlocal's default install."""
    gpu = report.gpu
    cc = float(gpu.compute_capability) if gpu and gpu.compute_capability else 0.0
    return {
        "torch_int8_cpu": True,
        "torch_int4_cpu": True,
        "zlocal_int4_cpu": "avx512_bf16" in report.cpu.isa,
        "zlocal_int8_cpu": "avx512_bf16" in report.cpu.isa,
        "bitsandbytes_cuda": gpu is not None,
        "torch_int4_cuda": cc >= 8.0,
        "gptqmodel_marlin": False,
        "gptqmodel_exllama": False,
        "gptqmodel_torch": False,
    }


def _gpu_bandwidth(name: str) -> float:
    """Bandwidth of a known card by name (longest matching profile name), else a default."""
    best, best_len = DEFAULT_GPU_BANDWIDTH_GBS, 0
    for prof in list_profiles("gpu").values():
        pname = prof["gpu"]["name"].lower()
        if pname in name.lower() and len(pname) > best_len:
            best, best_len = float(prof["gpu"]["bandwidth_gbs"]), len(pname)
    return best


# -- this machine --------------------------------------------------------------------------------
def _cpu_model_and_flags() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    wanted = [
        "avx",
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
        "avx512_vnni",
        "avx512_bf16",
        "amx_tile",
        "amx_bf16",
        "amx_int8",
        "neon",
        "asimd",
        "sve",
    ]
    return model, [f for f in wanted if f in flags]


def measure_cpu_bandwidth(megabytes: int = 256, repeats: int = 3) -> float:
    """Read bandwidth in GB/s: the best of a few full reductions over a buffer larger than cache."""
    import torch

    buf = torch.ones(megabytes * 1024 * 1024 // 4, dtype=torch.float32)
    buf.sum()  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return round(buf.numel() * 4 / best / GB, 1)


def _nvml_free(index: int) -> int | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).free)
    except (pynvml.NVMLError, OSError):  # no driver access: the torch numbers stand in
        return None


def _torch_gpus() -> list[GpuInfo]:
    import torch

    gpus = []
    if torch.cuda.is_available():
        backend = "rocm" if getattr(torch.version, "hip", None) else "cuda"
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            nvml_free = _nvml_free(i) if backend == "cuda" else None
            cc = f"{props.major}.{props.minor}"
            gpus.append(
                GpuInfo(
                    index=i,
                    name=props.name,
                    total_bytes=int(total),
                    free_bytes=int(nvml_free if nvml_free is not None else free),
                    compute_capability=cc,
                    bf16=props.major >= 8,
                    bandwidth_gbs=_gpu_bandwidth(props.name),
                    backend=backend,
                )
            )
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        import psutil

        vm = psutil.virtual_memory()  # unified memory: the GPU shares the RAM
        gpus.append(
            GpuInfo(
                index=0,
                name="Apple MPS",
                total_bytes=int(vm.total),
                free_bytes=int(vm.available),
                bf16=True,
                bandwidth_gbs=100.0,
                backend="mps",
            )
        )
    return gpus


def _kernels(gpus: list[GpuInfo]) -> dict[str, bool]:
    import torch

    from zlocal.kernels import cpu_kernels

    own = cpu_kernels.kernels() is not None  # one build serves both formats
    has = importlib.util.find_spec
    cuda = any(g.backend == "cuda" for g in gpus)
    cc = max((float(g.compute_capability) for g in gpus if g.compute_capability), default=0.0)
    gptq = has("gptqmodel") is not None
    return {
        "torch_int8_cpu": hasattr(torch, "_weight_int8pack_mm"),
        "torch_int4_cpu": hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"),
        "zlocal_int4_cpu": own,
        "zlocal_int8_cpu": own,
        "bitsandbytes_cuda": cuda and has("bitsandbytes") is not None,
        # PyTorch's int4 kernel (zlocal.formats.cuda_int4) is built for sm80 and newer
        "torch_int4_cuda": cuda and cc >= 8.0 and hasattr(torch, "_weight_int4pack_mm"),
        "gptqmodel_marlin": gptq and cuda and cc >= 8.0,
        "gptqmodel_exllama": gptq and cuda,
        "gptqmodel_torch": gptq,
    }


def profile_machine(measure_bandwidth: bool = True) -> HardwareReport:
    """Profile this machine. Works without a GPU; takes well under a second."""
    import psutil
    import torch

    model, isa = _cpu_model_and_flags()
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    cpu = CpuInfo(
        model=model,
        cores=int(cores),
        threads=int(os.cpu_count() or cores),
        isa=isa,
        bandwidth_gbs=measure_cpu_bandwidth() if measure_bandwidth else DEFAULT_CPU_BANDWIDTH_GBS,
    )
    vm = psutil.virtual_memory()
    cache = cache_dir()
    probe = cache if cache.exists() else Path.home()
    try:
        disk_free = shutil.disk_usage(probe).free
    except OSError:
        disk_free = 0
    gpus = _torch_gpus()
    return HardwareReport(
        source="this machine",
        cpu=cpu,
        ram_total_bytes=int(vm.total),
        ram_available_bytes=int(vm.available),
        disk_free_bytes=int(disk_free),
        gpus=gpus,
        kernels=_kernels(gpus),
        torch_version=torch.__version__,
        platform=f"{platform.system()} {platform.machine()}",
    )


def describe(report: HardwareReport) -> str:
    """Human-readable summary for ``zlocal profile``."""
    lines = [f"machine: {report.source} ({report.platform or 'simulated'})"]
    c = report.cpu
    lines.append(
        f"cpu: {c.model}, {c.cores} cores / {c.threads} threads, ISA {' '.join(c.isa) or '-'}, "
        f"~{c.bandwidth_gbs:g} GB/s read"
    )
    lines.append(
        f"ram: {report.ram_total_bytes / GIB:.1f} GiB total, "
        f"{report.ram_available_bytes / GIB:.1f} GiB available"
    )
    if report.disk_free_bytes:
        lines.append(f"disk: {report.disk_free_bytes / GIB:.1f} GiB free in the cache dir")
    if not report.gpus:
        lines.append("gpu: none")
    for g in report.gpus:
        lines.append(
            f"gpu {g.index}: {g.name} ({g.backend}), {g.total_bytes / GIB:.1f} GiB total, "
            f"{g.free_bytes / GIB:.1f} GiB free, compute capability {g.compute_capability or '-'}, "
            f"bf16 {'yes' if g.bf16 else 'no'}, ~{g.bandwidth_gbs:g} GB/s"
        )
    usable = [k for k, v in report.kernels.items() if v]
    lines.append(f"kernels: {', '.join(usable) or 'none'}")
    return "\n".join(lines)
