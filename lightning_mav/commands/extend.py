"""``mav extend in.mp4 --frames K --out out.mp4``: ↑F extrapolates K frames after (or before) a given video."""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from lightning_mav.checkpoints import CheckpointError
from lightning_mav.commands.options import add_device_arguments, fail
from lightning_mav.pipeline import EXTEND_DIRECTIONS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mav extend", description="Extend a video with ↑F (frame extrapolation): K "
                                "new frames after its end or before its start, at ↑F's size (centre square).")
    p.add_argument("video", help="the video to extend (mp4 or anything FFmpeg reads)")
    p.add_argument("--frames", type=int, required=True, help="frames to add (K > 0; 'both': K on each side)")
    p.add_argument("--direction", default="forward", choices=EXTEND_DIRECTIONS,
                   help="after the end (forward), before the start (backward) or both")
    p.add_argument("--out", default=None, help="output mp4 (a gif is written beside it); default VIDEO-extended.mp4")
    p.add_argument("--runs", default="runs", help="run folders holding interp/ (and clip/) checkpoints/last.ckpt")
    p.add_argument("--interp", metavar="CKPT", default=None,
                   help="↑F checkpoint (default RUNS/interp/checkpoints/last.ckpt)")
    p.add_argument("--clip", metavar="CKPT", default=None, help="the CLIP ↑F embeds the middle frame with (default: "
                   "the one ↑F's checkpoint records, else RUNS/clip/checkpoints/last.ckpt)")
    p.add_argument("--clip-model", default=None, help="the open_clip architecture of an open_clip weights file "
                                                     "given as --clip (ViT-L-14, ...)")
    p.add_argument("--fps", type=float, default=None, help="frame rate ↑F is conditioned on and the output's "
                                                           "(default: the video's)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the checkpoint's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the "
                                                                "checkpoint's)")
    p.add_argument("--seed", type=int, default=0)
    add_device_arguments(p)
    p.add_argument("--no-gif", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Write the extended video; returns the written files (also printed, one per line)."""
    from lightning_mav.extend import extend_file

    args = build_parser().parse_args(argv)
    if args.frames <= 0:
        fail(f"--frames: frames to add must be > 0, got {args.frames}")
    if args.steps is not None and args.steps <= 0:
        fail(f"--steps: must be > 0, got {args.steps}")
    src = Path(args.video)
    out = Path(args.out) if args.out else src.with_name(f"{src.stem}-extended.mp4")
    try:
        written = extend_file(src, out, args.frames, args.direction, interp=args.interp, runs=args.runs,
                              clip=args.clip, clip_model=args.clip_model, fps=args.fps, steps=args.steps,
                              guidance_scale=args.guidance, seed=args.seed, device=args.device, dtype=args.dtype,
                              gif=not args.no_gif, progress=not args.no_progress)
    except (CheckpointError, ValueError) as e:
        fail(str(e).splitlines()[0])
    for path in written:
        print(path)  # noqa: T201 - the command's output
    return written
