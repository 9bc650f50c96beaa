"""The fps-conditioning check: the same prompt and noise sampled by D_t at a low and a high frame rate.

D_t is conditioned on fps (paper §2.5): at fps 4 an object must move farther per frame than at fps 24 (6x in the real
clips). Each pair's D_t frames are scored with :func:`lightning_mav.metrics.speed.video_speeds` and drawn side by side
in one contact sheet (first row the low fps, second the high one) under ``out/sheets/fps-pair-*.png``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from lightning_mav.evaluation.samples import sample_name
from lightning_mav.media import contact_sheet, save_png
from lightning_mav.metrics.intervals import UnitMeans
from lightning_mav.metrics.speed import video_speeds
from lightning_mav.pipeline import GenerationSettings, MakeAVideoPipeline

FPS_PAIR = (4.0, 24.0)


@torch.no_grad()
def fps_pair(pipe: MakeAVideoPipeline, prompts: Sequence[str], settings: GenerationSettings, out: Path, *,
             seed: int, fps: tuple[float, float] = FPS_PAIR) -> dict[str, Any]:
    """D_t's videos for ``prompts`` at ``fps[0]`` and ``fps[1]`` (same seed, so the same noise), their speeds, and a
    sheet per prompt.

    Returns:
        ``{"metrics": {name: {"value", "about", "interval"?}}, "sheets": [{"prompt", "sheet"}]}``: speeds per frame
        (fraction of the side) at each fps, their per-prompt ratio low / high (t interval over prompts, target >= 2)
        and the fraction of prompts whose speeds are in the right order (Wilson interval).
    """
    low, high = fps
    run = replace(settings, stop_after="D_t")
    videos = {}
    for rate in fps:
        frames = pipe(list(prompts), **{**vars(run), "fps": rate}, seed=seed, progress=False)  # [B, F, 3, H, W]
        videos[rate] = frames.transpose(1, 2).float().clamp(-1, 1)  # [B, 3, F, H, W]
    speeds = {rate: video_speeds(v) for rate, v in videos.items()}
    ratio = speeds[low] / speeds[high].clamp(min=1e-6)
    means = UnitMeans(("slow", "fast", "ratio", "order"), rates=("order",))
    means.update({"slow": speeds[high], "fast": speeds[low], "ratio": ratio,
                  "order": (speeds[low] > speeds[high]).double()})
    scores = means.compute()
    sheets = []
    for i, prompt in enumerate(prompts):
        path = out / "sheets" / f"fps-pair-{sample_name(i, prompt)}.png"
        save_png(contact_sheet(torch.stack([videos[low][i], videos[high][i]]), max_frames=videos[low].shape[2]), path)
        sheets.append({"prompt": prompt, "sheet": str(path), "speed_low": float(speeds[low][i]),
                       "speed_high": float(speeds[high][i])})
    n = len(prompts)
    about = {
        "fast": f"median object step per frame (fraction of the side) of D_t at fps {low:g} ({n} prompts)",
        "slow": f"the same at fps {high:g}, same prompts and noise",
        "ratio": f"per prompt, the speed at fps {low:g} over that at fps {high:g} (real clips ~{high / low:g}; "
                 "target >= 2)",
        "order": f"fraction of prompts whose object moves faster per frame at fps {low:g} than at fps {high:g}"}
    names = {"fast": f"motion/fps{low:g}/speed", "slow": f"motion/fps{high:g}/speed", "ratio": "motion/fps_ratio",
             "order": "motion/fps_order"}
    metrics = {}
    for key, name in names.items():
        entry: dict[str, Any] = {"value": float(scores[key]["mean"]), "about": about[key]}
        bounds = [float(scores[key]["low"]), float(scores[key]["high"])]
        if all(b == b for b in bounds):  # not NaN
            entry["interval"] = bounds
        metrics[name] = entry
    return {"metrics": metrics, "sheets": sheets}
