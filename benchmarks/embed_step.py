"""One D training step with the live CLIP image tower vs with precomputed embeddings (``mav embed``), same run.

D at the paper's widths (``experiments/paper/decoder.yaml``'s U-Net: dim 320, mults 1-2-3-4, 3 res blocks, attention
at levels 1-3, 16 heads x 64, checkpointing) on ``[B, 3, 64, 64]`` images, conditioned on a 1024-d embedding of
the paper's CLIP, open_clip's ViT-H-14 (random init from open_clip's config: no download; its text tower is dropped,
D never reads it). The same ``DecoderStage.compute_loss`` runs twice per round:

- **live CLIP**: the batch has images only; the frozen ViT-H-14 encodes them (224 px, no autograd) inside the step;
- **precomputed**: the batch also carries ``image_embed`` (what ``mav embed`` stores); the image tower is deleted
  first, as ``clip_image_tower: false`` does.

A step is forward + backward of the loss. AdamW's update is the same in both cases and is left out: its moments
(2 x 3.3 GB for the 830 M-parameter U-Net) would not fit beside the two networks on the shared benchmark machine.
The first step (precomputed) is a warm-up (gradient buffers, first-touch page faults) and is not reported. The CLIP
forward is also timed alone. fp32, one intra-op thread by default (CPU time is then load-independent).

    python -m benchmarks.embed_step --write        # paper widths, batch 2 (~4 min on the shared 2-core CPU)
    python -m benchmarks.embed_step --quick        # small U-Net and CLIP: a smoke test of the script
    python -m benchmarks.embed_step --from-json F --write   # re-render an earlier run's --json dump
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from benchmarks.common import (
    EXPERIMENTS, configure_threads, count_flops, fmt, machine, machine_line, md_table, save_json, timed, write_section,
)
from lightning_mav.nn.clip import CLIP
from lightning_mav.stages.decoder import DecoderStage

SECTION = "## D training step: live CLIP vs precomputed embeddings"
QUICK_UNET = {"dim": 32, "dim_mults": [1, 2], "num_res_blocks": 1, "attn_levels": [1], "heads": 2, "dim_head": 16}
QUICK_CLIP = {"embed_dim": 64, "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 64, "layers": 2,
                                              "head_width": 32},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def paper_unet() -> dict[str, Any]:
    """The U-Net of ``experiments/paper/decoder.yaml``."""
    config = yaml.safe_load((EXPERIMENTS / "paper" / "decoder.yaml").read_text())
    return dict(config["model"]["init_args"]["unet"])


def build(quick: bool) -> tuple[DecoderStage, CLIP]:
    """D (no CLIP file: the embedding width is set) and the frozen CLIP, attached as the stage's ``clip``."""
    clip = CLIP("quick", model_cfg=QUICK_CLIP) if quick else CLIP("ViT-H-14")  # random init, frozen
    clip.drop_text_tower()
    stage = DecoderStage(unet={**(QUICK_UNET if quick else paper_unet()), "image_embed_dim": clip.embed_dim},
                         image_size=64)
    stage.clip = clip  # as load_clip would set it, without writing a 4 GB random checkpoint first
    return stage.train(), clip


def step(stage: DecoderStage, batch: dict[str, Any]) -> float:
    """Forward + backward of one training batch; the loss."""
    for p in stage.parameters():
        p.grad = None
    loss, _ = stage.compute_loss(batch, generator=torch.Generator().manual_seed(0))
    loss.backward()
    return loss.item()


def flops(quick: bool, batch: int) -> dict[str, float]:
    """GFLOP of one batch, counted on meta tensors (no compute): the U-Net's forward + backward (recomputation under
    checkpointing included) and the CLIP image tower's forward."""
    with torch.device("meta"):
        stage, clip = build(quick)
        images = torch.empty(batch, 3, 64, 64)
        y_e = torch.empty(batch, clip.embed_dim)
        unet = count_flops(lambda: stage.compute_loss({"image": images, "image_embed": y_e})[0].backward())
        tower = count_flops(lambda: clip.encode_image(images, normalize=False))
    return {"unet_gflop": unet, "clip_gflop": tower}


