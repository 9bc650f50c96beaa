"""Run the three model benchmarks in one go: ``python -m benchmarks.run [--quick | --full] [--write]``.

1. :mod:`benchmarks.train_step` — D_t training step vs SpaceTimeUnet and UNet3DConditionModel;
2. :mod:`benchmarks.frames_scaling` — step time at F = 8, 16, 32, 64, factorised vs full 3-D attention;
3. :mod:`benchmarks.sample` — one 16-frame video through every stage of the pipeline.

The default run takes about 8 minutes on the shared 2-core CPU (``--quick``: about 3); ``--full`` runs the
reference configurations (16x64x64 training step, 64x64 frame scaling, 50 real DDIM steps per stage: about an hour
there). ``--write`` replaces the "## D_t training step vs peers", "## Frame scaling", "## Sampling" and "## GPU"
sections of ``benchmarks/RESULTS.md``, keeping every other section. ``--json DIR`` keeps the raw measurements.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks import frames_scaling, sample, train_step
from benchmarks.common import write_section

GPU_SECTION = "## GPU"


def gpu_section() -> str:
    """The GPU section: measured only when a CUDA device is present (it never was for these results)."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return (f"A CUDA device is present ({name}) but these benchmarks measure the CPU path; the H100/H200 bf16 "
                "MFU of D_t training at batch >= 8 and the pipeline's sample time were not measured in this run.")
    return ("Not measured (no GPU): no CUDA device was available to this run, so the H100/H200 bf16 MFU of D_t "
            "training (batch >= 8) and the pipeline's GPU sample time are not reported. What is in place for a GPU "
            "run: the paper-scale configs train with `precision: bf16-mixed` (`experiments/paper/*.yaml`), the "
            "pipeline samples under bf16 autocast on CUDA (`MakeAVideoPipeline(dtype='auto')`), stages use fused "
            "AdamW, attention is `scaled_dot_product_attention` throughout (flash / memory-efficient kernels "
            "on GPU), and `unet.channels_last` (NHWC, cuDNN's preferred layout) is available but unmeasured on GPU. "
            "On a GPU machine, `python -m benchmarks.gpu_check --write` (about 8 minutes on one H100) measures every "
            "paper-width network's bf16 training step, eager and compiled (MFU, peak memory), and one 16-frame "
            "sample through the whole chain, into the \"## GPU check\" section.")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true")
    mode.add_argument("--full", action="store_true")
    p.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    p.add_argument("--json", default=None, help="directory for the raw measurements (one JSON per benchmark)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    common = (["--quick"] if args.quick else ["--full"] if args.full else []) + (["--write"] if args.write else [])
    if args.threads:
        common += ["--threads", str(args.threads)]
    t0 = time.perf_counter()
    for name, module in (("train_step", train_step), ("frames_scaling", frames_scaling), ("sample", sample)):
        extra = ["--json", str(Path(args.json) / f"{name}.json")] if args.json else []
        print(f"\n==================== {name} ====================", flush=True)
        module.main(common + extra)
    if args.write:
        write_section(GPU_SECTION, gpu_section())
    print(f"\nbenchmarks.run: {time.perf_counter() - t0:.0f} s in all", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
