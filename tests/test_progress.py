"""Progress events of the converter's Python entry point (the load's are in test_prepared.py)."""

from __future__ import annotations

import pytest

from zlocal.conversion.convert import convert
from zlocal.progress import Progress


def test_convert_reports_bytes_then_ready(tiny_zephyr, tmp_path):
    events: list[Progress] = []
    convert(tiny_zephyr, tmp_path / "out", "nf4", evaluate=False, quiet=True, progress=events.append)
    done = [e.done for e in events if e.stage == "convert"]
    assert done == sorted(done) and len(done) > 3
    total = events[0].total
    assert done[-1] == total > 0 and all(e.total == total for e in events if e.stage == "convert")
    assert events[-1].stage == "ready" and events[-1].message.endswith("out")


def test_a_raising_callback_stops_the_conversion_and_writes_nothing(tiny_zephyr, tmp_path):
    def stop(p: Progress):
        if p.stage == "convert" and p.fraction > 0.5:
            raise KeyboardInterrupt  # how an app's cancel button stops it

    with pytest.raises(KeyboardInterrupt):
        convert(tiny_zephyr, tmp_path / "out", "nf4", evaluate=False, quiet=True, progress=stop)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == []
