"""Clean objects: how many objects, stray objects and flecks a frame holds, and how noisy its background is.

Moving Shapes frames are flat shapes on a flat background (``datamodules.shapes``), so the foreground is every pixel
far (RGB distance > ``threshold``, 0..255) from the background colour (the median of the frame's border, as
``shapes.detect_object`` reads it). Its 4-connected components are

- **objects**: components of at least ``object_area`` of the frame. The default, 0.005, is a quarter of the data's
  smallest shape (a small triangle covers 0.02), so a shape cut by blur or partly off-screen still counts;
- **flecks**: smaller components (specks of colour no object accounts for).

Per video ``[F, H, W, 3]``: ``one_object`` (fraction of frames with exactly one object: every evaluation prompt asks
for one), ``flecks`` (flecks per frame), ``strays`` (objects beyond the first, per frame) and ``background_std``
(mean over frames of the std of the background pixels, 0..255, averaged over RGB; pixels within 2 px of the
foreground are left out so that an object's blurred edge does not count as noise). Real clips hold one object in
about 70% of videos and two in the rest, by the data's design; their background noise is the H.264 codec's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage
from torch import Tensor

from lightning_mav.metrics.intervals import UnitMeans
from lightning_mav.metrics.shapes import to_frames

__all__ = ["FrameObjects", "ObjectCounts", "frame_background", "frame_objects", "video_object_stats"]

OBJECT_AREA = 0.005  # a quarter of the smallest shape's area (small triangle: 0.5 * 0.2^2 of the frame)
THRESHOLD = 48.0  # as shapes.detect_object: palette colours are >= ~80 from every background


@dataclass(frozen=True)
class FrameObjects:
    """What one frame holds: object areas (pixels, largest first), fleck count, background std (0..255)."""

    object_areas: tuple[int, ...]
    flecks: int
    background_std: float

    @property
    def objects(self) -> int:
        return len(self.object_areas)


def frame_background(frame: np.ndarray) -> np.ndarray:
    """The background colour of ``frame`` ``[H, W, 3]`` (0..255): the median of its border pixels, ``[3]``."""
    border = np.concatenate([frame[0], frame[-1], frame[:, 0], frame[:, -1]])
    return np.median(border, axis=0)


def frame_objects(frame: np.ndarray, *, threshold: float = THRESHOLD, object_area: float = OBJECT_AREA,
                  margin: int = 2) -> FrameObjects:
    """Objects, flecks and background noise of one frame ``[H, W, 3]`` (0..255).

    Args:
        threshold: RGB distance from the background that marks a pixel as foreground.
        object_area: least area (fraction of the frame) of a component counted as an object, not a fleck.
        margin: pixels around the foreground left out of the background noise (blurred edges).
    """
    h, w, _ = frame.shape
    background = frame_background(frame)
    foreground = np.linalg.norm(frame - background, axis=-1) > threshold
    labels, count = ndimage.label(foreground)
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    large = areas >= object_area * h * w
    near = ndimage.binary_dilation(foreground, iterations=margin) if margin else foreground
    flat = frame[~near]
    std = float(flat.std(axis=0).mean()) if len(flat) > 1 else float("nan")
    return FrameObjects(object_areas=tuple(int(a) for a in sorted(areas[large], reverse=True)),
                        flecks=int((~large).sum()), background_std=std)


def video_object_stats(video: np.ndarray, **kwargs: Any) -> dict[str, float]:
    """``one_object``, ``flecks``, ``strays`` and ``background_std`` of one video ``[F, H, W, 3]`` (0..255); see
    the module docstring."""
    frames = [frame_objects(frame, **kwargs) for frame in video]
    stds = [f.background_std for f in frames if np.isfinite(f.background_std)]
    return {"one_object": float(np.mean([f.objects == 1 for f in frames])),
            "flecks": float(np.mean([f.flecks for f in frames])),
            "strays": float(np.mean([max(f.objects - 1, 0) for f in frames])),
            "background_std": float(np.mean(stds)) if stds else float("nan")}


class ObjectCounts(UnitMeans):
    """Clean objects over videos: ``update(videos [B, 3, F, H, W] in [-1, 1])`` (or images ``[B, 3, H, W]``);
    ``compute() -> {"one_object" | "flecks" | "strays" | "background_std": {"mean", "low", "high", "n"}}``, means
    over videos with 95% intervals (Wilson for ``one_object``, t for the others).

    Args:
        threshold, object_area: see :func:`frame_objects`.
    """

    higher_is_better = None

    def __init__(self, *, threshold: float = THRESHOLD, object_area: float = OBJECT_AREA, **kwargs: Any) -> None:
        super().__init__(("one_object", "flecks", "strays", "background_std"), rates=("one_object",), **kwargs)
        self.frame_kwargs = {"threshold": threshold, "object_area": object_area}

    def update(self, videos: Tensor) -> None:  # type: ignore[override]
        """Score a batch of videos."""
        per_video = [video_object_stats(v, **self.frame_kwargs) for v in to_frames(videos)]
        super().update({name: [s[name] for s in per_video] for name in self.names})
