"""``mav generate "a red circle moving" --out out.mp4``: text to video with the trained chain (the pipeline);
``--extend K`` has ↑F extrapolate K more frames (``--extend-direction``) before super-resolution."""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from lightning_mav.checkpoints import CheckpointError
from lightning_mav.commands.options import (
    add_dataclass_arguments,
    add_device_arguments,
    dataclass_from_args,
    fail,
    flag,
)
from lightning_mav.networks import BY_KEY, LOADED, OPTIONAL, SAMPLED, default_checkpoint, train_command
from lightning_mav.pipeline import CPU_FRAME_BATCH, GenerationSettings, MakeAVideoPipeline, stop_index
from lightning_mav.stages.superres import check_chunking


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mav generate", description="Text to video with the trained Make-A-Video chain.")
    p.add_argument("prompts", nargs="+", help="one video per prompt")
    p.add_argument("--out", default="out.mp4", help="output mp4 (a gif is written beside it); -0, -1 ... per prompt")
    p.add_argument("--runs", default="runs", help="run folders holding <stage>/checkpoints/last.ckpt")
    for key in LOADED:
        run = BY_KEY[key].run
        skip = "; 'none' or missing: the one P was trained with" if key == "clip" else "; 'none' skips it" \
            if key in OPTIONAL else ""
        p.add_argument(flag(run), dest=run, metavar="CKPT",
                       help=f"{BY_KEY[key].paper} checkpoint (default RUNS/{run}/checkpoints/last.ckpt{skip})")
    p.add_argument("--clip-model", default=None, help="the open_clip architecture of an open_clip weights file given "
                                                     "as --clip (ViT-L-14, ...)")
    add_dataclass_arguments(p, GenerationSettings)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-fps", type=float, default=None, help="frame rate written to the files")
    p.add_argument("--frame-batch", type=int, default=None,
                   help=f"SR_h frames per call (default: {CPU_FRAME_BATCH} on the CPU; on a GPU as many as make "
                        "8 frames of 768x768, e.g. all 76 of a small video)")
    p.add_argument("--sr-t-chunk", type=int, default=None, metavar="W",
                   help="SR_t's network calls on windows of W frames (bounds its memory; approximate: "
                        "docs/scale-out.md); default: all frames at once")
    p.add_argument("--sr-t-overlap", type=int, default=None, metavar="O",
                   help="frames shared by consecutive SR_t windows, cross-faded (default 4)")
    add_device_arguments(p)
    p.add_argument("--no-gif", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def checkpoint_paths(args: argparse.Namespace) -> dict[str, str | None]:
    """Each loaded network's checkpoint (None: skipped); a missing file is a one-line error naming what makes it."""
    last = stop_index(args.stop_after)
    paths: dict[str, str | None] = {}
    for key in LOADED:
        run = BY_KEY[key].run
        given = getattr(args, run)
        if (key in SAMPLED and SAMPLED.index(key) > last) or (given or "").lower() == "none":
            paths[key] = None
            continue
        path = Path(given) if given else default_checkpoint(args.runs, key)
        if key == "clip" and not given and not path.is_file():
            paths[key] = None  # no suite CLIP run: the CLIP P recorded (e.g. an open_clip weights file)
            continue
        if not path.is_file():
            later = f" (or skip it: {flag(run)} none / --stop-after)" if key in OPTIONAL else ""
            fail(f"{key} checkpoint not found: {path} — make it with `{train_command(key)}`{later}")
        paths[key] = str(path)
    return paths


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Write one video per prompt; returns the written files (also printed, one per line)."""
    args = build_parser().parse_args(argv)
    try:
        settings = dataclass_from_args(GenerationSettings, args)
        if args.sr_t_chunk is not None or args.sr_t_overlap is not None:  # before any checkpoint is loaded
            check_chunking(args.sr_t_chunk, 4 if args.sr_t_overlap is None else args.sr_t_overlap)
    except ValueError as e:
        fail(str(e).replace("frame_chunk", "--sr-t-chunk").replace("chunk_overlap", "--sr-t-overlap"))
    paths = checkpoint_paths(args)
    if settings.extend and paths["up_F"] is None:  # before loading anything: ↑F is the network that extends
        fail(f"--extend {settings.extend}: ↑F extends the video, but --interp is none — give an ↑F checkpoint "
             f"(`{train_command('up_F')}`)")
    try:
        pipe = MakeAVideoPipeline.from_checkpoints(
            clip=paths["clip"], clip_model=args.clip_model, prior=paths["P"], decoder=paths["D_t"],
            interpolation=paths["up_F"],
            sr_t=paths["SR_t"], sr_h=paths["SR_h"], device=args.device, dtype=args.dtype)
    except CheckpointError as e:
        fail(str(e))
    frames = pipe(args.prompts, **vars(settings), seed=args.seed, output_fps=args.output_fps,
                  frame_batch=args.frame_batch, sr_t_chunk=args.sr_t_chunk, sr_t_overlap=args.sr_t_overlap,
                  progress=not args.no_progress)
    written = pipe.save(frames, args.out, gif=not args.no_gif)
    for path in written:
        print(path)  # noqa: T201 - the command's output
    return written
