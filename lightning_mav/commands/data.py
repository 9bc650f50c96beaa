"""``mav data --out DIR [--small] [--num-images N ...]``: write the built-in Moving Shapes shards."""
from __future__ import annotations

import argparse
import inspect
from collections.abc import Sequence
from pathlib import Path

from datamodules.shapes import DEFAULT_ROOT, generate

#: the sizes ``--small`` writes: a tiny dataset (32 px, a few seconds to write)
SMALL = dict(num_images=64, num_videos=16, num_val_images=16, num_val_videos=8, image_size=32, video_size=32)


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="mav data", description="Write the Moving Shapes shards: captioned images, "
                                                                  "unlabeled videos, held-out prompts in eval/.")
    parser.add_argument("--out", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--small", action="store_true", help="a tiny dataset (32 px, a few seconds to write)")
    defaults = inspect.signature(generate).parameters
    for name in (*SMALL, "seed"):  # generate()'s own defaults
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=defaults[name].default)
    args = parser.parse_args(argv)
    sizes = SMALL if args.small else {name: getattr(args, name) for name in SMALL}
    root = generate(args.out, seed=args.seed, **sizes)
    print(f"wrote Moving Shapes to {root}")  # noqa: T201 - the command's output
    return root
