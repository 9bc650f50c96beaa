"""Fréchet Video Distance (Unterthiner et al. 2018) as a ``torchmetrics.Metric``.

Follows the reference implementation (google-research ``frechet_video_distance``): each video
``[3, F, H, W]`` in [-1, 1] is resized frame by frame to 224x224 (bilinear, no crop), fed to I3D
(Kinetics-400), and described by its 400 logits averaged over time; the score is the Fréchet distance
between Gaussians fitted to the real and the generated features, computed in float64.

Scores are only comparable when computed with the same I3D weights (the tf.hub I3D behind the reference
and StyleGAN-V's TorchScript copy of it differ from the weights released with the I3D paper), so the metric
records where its weights came from: ``metric.weights_source``, also returned by ``metric.report()``.

``compute()`` returns the scalar FVD (a float64 tensor) so that the metric logs like any other; use
``report()`` for ``{"fvd", "weights_source", "num_real", "num_fake"}``.

The real side can be computed once and cached (``lightning_mav.metrics.real_stats``): ``real_stats_key(...)`` names
what the real statistics depend on, ``save_real_stats(path, key)`` / ``load_real_stats(path, key)`` write and read
them (mean, covariance, count; a file written under another key is refused), ``load_or_compute_real_stats``
does whichever applies.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_mav.metrics.ddp import rank_share
from lightning_mav.metrics.i3d import load_i3d
from lightning_mav.metrics.real_stats import RealStats, pair, read_real_stats, real_stats_key, write_real_stats

__all__ = ["FrechetVideoDistance", "frechet_distance", "resize_video"]


def _psd_eigenvalues_sqrt(eigenvalues: Tensor) -> Tensor:
    """sqrt of a PSD matrix's eigenvalues, with those below round-off level set to zero.

    A rank-deficient covariance (fewer samples than feature dimensions, routine for 400-d FVD features on
    small sets) has eigenvalues that are zero in exact arithmetic but come out as +-eps * largest; their
    square roots (~1e-7 * largest) would add up over hundreds of dimensions. The cut-off is the usual
    numerical-rank threshold ``d * eps * max``.
    """
    cutoff = eigenvalues.abs().max() * eigenvalues.numel() * torch.finfo(eigenvalues.dtype).eps
    return torch.where(eigenvalues > cutoff, eigenvalues, torch.zeros_like(eigenvalues)).sqrt()


def _sqrtm_psd(matrix: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix ``[d, d]`` via its eigen-decomposition."""
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return (eigenvectors * _psd_eigenvalues_sqrt(eigenvalues)) @ eigenvectors.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> Tensor:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))`` with means ``[d]`` and
    covariances ``[d, d]``. The trace term uses ``tr((S1 S2)^(1/2)) = tr((S1^(1/2) S2 S1^(1/2))^(1/2))``
    (similar matrices, same eigenvalues); the right-hand matrix is symmetric PSD, so only symmetric
    eigen-decompositions are needed: stable for singular covariances (fewer samples than dimensions),
    where a general ``sqrtm`` of the non-symmetric product can return complex noise.
    """
    mu1, sigma1, mu2, sigma2 = (t.double() for t in (mu1, sigma1, mu2, sigma2))
    sqrt_sigma1 = _sqrtm_psd(sigma1)
    inner = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    inner = (inner + inner.T) / 2  # remove round-off asymmetry before eigvalsh
    trace_sqrt_product = _psd_eigenvalues_sqrt(torch.linalg.eigvalsh(inner)).sum()
    return (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt_product


def resize_video(videos: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of every frame, no crop (the reference's preprocessing).

    ``[B, C, F, H, W] -> [B, C, F, size[0], size[1]]``; returned unchanged if already that size.
    """
    b, c, f, h, w = videos.shape
    if (h, w) == tuple(size):
        return videos
    frames = videos.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
    frames = F.interpolate(frames, size=size, mode="bilinear", align_corners=False)
    return frames.reshape(b, f, c, *size).permute(0, 2, 1, 3, 4)


def _is_distributed() -> bool:
    """Whether a default process group is up (the cache's write-on-rank-0-then-wait applies)."""
    return dist.is_available() and dist.is_initialized()