def run(args: argparse.Namespace) -> dict[str, Any]:
    threads = configure_threads(args.threads)
    torch.manual_seed(0)
    build_wall, _, (stage, clip) = timed(lambda: build(args.quick))
    images = torch.rand(args.batch, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        embed_wall, embed_cpu, y_e = timed(lambda: clip.encode_image(images, normalize=False))
    live = {"image": images}
    precomputed = {"image": images, "image_embed": y_e}
    step(stage, precomputed)  # warm-up
    load = [machine()["load"][0]]
    live_wall, live_cpu, _ = timed(lambda: step(stage, live))
    load.append(machine()["load"][0])
    params = sum(p.numel() for p in stage.unet.parameters())
    visual = sum(p.numel() for p in clip.model.visual.parameters())
    clip.drop_image_tower()  # as clip_image_tower: false does
    pre_wall, pre_cpu, _ = timed(lambda: step(stage, precomputed))
    load.append(machine()["load"][0])
    return {"machine": machine(), "load_seen": load, "threads": threads, "batch": args.batch, "quick": args.quick,
            "unet_params_m": params / 1e6, "visual_params_m": visual / 1e6, "build_wall": build_wall,
            "clip_wall": embed_wall, "clip_cpu": embed_cpu, "live_wall": live_wall, "live_cpu": live_cpu,
            "pre_wall": pre_wall, "pre_cpu": pre_cpu}


def report(res: dict[str, Any]) -> str:
    rows = [["live CLIP (ViT-H-14 image tower in the step)" if not res["quick"] else "live CLIP",
             fmt(res["live_wall"], 1), fmt(res["live_cpu"], 1)],
            ["precomputed `image_embed` (mav embed)", fmt(res["pre_wall"], 1), fmt(res["pre_cpu"], 1)],
            ["the CLIP image forward alone", fmt(res["clip_wall"], 1), fmt(res["clip_cpu"], 1)]]
    ratio_wall, ratio_cpu = res["live_wall"] / res["pre_wall"], res["live_cpu"] / res["pre_cpu"]
    return "\n".join([
        f"`{res['command']}`", "",
        machine_line(res["machine"], res["load_seen"]), "",
        f"One D training step (forward + backward; AdamW's update, the same in both, left out: its moments would not "
        f"fit beside the networks on this machine), fp32, batch {res['batch']} of 64x64 images; U-Net "
        f"{res['unet_params_m']:.0f} M parameters (experiments/paper/decoder.yaml: dim 320, mults 1-2-3-4, 3 res "
        f"blocks, attention at levels 1-3, checkpointing), CLIP image tower {res['visual_params_m']:.0f} M "
        f"(open_clip ViT-H-14, random init, 224 px). One step each after a warm-up step; the precomputed step ran "
        f"with the image tower deleted.", "",
        md_table(["step", "wall s", "CPU s"], rows), "",
        f"**Live / precomputed: {ratio_wall:.2f}x wall, {ratio_cpu:.2f}x CPU time.** Precomputing the embeddings "
        f"saves the ViT-H-14 forward, {100 * (1 - 1 / ratio_cpu):.0f}% of the step's CPU time here, and the image "
        f"tower's {res['visual_params_m'] * 4 / 1024:.1f} GB of fp32 weights (`clip_image_tower: false`).", "",
        f"FLOPs per batch (FlopCounterMode on meta tensors): the U-Net's forward + backward {res['unet_gflop']:.0f} "
        f"GFLOP, the CLIP image forward {res['clip_gflop']:.0f} GFLOP: the decoder's step is "
        f"{res['unet_gflop'] / res['clip_gflop']:.1f}x the CLIP's work, which bounds what precomputing can save "
        f"(before AdamW's update, which adds to both).",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small U-Net and CLIP (smoke test)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", action="store_true", help="replace this benchmark's section of RESULTS.md")
    parser.add_argument("--json", default=None, help="also dump the raw measurements to this file")
    parser.add_argument("--from-json", default=None, help="re-render the report of an earlier --json dump (no run)")
    args = parser.parse_args(argv)
    given = " ".join(sys.argv[1:] if argv is None else argv)
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
        res.setdefault("command", "python -m benchmarks.embed_step --write")
    else:
        res = run(args)
        res["command"] = f"python -m benchmarks.embed_step {given}".strip()
    gc.collect()
    if "unet_gflop" not in res:
        res.update(flops(res["quick"], res["batch"]))
    text = report(res)
    print(text)  # noqa: T201 - the benchmark's output
    save_json(args.json, res)
    if args.write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
