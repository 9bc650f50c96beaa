"""Analytic metrics for Moving Shapes: did each stage learn something? No learned weights involved.

Every frame is segmented by colour: the background is the median colour of the frame's border, the object
is the largest connected blob of pixels far from it, re-cut at half its contrast so that blur (resizing,
video coding) does not grow it. From that blob:

- colour: the palette colour (``datamodules.shapes.COLORS``) nearest to the blob's median colour;
- shape: from the mask geometry, nearest of three prototypes in (fill ratio of the bounding box: circle
  pi/4, square 1, triangle 1/2; centroid height in the box: 1/2, 1/2, 2/3 for the apex-up triangles the
  renderer draws; spread, the farthest point from the centroid over the radius of the disk of equal area:
  1, sqrt(pi/2), 2/3 sqrt(2 pi)). Fill alone confuses blurred squares with circles and pixelated
  triangles with circles; the three together classify every rendered frame at 32 and 64 px;
- size: the shape's size (diameter / side / base) implied by its area, nearest of ``SIZES``;
- centroid and area, which the temporal checks follow over frames.

``ShapesFaithfulness`` scores frames against the prompt ("a small red circle moving", parsed with the
vocabulary of ``datamodules.shapes``); ``TemporalCoherence`` scores whether one object persists with stable
colour and area along a smooth path and actually moves. Both are ``torchmetrics.Metric`` with summed
states, so DDP is exact. ``interpolation_psnr`` and ``sr_psnr`` compare ↑F and SR outputs with ground truth
and with the obvious baselines (linear blend, bicubic upsampling).

Videos are ``[B, 3, F, H, W]`` (images ``[B, 3, H, W]`` count as one frame) in [-1, 1]. One object per video
is assumed, as the evaluation prompts describe. Score lossless frames: at 32 px H.264's 4:2:0 chroma (16x16)
smears small shapes enough to cost ~10% shape accuracy on decoded videos (none at 64 px).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor
from torchmetrics import Metric

from datamodules.shapes import COLORS, SHAPES, SIZES

__all__ = [
    "DetectedObject",
    "ShapesFaithfulness",
    "ShapesPrompt",
    "TemporalCoherence",
    "classify_shape",
    "detect_object",
    "interpolation_psnr",
    "nearest_color",
    "parse_prompt",
    "psnr",
    "sr_psnr",
    "to_frames",
]

_PALETTE_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[name] for name in _PALETTE_NAMES], dtype=np.float32)  # [K, 3], 0..255
# (fill ratio of the bounding box, centroid height within the box from the top, spread) of the ideal shapes;
# spread = farthest point from the centroid / radius of the disk of the same area.
_SHAPE_PROTOTYPES: dict[str, tuple[float, float, float]] = {
    "circle": (math.pi / 4, 0.5, 1.0),
    "square": (1.0, 0.5, math.sqrt(math.pi / 2)),
    "triangle": (0.5, 2 / 3, 2 / 3 * math.sqrt(2 * math.pi)),
}
# Distance scale per feature: about half the gap between neighbouring prototypes, tuned so that rendered
# frames at 32 and 64 px and H.264-decoded ones at 64 px are classified correctly.
_SHAPE_FEATURE_SCALES = (0.125, 1 / 12, 0.2)
assert set(_SHAPE_PROTOTYPES) == set(SHAPES), "a shape of datamodules.shapes has no prototype here"


# ------------------------------------------------------------------------------------------------ prompts
@dataclass(frozen=True)
class ShapesPrompt:
    """Attributes a Moving Shapes prompt asks for; ``size`` is None when the prompt names none."""

    color: str
    shape: str
    size: str | None = None


def _find(words: list[str], vocabulary: Sequence[str]) -> str | None:
    return next((w for w in words if w in vocabulary), None)


def parse_prompt(prompt: str) -> ShapesPrompt:
    """Parse "a small red circle moving" (any of the data's templates) into its attributes.

    Raises:
        ValueError: the prompt names no palette colour or no shape.
    """
    words = re.findall(r"[a-z]+", prompt.lower())
    color, shape, size = _find(words, _PALETTE_NAMES), _find(words, SHAPES), _find(words, tuple(SIZES))
    if color is None or shape is None:
        raise ValueError(f"not a Moving Shapes prompt (needs one of {_PALETTE_NAMES} and one of {SHAPES}): {prompt!r}")
    return ShapesPrompt(color=color, shape=shape, size=size)


# ------------------------------------------------------------------------------------------ segmentation
@dataclass(frozen=True)
class DetectedObject:
    """The object found in one frame. Positions and lengths are fractions of the frame's height / width."""

    color: str  # nearest palette colour
    shape: str  # nearest shape prototype
    size: str  # nearest of SIZES by the size estimated from the area and the shape
    area: float  # fraction of the frame's pixels
    center_xy: tuple[float, float]  # centroid (x right, y down)
    extent: float  # longer bounding-box side
    fill: float  # area / bounding-box area
    centroid_height: float  # centroid row within the bounding box, 0 top .. 1 bottom
    spread: float  # farthest pixel from the centroid / radius of the disk of equal area
    background: tuple[float, float, float]  # median RGB (0..255) of the frame's border


def to_frames(videos: Tensor) -> np.ndarray:
    """``[B, 3, F, H, W]`` or ``[B, 3, H, W]`` in [-1, 1] -> float32 ``[B, F, H, W, 3]`` in 0..255."""
    if videos.ndim == 4:
        videos = videos.unsqueeze(2)
    if videos.ndim != 5 or videos.shape[1] != 3:
        raise ValueError(f"expected videos [B, 3, F, H, W] or images [B, 3, H, W], got {tuple(videos.shape)}")
    frames = ((videos.detach().float().clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 4, 1)
    return frames.cpu().numpy()


def nearest_color(rgb: Sequence[float] | np.ndarray) -> str:
    """Name of the palette colour nearest (Euclidean RGB, 0..255) to ``rgb``."""
    distances = np.linalg.norm(_PALETTE - np.asarray(rgb, dtype=np.float32), axis=1)
    return _PALETTE_NAMES[int(distances.argmin())]


def classify_shape(fill: float, centroid_height: float, spread: float) -> str:
    """Nearest shape prototype in (bounding-box fill ratio, centroid height in the box, spread), each
    feature scaled by about half the gap between prototypes so that all three count alike."""
    features = (fill, centroid_height, spread)
    return min(
        _SHAPE_PROTOTYPES,
        key=lambda s: sum(
            ((f - p) / scale) ** 2 for f, p, scale in zip(features, _SHAPE_PROTOTYPES[s], _SHAPE_FEATURE_SCALES)
        ),
    )


def _largest_blob(foreground: np.ndarray) -> np.ndarray | None:
    """The largest 4-connected component of a boolean ``[H, W]`` mask, holes filled; None if empty."""
    labels, count = ndimage.label(foreground)
    if count == 0:
        return None
    largest = int(np.bincount(labels.ravel())[1:].argmax()) + 1
    return ndimage.binary_fill_holes(labels == largest)


def detect_object(
    frame: np.ndarray, *, threshold: float = 48.0, min_area: float = 0.002, max_area: float = 0.4
) -> DetectedObject | None:
    """Find the object in one frame ``[H, W, 3]`` (0..255); None when there is no plausible object.

    Args:
        threshold: RGB distance (0..255) from the background that marks a pixel as object. The closest
            palette colour to a background (purple on gray) is ~80 away; edges and codec blur stay below.
        min_area / max_area: the largest blob must cover this fraction of the frame (the data's largest
            shape, a large square, covers 16%); noise, a blank frame or a frame-filling blob is no object.
    """
    h, w, _ = frame.shape
    # The border is background except where a shape touches it (at most 40% of one side).
    border = np.concatenate([frame[0], frame[-1], frame[:, 0], frame[:, -1]])
    background = np.median(border, axis=0)
    distance = np.linalg.norm(frame - background, axis=-1)
    mask = _largest_blob(distance > threshold)
    if mask is None:
        return None
    # Re-cut at half the object's contrast: a blurred (resized, video-coded) edge crosses 50% where the sharp
    # edge was, whereas a fixed low threshold grows the blob by the blur radius and rounds off its corners.
    contrast = float(np.percentile(distance[mask], 90))
    if contrast / 2 > threshold:
        mask = _largest_blob(distance > contrast / 2)
        if mask is None:
            return None
    area = int(mask.sum())
    if not (min_area * h * w <= area <= max_area * h * w):
        return None
    ys, xs = np.nonzero(mask)
    y0, x0 = ys.min(), xs.min()
    box_h, box_w = ys.max() - y0 + 1, xs.max() - x0 + 1
    fill = area / float(box_h * box_w)
    cy, cx = ys.mean(), xs.mean()
    centroid_height = float((cy + 0.5 - y0) / box_h)  # pixel centres are at +0.5
    # +0.5: the farthest pixel's centre is about half a pixel inside the shape's true outline.
    farthest = math.sqrt(float(((ys - cy) ** 2 + (xs - cx) ** 2).max())) + 0.5
    spread = farthest / math.sqrt(area / math.pi)
    extent = max(box_h / h, box_w / w)
    shape = classify_shape(fill, centroid_height, spread)
    # Size (diameter / side / base, as a fraction of the side) from the area, which averages over every
    # pixel, rather than from the bounding box, which is off by up to a pixel per side at 32 px.
    size_fraction = math.sqrt(area / _SHAPE_PROTOTYPES[shape][0] / (h * w))
    return DetectedObject(
        color=nearest_color(np.median(frame[mask], axis=0)),
        shape=shape,
        size=min(SIZES, key=lambda s: abs(SIZES[s] - size_fraction)),
        area=area / float(h * w),
        center_xy=(float((cx + 0.5) / w), float((cy + 0.5) / h)),
        extent=float(extent),
        fill=float(fill),
        centroid_height=centroid_height,
        spread=spread,
        background=(float(background[0]), float(background[1]), float(background[2])),
    )


def _detect_videos(videos: Tensor, **kwargs: float) -> list[list[DetectedObject | None]]:
    """Per video, per frame detections of ``videos [B, 3, F, H, W]`` (or images ``[B, 3, H, W]``)."""
    return [[detect_object(frame, **kwargs) for frame in video] for video in to_frames(videos)]


# ---------------------------------------------------------------------------------------------- metrics
class ShapesFaithfulness(Metric):
    """Fraction of frames whose object has the prompt's colour / shape / size, averaged over videos.

    ``update(videos [B, 3, F, H, W] or images [B, 3, H, W] in [-1, 1], prompts: list[str])``;
    ``compute() -> {"color", "shape", "size", "all"}`` (float64 scalars in [0, 1]); a frame without a
    detectable object counts as wrong on every attribute. "size" only covers prompts that name a size;
    "all" needs colour, shape and (when named) size right in the same frame. Chance level on the balanced
    evaluation prompts: 1/8 colour, 1/3 shape, 1/3 size.

    Args:
        threshold, min_area, max_area: segmentation settings, see ``detect_object``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self, *, threshold: float = 48.0, min_area: float = 0.002, max_area: float = 0.4, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.detect_kwargs = {"threshold": threshold, "min_area": min_area, "max_area": max_area}
        for name in ("color", "shape", "size", "all"):
            self.add_state(f"{name}_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("size_count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, videos: Tensor, prompts: Sequence[str]) -> None:
        """Score a batch; ``prompts[i]`` is the prompt of ``videos[i]``."""
        if len(prompts) != videos.shape[0]:
            raise ValueError(f"{videos.shape[0]} videos but {len(prompts)} prompts")
        for detections, prompt in zip(_detect_videos(videos, **self.detect_kwargs), prompts):
            want = parse_prompt(prompt)
            hits = {name: 0 for name in ("color", "shape", "size", "all")}
            for obj in detections:
                if obj is None:
                    continue
                color, shape = obj.color == want.color, obj.shape == want.shape
                size = want.size is None or obj.size == want.size
                hits["color"] += color
                hits["shape"] += shape
                hits["size"] += obj.size == want.size
                hits["all"] += color and shape and size
            frames = len(detections)
            self.color_sum += hits["color"] / frames
            self.shape_sum += hits["shape"] / frames
            self.all_sum += hits["all"] / frames
            if want.size is not None:
                self.size_sum += hits["size"] / frames
                self.size_count += 1
            self.count += 1

    def compute(self) -> dict[str, Tensor]:
        """Mean per-video scores; ``size`` is NaN when no prompt named a size."""
        n = self.count.double()
        return {
            "color": self.color_sum / n,
            "shape": self.shape_sum / n,
            "size": self.size_sum / self.size_count.double(),
            "all": self.all_sum / n,
        }


class TemporalCoherence(Metric):
    """Does one object persist, keep its colour and area, move smoothly, and move at all?

    Per video of F frames (each component in [0, 1], a frame without an object fails every check):

    - ``presence``: fraction of frames with an object;
    - ``color_stability``: fraction of frames whose object has the video's most common colour;
    - ``area_stability``: fraction of frames whose area is within ``area_tolerance`` (relative) of the
      video's median area;
    - ``smoothness``: fraction of the F - 2 inner frames whose centroid acceleration
      ``|c[t+1] - 2 c[t] + c[t-1]|`` is at most ``max_acceleration`` (fraction of the frame side): zero for
      constant velocity, ``2 |v|`` at a wall bounce (< 0.07 for the data's speeds at 24 fps), ~0.5 for a
      position redrawn every frame (an image model applied frame by frame);
    - ``moving``: 1 if the centroid's range over the video reaches ``min_travel`` (fraction of the side);
    - ``background_stability``: fraction of frames whose background (median of the border) is within
      ``background_tolerance`` (RGB distance, 0..255) of the video's median background. The data's backgrounds are
      ~186 apart, so a video that switches between them (or fades) fails here while its object may pass the rest;
    - ``coherence``: the mean of the six.

    Besides: ``speed``, the median step of the centroid between consecutive frames (fraction of the side per
    frame; 0 without two consecutive detections). Not part of ``coherence``: it has no right value on its own,
    only next to real clips at the same frame rate (``moving`` is passed by any jitter; ``speed`` tells whether
    objects move as fast as the data's).

    ``update(videos [B, 3, F, H, W] in [-1, 1])``, F >= 3; ``compute()`` -> dict of float64 scalars, means
    over videos.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    components = ("presence", "color_stability", "area_stability", "smoothness", "moving", "background_stability")

    def __init__(
        self,
        *,
        area_tolerance: float = 0.3,
        max_acceleration: float = 0.1,
        min_travel: float = 0.05,
        background_tolerance: float = 48.0,
        threshold: float = 48.0,
        min_area: float = 0.002,
        max_area: float = 0.4,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.area_tolerance, self.max_acceleration, self.min_travel = area_tolerance, max_acceleration, min_travel
        self.background_tolerance = background_tolerance
        self.detect_kwargs = {"threshold": threshold, "min_area": min_area, "max_area": max_area}
        for name in (*self.components, "speed"):
            self.add_state(f"{name}_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def score_video(self, detections: Sequence[DetectedObject | None]) -> dict[str, float]:
        """The six components and ``speed`` for one video's per-frame detections."""
        frames = len(detections)
        found = [obj for obj in detections if obj is not None]
        if not found:
            return dict.fromkeys((*self.components, "speed"), 0.0)
        modal_color = Counter(obj.color for obj in found).most_common(1)[0][0]
        median_area = float(np.median([obj.area for obj in found]))
        backgrounds = np.array([obj.background for obj in found])
        median_background = np.median(backgrounds, axis=0)
        centers = [None if obj is None else np.array(obj.center_xy) for obj in detections]
        smooth = sum(
            1
            for prev, cur, nxt in zip(centers, centers[1:], centers[2:])
            if prev is not None and cur is not None and nxt is not None
            and np.linalg.norm(nxt - 2 * cur + prev) <= self.max_acceleration
        )
        path = np.stack([c for c in centers if c is not None])
        steps = [np.linalg.norm(cur - prev) for prev, cur in zip(centers, centers[1:])
                 if prev is not None and cur is not None]
        return {
            "presence": len(found) / frames,
            "color_stability": sum(obj.color == modal_color for obj in found) / frames,
            "area_stability": sum(abs(obj.area - median_area) <= self.area_tolerance * median_area for obj in found)
            / frames,
            "smoothness": smooth / (frames - 2),
            "moving": float((path.max(axis=0) - path.min(axis=0)).max() >= self.min_travel),
            "background_stability": float((np.linalg.norm(backgrounds - median_background, axis=1)
                                           <= self.background_tolerance).sum()) / frames,
            "speed": float(np.median(steps)) if steps else 0.0,
        }

    def update(self, videos: Tensor) -> None:
        """Score a batch of videos ``[B, 3, F, H, W]`` in [-1, 1]."""
        if videos.ndim != 5 or videos.shape[2] < 3:
            raise ValueError(f"expected videos [B, 3, F>=3, H, W], got {tuple(videos.shape)}")
        for detections in _detect_videos(videos, **self.detect_kwargs):
            for name, value in self.score_video(detections).items():
                setattr(self, f"{name}_sum", getattr(self, f"{name}_sum") + value)
            self.count += 1

    def compute(self) -> dict[str, Tensor]:
        """Mean over videos of each component, ``coherence`` (their mean) and ``speed``."""
        n = self.count.double()
        scores = {name: getattr(self, f"{name}_sum") / n for name in self.components}
        scores["coherence"] = torch.stack(list(scores.values())).mean()
        scores["speed"] = self.speed_sum / n
        return scores


# ------------------------------------------------------------------------------------------------- PSNR
def psnr(pred: Tensor, target: Tensor, max_db: float = 100.0) -> Tensor:
    """Per-image PSNR in dB for values in [-1, 1] (data range 2): ``[N, C, H, W]`` x2 -> ``[N]``.

    Identical images would give +inf; capped at ``max_db`` so means stay finite.
    """
    mse = (pred.float().clamp(-1, 1) - target.float().clamp(-1, 1)).square().flatten(1).mean(dim=1)
    return (10 * torch.log10(4.0 / mse.clamp(min=4.0 * 10 ** (-max_db / 10)))).double()


def _frames(videos: Tensor) -> Tensor:
    """``[B, C, F, H, W] -> [B * F, C, H, W]``."""
    return videos.transpose(1, 2).flatten(0, 1)


def interpolation_psnr(pred: Tensor, target: Tensor, stride: int) -> dict[str, Tensor]:
    """Frame interpolation (↑F) PSNR on held-out frames, next to the linear-blend baseline.

    The model saw the keyframes ``target[:, :, ::stride]`` and produced ``pred`` at the full frame rate.

    Args:
        pred, target: ``[B, 3, F, H, W]`` in [-1, 1] with ``F = (K - 1) * stride + 1`` for K keyframes
            (frames past the last keyframe are ignored).
        stride: frames per keyframe interval (the paper's ↑F: 16 -> 76 frames is stride 5).

    Returns:
        ``{"psnr", "baseline_psnr", "gain"}``: mean PSNR (dB) over the held-out frames of ``pred`` and of
        the linear blend of the two surrounding ground-truth keyframes, and their difference; ``gain_items``
        ``[B]``: each clip's gain (for an interval over clips).
    """
    if pred.shape != target.shape or pred.ndim != 5:
        raise ValueError(
            f"pred and target must be equal [B, 3, F, H, W], got {tuple(pred.shape)}, {tuple(target.shape)}"
        )
    last_key = (target.shape[2] - 1) // stride * stride
    held_out = [t for t in range(last_key) if t % stride]
    if not held_out:
        raise ValueError(f"no held-out frames: {target.shape[2]} frames with stride {stride}")
    idx = torch.tensor(held_out, device=target.device)
    before = target[:, :, idx // stride * stride]
    after = target[:, :, idx // stride * stride + stride]
    weight = ((idx % stride).float() / stride).view(1, 1, -1, 1, 1)
    blend = (1 - weight) * before + weight * after
    ours = psnr(_frames(pred[:, :, idx]), _frames(target[:, :, idx])).view(len(pred), -1).mean(dim=1)
    baseline = psnr(_frames(blend), _frames(target[:, :, idx])).view(len(pred), -1).mean(dim=1)
    return {"psnr": ours.mean(), "baseline_psnr": baseline.mean(), "gain": (ours - baseline).mean(),
            "gain_items": ours - baseline}


def sr_psnr(pred: Tensor, target: Tensor, lowres: Tensor) -> dict[str, Tensor]:
    """Super-resolution PSNR next to bicubic upsampling of the model's low-resolution input.

    Args:
        pred, target: ``[B, 3, H, W]`` or ``[B, 3, F, H, W]`` in [-1, 1] (SR output and ground truth).
        lowres: the SR input, ``[B, 3, h, w]`` or ``[B, 3, F, h, w]``.

    Returns:
        ``{"psnr", "baseline_psnr", "gain"}``: mean per-frame PSNR (dB) of ``pred`` and of bicubic
        ``lowres`` against ``target``, and their difference; ``gain_items`` ``[B]``: each image's / clip's gain.
    """
    if pred.shape != target.shape or lowres.ndim != target.ndim:
        raise ValueError(
            f"pred {tuple(pred.shape)} must equal target {tuple(target.shape)}, lowres {tuple(lowres.shape)} same rank"
        )
    items = len(pred)
    if target.ndim == 5:
        pred, target, lowres = _frames(pred), _frames(target), _frames(lowres)
    bicubic = F.interpolate(lowres.float(), size=target.shape[-2:], mode="bicubic", align_corners=False)
    ours = psnr(pred, target).view(items, -1).mean(dim=1)
    baseline = psnr(bicubic.clamp(-1, 1), target).view(items, -1).mean(dim=1)
    return {"psnr": ours.mean(), "baseline_psnr": baseline.mean(), "gain": (ours - baseline).mean(),
            "gain_items": ours - baseline}
