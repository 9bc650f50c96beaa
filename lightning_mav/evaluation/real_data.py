"""Scores on real validation data: the real side of FVD, real motion, ↑F's PSNR on held-out frames of real clips,
↑F extending real clips, and SR PSNR on downsampled real images / clips (each next to its baseline: linear blend,
constant velocity, bicubic)."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from lightning_mav.diffusion import Diffusion
from lightning_mav.evaluation.chain import Chain
from lightning_mav.evaluation.generation import final_size
from lightning_mav.evaluation.protocols import ucf101_real_clips, ucf101_sampling_description
from lightning_mav.evaluation.scores import EvalMetrics
from lightning_mav.metrics import ExtrapolationScore, interpolation_psnr, real_stats_path, sr_psnr
from lightning_mav.pipeline import GenerationSettings, MakeAVideoPipeline, per_stage, stage_generator
from lightning_mav.stages.superres import SuperResStage


def real_batches(urls: str, kind: str, *, size: int, limit: int, batch_size: int = 4, num_frames: int = 16,
                 fps: float = 6.0) -> Iterator[tuple[Tensor, Tensor | None, list[str]]]:
    """Up to ``limit`` real items of validation shards, this rank's share under DDP, centre-cropped to ``size``.

    ``kind="videos"``: ``(clips [B, 3, F, S, S], fps [B], keys)`` with ``num_frames`` frames at ``fps`` (or the
    nearest rate the native one allows); ``kind="images"``: ``(images [B, 3, S, S], None, keys)``. Values in
    [-1, 1]; ``keys`` are the samples' shard keys.
    """
    from datamodules.shards import ShardStream, resolve_rank
    from datamodules.tars import expand_urls
    from datamodules.text_image import TextImageCodec
    from datamodules.video import VideoCodec

    rank, world = resolve_rank()
    share = limit // world + int(rank < limit % world)
    codec = VideoCodec(num_frames, size, fps, fps) if kind == "videos" else TextImageCodec(size)
    stream = ShardStream(expand_urls(urls), codec, batch_size=batch_size, train=False, seed=0, rank=rank,
                         world_size=world)
    seen = 0
    for batch in stream:
        keep = batch["valid"].bool()
        x = batch["video" if kind == "videos" else "image"][keep][: share - seen]
        keys = [key for key, k in zip(batch["key"], keep.tolist()) if k][: len(x)]
        if len(x):
            seen += len(x)
            if kind == "videos":
                yield rearrange(x, "b f c h w -> b c f h w"), batch["fps"][keep][: len(x)].float(), keys
            else:
                yield x, None, keys
        if seen >= share:
            return


def _shards_reason(urls: str, what: str) -> str | None:
    """None when ``urls`` names shards, else why the scores that need them are not computed."""
    from datamodules.tars import expand_urls

    try:
        expand_urls(urls)
    except (ValueError, FileNotFoundError):
        return f"not computed: no {what} at {urls}"
    return None


@dataclass(frozen=True)
class RealData:
    """Where the real validation data is and how much of it to score."""

    videos: str
    images: str
    clips: int = 16  # real clips / images per PSNR score (↑F, SR_l, SR_t, SR_h) and for the motion reference
    fvd_videos: int = 2048  # real clips for FVD (at most; the shards may hold fewer)
    batch_size: int = 4
    split: str | None = None  # a UCF-101 split list naming FVD's real videos (``videos`` a UCF-101 folder)
    stats_cache: str | None = None  # folder of cached real FVD statistics; None: computed every run

    @property
    def is_ucf101_folder(self) -> bool:
        """Whether ``videos`` is a folder of videos (UCF-101's ``<ClassName>/*.avi``) rather than of shards."""
        folder = Path(self.videos)
        return folder.is_dir() and not any(folder.glob("*.tar")) and any(p.is_dir() for p in folder.iterdir())


def item_noise(keys: Sequence[str], shape: Sequence[int], *, seed: int, stream: str,
               diffusion: Diffusion | None = None) -> Tensor:
    """Gaussian noise ``[len(keys), *shape]``, each item's drawn from a generator of its own key: a real clip gets
    the same noise whatever batch or DDP rank it lands in, so DDP reproduces the single-process scores. With
    ``diffusion``, drawn as that stage draws it (e.g. ↑F's noise shared across frames, ``frame_noise_share``)."""
    def draw(key: str) -> Tensor:
        generator = stage_generator(seed, f"{stream}/{key}")
        if diffusion is None:
            return torch.randn(tuple(shape), generator=generator)
        return diffusion.noise((1, *shape), generator=generator)[0]
    return torch.stack([draw(key) for key in keys])


@torch.no_grad()
def score_interpolation(pipe: MakeAVideoPipeline, metrics: EvalMetrics, real: RealData,
                        settings: GenerationSettings, seed: int) -> None:
    """↑F on real clips with every ``skip``-th frame kept: PSNR of the frames it fills in vs a linear blend."""
    up_F, k = pipe.up_F, settings.skip
    # the longest clip one window of ↑F covers: keyframes every k frames, k - 1 held-out frames between them
    length = (up_F.num_frames - 1) // k * k + 1
    clips = real_batches(real.videos, "videos", size=up_F.image_size, limit=real.clips, batch_size=real.batch_size,
                         num_frames=length, fps=settings.fps * k)  # at ↑F's output rate, as in the pipeline
    for target, fps, keys in clips:
        # one window per clip: its shape; drawn as ↑F was trained (frames may share part of their noise)
        noise = item_noise(keys, target.shape[1:], seed=seed, stream="up_F", diffusion=up_F.diffusion)
        with pipe.autocast():
            pred = up_F.interpolate(target[:, :, ::k], k, fps=fps / k,
                                    steps=int(per_stage(settings.steps, "up_F", up_F.sample_steps)),
                                    guidance_scale=float(per_stage(settings.guidance, "up_F", up_F.guidance_scale)),
                                    noise=noise.to(pipe.device), generator=stage_generator(seed, "up_F"))
        metrics.update_psnr("up_F", interpolation_psnr(pred.float().cpu(), target, k), len(target))
        metrics.update_interpolation_objects(pred.float().cpu(), target, k)


def extension_lengths(window: int, extend: int = 0) -> tuple[int, int]:
    """``(context, K)``: known frames per scored clip (half ↑F's ``window``, at least 2: the constant-velocity
    guess needs two) and frames to extend (``extend``, or the rest of one window)."""
    context = max(window // 2, 2)
    return context, extend or max(window - context, 1)


@torch.no_grad()
def score_extension(pipe: MakeAVideoPipeline, score: ExtrapolationScore, real: RealData,
                    settings: GenerationSettings, seed: int) -> dict[str, Any] | None:
    """↑F extending real clips, scored into ``score`` (docs/evaluation.md#frame-extrapolation-extend).

    Each clip (``context + K`` frames at ↑F's output rate ``fps · skip``, ↑F's size; :func:`extension_lengths`) keeps
    its first ``context`` frames; ↑F extends them by ``K`` (conditioned on CLIP of their middle frame, as ``mav
    extend`` does) and :class:`lightning_mav.metrics.ExtrapolationScore` compares the extension with the real rest.
    Returns the first clip as an example, ``{"real", "extended": [3, F, H, W], "known": int, "fps": float}`` (None
    without clips)."""
    up_F = pipe.up_F
    context, k = extension_lengths(up_F.num_frames, settings.extend)
    rate = settings.fps * settings.skip  # ↑F's output rate, where the pipeline extends
    clips = real_batches(real.videos, "videos", size=up_F.image_size, limit=real.clips, batch_size=real.batch_size,
                         num_frames=context + k, fps=rate)
    steps = int(per_stage(settings.steps, "up_F", up_F.sample_steps))
    guidance = float(per_stage(settings.guidance, "up_F", up_F.guidance_scale))
    example = None
    for target, fps, keys in clips:
        known = target[:, :, :context]
        with pipe.autocast():
            if context + k <= up_F.num_frames:  # one window: each clip's noise from its key, batched
                noise = item_noise(keys, target.shape[1:], seed=seed, stream="up_F/extend", diffusion=up_F.diffusion)
                pred = up_F.extend(known, k, "forward", fps=fps, context=context, steps=steps,
                                   guidance_scale=guidance, noise=noise.to(pipe.device))
            else:  # several windows: one clip at a time, each from a generator of its key
                pred = torch.cat([up_F.extend(known[i:i + 1], k, "forward", fps=fps[i:i + 1], context=context,
                                              steps=steps, guidance_scale=guidance,
                                              generator=stage_generator(seed, f"up_F/extend/{key}"))
                                  for i, key in enumerate(keys)])
        pred = pred.float().clamp(-1, 1).cpu()
        score.update(pred, target, context)
        if example is None:
            example = {"real": target[0], "extended": pred[0], "known": context, "fps": float(fps[0])}
    return example


@torch.no_grad()
def score_super_resolution(stage: str, module: SuperResStage, pipe: MakeAVideoPipeline, metrics: EvalMetrics,
                           real: RealData, settings: GenerationSettings, seed: int) -> None:
    """An SR stage on downsampled real data (clips for SR_t, images for SR_l / SR_h): PSNR vs bicubic."""
    kind = "videos" if module.unet.temporal else "images"
    items = real_batches(real.videos if kind == "videos" else real.images, kind, size=module.highres_size,
                         limit=real.clips, batch_size=real.batch_size, num_frames=settings.num_frames,
                         fps=settings.fps)
    for target, _, keys in items:
        lowres = module.lowres_of(target)  # what a perfect stage below would hand it
        noise = item_noise(keys, target.shape[1:], seed=seed, stream=stage, diffusion=module.diffusion)
        noise = noise.to(pipe.device)
        lowres_noise = item_noise(keys, lowres.shape[1:], seed=seed, stream=f"{stage}/lowres").to(pipe.device)
        with pipe.autocast():
            pred = module.sample(lowres, steps=int(per_stage(settings.steps, stage, module.sample_steps)),
                                 noise=noise, lowres_noise=lowres_noise, generator=stage_generator(seed, stage))
        metrics.update_psnr(stage, sr_psnr(pred.float().cpu(), target, lowres), len(target))
        metrics.update_sr_edges(stage, pred.float().cpu(), target, lowres)


def fvd_real_clips(real: RealData, settings: GenerationSettings, size: int) -> tuple[Iterator[Tensor], str]:
    """FVD's real clips ``[B, 3, F, S, S]`` (this rank's share) and a line saying how they were sampled (what a cache
    of their statistics is keyed by): a UCF-101 folder (``<ClassName>/*.avi``) as that protocol samples it, or
    video shards at the pipeline's fps."""
    if real.is_ucf101_folder:
        from datamodules.shards import resolve_rank

        rank, world = resolve_rank()
        clips = ucf101_real_clips(real.videos, num_frames=settings.num_frames, size=size, limit=real.fvd_videos,
                                  split_list=real.split, rank=rank, world_size=world, batch_size=real.batch_size)
        return (batch for batch, _ in clips), ucf101_sampling_description(
            num_frames=settings.num_frames, size=size, limit=real.fvd_videos, split_list=real.split)
    batches = real_batches(real.videos, "videos", size=size, limit=real.fvd_videos, batch_size=real.batch_size,
                           num_frames=settings.num_frames, fps=settings.fps)
    return (clips for clips, _, _ in batches), (
        f"shards {real.videos}: the first {real.fvd_videos} clips in evaluation order, {settings.num_frames} frames "
        f"at {settings.fps} fps (or the nearest rate a video allows), centre crop {size}x{size}")


def score_fvd_real(metrics: EvalMetrics, real: RealData, settings: GenerationSettings, *, size: int) -> None:
    """FVD's real side: from the statistics cached under ``real.stats_cache`` when a file with the same key (I3D
    weights, size, frames, clip sampling) is there, else from the real clips (and then cached)."""
    fvd = metrics.fvd
    clips, sampling = fvd_real_clips(real, settings, size)
    if real.stats_cache is None:
        for batch in clips:
            metrics.update_fvd_real(batch)
        return
    key = fvd.real_stats_key(resolution=size, num_frames=settings.num_frames, sampling=sampling)
    fvd.load_or_compute_real_stats(real_stats_path(real.stats_cache, key), (b.to(fvd.device) for b in clips),
                                   resolution=size, num_frames=settings.num_frames, sampling=sampling)


def score_real_data(chain: Chain, metrics: EvalMetrics, real: RealData, settings: GenerationSettings, *,
                    seed: int) -> dict[str, str]:
    """FVD's real side, real motion, ↑F PSNR and SR PSNR on real validation data; returns why any of them was not
    computed."""
    pipe, skipped = chain.pipe, {}
    no_videos = _shards_reason(real.videos, "validation video shards")
    if real.is_ucf101_folder:  # FVD reads it as the UCF-101 protocol does; the scores below need shards
        no_videos = f"not computed: {real.videos} is a UCF-101 folder, not video shards"
    no_images = _shards_reason(real.images, "validation image shards")
    if no_videos:
        skipped["real"] = no_videos
    else:  # the clips D_t's frames are compared with: same frame count, fps and size
        for clips, _, _ in real_batches(real.videos, "videos", size=pipe.D_t.image_size, limit=real.clips,
                                        batch_size=real.batch_size, num_frames=settings.num_frames, fps=settings.fps):
            metrics.update_real_motion(clips)
    if metrics.fvd is not None:
        if no_videos and not real.is_ucf101_folder:
            skipped["fvd"] = no_videos
        else:
            score_fvd_real(metrics, real, settings, size=final_size(pipe, settings.stop_after))
    if pipe.up_F is not None:
        if no_videos:
            skipped["up_F/data"] = no_videos
        elif pipe.up_F.num_frames <= settings.skip:
            skipped["up_F/data"] = f"not computed: ↑F's {pipe.up_F.num_frames}-frame window < skip + 1"
        else:
            score_interpolation(pipe, metrics, real, settings, seed)
        if no_videos:  # ↑F extending real clips
            skipped["extend/data"] = no_videos
        elif pipe.up_F.num_frames < 4:
            skipped["extend/data"] = f"not computed: ↑F's {pipe.up_F.num_frames}-frame window < 4 (2 known, 2 new)"
        else:
            metrics.extension_example = score_extension(pipe, metrics.extension, real, settings, seed)
    for stage, module in (("SR_l", chain.sr_l), ("SR_t", pipe.SR_t), ("SR_h", pipe.SR_h)):
        if module is not None:
            reason = no_videos if module.unet.temporal else no_images
            if reason:
                skipped[f"{stage}/data"] = reason
            else:
                score_super_resolution(stage, module, pipe, metrics, real, settings, seed)
    return skipped
