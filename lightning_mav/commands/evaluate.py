"""``mav evaluate [--runs runs] [--data data/shapes] [--out runs/eval] ...``: generate for held-out prompts and score
them (``lightning_mav.evaluation``); one flag per field of ``EvalOptions``."""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_mav.checkpoints import CheckpointError
from lightning_mav.commands.options import add_dataclass_arguments, dataclass_from_args, fail
from lightning_mav.evaluation import EvalOptions, evaluate


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mav evaluate", description="Generate videos with the trained chain and "
                                                                 "score them: metrics.json + TensorBoard.")
    add_dataclass_arguments(p, EvalOptions)
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the evaluation and print the scores, one per line, then the path of ``metrics.json``."""
    args = build_parser().parse_args(argv)
    try:
        options = dataclass_from_args(EvalOptions, args)
        result = evaluate(options)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        fail(str(e).splitlines()[0])
    width = max(len(n) for n in result["metrics"])
    for name, entry in result["metrics"].items():
        value = entry["value"]
        shown = f"{value:.4f}" if isinstance(value, float) else value
        print(f"{name:<{width}}  {shown}")  # noqa: T201 - the command's output
    print(Path(options.out) / "metrics.json")  # noqa: T201
    return result
