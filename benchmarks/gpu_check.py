"""GPU check: every paper-width network's bf16 training step (eager and ``torch.compile``) and one 16-frame sample.

    python -m benchmarks.gpu_check                          # one GPU, paper widths: about 8 minutes on an H100
    python -m benchmarks.gpu_check --out gpu.json --write   # and the "## GPU check" section of RESULTS.md
    python -m benchmarks.gpu_check --tiny --device cpu      # tiny widths and sizes, the tests' smoke run

For each network of the paper (P, D, SR_l, SR_h, D_t, ↑F, SR_t; widths from ``experiments/<stage>.yaml`` with
``experiments/paper/<stage>.yaml`` over it, children's U-Nets through their ``init_from`` chain,
:func:`benchmarks.common.paper_init_args`), random weights built in memory (no checkpoint, no CLIP weights: P's
ViT-H-14 is randomly initialised too, D/D_t/↑F get precomputed ``image_embed`` batches as from shards that carry
them), ``--steps`` training steps of the stage's own ``compute_loss`` under bf16 autocast with its fused AdamW
(what ``bf16-mixed`` runs): timed after warm-up, eager, then with the network compiled (``torch.compile``, default
mode; the first compiled steps' time is reported as the compile time). Per step: FLOPs counted with
``FlopCounterMode`` (forward + backward, checkpointing's recomputation included), MFU = FLOPs / step time / the
device's peak dense bf16 FLOP/s (Lightning's table for GPUs; on the CPU a bf16 GEMM measured in the same run), and
peak memory (CUDA: ``max_memory_allocated`` during the timed steps, weights and AdamW state included; CPU: the
profiler's tensor allocations of one step, weights excluded). Then the whole chain ``SR_h ∘ SR_t ∘ ↑F ∘ D_t ∘ P`` at
paper widths, 16 frames -> 76 at 768², each stage's paper sampling steps, bf16: its time and output shape.

Per-GPU batches are smaller than the paper overlays' (``BATCH``: the check must fit one GPU and 8 minutes); MFU grows
with batch. A failure in one network (out of memory, a compile error) is recorded in the JSON as ``error`` and the
rest continue; ``--budget`` seconds (default 480) skips what would start after it, recorded as ``skipped``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import fmt, gemm_rate, machine, md_table, paper_init_args, peak_allocated_mib, write_section

SECTION = "## GPU check"
NETWORKS = ("prior", "decoder", "sr_l", "sr_h", "dt", "interp", "sr_t")
PAPER_NAMES = {"prior": "P", "decoder": "D", "sr_l": "SR_l", "sr_h": "SR_h", "dt": "D_t", "interp": "↑F",
               "sr_t": "SR_t"}
#: per-GPU training batch of the check (the paper overlays': 256, 128, 64, 32, 16x16 frames, 16x16, 8x8)
BATCH = {"prior": 64, "decoder": 32, "sr_l": 16, "sr_h": 8, "dt": 4, "interp": 4, "sr_t": 2}
VIDEO_FRAMES = {"dt": 16, "interp": 16, "sr_t": 8}  # frames per training clip (the overlays' num_frames)
TINY_UNET = {"dim": 8, "dim_mults": [1, 2], "num_res_blocks": 1, "attn_levels": [1], "heads": 2, "dim_head": 8,
             "norm_groups": 4, "checkpointing": False}
#: --tiny sizes: same factors as the paper (D 64 -> SR_t x4 -> SR_h x3), every side small
TINY_SIZES = {"decoder": {"image_size": 8}, "dt": {"image_size": 8}, "interp": {"image_size": 8},
              "sr_l": {"lowres_size": 8, "highres_size": 32}, "sr_t": {"lowres_size": 8, "highres_size": 32},
              "sr_h": {"lowres_size": 32, "highres_size": 96, "crop_size": 24}}


# ------------------------------------------------------------------------------------------------ building
@contextlib.contextmanager
def in_memory_clip(model_name: str) -> Iterator[None]:
    """Stages built inside get a randomly initialised CLIP ``model_name`` instead of loading ``clip_ckpt``."""
    from lightning_mav.nn.clip import CLIP
    from lightning_mav.stages.base import StageBase

    original = StageBase.load_clip

    def load_clip(self: StageBase, clip_ckpt: str | None, clip_model: str | None = None) -> Any:
        if clip_ckpt is None:
            return None
        self.clip = CLIP(model_name, freeze=True)
        return self.clip

    StageBase.load_clip = load_clip
    try:
        yield
    finally:
        StageBase.load_clip = original


def stage_args(name: str, tiny: bool, embed_dim: int) -> dict[str, Any]:
    """The stage's paper init args (or their --tiny shrink), ready for a random-init stage: no parents, no files."""
    args = {k: v for k, v in paper_init_args(name).items() if k not in ("init_from", "clip_ckpt", "clip_model")}
    if name == "prior":
        args["clip_ckpt"] = "in-memory"  # in_memory_clip builds it
        if tiny:
            args.update(dim=32, depth=2, heads=2, dim_head=16)
        return args
    unet = dict(args.get("unet") or {})
    if tiny:
        keep = {k: v for k, v in unet.items() if k in ("temporal", "fps_cond", "image_embed_scale", "channels_last")}
        unet = {**TINY_UNET, **keep}
        args.update(TINY_SIZES.get(name, {}))
    if name in ("decoder", "dt", "interp"):
        unet["image_embed_dim"] = embed_dim  # the CLIP's width; batches carry the embeddings
    args["unet"] = unet
    return args


