"""The demo (``mav demo``): the whole Make-A-Video chain on the built-in Moving Shapes data, end to end, on a CPU.

data → C_x → P → D → SR_l → SR_h → D_t → ↑F → SR_t → videos for the held-out prompts → metrics →
``runs/demo/report.md`` (metrics table, a contact sheet per prompt, mp4 and gif files).

Every stage is exactly ``lightning fit --config experiments/<stage>.yaml`` (run in this process), so the demo is
also the proof that the YAMLs chain: each child starts from ``runs/<parent>/checkpoints/last.ckpt``. A finished
stage leaves ``runs/<stage>/DONE`` and is skipped when the demo runs again, unless ``--force``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from lightning_mav.networks import NETWORKS
from lightning_mav.nn.mixed_precision import native_bf16
from lightning_mav.trainer_cli import EXPERIMENTS, MAVCLI


DEMO_PROMPTS = 24  # every held-out prompt of the shapes data
DEMO_VIDEOS_PER_PROMPT = 2
DEMO_FPS_PAIR = 4  # prompts sampled by D_t at fps 4 and 24


def _elapsed(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def demo_precision(precision: str = "auto") -> str:
    """The stages' ``trainer.precision``: ``auto`` = ``bf16-mixed`` where this machine computes bf16 natively (an
    Ampere or later GPU, a CPU with AMX or AVX512-BF16: faster training steps, docs/choices.md#bf16-on-cpus),
    else ``32-true``."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if native_bf16("cuda" if torch.cuda.is_available() else "cpu") else "32-true"


def train_stage(stage: str, *, data: Path, runs: Path, max_steps: int | None = None, precision: str | None = None,
                extra: Sequence[str] = ()) -> dict:
    """``lightning fit --config experiments/<stage>.yaml`` on the shapes data; returns what DONE records."""
    args = ["fit", "--config", str(EXPERIMENTS / f"{stage}.yaml"), "--data.init_args.root", str(data),
            "--trainer.logger.init_args.save_dir", str(runs)]
    if precision is not None:
        args += ["--trainer.precision", precision]
    if max_steps is not None:
        interval = max(1, max_steps // 2)
        args += ["--trainer.max_steps", str(max_steps), "--trainer.val_check_interval", str(interval)]
    start = time.time()
    cli = MAVCLI(args=[*args, *extra])
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if v.numel() == 1}
    last = runs / stage / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise RuntimeError(f"stage {stage} finished without writing {last}")
    return {"stage": stage, "steps": cli.trainer.global_step, "seconds": round(time.time() - start, 1),
            "precision": str(cli.trainer.precision), "metrics": metrics}


