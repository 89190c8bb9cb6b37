"""The drawn-shape kernel cases of tests/test_kernel_shapes.py, run for longer: every case in a child
process, counted by outcome, written as JSON.

    python scripts/sweep_kernels.py --linear 400 --models 60 --out bench-results/sweep_kernels.json

A case passes when it matches its float reference within the test's tolerance; it fails when it is off,
raises, crashes the child or hangs. Failures are listed with their cases.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _sweep(strategy, worker, examples: int, seed: int, check) -> dict:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed

    counts, failures, paths = Counter(), [], Counter()

    @hseed(seed)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=["generate"],
    )
    @given(case=strategy)
    def run(case):
        try:
            result = worker.run(case)
        except AssertionError as exc:  # crashed, hung or raised in the child
            counts["crashed or raised"] += 1
            failures.append({"case": case, "error": str(exc)[:500]})
            return
        paths[result.get("path") or result.get("layout", "?")] += 1
        if check(case, result):
            counts["passed"] += 1
        else:
            counts["off"] += 1
            failures.append({"case": case, "result": result})

    run()
    return {"cases": sum(counts.values()), "counts": dict(counts), "paths": dict(paths), "failures": failures}


def main(argv: list[str] | None = None) -> int:
    """Run the sweep; exit status 1 when any case failed."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--linear", type=int, default=300, help="drawn single-layer cases")
    ap.add_argument("--models", type=int, default=40, help="drawn whole-decoder cases (zlocal's kernels)")
    ap.add_argument("--torch-models", type=int, default=20, help="drawn decoders with zlocal's kernels off")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench-results/sweep_kernels.json")
    args = ap.parse_args(argv)

    from tests import test_kernel_shapes as t
    from tests.kernel_worker import KernelWorker

    def linear_ok(case, r):
        if r["layout"] == "unquantized":
            return True
        tol = 0.02 if case["dtype"] == "bfloat16" else 2e-3
        return r["err"] <= tol and r["weight_err"] <= (0.01 if case["bits"] == 8 else 0.1)

    def model_ok(case, r):
        return r["err"] <= t.MODEL_TOL

    def linear_case(case):
        return case if case["layout"] != "torch" or t._torch_runs(case) else {**case, "layout": "auto"}

    t0 = time.time()
    report = {}
    worker, torch_worker = KernelWorker(), KernelWorker(env={"ZLOCAL_CPU_KERNELS": "0"})
    try:
        report["linear"] = _sweep(
            t.linear_cases().map(linear_case), worker, args.linear, args.seed, linear_ok
        )
        report["models"] = _sweep(t.model_cases(), worker, args.models, args.seed, model_ok)
        report["torch_models"] = _sweep(t.model_cases(), torch_worker, args.torch_models, args.seed, model_ok)
    finally:
        worker.close()
        torch_worker.close()
    report["seconds"] = round(time.time() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    for name in ("linear", "models", "torch_models"):
        print(f"{name}: {report[name]['cases']} cases, {report[name]['counts']}")
    print(f"wrote {out} ({report['seconds']} s)")
    return 1 if any(report[n]["failures"] for n in ("linear", "models", "torch_models")) else 0


if __name__ == "__main__":
    raise SystemExit(main())
