"""SR at paper sizes in chunks: peak memory of one SR_t / SR_h network call, and what SR_t's frame windows change.

Two parts (``--part memory``, ``--part windows``, default both):

- **memory** — one network call (forward, no grad, bf16 autocast on a CPU with AMX / AVX512-BF16, else fp32; batch
  1; random weights) of the paper-width SR_t (``experiments/sr_l.yaml`` + ``experiments/paper/sr_l.yaml``'s U-Net
  with ``temporal: true``, 64 -> 256) on windows of ``W`` frames, and of the paper-width SR_h (768², per frame) on
  ``frame_batch`` frames. Peak = the profiler's tensor allocations during the call (``benchmarks.common.
  peak_allocated_mib``; the weights are not in it). A 76-frame unchunked SR_t call is out of reach of a 2-core CPU
  (about a minute per 4 frames), so the 76-frame peak is the linear fit over the measured windows, extrapolated; the
  windowed call adds the float32 blend accumulator over all frames (counted exactly below).
- **windows** — the demo SR_t checkpoint (``--sr-t-ckpt``, trained by ``mav demo``; 32 -> 64) samples one 76-frame
  Moving Shapes clip unchunked and with ``frame_chunk`` / ``chunk_overlap`` windows (same seed, its own sampler and
  steps): the difference to the unchunked sample, and each one's PSNR against the clip's ground truth.

    python -m benchmarks.sr_chunks --write                        # both parts (~15 min on the shared 2-core CPU)
    python -m benchmarks.sr_chunks --part windows --sr-t-ckpt runs/sr_t/checkpoints/last.ckpt --write
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    MiB, configure_threads, fmt, machine, machine_line, md_table, paper_init_args, peak_allocated_mib, save_json,
    write_section,
)

MEMORY_SECTION = "## SR at paper size: peak memory per network call"
WINDOWS_SECTION = "## SR_t frame windows"
FRAMES = 76  # ↑F's output: (16 - 1) * 5 + 1


def _autocast(dtype: torch.dtype):
    return torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)


def paper_unet(name: str) -> torch.nn.Module:
    """The paper-width SR U-Net of ``name`` (``sr_t``, ``sr_h``), random weights, eval mode."""
    from lightning_mav.nn.unet import UNet

    return UNet(**{**paper_init_args(name)["unet"], "lowres_cond": True}).eval()


def call_peak(unet: torch.nn.Module, frames: int | None, lowres: int, factor: int, batch: int,
              dtype: torch.dtype) -> tuple[float, float]:
    """(peak MiB, wall s) of one forward of ``unet`` on ``[batch, 3, (frames,) lowres·factor, ...]``."""
    size = lowres * factor
    shape = (batch, 3) + ((frames,) if frames else ()) + (size, size)
    low_shape = shape[:-2] + (lowres, lowres)
    x, low = torch.randn(shape), torch.randn(low_shape)
    t, level = torch.full((batch,), 500), torch.full((batch,), 100.0)

    def call() -> None:
        with torch.no_grad(), _autocast(dtype):
            unet(x, t, lowres=low, lowres_noise_level=level)

    w0 = time.perf_counter()
    peak = peak_allocated_mib(call)
    return peak, time.perf_counter() - w0


def memory(args: argparse.Namespace, dtype: torch.dtype) -> dict[str, Any]:
    sr_t, rows = paper_unet("sr_t"), []
    cfg = paper_init_args("sr_t")
    factor = cfg["highres_size"] // cfg["lowres_size"]
    for w in args.windows:
        peak, wall = call_peak(sr_t, w, cfg["lowres_size"], factor, 1, dtype)
        rows.append({"net": "SR_t", "frames": w, "peak_mib": peak, "wall_s": wall})
        print(f"SR_t window {w}: peak {peak:.0f} MiB, {wall:.0f} s", flush=True)
    del sr_t
    ws = torch.tensor([float(r["frames"]) for r in rows])
    ps = torch.tensor([r["peak_mib"] for r in rows])
    slope = float(((ws - ws.mean()) * (ps - ps.mean())).sum() / ((ws - ws.mean()) ** 2).sum())
    intercept = float(ps.mean() - slope * ws.mean())
    hr = cfg["highres_size"]
    accumulator = FRAMES * 3 * hr * hr * 4 / MiB  # windowed_frames' float32 sum over all frames (+ weights, tiny)
    sr_h, cfg_h = paper_unet("sr_h"), paper_init_args("sr_h")
    for b in args.sr_h_batch:
        peak, wall = call_peak(sr_h, None, cfg_h["lowres_size"], cfg_h["highres_size"] // cfg_h["lowres_size"], b,
                               dtype)
        rows.append({"net": "SR_h", "frames": b, "peak_mib": peak, "wall_s": wall})
        print(f"SR_h frame batch {b}: peak {peak:.0f} MiB, {wall:.0f} s", flush=True)
    params = {"SR_t": sum(p.numel() for p in paper_unet("sr_t").parameters()),
              "SR_h": sum(p.numel() for p in sr_h.parameters())}
    return {"rows": rows, "slope_mib_per_frame": slope, "intercept_mib": intercept,
            "extrapolated_76_mib": intercept + slope * FRAMES, "accumulator_mib": accumulator, "params": params}


def moving_shapes_clip(frames: int, size: int, seed: int = 0) -> torch.Tensor:
    """A Moving Shapes clip ``[1, 3, F, size, size]`` in [-1, 1] at 30 fps (two objects bouncing)."""
    import numpy as np

    from datamodules.shapes import render_video_frame, sample_video_attributes

    attrs = sample_video_attributes(np.random.default_rng(seed), size)
    attrs["objects"] = (attrs["objects"] * 2)[:2]
    video = np.stack([render_video_frame(attrs["objects"], i / 30.0, size, attrs["background"])
                      for i in range(frames)])
    return torch.from_numpy(video).permute(3, 0, 1, 2)[None].float() / 127.5 - 1


def windows(args: argparse.Namespace) -> dict[str, Any]:
    from lightning_mav.pipeline import load_stage
    from lightning_mav.stages.superres import SuperResStage, resize

    stage = load_stage(SuperResStage, args.sr_t_ckpt, stage="SR_t")
    target = moving_shapes_clip(FRAMES, stage.highres_size)
    low = resize(target, stage.lowres_size)

    def psnr(x: torch.Tensor) -> float:
        mse = ((x - target) / 2).pow(2).mean()
        return float(10 * torch.log10(1 / mse))

    def run(chunk: int | None, overlap: int) -> tuple[torch.Tensor, float]:
        w0 = time.perf_counter()
        out = stage.sample(low, generator=torch.Generator().manual_seed(0), frame_chunk=chunk, chunk_overlap=overlap)
        return out, time.perf_counter() - w0

    whole, wall = run(None, 0)
    rows = [{"chunk": None, "overlap": 0, "max_abs": 0.0, "mean_abs": 0.0, "psnr": psnr(whole), "wall_s": wall}]
    for chunk, overlap in args.cases:
        out, wall = run(chunk, overlap)
        diff = (out - whole).abs()
        rows.append({"chunk": chunk, "overlap": overlap, "max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
                     "psnr": psnr(out), "wall_s": wall})
        print(f"W {chunk} O {overlap}: max |diff| {diff.max():.4f}, mean {diff.mean():.5f}, "
              f"PSNR {rows[-1]['psnr']:.2f}", flush=True)
    return {"rows": rows, "ckpt": str(args.sr_t_ckpt), "steps": stage.sample_steps, "sampler": stage.sampler,
            "sizes": (stage.lowres_size, stage.highres_size)}


def memory_body(res: dict[str, Any], command: str, line: str, dtype_name: str) -> str:
    m = res["memory"]
    table = md_table(["network call", "frames", "peak MiB", "wall s"],
                     [[f"{r['net']} ({'window' if r['net'] == 'SR_t' else 'frame batch'})", r["frames"],
                       fmt(r["peak_mib"], 0), fmt(r["wall_s"], 0)] for r in m["rows"]])
    sr_t = [r for r in m["rows"] if r["net"] == "SR_t"]
    sr_h = [r for r in m["rows"] if r["net"] == "SR_h"]
    return f"""`{command}`