def run_demo(*, data: Path = Path("data/shapes"), runs: Path = Path("runs"), force: bool = False,
             quick: bool = False, num_prompts: int = DEMO_PROMPTS, videos_per_prompt: int = DEMO_VIDEOS_PER_PROMPT,
             fps_pair_prompts: int = DEMO_FPS_PAIR, stages: Sequence[str] | None = None,
             precision: str = "auto") -> Path:
    """Train every stage that is not done yet, then evaluate the chain and write ``runs/demo/report.md``.

    ``precision`` (see :func:`demo_precision`) also sets the sampling dtype of the evaluation (bf16 or fp32).
    ``num_prompts`` x ``videos_per_prompt`` videos are scored (default 24 x 2: enough for the report's intervals to
    tell changes apart, docs/choices.md#demo-report-24-prompts-x-2-videos-with-95-intervals) and
    ``fps_pair_prompts`` prompts sampled by D_t at fps 4 and 24.

    ``runs`` must be the folder the stage YAMLs chain through (``runs/<parent>/checkpoints/last.ckpt``, relative to
    the working directory); it is a parameter for tests that run in a temporary working directory.
    """
    from datamodules import shapes

    t0 = time.time()
    if force or not shapes.is_complete(data):
        print(f"[data] writing Moving Shapes to {data} ...", flush=True)
        shapes.generate(data, **(_QUICK_DATA if quick else {}))
    chain = [n for n in NETWORKS if stages is None or n.run in stages]
    chosen, precision = precision, demo_precision(precision)
    print(f"[precision] {precision}" + (" (auto: bf16 is native here; --precision 32-true for fp32)"
                                        if chosen == "auto" and precision != "32-true" else ""), flush=True)
    records = []
    for i, (stage, paper, what) in enumerate(((n.run, n.paper, n.what) for n in chain), 1):
        done = runs / stage / "DONE"
        if done.is_file() and not force:
            record = json.loads(done.read_text())
            print(f"[{i}/{len(chain)}] {stage} ({paper}): done earlier, skipped (--force retrains)", flush=True)
        else:
            shutil.rmtree(runs / stage, ignore_errors=True)  # a fresh run, not a mix with an older one
            print(f"[{i}/{len(chain)}] {stage} ({paper}): {what} ...", flush=True)
            record = train_stage(stage, data=data, runs=runs, max_steps=_QUICK_STEPS if quick else None,
                                 precision=precision)
            done.write_text(json.dumps(record, indent=1) + "\n")
            loss = record["metrics"].get("val/loss")
            print(f"[{i}/{len(chain)}] {stage} ({paper}): {record['steps']} steps in "
                  f"{_elapsed(record['seconds'])}" + (f", val/loss {loss:.4f}" if loss is not None else ""),
                  flush=True)
        records.append(record)

    from lightning_mav.evaluation import EvalOptions, evaluate

    print("[eval] generating videos for the held-out prompts and scoring them ...", flush=True)
    out = runs / "demo"
    # steps=None: every stage samples with its own sample_steps, as its YAML set them and as `mav generate` does
    # (docs/choices.md#demo-evaluation-each-stage-samples-with-its-own-steps)
    result = evaluate(EvalOptions(runs=str(runs), data=str(data), out=str(out), num_prompts=num_prompts, quick=quick,
                                  videos_per_prompt=videos_per_prompt, fps_pair_prompts=fps_pair_prompts,
                                  steps=None, eval_clips=8,
                                  dtype="bf16" if precision.startswith("bf16") else "fp32"))
    report = write_report(out, records, result, seconds=time.time() - t0)
    print(f"[done] {report} ({_elapsed(time.time() - t0)})", flush=True)
    return report


_QUICK_STEPS = 4
_QUICK_DATA = dict(num_images=128, num_videos=16, num_val_images=32, num_val_videos=8)


def write_report(out: Path, records: list[dict], result: dict, *, seconds: float) -> Path:
    """``report.md``: what each stage trained, the metrics, and the videos per prompt."""
    from lightning_mav.evaluation.extension import extension_section
    from lightning_mav.evaluation.report import fps_pair_section, metrics_table

    lines = ["# Make-A-Video on Moving Shapes", "",
             f"The whole chain, trained and evaluated on this machine in {_elapsed(seconds)} "
             "(stages trained earlier and skipped count as 0).", "", "## Stages", "",
             "| stage | paper | steps | time | precision | val/loss |", "|---|---|---:|---:|---|---:|"]
    names = {n.run: n.paper for n in NETWORKS}
    for r in records:
        loss = r["metrics"].get("val/loss")
        lines.append(f"| {r['stage']} | {names.get(r['stage'], '')} | {r['steps']} | {_elapsed(r['seconds'])} | "
                     f"{r.get('precision', '32-true')} | " + (f"{loss:.4f}" if loss is not None else "–") + " |")
    run = result["run"]
    lines += ["", f"Videos sampled in {run.get('dtype', 'float32')}: {run.get('prompts')} held-out prompts x "
              f"{run.get('videos_per_prompt', 1)} videos; 95% intervals in brackets (Wilson for rates, t for means).",
              "", "## Metrics", "", *metrics_table(result["metrics"])]
    lines += fps_pair_section(out, result)
    extension = extension_section(result, out)  # ↑F extending a real clip, when the run scored it
    if extension:
        lines += ["", *extension]
    lines += ["", "## Videos", ""]
    for video in result["videos"]:
        files = " · ".join(f"[{Path(f).suffix[1:]}]({Path(f).relative_to(out)})" for f in video["files"])
        lines += [f"**{video['prompt']}** — {files}", "",
                  f"![{video['prompt']}]({Path(video['sheet']).relative_to(out)})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
