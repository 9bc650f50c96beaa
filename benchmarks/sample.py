"""Sampling time: one 16-frame video through every stage of ``MakeAVideoPipeline`` at the demo sizes.

The networks are built from the demo configs in ``experiments/*.yaml`` (random weights: timing does not depend on
them; the zero-initialised output layers are perturbed so no layer computes on all-zero tensors), chained by the
library's :class:`lightning_mav.pipeline.MakeAVideoPipeline` exactly as ``mav generate`` runs it, and the whole call is
timed. Per-stage times come from the same call: each stage's entry point (``P.sample``, ``D_t.sample``,
``up_F.interpolate``, ``SR_t.sample``, ``super_resolve_frames``) is wrapped on the instance with a timer, and a forward
hook on each network counts its calls and their batch size (a doubled batch = classifier-free guidance in one call).

Shapes at the demo sizes: P -> ``y_e``; D_t 16 frames at 32x32; ↑F (skip 5) -> 76 frames at 32x32 (windows of 16);
SR_t -> 76 x 64x64; SR_h -> 76 x 128x128 (frame by frame, shared noise). Every stage runs ``--steps`` DDIM steps
(default 50) with its configured guidance (P 2.0 and D_t 3.0: classifier-free guidance, both branches in one
doubled batch; ↑F's default is 1.0 — no guidance, the known frames pin the content — and SR has none).

A DDIM step is one identical network call (two branches batched under guidance), so the time of ``s`` steps is a fixed
part (text encoding, window and noise set-up) plus ``s`` times a per-step cost; the default run measures 2 steps per
stage and also prints ``50 x`` its per-step time, the ``--full`` run measures the real 50 steps (~15 CPU-minutes here).

    python -m benchmarks.sample                    # 2 DDIM steps per stage (+ the 50-step projection), ~2 min
    python -m benchmarks.sample --full --write     # 50 DDIM steps per stage, measured; RESULTS.md
    python -m benchmarks.sample --steps 0          # each stage's own sample_steps from the experiments
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    add_common_args, apply_preset, configure_threads, fmt, heap_malloc, init_args, machine, machine_line, md_table,
    mode_flag, save_json, write_section,
)

SECTION = "## Sampling"
PRESETS = {
    "quick": dict(steps=1, reps=1, threads=1),
    "default": dict(steps=2, reps=1, threads=1),
    "full": dict(steps=50, reps=1, threads=1),
}
TARGET_STEPS = 50
STAGE_LABELS = {"P": "P (prior)", "D_t": "D_t", "up_F": "↑F (skip 5)", "SR_t": "SR_t", "SR_h": "SR_h (per frame)"}


def _drop(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


def build_pipeline(workdir: Path):
    """The demo chain with random weights: ``MakeAVideoPipeline(C_x, P, D_t, up_F, SR_t, SR_h)`` on the CPU."""
    from lightning_mav.pipeline import MakeAVideoPipeline
    from lightning_mav.stages.clip import CLIPStage
    from lightning_mav.stages.decoder import DecoderStage
    from lightning_mav.stages.interpolation import InterpolationStage
    from lightning_mav.stages.prior import PriorStage
    from lightning_mav.stages.superres import SuperResStage

    torch.manual_seed(0)
    clip_args = init_args("clip")
    clip_stage = CLIPStage(model_name=clip_args.get("model_name", "mav-tiny"))
    clip_ckpt = workdir / "clip.ckpt"  # what CLIPStage's checkpoint holds for CLIP.from_checkpoint
    torch.save({"hyper_parameters": {"model_name": clip_stage.hparams.model_name, "model_cfg": None},
                "state_dict": {f"clip.{k}": v for k, v in clip_stage.clip.state_dict().items()}}, clip_ckpt)
    P = PriorStage(clip_ckpt=str(clip_ckpt), **_drop(init_args("prior"), "clip_ckpt"))
    C_x = P.clip
    dt = init_args("dt")
    dt_unet = {**init_args("decoder")["unet"], **dt["unet"], "image_embed_dim": C_x.embed_dim}
    D_t = DecoderStage(unet=dt_unet, clip_ckpt=None, **_drop(dt, "clip_ckpt", "init_from", "unet"))
    interp = init_args("interp")
    up_F = InterpolationStage(unet=dt_unet, clip_ckpt=None, **_drop(interp, "clip_ckpt", "init_from", "unet"))
    sr_t = init_args("sr_t")
    SR_t = SuperResStage(unet={**init_args("sr_l")["unet"], **sr_t.get("unet", {})},
                         **_drop(sr_t, "init_from", "unet"))
    SR_h = SuperResStage(**init_args("sr_h"))
    with torch.no_grad():  # leave no all-zero layer (ADM zero-inits the output convs)
        for stage in (P, D_t, up_F, SR_t, SR_h):
            for p in stage.parameters():
                if p.requires_grad and not p.any():
                    p.normal_(0.0, 0.02)
    for stage in (D_t, up_F):
        stage.clip = C_x  # as MakeAVideoPipeline.from_checkpoints shares it
    return MakeAVideoPipeline(C_x, P, D_t, up_F, SR_t, SR_h, device="cpu", dtype="fp32")


class StageClock:
    """Times each stage of one pipeline call (entry points wrapped on the instances) and counts network calls."""

    ENTRY = {"P": ("P", "sample"), "D_t": ("D_t", "sample"), "up_F": ("up_F", "interpolate"),
             "SR_t": ("SR_t", "sample"), "SR_h": (None, "super_resolve_frames")}
    NETWORK = {"P": "prior", "D_t": "unet", "up_F": "unet", "SR_t": "unet", "SR_h": "unet"}

    def __init__(self, pipe: Any) -> None:
        self.times: dict[str, tuple[float, float]] = {}
        self.calls: dict[str, list[int]] = {name: [] for name in self.ENTRY}
        for name, (attr, method) in self.ENTRY.items():
            owner = pipe if attr is None else getattr(pipe, attr)
            setattr(owner, method, self._wrap(name, getattr(owner, method)))
            network = getattr(getattr(pipe, name), self.NETWORK[name])
            network.register_forward_pre_hook(self._hook(name))

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed_call(*args: Any, **kwargs: Any) -> Any:
            w0, c0 = time.perf_counter(), time.process_time()
            out = fn(*args, **kwargs)
            self.times[name] = (time.perf_counter() - w0, time.process_time() - c0)
            return out
        return timed_call

    def _hook(self, name: str) -> Callable[..., None]:
        def count(module: Any, args: tuple[Any, ...]) -> None:
            self.calls[name].append(int(args[0].shape[0]))
        return count

    def reset(self) -> None:
        self.times = {}
        self.calls = {name: [] for name in self.ENTRY}


def preset_steps(args: argparse.Namespace) -> int:
    return PRESETS["quick" if args.quick else "full" if args.full else "default"]["steps"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    threads = configure_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_pipeline(Path(tmp))
    clock = StageClock(pipe)
    steps = args.steps or None  # 0/None: each stage's sample_steps
    print(f"sample: steps={steps or 'stage defaults'}, threads={threads}, runs={args.reps}", flush=True)
    pipe("a red circle moving", num_frames=16, steps=1, seed=0, progress=False)  # warm-up: every shape once
    runs, loads = [], []
    for rep in range(args.reps):
        clock.reset()
        w0, c0 = time.perf_counter(), time.process_time()
        frames = pipe("a red circle moving", num_frames=16, steps=steps, seed=rep, progress=False)
        total = (time.perf_counter() - w0, time.process_time() - c0)
        loads.append(os.getloadavg()[0])
        runs.append({"total": total, "stages": dict(clock.times), "calls": {k: list(v) for k, v in clock.calls.items()},
                     "shape": list(frames.shape)})
        print(f"  run {rep}: {total[0]:.1f} s wall, {total[1]:.1f} CPU-s, frames {tuple(frames.shape)}; " +
              ", ".join(f"{k} {v[0]:.1f}s" for k, v in clock.times.items()), flush=True)
    stage_steps = {name: (steps or getattr(pipe, name).sample_steps) for name in StageClock.ENTRY}
    guidance = {name: getattr(getattr(pipe, name), "guidance_scale", None) for name in StageClock.ENTRY}
    return {"machine": machine(), "loads": loads, "threads": threads, "steps": stage_steps, "guidance": guidance,
            "runs": runs, "command": f"python -m benchmarks.sample{mode_flag(args)}" +
            (f" --steps {args.steps}" if args.steps != preset_steps(args) else "")}


def report(res: dict[str, Any]) -> str:
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    runs = res["runs"]
    rows = []
    shapes = {"P": "text -> y_e", "D_t": "y_e -> 16 x 32²", "up_F": "16 -> 76 x 32²", "SR_t": "76 x 32² -> 64²",
              "SR_h": "76 x 64² -> 128²"}
    stage_sum_wall = stage_sum_cpu = 0.0
    project = any(n != TARGET_STEPS for n in res["steps"].values())
    for name in StageClock.ENTRY:
        if name not in runs[0]["stages"]:
            continue
        wall = med([r["stages"][name][0] for r in runs])
        cpu = med([r["stages"][name][1] for r in runs])
        stage_sum_wall, stage_sum_cpu = stage_sum_wall + wall, stage_sum_cpu + cpu
        calls = runs[0]["calls"][name]
        g = res["guidance"][name]
        cfg = "yes" if (g or 1.0) != 1.0 and name in ("P", "D_t", "up_F") else "no"
        n_steps = res["steps"][name]
        rows.append([STAGE_LABELS[name], shapes[name], str(n_steps), cfg, str(len(calls)),
                     str(max(calls) if calls else "-"), fmt(wall, 1), fmt(cpu, 1),
                     fmt(1000 * cpu / max(len(calls), 1), 0)] +
                    ([fmt(wall / n_steps * TARGET_STEPS, 0), fmt(cpu / n_steps * TARGET_STEPS, 0)] if project else []))
    total_wall = med([r["total"][0] for r in runs])
    total_cpu = med([r["total"][1] for r in runs])
    rows.append(["**whole pipeline**", "text -> 76 x 128²", "", "", str(sum(len(c) for c in runs[0]["calls"].values())),
                 "", f"**{total_wall:.1f}**", f"**{total_cpu:.1f}**", ""] +
                ([f"**{stage_sum_wall / max(res['steps'].values()) * TARGET_STEPS:.0f}**",
                  f"**{stage_sum_cpu / max(res['steps'].values()) * TARGET_STEPS:.0f}**"]
                 if project and len(set(res["steps"].values())) == 1 else ["", ""] if project else []))
    lines = [
        f"`{res['command']}` — {machine_line(res['machine'], res['loads'])}",
        "",
        f"One prompt, 16 frames from D_t, fp32 on the CPU, random weights (timing only), DDIM; median of {len(runs)} "
        "run(s) after a 1-step warm-up call. Per-stage times are measured inside the same `MakeAVideoPipeline` call "
        "as the whole; *calls* = network evaluations, *batch* = items per call (2 = both guidance branches in one "
        "batch). "
        + ("C allocator: glibc keeps freed memory in its heap, as in the `mav`/`lightning` commands. "
           if heap_malloc(res) else "C allocator: glibc's own defaults (`--malloc default`). ")
        + "The whole call also encodes the prompt and moves tensors: "
        f"{total_cpu - stage_sum_cpu:.1f} CPU-s outside the stages."
        + (f" The *{TARGET_STEPS} steps* columns are projections ({TARGET_STEPS} x the measured time per step; run "
           "`--full` to measure them)." if project else ""),
        "",
        md_table(["stage", "shapes", "DDIM steps", "CFG", "calls", "batch", "s (wall)", "CPU-s", "CPU-ms per call"]
                 + ([f"{TARGET_STEPS} steps: s (wall)", f"{TARGET_STEPS} steps: CPU-s"] if project else []), rows,
                 align="llrlrrrrr" + ("rr" if project else "")),
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sample", description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--steps", type=int, default=None, help="DDIM steps for every stage (0: each stage's own)")
    return p


def notes(results: list[dict[str, Any]]) -> list[str]:
    """What the tables show (numbers from the results)."""
    from lightning_mav.pipeline import CPU_FRAME_BATCH
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    r = results[0]
    stage_cpu = {n: med([run["stages"][n][1] for run in r["runs"]]) for n in r["runs"][0]["stages"]}
    total = sum(stage_cpu.values())
    share = ", ".join(f"{STAGE_LABELS[n].split(' ')[0]} {100 * c / total:.0f}%" for n, c in stage_cpu.items())
    out = [f"- Where the time goes (CPU time): {share}. The super-resolution stages dominate: they run on all 76 "
           "frames ↑F makes, SR_h at 128² per frame; D_t and P are cheap at the demo sizes even with guidance."]
    measured = [x for x in results if set(x["steps"].values()) == {TARGET_STEPS}]
    projected = [x for x in results if measured and TARGET_STEPS not in x["steps"].values()
                 and heap_malloc(x) == heap_malloc(measured[0])]
    if measured and projected:
        m = med([run["total"][1] for run in measured[0]["runs"]])
        pr = projected[0]
        proj = sum(med([run["stages"][n][1] for run in pr["runs"]]) / pr["steps"][n] * TARGET_STEPS
                   for n in pr["runs"][0]["stages"])
        out.append(f"- The default run's {TARGET_STEPS}-step projection ({proj:.0f} CPU-s) and the measured "
                   f"{TARGET_STEPS}-step run ({m:.0f} CPU-s) agree within {100 * abs(proj - m) / m:.0f}%: every DDIM "
                   "step makes the same network calls (one per stage; SR_h one per chunk of "
                   f"{CPU_FRAME_BATCH} frames on the CPU), so the short default run predicts the long one.")
    pairs = [(h, d) for h in results if heap_malloc(h) for d in results if not heap_malloc(d) and d["steps"] == h["steps"]]
    if pairs:
        h, d = pairs[0]

        def per_step(x: dict[str, Any]) -> float:
            return sum(med([run["stages"][n][1] for run in x["runs"]]) / x["steps"][n] for n in x["runs"][0]["stages"])
        out.append(
            f"- As in training (see Frame scaling), glibc's default handling of large tensors costs a lot here: "
            f"keeping freed memory in the heap (`--malloc heap`, the default) one DDIM step of every stage together "
            f"takes {per_step(h):.1f} CPU-s instead of {per_step(d):.1f} with `--malloc default` "
            f"({per_step(d) / per_step(h):.2f}x faster; the two runs side by side, same steps); SR_h's and SR_t's "
            "activations (76 frames at 128² and 64²) are the largest tensors of the pipeline.")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = apply_preset(build_parser().parse_args(argv), PRESETS)
    if args.from_json:  # several dumps (comma-separated): one table each, in one section
        results = [json.loads(Path(p).read_text()) for p in args.from_json.split(",")]
    else:
        results = [run(args)]
    body = "\n\n".join(report(r) for r in results)
    why = notes(results)
    body += "\n\nNotes:\n\n" + "\n".join(why)
    print("\n" + SECTION + "\n\n" + body, flush=True)
    save_json(args.json, results[0])
    if args.write:
        write_section(SECTION, body)
    return results[0]


if __name__ == "__main__":
    main(sys.argv[1:])
