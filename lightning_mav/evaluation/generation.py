"""Generating evaluation samples: one pipeline call per batch of prompts, with D_t's and ↑F's frames besides the
final ones, and the paper's ablation (D applied frame by frame) from the same embeddings and noise."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor

from lightning_mav.pipeline import GenerationSettings, MakeAVideoPipeline, PerStage, per_stage, stage_generator


@dataclass
class Generated:
    """One batch of samples: ``frames[name]`` ``[B, 3, F, H, W]`` in [-1, 1] for ``"D_t"``, ``"D_per_frame"``,
    ``"up_F"`` (when it ran) and the last stage that ran (``final``, e.g. ``"SR_h"``); ``fps`` of the final frames."""

    frames: dict[str, Tensor]
    final: str
    fps: float


def final_size(pipe: MakeAVideoPipeline, stop_after: str | None) -> int:
    """Side of the final frames: D_t's, times the factor of every super-resolution stage that runs."""
    size = pipe.D_t.image_size
    for stage in pipe.stages_run(stop_after):
        if stage in ("SR_t", "SR_h"):
            size *= getattr(pipe, stage).factor
    return size


@torch.no_grad()
def sample_per_frame(pipe: MakeAVideoPipeline, image_embed: Tensor, *, num_frames: int, seed: int,
                     steps: PerStage = None, guidance: PerStage = None, noise: Tensor | None = None) -> Tensor:
    """The ablation: D applied frame by frame. ``y_e [B, D]`` -> ``[B, 3, F, H, W]`` in [-1, 1].

    D_t's own sampler with ``per_frame=True`` (temporal convolutions and attention skipped, no fps term): its
    spatial layers, i.e. D, on every frame independently. The initial noise is D_t's (the same stage generator), so
    the comparison with D_t differs only in the temporal layers. ``noise`` ``[B, 3, F, H, W]`` overrides it.
    """
    D_t = pipe.D_t
    with pipe.autocast():
        video = D_t.sample(image_embed, num_frames=num_frames, per_frame=True,
                           steps=int(per_stage(steps, "D_t", D_t.sample_steps)),
                           guidance_scale=float(per_stage(guidance, "D_t", D_t.guidance_scale)),
                           generator=stage_generator(seed, "D_t"), noise=noise)
    return video.float().clamp(-1, 1).cpu()


@torch.no_grad()
def generate_batch(pipe: MakeAVideoPipeline, prompts: list[str], *, seed: int,
                   settings: GenerationSettings) -> Generated:
    """One pipeline call for ``prompts`` (seeded), with D_t's and ↑F's frames and the per-frame ablation."""
    outputs: dict[str, Tensor] = {}
    final = pipe(prompts, **vars(settings), seed=seed, progress=False,
                 on_stage_end=lambda name, output: outputs.__setitem__(name, output))
    frames = {name: outputs[name].float().clamp(-1, 1).cpu() for name in ("D_t", "up_F") if name in outputs}
    last = pipe.stages_run(settings.stop_after)[-1]
    frames[last] = rearrange(final, "b f c h w -> b c f h w")
    frames["D_per_frame"] = sample_per_frame(pipe, outputs["P"], num_frames=settings.num_frames, seed=seed,
                                             steps=settings.steps, guidance=settings.guidance)
    return Generated(frames=frames, final=last, fps=float(pipe.last_fps))
