"""The ``mav`` / ``lightning`` / ``python -m lightning_mav`` command: one module of this package per command.

``mav --help`` lists them; ``mav <command> --help`` gives each one's options. Modules are imported only when their
command runs, so ``mav fit`` does not pay for the pipeline's imports.
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from lightning_mav.malloc import keep_freed_memory
from lightning_mav.trainer_cli import TRAINER_COMMANDS, quiet_known_noise

#: command -> (module of this package, one line of what it does)
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("fit", "train a stage: mav fit --config experiments/<stage>.yaml [--config overlay.yaml] [--key value]"),
    "validate": ("fit", "validate a stage's checkpoint (LightningCLI)"),
    "test": ("fit", "test run, e.g. the evaluation: mav test --config experiments/eval.yaml"),
    "predict": ("fit", "predict with a stage (LightningCLI)"),
    "demo": ("demo", "the whole chain on the built-in Moving Shapes data, ending in runs/demo/report.md"),
    "generate": ("generate", "text to video with the trained chain: mav generate \"a prompt\" --out out.mp4"),
    "extend": ("extend", "extend a video with ↑F (frame extrapolation): mav extend in.mp4 --frames K --out out.mp4"),
    "evaluate": ("evaluate", "generate for held-out prompts and score them: metrics.json, TensorBoard, videos"),
    "data": ("data", "write the Moving Shapes shards (images with captions, unlabeled videos, eval prompts)"),
    "embed": ("embed", "precompute the frozen CLIP's embeddings of shards: mav embed --clip FILE --urls S --out DIR"),
    "plan": ("plan", "memory, FLOPs and days of a stage before renting GPUs: mav plan --config <stage>.yaml "
                     "[--config overlay]"),
    "import": ("imports", "pretrained networks as runs: mav import karlo SRC --runs RUNS [--clip FILE] (P, D, SR_l)"),
}
assert set(TRAINER_COMMANDS) <= set(COMMANDS)


def usage() -> str:
    """``mav --help``: every command with its line."""
    width = max(map(len, COMMANDS))
    lines = ["usage: mav <command> [options]    (also: lightning <command>, python -m lightning_mav <command>)", "",
             "Make-A-Video as a PyTorch Lightning experiment suite. Commands:", ""]
    lines += [f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items()]
    lines += ["", "mav <command> --help shows a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``mav`` and ``lightning``."""
    keep_freed_memory()  # video tensors: no mmap/munmap page faults per step (lightning_mav/malloc.py)
    quiet_known_noise()
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())  # noqa: T201 - the command's output
        return
    if args[0] not in COMMANDS:
        sys.stderr.write(f"error: unknown command {args[0]!r}: use one of {', '.join(COMMANDS)} (mav --help)\n")
        raise SystemExit(2)
    module = importlib.import_module(f"lightning_mav.commands.{COMMANDS[args[0]][0]}")
    module.main(args if args[0] in TRAINER_COMMANDS else args[1:])