def build_stage(name: str, tiny: bool, clip_model: str, embed_dim: int) -> Any:
    from lightning_mav.stages.decoder import DecoderStage
    from lightning_mav.stages.interpolation import InterpolationStage
    from lightning_mav.stages.prior import PriorStage
    from lightning_mav.stages.superres import SuperResStage

    cls = {"prior": PriorStage, "decoder": DecoderStage, "dt": DecoderStage, "interp": InterpolationStage,
           "sr_l": SuperResStage, "sr_h": SuperResStage, "sr_t": SuperResStage}[name]
    with in_memory_clip(clip_model):
        stage = cls(**stage_args(name, tiny, embed_dim))
    with torch.no_grad():  # ADM zero-inits the output layers: leave no all-zero weight (as benchmarks.sample)
        for p in stage.parameters():
            if p.requires_grad and not p.any():
                p.normal_(0.0, 0.02)
    return stage


def make_batch(name: str, stage: Any, batch: int, frames: int, embed_dim: int, device: torch.device) -> dict:
    """A synthetic training batch of the stage's format on ``device``."""
    g = torch.Generator().manual_seed(0)

    def pixels(*shape: int) -> torch.Tensor:
        return (torch.rand(*shape, generator=g) * 2 - 1).to(device)

    embed = torch.nn.functional.normalize(torch.randn(batch, embed_dim, generator=g), dim=-1).to(device)
    if name == "prior":
        return {"caption": [f"a red circle number {i}" for i in range(batch)], "image_embed": embed}
    if name == "decoder":
        return {"image": pixels(batch, 3, stage.image_size, stage.image_size), "image_embed": embed}
    if name in ("dt", "interp"):
        return {"video": pixels(batch, frames, 3, stage.image_size, stage.image_size), "image_embed": embed,
                "fps": torch.full((batch,), 24.0, device=device)}
    size = stage.highres_size
    if name == "sr_t":
        return {"video": pixels(batch, frames, 3, size, size)}
    return {"image": pixels(batch, 3, size, size)}


def network_attr(name: str) -> str:
    return "prior" if name == "prior" else "unet"


# ------------------------------------------------------------------------------------------------ measuring
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    """(peak dense bf16 FLOP/s, where it comes from): Lightning's table for GPUs, a measured bf16 GEMM on the CPU."""
    if device.type == "cuda":
        from lightning_fabric.utilities.throughput import get_available_flops

        flops = get_available_flops(device, torch.bfloat16)
        return (float(flops) if flops else None), f"{torch.cuda.get_device_name(device)} bf16 peak (Lightning's table)"
    wall, _ = gemm_rate(n=1024, reps=3, dtype=torch.bfloat16)
    return wall * 1e9, "bf16 GEMM [1024x1024] measured in this run"


