"""benchmarks/common.py: the machine line of RESULTS.md says the machine was shared only when it was."""
from __future__ import annotations

from benchmarks.common import machine, machine_line


def test_shared_only_when_load_exceeds_the_benchmarks_own_threads() -> None:
    info = {**machine(), "threads": 1}
    alone, busy = machine_line(info, [0.9, 1.3]), machine_line(info, [0.9, 2.4])
    assert "load average 0.9-1.3 while measuring)" in alone and "shared" not in alone
    assert "load average 0.9-2.4 while measuring: the machine was shared)" in busy
    assert "shared" in machine_line({**info, "load": (3.0, 3.0, 3.0)})  # no samples: the load at the start
