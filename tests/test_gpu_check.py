"""scripts/gpu_check.py runs here in its reduced form (--cpu: tiny shapes, same stages), so the command
meant for the GPU machine cannot rot unnoticed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_cpu_run_writes_its_report(tmp_path):
    assert _script().main(["--cpu", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["environment"]["mode"] == "cpu" and report["total_seconds"] < 120
    errors = {k: v["error"] for k, v in report.items() if isinstance(v, dict) and "error" in v}
    assert not errors, errors
    tests = report["gpu_tests"]
    assert tests["returncode"] == 0 and "skipped" in tests["summary"]  # gpu-marked tests skip here
    for fmt in ("bf16", "int4"):
        r = report[f"format_{fmt}"]
        assert r["cpu_layers"] == report["shape"]["num_hidden_layers"] and r["gpu_layers"] == 0
        for side in ("zlocal", "transformers"):
            assert r[side]["prefill_tok_s"] > 0 and r[side]["decode_tok_s"] > 0
        assert r["zlocal"]["step_loop_tok_s"] > 0 and r["zlocal"]["step_crossings"] == 0
        assert r["peak_bytes"] > 0 and r["estimated_bytes"] > 0 and r["predicted_decode_tok_s"] > 0
    # same weights, same greedy tokens in full precision compute on the CPU
    done, total = map(int, report["format_bf16"]["greedy_prefix_agreement"].split("/"))
    assert done == total > 0
    assert report["offload"] == {"skipped": "partial offload needs a GPU"}
