"""``mav plan --config experiments/<stage>.yaml [--config overlay.yaml] [--key value …]``: parameters, FLOPs per
sample, memory per GPU (DDP / FSDP, with and without checkpointing), the largest batch that fits 80 GB and days to
``max_steps`` on A100 / H100, for the stage ``lightning fit`` would train from the same arguments, without data,
weights or a GPU (lightning_mav.plan)."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence

from lightning_mav.trainer_cli import _fail


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mav plan", usage="mav plan --config STAGE.yaml [--config OVERLAY.yaml] [--key value ...] [options]",
        description="What a stage costs before renting GPUs. Every other argument (--config files, --model.* / "
                    "--trainer.* / --data.* overrides) is read as lightning fit reads it.")
    p.add_argument("--gpus", type=int, default=8, help="GPUs for data parallelism (FSDP shards over them; default 8)")
    p.add_argument("--mfu", type=float, default=0.4,
                   help="model FLOP utilisation assumed for the step time (default 0.4: 40%% of the bf16 peak)")
    p.add_argument("--gpu", choices=["A100", "H100", "both"], default="both", help="card(s) of the time table")
    p.add_argument("--headroom", type=float, default=0.1,
                   help="share of the 80 GB left free for allocator fragmentation and workspaces (default 0.1)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of markdown")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if any(a in ("-h", "--help") for a in argv):
        parser.print_help()
        return
    args, rest = parser.parse_known_args(argv)
    if "--config" not in rest:
        _fail("--config: give the stage's YAML (mav plan --config experiments/<stage>.yaml [--config overlay])")
    from lightning_mav.plan import PEAK_BF16, make_plan

    try:
        plan = make_plan(rest, gpus=args.gpus, mfu=args.mfu, headroom=args.headroom,
                         command="mav plan " + shlex.join(argv))
    except ValueError as e:  # the options' own checks
        _fail(str(e))
    if args.json:
        print(json.dumps(plan.to_dict(), indent=1))  # noqa: T201 - the command's output
    else:
        print(plan.to_markdown(tuple(PEAK_BF16) if args.gpu == "both" else (args.gpu,)))  # noqa: T201
