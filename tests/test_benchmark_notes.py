"""benchmarks/common.py: the machine line of RESULTS.md says the machine was shared only when it was; sections are
replaced in place and new ones land beside their siblings."""
from __future__ import annotations

from pathlib import Path

from benchmarks.common import machine, machine_line, write_section
from benchmarks.train_step import SECTION, section


def test_shared_only_when_load_exceeds_the_benchmarks_own_threads() -> None:
    info = {**machine(), "threads": 1}
    alone, busy = machine_line(info, [0.9, 1.3]), machine_line(info, [0.9, 2.4])
    assert "load average 0.9-1.3 while measuring)" in alone and "shared" not in alone
    assert "load average 0.9-2.4 while measuring: the machine was shared)" in busy
    assert "shared" in machine_line({**info, "load": (3.0, 3.0, 3.0)})  # no samples: the load at the start


def test_bf16_tables_are_one_section_per_kind_of_bf16_instructions(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text(f"# Benchmark results\n\n{SECTION}\n\nfp32 table\n\n## Frame scaling\n\nframes\n")
    amx, avx512 = section("bf16", "AMX-BF16"), section("bf16", "AVX512-BF16")
    assert section("fp32", "AMX-BF16") == SECTION and amx == f"{SECTION}, bf16 autocast (AMX-BF16)" != avx512
    write_section(amx, "amx table", results, after=SECTION)
    write_section(avx512, "avx512 table", results, after=SECTION)
    write_section(amx, "amx table, rerun", results, after=SECTION)  # replaced where it stands
    text = results.read_text()
    order = [text.index(s) for s in (f"{SECTION}\n\nfp32 table", f"{amx}\n\namx table, rerun",
                                     f"{avx512}\n\navx512 table", "## Frame scaling\n\nframes")]
    assert order == sorted(order) and "amx table\n" not in text and text.count("## ") == 4
    write_section("## New", "new", results, after="## Nothing like it")  # no sibling: appended
    assert results.read_text().endswith("## New\n\nnew\n")
