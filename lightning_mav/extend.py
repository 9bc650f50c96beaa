"""Extending a given video with ↑F (``mav extend in.mp4 --frames K``): the paper's ↑F also extrapolates, making
frames after a video's end (or before its start) conditioned on the frames it has.

    in.mp4 ──decode, centre crop, resize to ↑F's size──> [F, 3, S, S] ──↑F.extend (windows of its trained length,
    the last (first) half-window of frames known)──> [F + K, 3, S, S] ──> out.mp4 + out.gif

↑F is conditioned on the CLIP image embedding of the video's middle frame (what ``InterpolationStage`` does when it
is given no ``y_e``), so it needs the frozen CLIP it was trained with: the one its checkpoint records, or
``runs/clip``, or one given. The given frames come back exactly (↑F writes its known frames back), at ↑F's size.
"""
from __future__ import annotations

import logging
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_mav.checkpoints import CheckpointError
from lightning_mav.media import write_gif, write_mp4
from lightning_mav.networks import default_checkpoint, train_command
from lightning_mav.pipeline import (
    EXTEND_DIRECTIONS,
    _resolve_dtype,
    extend_both_ways,
    load_stage,
    stage_generator,
    stage_progress,
)
from lightning_mav.stages.interpolation import InterpolationStage

log = logging.getLogger(__name__)


def fit_frame(frame: Tensor, size: int) -> Tensor:
    """One frame ``[3, H, W]`` -> its centre square resized to ``[3, size, size]`` (antialiased bicubic; as the
    video data is cropped for training)."""
    h, w = frame.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = frame[:, top:top + side, left:left + side]
    if side == size:
        return square
    return F.interpolate(square[None], size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]


