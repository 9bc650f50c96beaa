"""``mav import karlo SRC --runs RUNS [--clip FILE]``: pretrained networks as runs of the suite.

Karlo (kakaobrain/karlo-v1-alpha, unCLIP) downloaded by the user in diffusers' layout becomes ``RUNS/prior`` (P),
``RUNS/decoder`` (D) and ``RUNS/sr_l`` (SR_l), which ``init_from``, ``mav generate`` and ``mav evaluate`` then use as if
the suite had trained them (lightning_mav.karlo.importer). Nothing is downloaded.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from lightning_mav.commands.options import fail

SOURCES = ("karlo",)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mav import", description="Import pretrained networks as the suite's runs.")
    p.add_argument("source", choices=SOURCES, help="what to import: karlo (P, D and SR_l of kakaobrain/karlo-v1-alpha)")
    p.add_argument("src", help="the downloaded model folder (prior/, text_proj/, decoder/, super_res_first/, ...)")
    p.add_argument("--runs", default="runs", help="where the run folders go (RUNS/prior, RUNS/decoder, RUNS/sr_l)")
    p.add_argument("--clip", default=None, metavar="FILE",
                   help="the open_clip weights file of the CLIP Karlo was trained with (OpenAI ViT-L/14), recorded "
                        "in the runs; without it, give --clip to mav generate and clip_ckpt to the video stages")
    p.add_argument("--clip-model", default="ViT-L-14", help="the open_clip architecture of --clip")
    p.add_argument("--force", action="store_true", help="replace existing run folders")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from lightning_mav.karlo.importer import KarloImportError, import_karlo

    try:
        written = import_karlo(args.src, args.runs, clip=args.clip, clip_model=args.clip_model, force=args.force)
    except KarloImportError as e:
        fail(str(e))
    for path in written:
        print(f"wrote {path}")  # noqa: T201 - the command's output
