"""Object speed per frame: the median step of the object's centroid between consecutive frames, as
``TemporalCoherence`` reads it, per video, in pixels and as a fraction of the frame side."""

from __future__ import annotations

from torch import Tensor
import torch

from lightning_mav.metrics.shapes import TemporalCoherence, _detect_videos

__all__ = ["video_speeds"]


def video_speeds(videos: Tensor) -> Tensor:
    """Median centroid step per frame of each video ``[B, 3, F, H, W]`` in [-1, 1], as a fraction of the frame side
    (times ``W`` for pixels); ``[B]`` float64, 0 for a video without two consecutive detections."""
    if videos.ndim != 5 or videos.shape[2] < 2:
        raise ValueError(f"expected videos [B, 3, F>=2, H, W], got {tuple(videos.shape)}")
    scorer = TemporalCoherence()
    return torch.tensor([scorer.score_video(d)["speed"] for d in _detect_videos(videos, **scorer.detect_kwargs)],
                        dtype=torch.float64)
