"""Hardware profiler and the machine/model profiles in profiles/."""

from __future__ import annotations

import json

import pytest

from zlocal import cli
from zlocal.errors import PlanError
from zlocal.planning.hardware import HardwareReport, hardware_from_profile, list_profiles, profile_machine
from zlocal.planning.memory import GIB

# The GPUs issue 4 asks for: profile name -> (VRAM GB, compute capability)
REQUIRED_GPUS = {
    "gtx-1660-6gb": (6, "7.5"),
    "rtx-2060-6gb": (6, "7.5"),
    "rtx-3060-12gb": (12, "8.6"),
    "rtx-3060-ti-8gb": (8, "8.6"),
    "rtx-3070-8gb": (8, "8.6"),
    "rtx-3080-10gb": (10, "8.6"),
    "rtx-3090-24gb": (24, "8.6"),
    "rtx-4060-8gb": (8, "8.9"),
    "rtx-4060-ti-16gb": (16, "8.9"),
    "rtx-4070-12gb": (12, "8.9"),
    "rtx-4080-16gb": (16, "8.9"),
    "rtx-4090-24gb": (24, "8.9"),
}


@pytest.fixture(scope="module")
def this_machine():
    return profile_machine(measure_bandwidth=False)


def test_profile_this_machine(this_machine):
    hw = this_machine
    assert hw.cpu.cores >= 1 and hw.cpu.threads >= hw.cpu.cores
    assert 0 < hw.ram_available_bytes <= hw.ram_total_bytes
    assert hw.kernels["torch_int8_cpu"] and hw.kernels["torch_int4_cpu"]
    import torch

    assert bool(hw.gpus) == (torch.cuda.is_available() or torch.backends.mps.is_available())
    if not torch.cuda.is_available():
        assert not hw.kernels["bitsandbytes_cuda"]


def test_report_json_round_trip(this_machine, tmp_path):
    path = tmp_path / "hw.json"
    path.write_text(this_machine.to_json())
    assert HardwareReport.from_json_file(path) == this_machine
    sim = hardware_from_profile("rtx-3060-12gb")
    assert HardwareReport.from_dict(json.loads(sim.to_json())) == sim


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"source": "x"}'])
def test_bad_hardware_file_is_a_plan_error(tmp_path, content):
    path = tmp_path / "hw.json"
    path.write_text(content)
    with pytest.raises(PlanError):
        HardwareReport.from_json_file(path)


@pytest.mark.parametrize("name", sorted(REQUIRED_GPUS))
def test_gpu_profiles(name):
    vram, cc = REQUIRED_GPUS[name]
    hw = hardware_from_profile(name)
    gpu = hw.gpu
    assert gpu.total_bytes == vram * GIB and 0 < gpu.free_bytes < gpu.total_bytes
    assert gpu.compute_capability == cc and gpu.bf16 == (float(cc) >= 8.0)
    assert 150 <= gpu.bandwidth_gbs <= 1100
    assert hw.ram_available_bytes < hw.ram_total_bytes and hw.cpu.bandwidth_gbs > 0


def test_cpu_laptop_profile():
    hw = hardware_from_profile("cpu-laptop-16gb")
    assert hw.gpus == [] and hw.ram_total_bytes == 16 * GIB and hw.ram_available_bytes < 16 * GIB


@pytest.mark.parametrize("name", ["zephyr-7b-beta", "zephyr-7b-alpha"])
def test_model_profiles(name):
    prof = list_profiles("model")[name]
    assert prof["repo"] == f"HuggingFaceH4/{name}" and prof["template"] == "zephyr"
    s = prof["shape"]
    assert (s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]) == (4096, 14336, 32)
    assert (s["num_attention_heads"], s["num_key_value_heads"], s["head_dim"], s["vocab_size"]) == (
        32,
        8,
        128,
        32000,
    )


def test_unknown_profile_lists_machines():
    with pytest.raises(PlanError, match="rtx-4090-24gb"):
        hardware_from_profile("rtx-9999")
    with pytest.raises(PlanError):
        hardware_from_profile("zephyr-7b-beta")  # a model, not a machine


def test_cli_profile_json(capsys):
    assert cli.main(["profile", "--json"]) == 0
    report = HardwareReport.from_dict(json.loads(capsys.readouterr().out))
    assert report.source == "this machine" and report.cpu.bandwidth_gbs > 0


def test_cli_profile_simulated_and_list(capsys):
    assert cli.main(["profile", "--profile", "rtx-4090-24gb"]) == 0
    assert "RTX 4090" in capsys.readouterr().out
    assert cli.main(["profile", "--list"]) == 0
    assert "cpu-laptop-16gb" in capsys.readouterr().out
    assert cli.main(["profile", "--profile", "nope"]) == PlanError.exit_code
    assert "unknown machine profile" in capsys.readouterr().err
