"""Video Inception Score with the UCF-101 C3D classifier, as a ``torchmetrics.Metric``.

The score video papers report on UCF-101 (TGAN, TGANv2, StyleGAN-V, and the zero-shot 33.00 of Make-A-Video),
computed as StyleGAN-V's ``src/metrics/video_inception_score.py`` and ``metric_utils.py`` compute it:

1. Each video gives one 16-frame clip, its first 16 frames: StyleGAN-V generates exactly 16 frames from t = 0
   and reads dataset clips from their start (no random offset, no frame skipping). A video shorter than 16 frames
   is stretched to 16 in time by ``area`` interpolation, as the StyleGAN-V authors' later evaluation code does
   (the 2022 protocol itself never sees one).
2. Frames go to uint8 as StyleGAN-V quantises them, ``(x * 127.5 + 128).clamp(0, 255)`` truncated, at their own
   resolution: the C3D detector resizes to 112x112 itself (see ``lightning_mav.metrics.c3d``).
3. The detector's class probabilities ``[N, 101]`` for all videos are gathered (under DDP in StyleGAN-V's
   order: video ``i`` from rank ``i % world_size``), shuffled by ``numpy.random.RandomState(42)``, and cut into
   ``splits`` parts, part ``i`` being rows ``[i * N // splits, (i + 1) * N // splits)``.
4. Per part, ``IS = exp(mean_x sum_y p(y|x) (log p(y|x) - log p(y)))`` with ``p(y)`` the part's mean prediction;
   the score is the mean over parts, ``is_std`` their population standard deviation (``numpy.std``).
   ``0 log 0`` counts as 0: StyleGAN-V takes the logs without an epsilon (an exact zero probability would give
   NaN there), TGANv2 adds 1e-20 to every probability; both agree with this limit to ~1e-18.

StyleGAN-V reports ``isv2048_ucf`` (2048 videos, 10 splits); TGANv2 averaged 10 independent sets of 2048 videos with
one split each; other papers use 10,000 videos. Set ``max_samples`` and ``splits`` to the protocol being compared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from lightning_mav.metrics.c3d import C3D_FRAMES, load_c3d
from lightning_mav.metrics.ddp import rank_share

__all__ = ["SHUFFLE_SEED", "VideoInceptionScore", "c3d_clips", "inception_score"]

SHUFFLE_SEED = 42  # StyleGAN-V shuffles the gathered predictions with np.random.RandomState(42) before splitting


def c3d_clips(videos: Tensor, num_frames: int = C3D_FRAMES) -> Tensor:
    """Videos ``[B, 3, F, H, W]`` in [-1, 1] -> the detector's uint8 clips ``[B, 3, num_frames, H, W]``.

    The first ``num_frames`` frames; fewer frames are stretched in time (``area`` interpolation, before
    quantisation); then StyleGAN-V's quantisation ``(x * 127.5 + 128).clamp(0, 255)`` truncated to uint8.
    """
    if videos.ndim != 5 or videos.shape[1] != 3:
        raise ValueError(f"expected videos [B, 3, F, H, W], got shape {tuple(videos.shape)}")
    if not videos.is_floating_point():
        raise ValueError(f"expected float videos in [-1, 1], got dtype {videos.dtype}")
    x = videos.float()
    b, c, f, h, w = x.shape
    if f >= num_frames:
        x = x[:, :, :num_frames]
    else:
        x = F.interpolate(x, size=(num_frames, h, w), mode="area")  # time only: H, W stay as they are
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def inception_score(probs: Tensor, splits: int = 10, shuffle_seed: int | None = SHUFFLE_SEED) -> tuple[Tensor, Tensor]:
    """Inception Score of class probabilities ``[N, C]``: ``(mean, std)`` over ``splits`` parts, float64.

    The rows are permuted by ``numpy.random.RandomState(shuffle_seed).permutation(N)`` (the same permutation as
    StyleGAN-V's in-place ``shuffle`` of the rows; ``None`` keeps the order), then cut into ``splits`` consecutive
    parts of ``N // splits`` or ``N // splits + 1`` rows. ``std`` is the population standard deviation.
    """
    if probs.ndim != 2:
        raise ValueError(f"expected probabilities [N, C], got shape {tuple(probs.shape)}")
    n = probs.shape[0]
    if splits < 1 or n < splits:
        raise ValueError(f"the Inception Score needs at least one video per split: {n} videos, {splits} splits")
    p = probs.detach().double().cpu()
    if shuffle_seed is not None:
        p = p[torch.from_numpy(np.random.RandomState(shuffle_seed).permutation(n))]
    scores = []
    for i in range(splits):
        part = p[i * n // splits:(i + 1) * n // splits]
        marginal = part.mean(dim=0, keepdim=True)
        # xlogy: 0 * log(0) = 0, where a class no video in the part predicts would otherwise give NaN.
        kl = (torch.xlogy(part, part) - torch.xlogy(part, marginal)).sum(dim=1).mean()
        scores.append(kl.exp())
    stacked = torch.stack(scores)
    return stacked.mean(), stacked.std(unbiased=False)


def _interleaved_order(counts: Tensor) -> Tensor:
    """Row order that turns rank-by-rank concatenated rows into StyleGAN-V's interleaved order.

    ``counts[r]`` rows came from rank ``r``; the ``j``-th row of rank ``r`` is global video ``j * world + r`` (what
    an unshuffled ``DistributedSampler`` hands out), so sorting by ``(j, r)`` restores the single-process order.
    """
    world = counts.numel()
    ranks = torch.repeat_interleave(torch.arange(world), counts)
    within = torch.cat([torch.arange(int(c)) for c in counts])
    return torch.argsort(within * world + ranks)


class VideoInceptionScore(Metric):
    """Video Inception Score with the UCF-101 C3D (TGAN / TGANv2 / StyleGAN-V protocol, see the module docstring).

    Args:
        detector: a local C3D file (StyleGAN-V's TorchScript ``c3d_ucf101.pt`` or a ``C3D`` state dict, see
            ``load_c3d``) or an ``nn.Module`` mapping uint8 clips ``[B, 3, 16, H, W]`` to class probabilities
            ``[B, num_classes]``.
        splits: parts the videos are cut into (10 as StyleGAN-V; TGANv2 used 1).
        max_samples: videos counted, later ones ignored; ``None`` counts all. Under DDP each rank counts its
            share (``lightning_mav.metrics.ddp.rank_share``), so the total is ``max_samples`` and the counted
            videos are the first ``max_samples`` of the interleaved order.
        weights_source: label recorded beside the score; defaults to the detector's ``weights_source`` (set by
            ``load_c3d``: kind, file name, sha256 prefix) or its class name.
        num_classes: the detector's classes (101 for UCF-101).
        kwargs: ``torchmetrics.Metric`` options (``sync_on_compute``, ``process_group``, ...).

    ``update(videos [B, 3, F, H, W] in [-1, 1])``; ``compute()`` -> the mean IS (float64 scalar); ``report()`` ->
    ``{"is", "is_std", "splits", "num_videos", "weights_source"}``. ``forward`` on one batch is not meaningful.

    States are every video's probabilities (float64, gathered with ``cat`` under DDP) and each rank's count, from
    which ``compute`` restores the single-process order before shuffling, so DDP gives the single-process score
    whenever the ranks see the videos an unshuffled ``DistributedSampler`` gives them. Every rank must call
    ``update`` at least once before a synced ``compute``. The detector is deliberately not a registered
    submodule (frozen weights stay out of checkpoints and DDP broadcasts); it follows the inputs' device.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    probs: list[Tensor] | Tensor
    count: Tensor

    def __init__(
        self,
        detector: str | Path | nn.Module,
        splits: int = 10,
        max_samples: int | None = None,
        *,
        weights_source: str | None = None,
        num_classes: int = 101,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        network = load_c3d(detector, num_classes=num_classes) if isinstance(detector, (str, Path)) else detector
        network.eval().requires_grad_(False)
        # Plain attribute on purpose (see class docstring): bypass nn.Module registration.
        object.__setattr__(self, "_detector", network)
        self.weights_source: str = (
            weights_source or getattr(network, "weights_source", None) or f"module:{type(network).__name__}"
        )
        if splits < 1:
            raise ValueError(f"splits must be >= 1, got {splits}")
        if max_samples is not None and max_samples < splits:
            raise ValueError(f"max_samples ({max_samples}) must be >= splits ({splits}): one video per split at least")
        self.splits = splits
        self.max_samples = max_samples
        self.num_classes = num_classes
        self.add_state("probs", default=[], dist_reduce_fx="cat")
        # One entry per rank after a sync (cat): how many rows each rank contributed, to restore the order.
        self.add_state("count", default=torch.zeros(1, dtype=torch.long), dist_reduce_fx="cat")

    @property
    def detector(self) -> nn.Module:
        """The frozen C3D classifier."""
        return self._detector

    @torch.no_grad()
    def class_probabilities(self, videos: Tensor) -> Tensor:
        """``videos [B, 3, F, H, W]`` in [-1, 1] -> the detector's class probabilities ``[B, num_classes]``, float64."""
        clips = c3d_clips(videos)
        detector = self._detector.to(clips.device)
        probs = detector(clips)
        if probs.shape != (videos.shape[0], self.num_classes):
            raise ValueError(f"C3D detector {self.weights_source} returned shape {tuple(probs.shape)}, expected "
                             f"({videos.shape[0]}, {self.num_classes}) class probabilities")
        probs = probs.double()
        if not torch.isfinite(probs).all() or (probs < 0).any() or (probs.sum(dim=1) - 1).abs().max() > 1e-3:
            raise ValueError(f"C3D detector {self.weights_source} did not return probabilities (rows >= 0 "
                             f"summing to 1): is it the UCF-101 C3D classifier?")
        return probs

    def update(self, videos: Tensor) -> None:
        """Add a batch ``videos [B, 3, F, H, W]`` in [-1, 1]."""
        cap = rank_share(self.max_samples, self.process_group)
        if cap is not None:
            room = cap - int(self.count.sum())
            if room <= 0:
                if not self.probs:  # an empty entry keeps this rank's list state gatherable under DDP
                    self.probs.append(torch.zeros(0, self.num_classes, dtype=torch.float64, device=self.device))
                return  # enough videos: skip the detector entirely
            videos = videos[:room]
        probs = self.class_probabilities(videos)
        self.probs.append(probs)
        self.count = self.count + probs.shape[0]

    def _ordered_probs(self) -> Tensor:
        """All probabilities ``[N, num_classes]`` in single-process order (states as they are: synced or local)."""
        if isinstance(self.probs, list) and not self.probs:
            return torch.zeros(0, self.num_classes, dtype=torch.float64)
        probs = dim_zero_cat(self.probs).cpu()
        counts = self.count.flatten().cpu()
        return probs[_interleaved_order(counts)]

    def compute(self) -> Tensor:
        """Mean Inception Score over ``splits`` parts (float64 scalar); needs at least one video per split."""
        mean, _ = inception_score(self._ordered_probs(), self.splits)
        return mean.to(self.device)

    def report(self) -> dict[str, Any]:
        """``{"is": float, "is_std": float, "splits": int, "num_videos": int, "weights_source": str}`` (synced)."""
        with self.sync_context(should_sync=self._to_sync, should_unsync=True):
            probs = self._ordered_probs()
        mean, std = inception_score(probs, self.splits)
        return {"is": float(mean), "is_std": float(std), "splits": self.splits, "num_videos": int(probs.shape[0]),
                "weights_source": self.weights_source}
