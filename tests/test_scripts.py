"""The scripts in scripts/ still start on a fresh checkout, and the cheap ones run end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "scripts").glob("*.py"))


def _run(*args, timeout=300):
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_help(script):
    r = _run(f"scripts/{script}", "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage:"), r.stderr[-2000:]


def test_plan_table_runs():
    r = _run("scripts/plan_table.py")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("| Machine |") and "| nf4 |" in r.stdout


def test_sweep_kernels_runs(tmp_path):
    out = tmp_path / "sweep.json"
    r = _run("scripts/sweep_kernels.py", "--linear", "3", "--models", "1", "--torch-models", "1",
             "--seed", "3", "--out", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(out.read_text())
    counts = {kind: report[kind]["cases"] for kind in ("linear", "models", "torch_models")}
    assert counts == {"linear": 3, "models": 1, "torch_models": 1}
    assert all(report[kind]["failures"] == [] for kind in counts)