def train_steps(stage: Any, batch: dict, device: torch.device, steps: int, warmup: int,
                count: bool) -> dict[str, Any]:
    """``warmup`` + ``steps`` bf16 training steps of ``stage``; times, FLOPs, MFU and peak memory."""
    optimizer = stage.configure_optimizers()["optimizer"]
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, _ = stage.compute_loss(batch, generator=generator)
        loss.backward()
        optimizer.step()

    w0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    out: dict[str, Any] = {"warmup_s": time.perf_counter() - w0}
    gflop = None
    if count:
        with FlopCounterMode(display=False) as counter:
            step()
        gflop = counter.get_total_flops() / 1e9
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    out["step_s"] = statistics.median(times)
    out["steps"] = steps
    if device.type == "cuda":
        out["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        out["peak_mib"] = peak_allocated_mib(step)
    out["gflop_per_step"] = gflop
    return out


def check_network(name: str, args: argparse.Namespace, device: torch.device, peak: float | None,
                  clip_model: str, embed_dim: int, deadline: float) -> dict[str, Any]:
    """Eager and compiled training steps of one network; errors recorded, never raised."""
    res: dict[str, Any] = {"paper_name": PAPER_NAMES[name]}
    try:
        stage = build_stage(name, args.tiny, clip_model, embed_dim).to(device).train()
        batch_size = 2 if args.tiny else BATCH[name]
        frames = (4 if args.tiny else VIDEO_FRAMES[name]) if name in VIDEO_FRAMES else None
        batch = make_batch(name, stage, batch_size, frames or 0, embed_dim, device)
        network = getattr(stage, network_attr(name))
        res.update(batch=batch_size, frames=frames, params=sum(p.numel() for p in network.parameters()),
                   trainable_params=sum(p.numel() for p in stage.parameters() if p.requires_grad))
        print(f"[{name}] {res['params'] / 1e6:.1f} M parameters, batch {batch_size}"
              + (f" x {frames} frames" if frames else ""), flush=True)
    except Exception as e:  # noqa: BLE001 - recorded, the other networks go on
        res["error"] = one_line(e)
        print(f"[{name}] build failed: {res['error']}", flush=True)
        return res
    gflop = None
    for mode in ("eager", "compiled"):
        if mode == "compiled" and args.no_compile:
            res[mode] = {"skipped": "--no-compile"}
            continue
        if time.perf_counter() > deadline:
            res[mode] = {"skipped": f"over the --budget of {args.budget:.0f} s"}
            print(f"[{name}] {mode}: skipped (budget)", flush=True)
            continue
        try:
            if mode == "compiled":
                setattr(stage, network_attr(name), torch.compile(network))
            r = train_steps(stage, batch, device, args.steps, args.warmup, count=gflop is None)
            gflop = gflop if r["gflop_per_step"] is None else r["gflop_per_step"]
            r["gflop_per_step"] = gflop
            r["mfu"] = gflop * 1e9 / r["step_s"] / peak if (gflop and peak) else None
            if mode == "compiled":
                r["compile_s"] = r.pop("warmup_s")  # the first compiled steps: tracing and code generation
            res[mode] = r
            print(f"[{name}] {mode}: {r['step_s'] * 1e3:.1f} ms/step, {gflop:.0f} GFLOP/step, MFU "
                  f"{fmt(100 * r['mfu'] if r['mfu'] is not None else None, 1)}%, peak {r['peak_mib']:.0f} MiB", flush=True)
        except Exception as e:  # noqa: BLE001
            res[mode] = {"error": one_line(e)}
            print(f"[{name}] {mode} failed: {res[mode]['error']}", flush=True)
            if args.verbose:
                traceback.print_exc()
        finally:
            free(device)
    res["gflop_per_step"] = gflop
    del stage, batch, network
    free(device)
    return res


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ the chain
def sample_chain(args: argparse.Namespace, device: torch.device, clip_model: str, embed_dim: int) -> dict[str, Any]:
    """One 16-frame sample through P, D_t, ↑F, SR_t, SR_h (random weights, paper widths or --tiny), bf16."""
    from lightning_mav.pipeline import MakeAVideoPipeline

    res: dict[str, Any] = {}
    try:
        stages = {n: build_stage(n, args.tiny, clip_model, embed_dim) for n in ("prior", "dt", "interp", "sr_t",
                                                                                "sr_h")}
        P = stages["prior"]
        for n in ("dt", "interp"):
            stages[n].clip = P.clip  # as MakeAVideoPipeline.from_checkpoints shares it
        pipe = MakeAVideoPipeline(P.clip, P, stages["dt"], stages["interp"], stages["sr_t"], stages["sr_h"],
                                  device=device, dtype="bf16")
        steps = args.sample_steps or (2 if args.tiny else None)
        res["steps"] = {name: steps or stage.sample_steps for name, stage in pipe.stages.items()}
        frame_batch = args.frame_batch or (None if args.tiny else 16)
        res.update(num_frames=16, frame_batch=frame_batch, sr_t_chunk=args.sr_t_chunk)
        print(f"[sample] 16 frames through {', '.join(pipe.stages)}, steps {res['steps']}", flush=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t0 = time.perf_counter()
        frames = pipe("a red circle moving to the left", num_frames=16, steps=steps, seed=0, frame_batch=frame_batch,
                      sr_t_chunk=args.sr_t_chunk, progress=False)
        sync(device)
        res["seconds"] = time.perf_counter() - t0
        res["shape"] = list(frames.shape)
        res["finite"] = bool(torch.isfinite(frames).all())
        if device.type == "cuda":
            res["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        print(f"[sample] {res['seconds']:.1f} s, frames {res['shape']}", flush=True)
    except Exception as e:  # noqa: BLE001
        res["error"] = one_line(e)
        print(f"[sample] failed: {res['error']}", flush=True)
        if args.verbose:
            traceback.print_exc()
    free(device)
    return res


# ------------------------------------------------------------------------------------------------ report
def section_body(res: dict[str, Any]) -> str:
    rows = []
    for name, r in res["networks"].items():
        for mode in ("eager", "compiled"):
            m = r.get(mode, {})
            note = r.get("error") or m.get("error") or m.get("skipped") or ""
            rows.append([f"{r['paper_name']} ({name})" if mode == "eager" else "", mode, r.get("batch", "-"),
                         fmt(r.get("gflop_per_step"), 0), fmt(m.get("step_s", float("nan")) * 1e3, 1),
                         fmt(100 * m["mfu"], 1) if m.get("mfu") is not None else "-",
                         fmt(m.get("peak_mib", float("nan")) / 1024, 1), fmt(m.get("compile_s"), 0), note])
    table = md_table(["network", "mode", "batch", "GFLOP/step", "ms/step", "MFU %", "peak GiB", "compile s", "note"],
                     rows, "llrrrrrrl")
    s = res["sample"]
    sample = (f"failed: {s['error']}" if "error" in s else f"skipped ({s['skipped']})" if "skipped" in s else
              f"{s['seconds']:.1f} s for one 16-frame prompt -> frames {s['shape']} (steps {s['steps']}, SR_h "
              f"{s['frame_batch'] or 'all'} frames per call" + (f", peak {s['peak_mib'] / 1024:.1f} GiB" if
                                                                 s.get("peak_mib") else "") + ")")
    return f"""`{res['command']}`

{res['device_name']}, torch {res['machine']['torch']}, {res['date']}; {res['total_s']:.0f} s in all. MFU against
{res['peak_source']} ({fmt(res['peak_tflops'], 0)} TFLOP/s).

{table}

Pipeline sample at {'tiny' if res['tiny'] else 'paper'} widths (random weights, bf16): {sample}.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny networks and sizes (a smoke run, e.g. on the CPU)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--out", default=None, help="write the results to this JSON file")
    p.add_argument("--write", action="store_true", help=f"replace the '{SECTION}' section of benchmarks/RESULTS.md")
    p.add_argument("--networks", default=",".join(NETWORKS), help="comma-separated subset of " + ",".join(NETWORKS))
    p.add_argument("--steps", type=int, default=20, help="timed training steps per network and mode")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compiled: they include compiling)")
    p.add_argument("--no-compile", action="store_true", help="eager steps only (compiled entries say skipped)")
    p.add_argument("--no-sample", action="store_true", help="skip the pipeline sample")
    p.add_argument("--sample-steps", type=int, default=None, help="sampling steps of every stage (default: the "
                                                                  "paper overlays'; --tiny: 2)")
    p.add_argument("--frame-batch", type=int, default=None, help="SR_h frames per call in the sample (default 16)")
    p.add_argument("--sr-t-chunk", type=int, default=None, help="SR_t frame window in the sample (default: all)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds after which no further run starts")
    p.add_argument("--verbose", action="store_true", help="tracebacks of failures")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    names = [n.strip() for n in args.networks.split(",") if n.strip()]
    unknown = [n for n in names if n not in NETWORKS]
    if unknown:
        raise SystemExit(f"error: --networks: unknown {', '.join(unknown)}; expected some of {', '.join(NETWORKS)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no CUDA device is available")
    t_start = time.perf_counter()
    deadline = t_start + args.budget
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    clip_model = "mav-tiny" if args.tiny else paper_init_args("prior").get("clip_model") or "ViT-H-14"
    from lightning_mav.nn.clip import resolve_config

    embed_dim = resolve_config(clip_model)["embed_dim"]
    peak, source = peak_flops(device)
    argv_text = " ".join(argv if argv is not None else sys.argv[1:])
    res: dict[str, Any] = {
        "command": f"python -m benchmarks.gpu_check {argv_text}".strip(), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else machine()["cpu"],
        "tiny": args.tiny, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "clip_model": clip_model,
        "peak_flops": peak, "peak_tflops": peak / 1e12 if peak else None, "peak_source": source, "networks": {}}
    print(f"gpu_check on {res['device_name']}: peak {fmt(res['peak_tflops'], 1)} TFLOP/s ({source})", flush=True)
    for name in names:
        res["networks"][name] = check_network(name, args, device, peak, clip_model, embed_dim, deadline)
    if args.no_sample:
        res["sample"] = {"skipped": "--no-sample"}
    elif time.perf_counter() > deadline:
        res["sample"] = {"skipped": f"over the --budget of {args.budget:.0f} s"}
    else:
        res["sample"] = sample_chain(args, device, clip_model, embed_dim)
    res["total_s"] = time.perf_counter() - t_start
    print(f"gpu_check: {res['total_s']:.0f} s in all", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1, default=str)
    if args.write:
        write_section(SECTION, section_body(res), after="## GPU")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
