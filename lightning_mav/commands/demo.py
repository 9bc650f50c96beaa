"""``mav demo``: the whole chain on Moving Shapes, from data to ``runs/demo/report.md`` (``lightning_mav.demo``)."""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from lightning_mav.demo import DEMO_FPS_PAIR, DEMO_PROMPTS, DEMO_VIDEOS_PER_PROMPT, run_demo
from lightning_mav.networks import NETWORKS


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="mav demo", description="The whole Make-A-Video chain on the built-in "
                                                                  "Moving Shapes data, ending in runs/demo/report.md.")
    parser.add_argument("--data", type=Path, default=Path("data/shapes"), help="Moving Shapes root")
    parser.add_argument("--force", action="store_true", help="retrain finished stages and regenerate the data")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage (checks the plumbing only)")
    parser.add_argument("--prompts", type=int, default=DEMO_PROMPTS, help="held-out prompts to generate videos for")
    parser.add_argument("--videos-per-prompt", type=int, default=DEMO_VIDEOS_PER_PROMPT,
                        help="videos per prompt (different noise)")
    parser.add_argument("--fps-pair", type=int, default=DEMO_FPS_PAIR,
                        help="prompts D_t samples at fps 4 and 24 with the same noise (0: none)")
    parser.add_argument("--stages", nargs="*", default=None, choices=[n.run for n in NETWORKS],
                        help="train only these stages")
    parser.add_argument("--precision", default="auto", choices=["auto", "32-true", "bf16-mixed"],
                        help="the stages' trainer.precision (auto: bf16-mixed on Ampere+ GPUs and CPUs with AMX or "
                             "AVX512-BF16)")
    args = parser.parse_args(argv)
    return run_demo(data=args.data, force=args.force, quick=args.quick, num_prompts=args.prompts,
                    videos_per_prompt=args.videos_per_prompt, fps_pair_prompts=args.fps_pair,
                    stages=args.stages, precision=args.precision)
