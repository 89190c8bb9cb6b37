"""A conversion killed mid-run leaves no OUT, and the next run removes its temp dir."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from zlocal.checkpoint.manifest import verify
from zlocal.conversion.convert import TMP_MARK, clean_stale_temp, convert

ROOT = Path(__file__).resolve().parent.parent


def test_killed_conversion_leaves_no_out(tiny_zephyr, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "scripts" / "convert.py"),
            str(tiny_zephyr),
            str(out),
            "--method",
            "nf4",
            "--quiet",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        temps: list[Path] = []
        while time.time() < deadline and proc.poll() is None:
            temps = [p for p in tmp_path.glob(f".out{TMP_MARK}*") if (p / ".pid").exists()]
            if temps:
                break
            time.sleep(0.05)
        assert temps, "the conversion never started writing"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    assert temps[0].exists()  # a kill cannot clean up; the next run must
    r = convert(tiny_zephyr, out, "nf4", evaluate=False, quiet=True)
    assert verify(r.out).ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_temp_dir_of_live_process_is_kept(tmp_path):
    live = tmp_path / f".out{TMP_MARK}live"
    live.mkdir()
    (live / ".pid").write_text(str(os.getpid()))
    dead = tmp_path / f".out{TMP_MARK}dead"
    dead.mkdir()
    (dead / ".pid").write_text("999999999")
    removed = clean_stale_temp(tmp_path / "out")
    assert removed == [dead] and live.exists() and not dead.exists()
