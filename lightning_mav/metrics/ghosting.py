"""Ghosting: is an in-between frame one object, or two half-transparent copies (what a linear blend of the frames
around it shows when the object moved)? And where is its object?

Opacity. A Moving Shapes pixel is ``background + alpha * (colour - background)``: alpha 1 inside a shape, 0 on the
background, in between on a blurred edge or a ghost. Per pixel, the colour is the palette colour (``COLORS``) whose
direction from the background is nearest (cosine) to the pixel's, and alpha the pixel's distance from the background
over that colour's full contrast *in this video*: the 90th percentile of the distance over the video's pixels of that
colour. The video's keyframes show every object opaque (↑F keeps every ``stride``-th frame), so a dull object is
opaque (alpha ~1) and half of it is a ghost (alpha ~0.5); two objects of different colours each have their own
scale.

- **Ghost fraction** of a frame: among the pixels of its objects (4-connected components of pixels more than
  ``threshold / 2`` from the background covering at least ``object_area`` of the frame), the share that is
  semi-transparent (``0.25 <= alpha < 0.75``) and not next to an opaque pixel (alpha >= 0.75). An opaque object's
  blurred edge is mostly a ring next to its core; the non-overlapping parts of two half-transparent copies are not.
  Measured on 32 real validation clips at 32 / 64 px it is at most 0.25 / 0.26 for real frames (small objects'
  edges are up to two pixels wide), so:
- **ghosted**, with the real frame at hand (↑F on real clips): the ghost fraction exceeds the real frame's by more
  than ``GHOST_EXCESS`` (0.1). The linear blend at weights 2/5 and 3/5 (stride 5) is ghosted in 83% of those frames
  at 32 px and 99% at 64 px; at weights 1/5 and 4/5 (a 20% ghost) in 3-6%; a real frame never (excess 0).
- **ghosted**, without a reference (↑F's frames in generated videos): the ghost fraction exceeds ``GHOST_LIMIT``
  (0.3), above every real frame measured; a coarser test, blind to ghosts of small motions at 32 px.
- **Object centroid**: the centroid (pixels, x right, y down) of the largest component of pixels at least half
  opaque (alpha >= 0.5), the object a viewer sees. For a blend at weight w < 1/2 that is the earlier copy, so the
  blend's centroid error is ~min(w, 1 - w) of the displacement (0.3 of it on average at stride 5), while a frame
  that moves the object scores ~0. (The alpha-weighted centroid would be blind to ghosting: the blend's lies
  exactly on the path of a constant-velocity object.)

``interpolation_objects`` scores ↑F's in-between frames against real clips and the linear blend the same way.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from datamodules.shapes import COLORS
from lightning_mav.metrics.objects import OBJECT_AREA, THRESHOLD, frame_background
from lightning_mav.metrics.shapes import to_frames

__all__ = ["GHOST_EXCESS", "GHOST_LIMIT", "frame_ghosting", "interpolation_objects", "video_ghost_rate",
           "video_opacity"]

GHOST_EXCESS = 0.1  # ghost fraction above the real frame's at which a frame counts as ghosted
GHOST_LIMIT = 0.3  # ghost fraction at which a frame counts as ghosted when there is no real frame to compare
_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)  # [K, 3]


def video_opacity(video: np.ndarray, *, threshold: float = THRESHOLD,
                  reference: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel opacity of a video ``[F, H, W, 3]`` (0..255): ``(alpha [F, H, W], foreground [F, H, W] bool)``.

    ``foreground``: pixels more than ``threshold / 2`` from their frame's background. ``reference`` (another video
    ``[F', H, W, 3]``, e.g. the real clip) sets the colours' full contrast instead of ``video`` itself, so that
    a prediction and a blend are measured on one scale.
    """
    def parts(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        backgrounds = np.stack([frame_background(f) for f in frames])[:, None, None, :]  # [F, 1, 1, 3]
        delta = frames - backgrounds
        distance = np.linalg.norm(delta, axis=-1)
        directions = _PALETTE[None] - backgrounds[:, 0, 0, None, :]  # [F, K, 3]
        directions /= np.linalg.norm(directions, axis=-1, keepdims=True).clip(min=1e-6)
        colour = np.einsum("fhwc,fkc->fhwk", delta, directions)  # projection on each colour's direction
        return distance, colour.argmax(axis=-1), distance > threshold / 2

    distance, colour, foreground = parts(video)
    ref_distance, ref_colour, ref_foreground = parts(video if reference is None else reference)
    scale = np.full(len(_PALETTE), np.inf, dtype=np.float32)
    for k in np.unique(ref_colour[ref_foreground]):
        scale[k] = max(float(np.percentile(ref_distance[ref_foreground & (ref_colour == k)], 90)), threshold)
    # a colour the reference never shows opaque: measured against the strongest colour it does show
    fallback = scale[np.isfinite(scale)].max() if np.isfinite(scale).any() else max(float(distance.max()), threshold)
    scale[~np.isfinite(scale)] = fallback
    return distance / scale[colour], foreground


def frame_ghosting(alpha: np.ndarray, foreground: np.ndarray, *, object_area: float = OBJECT_AREA,
                   ) -> tuple[float, tuple[float, float] | None]:
    """``(ghost fraction, object centroid (x, y) in pixels or None)`` of one frame from its opacity ``[H, W]`` and
    foreground mask ``[H, W]`` (see :func:`video_opacity`); the ghost fraction is NaN without an object."""
    h, w = alpha.shape
    labels, count = ndimage.label(foreground)
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    areas[0] = 0
    objects = (areas >= object_area * h * w)[labels]
    opaque = alpha >= 0.75
    # an opaque object's blurred edge is (mostly) a ring next to its core; a ghost's copies are semi-transparent
    semi = objects & (alpha >= 0.25) & ~opaque & ~ndimage.binary_dilation(opaque, structure=np.ones((3, 3)))
    fraction = float(semi.sum() / objects.sum()) if objects.any() else float("nan")
    solid, count = ndimage.label(alpha >= 0.5)
    if count == 0:
        return fraction, None
    sizes = np.bincount(solid.ravel())[1:]
    largest = int(sizes.argmax()) + 1
    if sizes[largest - 1] < object_area * h * w:
        return fraction, None
    ys, xs = np.nonzero(solid == largest)
    return fraction, (float(xs.mean() + 0.5), float(ys.mean() + 0.5))


def video_ghost_rate(videos: Tensor, stride: int, *, limit: float = GHOST_LIMIT) -> Tensor:
    """Fraction of the in-between frames (not a multiple of ``stride``) ghosted (ghost fraction > ``limit``) in each
    of ``videos`` ``[B, 3, F, H, W]`` in [-1, 1] (↑F's output: its keyframes set the colours' contrast); ``[B]``."""
    rates = []
    for video in to_frames(videos):
        alpha, foreground = video_opacity(video)
        between = [t for t in range(len(video)) if t % stride]
        rates.append(float(np.mean([frame_ghosting(alpha[t], foreground[t])[0] > limit for t in between]))
                     if between else float("nan"))
    return torch.tensor(rates, dtype=torch.float64)


def interpolation_objects(pred: Tensor, target: Tensor, stride: int, *, ghost_excess: float = GHOST_EXCESS,
                          ) -> dict[str, Tensor]:
    """Ghosting and object position of ↑F's held-out frames next to the linear blend's, per clip.

    Args:
        pred, target: ``[B, 3, F, H, W]`` in [-1, 1], ``F = (K - 1) * stride + 1`` (as ``interpolation_psnr``):
            ↑F's output given ``target[:, :, ::stride]`` and the real clip.
        stride: frames per keyframe interval.

    Returns:
        ``[B]`` float64 tensors: ``ghost_rate`` / ``blend_ghost_rate`` (fraction of held-out frames ghosted: ghost
        fraction above the real frame's by more than ``ghost_excess``),
        ``centroid_error`` / ``blend_centroid_error`` (mean distance in pixels between the object's centroid and
        the real frame's, over the held-out frames where both the real frame and the scored one have an object;
        NaN if none). Opacities of the prediction and the blend are both measured on the real clip's scale.
    """
    if pred.shape != target.shape or pred.ndim != 5:
        raise ValueError(f"pred and target must be equal [B, 3, F, H, W], got {tuple(pred.shape)}, {tuple(target.shape)}")
    last_key = (target.shape[2] - 1) // stride * stride
    held_out = [t for t in range(last_key) if t % stride]
    if not held_out:
        raise ValueError(f"no held-out frames: {target.shape[2]} frames with stride {stride}")
    idx = torch.tensor(held_out)
    weight = ((idx % stride).float() / stride).view(1, 1, -1, 1, 1)
    blend = (1 - weight) * target[:, :, idx // stride * stride] + weight * target[:, :, idx // stride * stride + stride]
    out: dict[str, list[float]] = {k: [] for k in ("ghost_rate", "blend_ghost_rate", "centroid_error",
                                                   "blend_centroid_error")}
    for real, ours, blended in zip(to_frames(target), to_frames(pred[:, :, idx]), to_frames(blend)):
        real_alpha, real_fg = video_opacity(real)
        truth = [frame_ghosting(real_alpha[t], real_fg[t]) for t in held_out]
        for name, video in (("", ours), ("blend_", blended)):
            alpha, fg = video_opacity(video, reference=real)
            scored = [frame_ghosting(a, f) for a, f in zip(alpha, fg)]
            ghosted = [g - r > ghost_excess for (g, _), (r, _) in zip(scored, truth)]  # NaN (no object): not ghosted
            out[f"{name}ghost_rate"].append(float(np.mean(ghosted)))
            errors = [float(np.hypot(c[0] - r[0], c[1] - r[1])) for (_, c), (_, r) in zip(scored, truth)
                      if c is not None and r is not None]
            out[f"{name}centroid_error"].append(float(np.mean(errors)) if errors else float("nan"))
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}