{line} One forward (no grad, {dtype_name}, batch 1, random weights), peak tensor memory during the call from the
profiler's allocation events, weights not included (SR_t {m['params']['SR_t'] / 1e6:.0f} M parameters,
{m['params']['SR_t'] * 4 / MiB:.0f} MiB in fp32; SR_h {m['params']['SR_h'] / 1e6:.0f} M,
{m['params']['SR_h'] * 4 / MiB:.0f} MiB). SR_t: the paper-width SR_l U-Net with temporal layers (64 -> 256); SR_h:
256 -> 768, per frame. Wall time of the profiled call.

{table}

- **SR_t, 76 frames at 256², unchunked: about {m['extrapolated_76_mib'] / 1024:.1f} GiB** of activations:
  {m['intercept_mib']:.0f} MiB + {m['slope_mib_per_frame']:.0f} MiB per frame, the linear fit over the windows
  above, extrapolated (not run: at about {sr_t[-1]['wall_s'] / sr_t[-1]['frames']:.0f} s per frame per call on this
  CPU one unchunked call would take {sr_t[-1]['wall_s'] / sr_t[-1]['frames'] * 76 / 60:.0f} minutes, and would
  not fit its 24 GB). Activations grow linearly with the frames (GroupNorm, convolutions, the per-frame spatial
  attention; SDPA computes the temporal attention's F² scores without storing them), so `frame_chunk` W bounds a
  call to about {m['intercept_mib']:.0f} + {m['slope_mib_per_frame']:.0f}·W MiB (W = 16: about
  {(m['intercept_mib'] + 16 * m['slope_mib_per_frame']) / 1024:.1f} GiB), plus the float32 blend of all 76 output
  frames ({m['accumulator_mib']:.0f} MiB).
- **SR_h at 768²**: {', '.join(f"{r['frames']} frame(s) per call {r['peak_mib'] / 1024:.1f} GiB" for r in sr_h)},
  per frame by construction, so `mav generate --frame-batch N` bounds it. All 76 frames in one call, the pipeline's
  default on a GPU, would need about {sr_h[0]['peak_mib'] / sr_h[0]['frames'] * 76 / 1024:.0f} GiB: at paper size
  give `--frame-batch` (16 frames: about {sr_h[0]['peak_mib'] / sr_h[0]['frames'] * 16 / 1024:.0f} GiB;
  `benchmarks.gpu_check` samples with 16).
- Measured on the CPU; a GPU under bf16 autocast stores about the same activations. The unchunked SR_t call fits
  an 80 GB H100; a 24 GB card needs `--sr-t-chunk` 16 or less.
"""


def windows_body(res: dict[str, Any], command: str, line: str) -> str:
    w = res["windows"]
    table = md_table(["frame_chunk W", "chunk_overlap O", "max abs diff", "mean abs diff", "PSNR vs truth (dB)",
                      "wall s"],
                     [["all 76 (unchunked)" if r["chunk"] is None else r["chunk"], r["overlap"],
                       fmt(r["max_abs"], 4), fmt(r["mean_abs"], 5), fmt(r["psnr"], 2), fmt(r["wall_s"], 1)]
                      for r in w["rows"]])
    lo, hi = w["sizes"]
    return f"""`{command}`

{line} The demo SR_t (`{w['ckpt']}`, {lo} -> {hi}, {w['steps']} {w['sampler']} steps) on one 76-frame Moving
Shapes clip, downsampled; same seed for every row. Differences are on the [-1, 1] scale, against the unchunked
sample; PSNR against the clip's ground-truth frames.

{table}

Why chunking is not exact: each network call of the sampler sees only the W frames of a window, so its temporal
convolutions (kernel 3, stacked through the U-Net) and its temporal attention (over all frames of the clip) lose
the frames beyond the window's edges; the sampler's state stays one 76-frame `x_t` (the windows are blended per
call, not sampled apart), so the windows cannot drift apart. `W >= 76` is the unchunked call, bit for bit
(tests/test_superres_stage.py). The overlap matters more than the window: without one the window edges show
(max difference 0.04-0.05), an overlap of 4 cuts it 3-5x. These differences are small because the demo SR_t's
temporal layers moved little from their identity init in its short training; a network that leans on time more
differs more, so check a trained paper-scale SR_t the same way before relying on short windows. Wall times come
from a shared machine (load 3-6): compare them only loosely.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sr_chunks", description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["memory", "windows", "both"], default="both")
    p.add_argument("--windows", type=int, nargs="+", default=[2, 4, 8], help="SR_t window sizes to measure")
    p.add_argument("--sr-h-batch", type=int, nargs="+", default=[1], help="SR_h frames per call to measure")
    p.add_argument("--sr-t-ckpt", default="runs/sr_t/checkpoints/last.ckpt", help="a (demo) SR_t checkpoint")
    p.add_argument("--cases", default="8:0,8:4,16:4,32:8", help="W:O pairs for the windows part")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--from-json", default=None, help="re-render the sections of an earlier --json dump (no run)")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from lightning_mav.malloc import keep_freed_memory
    from lightning_mav.nn.mixed_precision import native_bf16

    args = build_parser().parse_args(argv)
    args.cases = [tuple(int(v) for v in case.split(":")) for case in args.cases.split(",")]
    keep_freed_memory()
    configure_threads(args.threads)
    dtype = torch.bfloat16 if native_bf16(torch.device("cpu")) else torch.float32
    dtype_name = "bf16 autocast" if dtype == torch.bfloat16 else "fp32"
    info = machine()
    res: dict[str, Any] = {"machine": info}
    argv_text = " ".join(argv if argv is not None else sys.argv[1:])
    res["command"] = f"python -m benchmarks.sr_chunks {argv_text}".strip()
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
        info = res["machine"]
    elif args.part in ("memory", "both"):
        res["memory"] = memory(args, dtype)
    if args.part in ("windows", "both") and not args.from_json:
        if not Path(args.sr_t_ckpt).is_file():
            raise SystemExit(f"error: {args.sr_t_ckpt}: no SR_t checkpoint (train one with `mav demo`, or give "
                             "--sr-t-ckpt)")
        res["windows"] = windows(args)
    command = res["command"]
    save_json(args.json, res)
    if args.write:
        line = machine_line(info)
        if "memory" in res:
            write_section(MEMORY_SECTION, memory_body(res, command, line, dtype_name), after="## Sampling")
        if "windows" in res:
            write_section(WINDOWS_SECTION, windows_body(res, command, line), after=MEMORY_SECTION)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
