"""Edge sharpness and grain of super-resolved frames, next to bicubic upsampling and the real high-res frame.

- **Edge sharpness**: the mean gradient magnitude (central differences of the RGB mean) over the real frame's edge
  pixels (its gradient magnitude at least ``edge_level`` of its maximum), divided by the real frame's own: 1 when
  the edges are as steep as the real ones, ~2 / w for an edge smeared into a ramp w pixels wide; bicubic upsampling
  by 2-4x reads about 0.5-0.7. Overshoot (ringing) can read above 1.
- **Grain**: over the real frame's flat area (pixels whose 5x5 neighbourhood has no real gradient above
  ``flat_level``), the standard deviation of the high-pass ``x - box3x3(x)``, divided by sqrt(8/9) so that it reads
  as the std of white noise that would give it (0..255 units): 0 on a flat real PNG, the codec's noise on a decoded
  clip, more when a stage adds grain.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["edge_sharpness", "flat_grain", "gradient_magnitude", "sr_edges"]

_WHITE_NOISE_GAIN = math.sqrt(8 / 9)  # std of x - box3x3(x) for unit white noise


def _images(x: Tensor) -> Tensor:
    """``[B, 3, F, H, W]`` -> ``[B * F, 3, H, W]``; images pass through; float32."""
    return (x.transpose(1, 2).flatten(0, 1) if x.ndim == 5 else x).float()


def gradient_magnitude(images: Tensor) -> Tensor:
    """``[N, C, H, W]`` -> ``[N, H, W]``: |central-difference gradient| of the channel mean, per pixel of value units
    (zero on the one-pixel border)."""
    gray = images.float().mean(dim=1)
    gx, gy = torch.zeros_like(gray), torch.zeros_like(gray)
    gx[:, :, 1:-1] = (gray[:, :, 2:] - gray[:, :, :-2]) / 2
    gy[:, 1:-1, :] = (gray[:, 2:, :] - gray[:, :-2, :]) / 2
    return torch.sqrt(gx.square() + gy.square())


def edge_sharpness(images: Tensor, reference: Tensor, edge_level: float = 0.5) -> Tensor:
    """Per image, the mean gradient magnitude of ``images`` on the edge pixels of ``reference`` over that of
    ``reference`` itself: ``[N, C, H, W]`` x2 -> ``[N]`` (NaN for a reference without edges)."""
    ref = gradient_magnitude(reference)
    peak = ref.flatten(1).amax(dim=1).view(-1, 1, 1)
    edges = (ref >= edge_level * peak) & (peak > 1e-3)
    count = edges.flatten(1).sum(dim=1)
    ours = (gradient_magnitude(images) * edges).flatten(1).sum(dim=1)
    real = (ref * edges).flatten(1).sum(dim=1)
    return torch.where(count > 0, ours / real.clamp(min=1e-12), torch.full_like(ours, math.nan)).double()


def flat_grain(images: Tensor, reference: Tensor, flat_level: float = 0.02) -> Tensor:
    """Per image, the grain of ``images`` (``[N, C, H, W]`` in [-1, 1]) on the flat area of ``reference``, as the std
    (0..255 units) of white noise giving the same high-pass energy; ``[N]``, NaN without flat pixels."""
    ref = gradient_magnitude(reference)
    flat = F.max_pool2d(ref[:, None], 5, stride=1, padding=2)[:, 0] <= flat_level
    flat[:, :2], flat[:, -2:], flat[:, :, :2], flat[:, :, -2:] = False, False, False, False  # no padded windows
    x = images.float() * 127.5  # [-1, 1] -> 0..255 units
    high = x - F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    mask = flat[:, None].expand_as(high)
    count = mask.flatten(1).sum(dim=1)
    mean = (high * mask).flatten(1).sum(dim=1) / count.clamp(min=1)
    var = ((high - mean.view(-1, 1, 1, 1)).square() * mask).flatten(1).sum(dim=1) / count.clamp(min=1)
    grain = var.sqrt() / _WHITE_NOISE_GAIN
    return torch.where(count > 1, grain, torch.full_like(grain, math.nan)).double()


def sr_edges(pred: Tensor, target: Tensor, lowres: Tensor) -> dict[str, Tensor]:
    """Edge sharpness and grain of an SR stage's output next to bicubic upsampling of its input and the real frame.

    Args:
        pred, target: ``[B, 3, H, W]`` or ``[B, 3, F, H, W]`` in [-1, 1]; lowres: the SR input, same rank.

    Returns:
        Per image (frames of a video count alike), ``[N]`` float64: ``sharpness`` / ``bicubic_sharpness`` (1 = as
        steep as the real edges), ``grain`` / ``bicubic_grain`` / ``real_grain`` (0..255).
    """
    if pred.shape != target.shape or lowres.ndim != target.ndim:
        raise ValueError(f"pred {tuple(pred.shape)} must equal target {tuple(target.shape)}, lowres "
                         f"{tuple(lowres.shape)} same rank")
    pred, target, lowres = _images(pred), _images(target), _images(lowres)
    bicubic = F.interpolate(lowres, size=target.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)
    pred = pred.clamp(-1, 1)
    return {"sharpness": edge_sharpness(pred, target), "bicubic_sharpness": edge_sharpness(bicubic, target),
            "grain": flat_grain(pred, target), "bicubic_grain": flat_grain(bicubic, target),
            "real_grain": flat_grain(target, target)}
