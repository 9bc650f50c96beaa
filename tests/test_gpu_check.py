"""benchmarks/gpu_check.py: the tiny CPU run writes every network's eager (and compiled) step measurements and the
pipeline sample; a failing network is recorded and the others go on; the paper configs resolve to the paper widths."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.common import paper_init_args, write_section
from tests.helpers import REPO, cli_env


def test_paper_configs_resolve_through_init_from() -> None:
    sr_t, sr_l = paper_init_args("sr_t"), paper_init_args("sr_l")
    assert sr_t["unet"] == {**sr_l["unet"], "temporal": True} and sr_l["unet"]["dim"] == 128  # SR_l's, in time
    assert (sr_t["lowres_size"], sr_t["highres_size"]) == (64, 256)
    dt, d = paper_init_args("dt"), paper_init_args("decoder")
    assert dt["unet"] == {**d["unet"], "temporal": True, "fps_cond": True} and d["unet"]["dim"] == 320
    assert paper_init_args("interp")["unet"] == dt["unet"]
    assert paper_init_args("prior")["dim"] == 2048 and paper_init_args("sr_h")["highres_size"] == 768


@pytest.mark.slow  # ~1 min: seven networks and the 76-frame chain, tiny, on the CPU
def test_tiny_cpu_run_writes_every_network_and_the_sample(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    # torch.compile on the CPU (inductor's C++ codegen) takes about a minute per network on 2 cores: eager only
    # here, the compiled path runs on one network below
    subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--tiny", "--device", "cpu", "--no-compile",
                    "--steps", "2", "--warmup", "1", "--out", str(out)], check=True, cwd=REPO, env=cli_env(),
                   capture_output=True, text=True, timeout=600)
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and res["tiny"] and res["peak_flops"] > 0
    assert list(res["networks"]) == list(gpu_check.NETWORKS)
    for name, r in res["networks"].items():
        assert "error" not in r, (name, r)
        eager = r["eager"]
        assert eager["steps"] == 2 and eager["step_s"] > 0 and eager["peak_mib"] > 0, name
        assert eager["gflop_per_step"] > 0 and 0 < eager["mfu"] < 1, name
        assert r["compiled"] == {"skipped": "--no-compile"}
    assert res["networks"]["dt"]["frames"] == 4
    assert res["networks"]["sr_t"]["params"] > res["networks"]["sr_l"]["params"]  # SR_t = SR_l + temporal layers
    sample = res["sample"]
    assert sample["shape"] == [1, 76, 3, 96, 96] and sample["finite"] and sample["seconds"] > 0  # 16 -> 76 frames,
    assert set(sample["steps"]) == {"P", "D_t", "up_F", "SR_t", "SR_h"}                       # 8 px x4 x3


def failing_sr_h(monkeypatch: pytest.MonkeyPatch) -> None:
    real = gpu_check.build_stage

    def build(name: str, *args, **kwargs):
        if name == "sr_h":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore text")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(gpu_check, "build_stage", build)


def test_a_failing_network_is_recorded_and_the_rest_go_on(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    failing_sr_h(monkeypatch)
    torch.set_num_threads(1)
    res = gpu_check.main(["--tiny", "--device", "cpu", "--networks", "sr_h,dt", "--steps", "1", "--warmup", "1",
                          "--no-compile", "--no-sample", "--out", str(tmp_path / "r.json")])
    assert res["networks"]["sr_h"] == {"paper_name": "SR_h",
                                       "error": "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"}
    dt = json.loads((tmp_path / "r.json").read_text())["networks"]["dt"]
    assert dt["eager"]["step_s"] > 0 and dt["eager"]["mfu"] > 0 and dt["frames"] == 4 and dt["batch"] == 2
    assert res["sample"] == {"skipped": "--no-sample"}
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## GPU\n\ntext\n\n## Later\n\nkept\n")
    write_section(gpu_check.SECTION, gpu_check.section_body(res), results, after="## GPU")
    text = results.read_text()
    assert text.index("## GPU\n") < text.index("## GPU check") < text.index("## Later")
    assert "`python -m benchmarks.gpu_check --tiny" in text and "RuntimeError: CUDA out of memory" in text
    assert "sample at tiny widths (random weights, bf16): skipped (--no-sample)" in text
    with pytest.raises(SystemExit, match="--networks: unknown sr_x"):
        gpu_check.main(["--tiny", "--device", "cpu", "--networks", "sr_x"])


@pytest.mark.slow  # inductor compiles a tiny U-Net in about a minute on the CPU
def test_compiled_steps_on_the_cpu(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    res = gpu_check.main(["--tiny", "--device", "cpu", "--networks", "sr_l", "--steps", "1", "--warmup", "1",
                          "--no-sample"])
    compiled = res["networks"]["sr_l"]["compiled"]
    assert "error" not in compiled, compiled
    assert compiled["step_s"] > 0 and compiled["compile_s"] > 0 and compiled["mfu"] > 0
