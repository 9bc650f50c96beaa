"""Scoring ↑F's extrapolation (extending a clip past its end) on Moving Shapes: does the object's path continue?

A real clip's first ``known`` frames go to ↑F, which makes the rest; the real rest is the answer. Per extended frame:

- the object's centroid (:func:`lightning_mav.metrics.shapes.detect_object`) in ↑F's frame vs in the real one, in
  pixels, next to the **constant-velocity guess**: the centroid of the last known frame moved on by the step between
  the last two known frames, ``c[known-1] + t · (c[known-1] - c[known-2])`` at ``t = 1, 2, ...``: what a network
  that only carries the motion on would get (it misses the data's wall bounces; a model of the data should not);
- PSNR of ↑F's frame vs the real one, next to holding the last known frame (the video that stops).

Both centroid errors are averaged over the same frames: those where the real frame, ↑F's frame and the guess (the
last two known frames) all have an object; ``detected`` is the fraction of extended frames with a real object in
which ↑F's frame has one too (a vanished object has no centroid error, so it is counted here instead).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_mav.metrics.shapes import detect_object, psnr, to_frames

__all__ = ["ExtrapolationScore", "constant_velocity_guess", "extension_errors", "object_centroids"]


def object_centroids(videos: Tensor, **detect_kwargs: float) -> np.ndarray:
    """The object's centroid per frame of ``videos [B, 3, F, H, W]`` in [-1, 1]: ``[B, F, 2]`` (x, y) in pixels
    from the top-left corner, NaN where no object is found."""
    frames = to_frames(videos)  # [B, F, H, W, 3]
    h, w = frames.shape[2:4]
    out = np.full((*frames.shape[:2], 2), np.nan)
    for b, video in enumerate(frames):
        for f, frame in enumerate(video):
            obj = detect_object(frame, **detect_kwargs)
            if obj is not None:
                out[b, f] = (obj.center_xy[0] * w, obj.center_xy[1] * h)
    return out


def constant_velocity_guess(known: np.ndarray, n: int) -> np.ndarray:
    """Centroids ``[B, K, 2]`` of the known frames -> the next ``n`` under constant velocity ``[B, n, 2]``: the last
    one moved on by the last step (NaN where either of the last two is NaN; ``K >= 2``)."""
    if known.shape[1] < 2:
        raise ValueError(f"the constant-velocity guess needs 2 known frames, got {known.shape[1]}")
    last, step = known[:, -1], known[:, -1] - known[:, -2]
    t = np.arange(1, n + 1, dtype=np.float64)[None, :, None]
    return last[:, None] + t * step[:, None]


def extension_errors(pred: Tensor, target: Tensor, known: int, **detect_kwargs: float) -> dict[str, np.ndarray]:
    """Per extended frame (``[B, F - known]`` each): centroid error (px) of ``pred`` and of the constant-velocity
    guess against ``target`` (NaN where not comparable), and whether ``target`` / ``pred`` have an object.

    Args:
        pred: ``[B, 3, F, H, W]`` in [-1, 1]: the first ``known`` frames given, the rest extrapolated.
        target: the real clips, same shape.
        known: frames given to the extrapolation (>= 2).
    """
    if pred.shape != target.shape or pred.ndim != 5:
        raise ValueError(f"pred and target must be equal [B, 3, F, H, W], got {tuple(pred.shape)}, "
                         f"{tuple(target.shape)}")
    if not 2 <= known < target.shape[2]:
        raise ValueError(f"known must be in [2, {target.shape[2] - 1}] for {target.shape[2]} frames, got {known}")
    real = object_centroids(target, **detect_kwargs)
    ours = object_centroids(pred[:, :, known:], **detect_kwargs)
    real_next = real[:, known:]
    guess = constant_velocity_guess(real[:, :known], target.shape[2] - known)
    error = np.linalg.norm(ours - real_next, axis=-1)
    cv_error = np.linalg.norm(guess - real_next, axis=-1)
    both = ~np.isnan(error) & ~np.isnan(cv_error)  # the frames both errors are averaged over
    return {"error": np.where(both, error, np.nan), "constant_velocity": np.where(both, cv_error, np.nan),
            "real_object": ~np.isnan(real_next[..., 0]), "pred_object": ~np.isnan(ours[..., 0])}


def _frames(videos: Tensor) -> Tensor:
    """``[B, C, F, H, W] -> [B F, C, H, W]`` on the CPU."""
    return videos.detach().float().cpu().transpose(1, 2).flatten(0, 1)


class ExtrapolationScore(Metric):
    """↑F's extrapolation against the real continuation (see the module docstring).

    ``update(pred [B, 3, F, H, W], target [B, 3, F, H, W], known: int)`` (values in [-1, 1]);
    ``compute()`` -> ``{"centroid_error_px", "constant_velocity_px", "detected", "psnr", "hold_last_psnr"}``:
    the two centroid errors are means over the extended frames where both are defined, the PSNRs (dB) means over
    all extended frames. Summed states: exact under DDP.
    """

    is_differentiable = False
    higher_is_better = None  # errors lower, PSNR and detected higher
    full_state_update = False

    def __init__(self, *, threshold: float = 48.0, min_area: float = 0.002, max_area: float = 0.4,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.detect_kwargs = {"threshold": threshold, "min_area": min_area, "max_area": max_area}
        for name in ("error_sum", "cv_error_sum", "psnr_sum", "hold_psnr_sum"):
            self.add_state(name, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("compared", "real_objects", "found", "frames"):
            self.add_state(name, torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor, known: int) -> None:
        """Score a batch of clips whose first ``known`` frames were given."""
        errors = extension_errors(pred, target, known, **self.detect_kwargs)
        both = ~np.isnan(errors["error"])
        self.error_sum += float(errors["error"][both].sum())
        self.cv_error_sum += float(errors["constant_velocity"][both].sum())
        self.compared += int(both.sum())
        self.real_objects += int(errors["real_object"].sum())
        self.found += int((errors["real_object"] & errors["pred_object"]).sum())
        new = target.shape[2] - known
        real_next = _frames(target[:, :, known:])
        hold = _frames(target[:, :, known - 1:known].expand(-1, -1, new, -1, -1))  # the video that stops
        self.psnr_sum += float(psnr(_frames(pred[:, :, known:]), real_next).sum())
        self.hold_psnr_sum += float(psnr(hold, real_next).sum())
        self.frames += target.shape[0] * new

    def compute(self) -> dict[str, Tensor]:
        """Means (NaN where nothing was counted)."""
        compared, frames = self.compared.double(), self.frames.double()
        return {"centroid_error_px": self.error_sum / compared, "constant_velocity_px": self.cv_error_sum / compared,
                "detected": self.found.double() / self.real_objects.double(), "psnr": self.psnr_sum / frames,
                "hold_last_psnr": self.hold_psnr_sum / frames}
