"""The plan's memory estimate against the process: SmolLM2 in int4, quantized from its checkpoint and
then mapped from its prepared form, each in a fresh process sampled every 5 ms over the load and
the first generation (``scripts/bench_load.py --child``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from zlocal.planning.memory import GIB, HOST_LIBRARY_BYTES

ROOT = Path(__file__).resolve().parents[1]


def _child(prepared_dir: Path) -> dict:
    env = {**os.environ, "ZLOCAL_PREPARED_DIR": str(prepared_dir), "ZLOCAL_PREPARED_CACHE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_load.py"), "--child", "zlocal", "smollm2-135m", "4"],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_smollm2_peaks_match_the_plans_estimate(smollm2, tmp_path):
    cold = _child(tmp_path)
    assert not cold["prepared"]
    est = cold["estimated_ram_gib"]
    # quantizing on load: what the process owns is the estimate less the shared libraries' pages,
    # and a task manager's figure stays under the estimate + 1 GiB
    owned = est - HOST_LIBRARY_BYTES / GIB
    assert abs(cold["peak_RssAnon_gib"] - owned) <= 0.10 * owned, cold
    assert cold["peak_VmRSS_gib"] <= est + 1.0, cold
    warm = _child(tmp_path)
    assert warm["prepared"]
    # mapped: the weights are file pages, and the whole resident set is the (smaller) estimate
    assert warm["estimated_ram_gib"] < est
    assert abs(warm["peak_VmRSS_gib"] - warm["estimated_ram_gib"]) <= 0.10 * warm["estimated_ram_gib"], warm