class FrechetVideoDistance(Metric):
    """FVD between real and generated videos; DDP-exact, memory O(d^2) whatever the sample count.

    Args:
        weights: a local path to I3D weights (pytorch-i3d state dict or StyleGAN-V TorchScript detector,
            see ``load_i3d``) or an already built feature network (``nn.Module`` with ``features(x)`` or
            ``forward(x)`` mapping ``[B, 3, F, H, W]`` in [-1, 1] to ``[B, num_features]``).
        weights_source: label recorded beside the score; defaults to the network's ``weights_source``
            (set by ``load_i3d``: kind, file name, sha256 prefix) or its class name.
        resize: frame size ``(H, W)`` (or an int for square) fed to I3D; 224 as the reference. ``None``
            keeps the input size (tests use tiny clips). Ignored for the TorchScript detector, which
            resizes to 224 itself.
        num_features: feature width (400 I3D logits).
        max_samples: videos counted per side (real / generated), 2048 by default as in the usual protocol;
            later videos are ignored. Under DDP each rank counts its share (``max_samples // world_size``,
            the first ``max_samples % world_size`` ranks one more), so the total stays ``max_samples``.
            ``None`` counts everything (e.g. the 10K-sample UCF-101 protocol: ``max_samples=10_000``).
        reset_real_features: if False, ``reset()`` keeps the real statistics (reuse them across runs).
        kwargs: ``torchmetrics.Metric`` options (``sync_on_compute``, ``process_group``, ...).

    States are sums (feature sum ``[d]``, outer-product sum ``[d, d]``, count) in float64 with
    ``dist_reduce_fx="sum"``, so DDP gives exactly the single-process statistics. The feature network is
    deliberately not a registered submodule: frozen weights stay out of checkpoints and out of DDP's buffer
    broadcasts; it follows the inputs' device on ``update``.

    Use ``update(videos, real=...)`` and ``compute()``; ``forward`` on one batch is not meaningful.

    Cached real statistics (``load_real_stats`` / ``load_or_compute_real_stats``) replace the real side: they are
    held beside the states (the same on every rank, never summed), survive ``reset()``, and ``update(...,
    real=True)`` is refused while they are in use. Under DDP every rank must call these methods (the real sums are
    synced; rank 0 writes the file) and all ranks must see the same file system.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    real_sum: Tensor
    real_outer_sum: Tensor
    real_count: Tensor
    fake_sum: Tensor
    fake_outer_sum: Tensor
    fake_count: Tensor

    def __init__(
        self,
        weights: str | Path | nn.Module,
        *,
        weights_source: str | None = None,
        resize: int | tuple[int, int] | None = 224,
        num_features: int = 400,
        max_samples: int | None = 2048,
        reset_real_features: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        network = load_i3d(weights) if isinstance(weights, (str, Path)) else weights
        network.eval().requires_grad_(False)
        # Plain attribute on purpose (see class docstring): bypass nn.Module registration.
        object.__setattr__(self, "_network", network)
        self.weights_source: str = (
            weights_source or getattr(network, "weights_source", None) or f"module:{type(network).__name__}"
        )
        self.resize = (resize, resize) if isinstance(resize, int) else (tuple(resize) if resize else None)
        self.num_features = num_features
        if max_samples is not None and max_samples < 2:
            raise ValueError(f"max_samples must be >= 2 (a covariance needs two samples), got {max_samples}")
        self.max_samples = max_samples
        self.reset_real_features = reset_real_features
        # Loaded real Gaussian (mean [d], covariance [d, d], count), float64 on the CPU; None: use the real sums.
        self._cached_real: RealStats | None = None
        self.real_stats_file: str | None = None  # where the cached real statistics came from
        for side in ("real", "fake"):
            self.add_state(f"{side}_sum", torch.zeros(num_features, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(
                f"{side}_outer_sum",
                torch.zeros(num_features, num_features, dtype=torch.float64),
                dist_reduce_fx="sum",
            )
            self.add_state(f"{side}_count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @property
    def network(self) -> nn.Module:
        """The frozen feature network (I3D)."""
        return self._network

    @torch.no_grad()
    def extract_features(self, videos: Tensor) -> Tensor:
        """``videos [B, 3, F, H, W]`` in [-1, 1] -> float64 features ``[B, num_features]``."""
        if videos.ndim != 5 or videos.shape[1] != 3:
            raise ValueError(f"expected videos [B, 3, F, H, W], got shape {tuple(videos.shape)}")
        if not videos.is_floating_point():
            raise ValueError(f"expected float videos in [-1, 1], got dtype {videos.dtype}")
        network = self._network.to(videos.device)
        x = videos.float()
        if self.resize is not None and not getattr(network, "resizes_input", False):
            x = resize_video(x, self.resize).clamp(-1, 1)
        features = network.features(x) if hasattr(network, "features") else network(x)
        if features.shape != (videos.shape[0], self.num_features):
            raise ValueError(
                f"feature network returned {tuple(features.shape)}, expected ({videos.shape[0]}, {self.num_features})"
            )
        return features.double()

    def update(self, videos: Tensor, real: bool) -> None:
        """Add a batch ``videos [B, 3, F, H, W]`` in [-1, 1] to the real (``real=True``) or generated side."""
        if real and self._cached_real is not None:
            raise RuntimeError(f"the real statistics come from {self.real_stats_file}; real videos are not added")
        side = "real" if real else "fake"
        count: Tensor = getattr(self, f"{side}_count")
        cap = rank_share(self.max_samples, self.process_group)
        if cap is not None:
            room = cap - int(count)
            if room <= 0:
                return  # enough samples: skip the network entirely
            videos = videos[:room]
        features = self.extract_features(videos)
        setattr(self, f"{side}_sum", getattr(self, f"{side}_sum") + features.sum(dim=0))
        setattr(self, f"{side}_outer_sum", getattr(self, f"{side}_outer_sum") + features.T @ features)
        setattr(self, f"{side}_count", count + features.shape[0])

    def _gaussian(self, side: str) -> tuple[Tensor, Tensor]:
        """Mean ``[d]`` and unbiased covariance ``[d, d]`` of one side, from the sums."""
        n = getattr(self, f"{side}_count").double()
        total, outer = getattr(self, f"{side}_sum"), getattr(self, f"{side}_outer_sum")
        mean = total / n
        cov = (outer - n * torch.outer(mean, mean)) / (n - 1)
        return mean, cov

    def compute(self) -> Tensor:
        """FVD, a float64 scalar. Needs at least two real and two generated videos."""
        num_real = self._cached_real[2] if self._cached_real is not None else int(self.real_count)
        if num_real < 2 or self.fake_count < 2:
            raise RuntimeError(
                f"FVD needs >= 2 real and >= 2 generated videos, got {num_real} and {int(self.fake_count)}"
            )
        mu_r, sigma_r = self._cached_real[:2] if self._cached_real is not None else self._gaussian("real")
        mu_f, sigma_f = self._gaussian("fake")
        # On CPU: float64 eigen-decompositions everywhere (some accelerators lack float64); 400x400 is cheap.
        fvd = frechet_distance(mu_r.cpu(), sigma_r.cpu(), mu_f.cpu(), sigma_f.cpu())
        return fvd.to(self.real_sum.device)

    def report(self) -> dict[str, Any]:
        """``{"fvd": float, "weights_source": str, "num_real": int, "num_fake": int}`` (synced under DDP)."""
        fvd = float(self.compute())
        with self.sync_context(should_sync=self._to_sync, should_unsync=True):
            num_real, num_fake = int(self.real_count), int(self.fake_count)
        if self._cached_real is not None:
            num_real = self._cached_real[2]
        return {"fvd": fvd, "weights_source": self.weights_source, "num_real": num_real, "num_fake": num_fake}

    # ------------------------------------------------------------------------------------- cached real statistics
    def real_stats_key(self, *, resolution: int | tuple[int, int], num_frames: int,
                       sampling: str | Mapping[str, Any]) -> str:
        """The module's ``real_stats_key`` for this metric (its ``weights_source``, ``resize``, ``max_samples``)."""
        return real_stats_key(self.weights_source, resolution=resolution, num_frames=num_frames, sampling=sampling,
                              resize=self.resize, max_samples=self.max_samples)

    def real_gaussian(self) -> RealStats:
        """The real side's mean ``[d]``, covariance ``[d, d]`` (float64, CPU) and count: the cached statistics if
        loaded, else from the real sums (synced under DDP)."""
        if self._cached_real is not None:
            return self._cached_real
        with self.sync_context(should_sync=self._to_sync, should_unsync=True):
            count = int(self.real_count)
            if count < 2:
                raise RuntimeError(f"the real statistics need >= 2 real videos, got {count}")
            mean, cov = self._gaussian("real")
        return mean.cpu(), cov.cpu(), count

    def save_real_stats(self, path: str | Path, key: str) -> Path:
        """Write the real side's Gaussian under ``key`` (see ``real_stats_key``) to ``path``, atomically; the path.

        Under DDP every rank calls it (the real sums are synced); rank 0 writes, the others wait for the file.
        """
        return self._write_real_stats(Path(path).expanduser(), key, self.real_gaussian())

    def _write_real_stats(self, path: Path, key: str, stats: RealStats) -> Path:
        """Rank 0 writes ``stats`` to ``path``; the other ranks wait until the file is there."""
        if not _is_distributed() or dist.get_rank(self.process_group) == 0:
            write_real_stats(path, key, stats)
        if _is_distributed():
            dist.barrier(group=self.process_group)
        return path

    def load_real_stats(self, path: str | Path, key: str) -> None:
        """Use the real statistics saved at ``path`` under ``key`` instead of real videos.

        Raises ``FileNotFoundError`` for a missing file and a one-line ``ValueError`` for a file of another kind,
        one written under another key (both keys are named), or statistics of another width (``read_real_stats``).
        The real sums are cleared; the loaded statistics stay across ``reset()``.
        """
        path = Path(path).expanduser()
        self._use_real_stats(read_real_stats(path, key, self.num_features), path)

    def _use_real_stats(self, stats: RealStats, path: Path) -> None:
        """Hold ``stats`` as the real side and clear the real sums (they must not be added on top)."""
        self._cached_real = stats
        self.real_stats_file = str(path)
        for name in ("real_sum", "real_outer_sum", "real_count"):
            setattr(self, name, torch.zeros_like(getattr(self, name)))

    def load_or_compute_real_stats(
        self,
        path: str | Path,
        real_videos: Iterable[Tensor],
        *,
        resolution: int | tuple[int, int],
        num_frames: int,
        sampling: str | Mapping[str, Any],
    ) -> bool:
        """The real statistics from the cache file ``path`` if there is one, else computed and saved there.

        Args:
            path: the cache file (``real_stats_path(cache_dir, key)`` gives one per key).
            real_videos: batches ``[B, 3, num_frames, *resolution]`` in [-1, 1]; iterated only when there is no
                cache file (a DataLoader or a generator costs nothing when the statistics are loaded).
            resolution, num_frames, sampling: the key's fields (see ``real_stats_key``); batches of another
                size are refused, so a cache file is never labelled with the wrong resolution or length.

        Returns:
            True when the statistics were loaded, False when they were computed (and saved). A file written under
            another key raises ``ValueError`` (see ``load_real_stats``): it is never used nor overwritten.
        """
        key = self.real_stats_key(resolution=resolution, num_frames=num_frames, sampling=sampling)
        path = Path(path).expanduser()
        if path.exists():
            self.load_real_stats(path, key)
            return True
        h, w = pair(resolution)
        for videos in real_videos:
            if videos.ndim != 5 or videos.shape[2] != num_frames or tuple(videos.shape[3:]) != (h, w):
                raise ValueError(f"real videos of shape {tuple(videos.shape)} do not match the cache key "
                                 f"({num_frames} frames of {h}x{w}); their statistics would be mislabelled")
            self.update(videos, real=True)
        stats = self.real_gaussian()
        self._write_real_stats(path, key, stats)
        # From now on the real side is exactly what the file holds, as when it is loaded next time.
        self._use_real_stats(stats, path)
        return False

    def reset(self) -> None:
        """Reset states; keeps the real statistics when ``reset_real_features=False``."""
        if self.reset_real_features:
            super().reset()
            return
        kept = {k: deepcopy(getattr(self, k)) for k in ("real_sum", "real_outer_sum", "real_count")}
        super().reset()
        for k, v in kept.items():
            setattr(self, k, v)