def probe_video(path: str | Path) -> None:
    """Check that ``path`` is a video file with a decodable first frame, before anything heavy is loaded.

    Raises:
        ValueError: a missing or unreadable file, or one without video frames (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such video file")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: no video stream")
            if next(container.decode(container.streams.video[0]), None) is None:
                raise ValueError(f"{path}: no video frames")
    except av.error.FFmpegError as e:
        raise ValueError(f"{path}: cannot decode it as a video ({type(e).__name__}: {e})".splitlines()[0]) from e


def read_clip(path: str | Path, size: int) -> tuple[Tensor, float]:
    """Decode every frame of a video file as ``[F, 3, size, size]`` in [-1, 1] (centre square, resized frame by
    frame, so a long high-resolution video never sits in memory at full size) and its frame rate.

    Raises:
        ValueError: a missing or unreadable file, or one without video frames (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such video file")
    frames: list[Tensor] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: no video stream")
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                rgb = torch.from_numpy(np.ascontiguousarray(frame.to_ndarray(format="rgb24")))
                frames.append(fit_frame(rgb.permute(2, 0, 1).float() / 127.5 - 1, size).clamp(-1, 1))
            fps = float(stream.average_rate or stream.guessed_rate or 0.0)
    except av.error.FFmpegError as e:
        raise ValueError(f"{path}: cannot decode it as a video ({type(e).__name__}: {e})".splitlines()[0]) from e
    if not frames:
        raise ValueError(f"{path}: no video frames")
    return torch.stack(frames), fps


def load_extender(interp: str | Path, *, clip: str | Path | None = None, clip_model: str | None = None,
                  runs: str | Path = "runs", device: torch.device | str | None = None) -> InterpolationStage:
    """↑F from its checkpoint, in eval mode on ``device``, with the frozen CLIP it embeds frames with.

    The CLIP: ``clip`` when given, else the one ↑F's checkpoint records (``clip_ckpt``, ``clip_model``), else
    ``runs/clip/checkpoints/last.ckpt``. An unconditional ↑F needs none.

    Raises:
        CheckpointError: a missing file, a checkpoint that is not ↑F, or a conditional ↑F without its CLIP.
    """
    from lightning_mav.nn.clip import CLIP

    interp = Path(interp)
    if not interp.is_file():
        raise CheckpointError(f"checkpoint not found: {interp} — train ↑F with `{train_command('up_F')}`")
    recorded = _recorded_clip(interp)
    candidates = [(Path(clip), clip_model)] if clip is not None else \
        [c for c in (recorded, (default_checkpoint(runs, "clip"), None)) if c is not None and c[0].is_file()]
    encoder = None
    if candidates:
        path, model = candidates[0]
        try:
            encoder = CLIP.from_checkpoint(path, model_name=model, freeze=True)
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: not a CLIP checkpoint ({str(e).splitlines()[0] if str(e) else e!r})") \
                from e
    up_F = load_stage(InterpolationStage, interp, stage="up_F",
                      image_embed_dim=None if encoder is None else encoder.embed_dim)
    if up_F.conditional:
        if encoder is None:
            raise CheckpointError(f"{interp}: ↑F embeds the video's middle frame with CLIP, but there is no CLIP "
                                  f"(recorded: {recorded[0] if recorded else None}; none at "
                                  f"{default_checkpoint(runs, 'clip')}) — pass --clip")
        if up_F.unet.image_embed_dim != encoder.embed_dim:
            raise CheckpointError(f"{candidates[0][0]}: embeds to {encoder.embed_dim}, but ↑F at {interp} reads "
                                  f"{up_F.unet.image_embed_dim}-d CLIP embeddings")
        up_F.clip = encoder
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return up_F.to(device).eval()


def _recorded_clip(path: Path) -> tuple[Path, str | None] | None:
    """``(clip_ckpt, clip_model)`` that ↑F's checkpoint records, or None (memory-mapped: the weights stay on disk)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not a zip checkpoint (or corrupt): load_stage says what is wrong with it
        return None
    hp = (ckpt.get("hyper_parameters") or {}) if isinstance(ckpt, dict) else {}
    return (Path(hp["clip_ckpt"]), hp.get("clip_model")) if hp.get("clip_ckpt") else None


@torch.no_grad()
def extend_frames(up_F: InterpolationStage, frames: Tensor, n: int, direction: str = "forward", *, fps: float,
                  steps: int | None = None, guidance_scale: float | None = None, seed: int = 0,
                  dtype: torch.dtype | str | None = None, progress: bool = False) -> Tensor:
    """``frames [F, 3, S, S]`` (or ``[B, 3, F, S, S]``) at ↑F's size, in [-1, 1] -> ``n`` frames more
    (``direction`` "forward" / "backward"; "both": ``n`` on each side), same layout, on the CPU; the given frames
    are returned exactly. Conditioned on CLIP of the middle frame and on ``fps``; seeded as the pipeline's ``extend``.
    """
    if n <= 0:
        raise ValueError(f"frames to add must be > 0, got {n}")
    if direction not in EXTEND_DIRECTIONS:
        raise ValueError(f"direction: expected one of {', '.join(EXTEND_DIRECTIONS)}, got {direction!r}")
    single = frames.dim() == 4
    video = frames.transpose(0, 1)[None] if single else frames  # [B, 3, F, S, S]
    if video.shape[-1] != up_F.image_size or video.shape[-2] != up_F.image_size:
        raise ValueError(f"frames must be {up_F.image_size}x{up_F.image_size} (↑F's size), got "
                         f"{tuple(video.shape[-2:])}")
    dtype = _resolve_dtype(dtype, up_F.device)
    autocast = torch.autocast(up_F.device.type, dtype=dtype, enabled=dtype != torch.float32)
    with autocast, stage_progress(up_F.unet, "↑F extend", None, progress):
        out = extend_both_ways(up_F, video.to(up_F.device), n, direction, fps=fps,
                               steps=steps or up_F.sample_steps, guidance_scale=guidance_scale,
                               generator=stage_generator(seed, "up_F/extend"))
    out = out.float().clamp(-1, 1).cpu()
    return out[0].transpose(0, 1) if single else out


def extend_file(src: str | Path, out: str | Path, n: int, direction: str = "forward", *,
                interp: str | Path | None = None, runs: str | Path = "runs", clip: str | Path | None = None,
                clip_model: str | None = None, fps: float | None = None, steps: int | None = None,
                guidance_scale: float | None = None, seed: int = 0, device: torch.device | str | None = None,
                dtype: torch.dtype | str | None = None, gif: bool = True, progress: bool = False) -> list[Path]:
    """Extend the video at ``src`` by ``n`` frames with ↑F and write ``out`` (mp4, and a gif beside it).

    ``interp`` defaults to ``runs/interp/checkpoints/last.ckpt``; ``fps`` (the rate ↑F is conditioned on and the
    files' rate) to the video's own. The frames are ↑F's size (centre square). Returns the written paths.

    Raises:
        ValueError: bad input (a missing or unreadable video, ``n <= 0``, an unknown direction), one line naming it.
        CheckpointError: a missing checkpoint, one that is not ↑F, or no CLIP for a conditional ↑F.
    """
    if n <= 0:
        raise ValueError(f"--frames: frames to add must be > 0, got {n}")
    if direction not in EXTEND_DIRECTIONS:
        raise ValueError(f"--direction: expected one of {', '.join(EXTEND_DIRECTIONS)}, got {direction!r}")
    src = Path(src)
    probe_video(src)  # a bad file fails before the checkpoint is loaded
    up_F = load_extender(interp or default_checkpoint(runs, "up_F"), clip=clip, clip_model=clip_model, runs=runs,
                         device=device)
    frames, native_fps = read_clip(src, up_F.image_size)
    context = max(up_F.num_frames // 2, 1)  # what InterpolationStage.extend keeps known per window
    if len(frames) < context:
        log.warning(f"warning: {src} has {len(frames)} frame(s), fewer than ↑F's context of {context}: the first "
                    f"window is conditioned on {len(frames)}")
    rate = float(fps or native_fps or 8.0)
    if rate <= 0:
        raise ValueError(f"--fps: must be > 0, got {rate}")
    video = extend_frames(up_F, frames, n, direction, fps=rate, steps=steps, guidance_scale=guidance_scale,
                          seed=seed, dtype=dtype, progress=progress)
    out = Path(out)
    written = [write_mp4(video, out.with_suffix(".mp4"), fps=rate)]
    if gif:
        written.append(write_gif(video, out.with_suffix(".gif"), fps=rate))
    return written
