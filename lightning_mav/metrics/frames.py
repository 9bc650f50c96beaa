"""Frame-level FID and Inception Score of videos, through torchmetrics, with local Inception weights only.

Every frame of every video counts as one image. torchmetrics' Inception (torch-fidelity's port of the
TF FID network) would download its weights when no path is given; here a local weights file is required
(torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``) and a missing one is an error naming the
path. The optional ``torch-fidelity`` package provides the network (``pip install torch-fidelity``).

For tests and custom networks both classes also accept ``feature=<nn.Module>`` instead of a weights path
(the module receives uint8 frames ``[N, 3, H, W]``, as torchmetrics' Inception does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
from torchmetrics.image.inception import InceptionScore
from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

__all__ = ["FrameFID", "FrameInceptionScore", "video_frames_uint8"]


def video_frames_uint8(videos: Tensor) -> Tensor:
    """``[B, 3, F, H, W]`` (or images ``[B, 3, H, W]``) in [-1, 1] -> uint8 frames ``[B * F, 3, H, W]``."""
    if videos.ndim == 4:
        videos = videos.unsqueeze(2)
    if videos.ndim != 5 or videos.shape[1] != 3:
        raise ValueError(f"expected videos [B, 3, F, H, W] or images [B, 3, H, W], got {tuple(videos.shape)}")
    frames = videos.transpose(1, 2).flatten(0, 1)
    return ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _local_inception(weights_path: str | Path | None, feature: str) -> NoTrainInceptionV3:
    """torchmetrics' Inception-v3 with weights from ``weights_path``; clear errors instead of a download."""
    if weights_path is None:
        raise ValueError(
            "frame FID / IS need a local Inception weights file (torch-fidelity's "
            "weights-inception-2015-12-05-6726825d.pth): pass weights_path=PATH; nothing is downloaded"
        )
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights not found at {path} (frame FID / IS never download)")
    if not _TORCH_FIDELITY_AVAILABLE:
        raise ModuleNotFoundError("frame FID / IS need the torch-fidelity package: pip install torch-fidelity")
    return NoTrainInceptionV3(name="inception-v3-compat", features_list=[feature],
                              feature_extractor_weights_path=str(path))


class FrameFID(FrechetInceptionDistance):
    """FID between the frames of real and generated videos (torchmetrics' ``FrechetInceptionDistance``).

    Args:
        weights_path: local Inception weights (required unless ``feature`` is a module).
        feature: 2048 (pool features, the standard), 768, 192 or 64; or an ``nn.Module`` extractor.
        kwargs: ``FrechetInceptionDistance`` / ``Metric`` options (``reset_real_features``, ...).

    ``update(videos [B, 3, F, H, W] or images [B, 3, H, W] in [-1, 1], real: bool)``; ``compute()`` ->
    scalar. States are torchmetrics' sums (DDP-exact, memory independent of the frame count).
    """

    def __init__(self, weights_path: str | Path | None = None, *, feature: int | nn.Module = 2048,
                 **kwargs: Any) -> None:
        if not isinstance(feature, nn.Module):
            feature = _local_inception(weights_path, str(feature))
        super().__init__(feature=feature, **kwargs)

    def update(self, videos: Tensor, real: bool) -> None:  # type: ignore[override]
        """Add every frame of ``videos`` to the real or generated side."""
        super().update(video_frames_uint8(videos), real=real)


class FrameInceptionScore(InceptionScore):
    """Inception Score of video frames (torchmetrics' ``InceptionScore``, 10 splits by default).

    Args:
        weights_path: local Inception weights (required unless ``feature`` is a module).
        feature: an ``nn.Module`` returning logits ``[N, classes]``; by default the Inception's unbiased logits.
        kwargs: ``InceptionScore`` / ``Metric`` options (``splits``, ...).

    ``update(videos [B, 3, F, H, W] or images [B, 3, H, W] in [-1, 1])``; ``compute() -> (mean, std)``.
    Note: torchmetrics keeps every frame's logits (memory grows with the frame count).
    """

    def __init__(self, weights_path: str | Path | None = None, *, feature: nn.Module | None = None,
                 **kwargs: Any) -> None:
        if feature is None:
            feature = _local_inception(weights_path, "logits_unbiased")
        super().__init__(feature=feature, **kwargs)

    def update(self, videos: Tensor) -> None:  # type: ignore[override]
        """Add every frame of ``videos``."""
        super().update(video_frames_uint8(videos))
