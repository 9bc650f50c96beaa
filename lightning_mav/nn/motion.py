"""Global motion between two frames (phase correlation) and sub-pixel translation: what ↑F's motion-compensated
baseline (``InterpolationStage(baseline="motion")``) moves its known frames with (docs/choices.md#f-motion-compensated-baseline).

Phase correlation (Kuglin & Hines 1975; OpenCV's ``phaseCorrelate``): the normalised cross-power spectrum of two
frames is a pure phase ramp when one is a translated copy of the other, and its inverse FFT peaks at the
translation. It finds the dominant translation: a camera pan, or the one moving object on a static background.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["phase_shift", "translate"]


def phase_shift(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """The translation ``d = (dy, dx)`` in pixels that carries ``a`` onto ``b`` (``translate(a, d) ≈ b``).

    Args:
        a, b: ``[N, C, H, W]`` frames (channels are averaged).
    Returns:
        ``[N, 2]`` float32, sub-pixel (a parabola through the correlation peak and its neighbours), each component in
        ``[-H/2, H/2)`` / ``[-W/2, W/2)``; 0 where the frames have no structure to match.
    """
    a, b = a.float().mean(1), b.float().mean(1)  # [N, H, W]
    a, b = a - a.mean((-2, -1), keepdim=True), b - b.mean((-2, -1), keepdim=True)
    cross = torch.fft.fft2(b) * torch.fft.fft2(a).conj()
    corr = torch.fft.ifft2(cross / (cross.abs() + eps)).real  # [N, H, W], peak at the shift (mod H, W)
    n, h, w = corr.shape
    peak = corr.flatten(1).argmax(1)
    py, px = peak // w, peak % w
    rows = torch.arange(n, device=corr.device)

    def refine(c_minus: Tensor, c0: Tensor, c_plus: Tensor) -> Tensor:
        denom = c_minus - 2 * c0 + c_plus
        return torch.where(denom.abs() > eps, 0.5 * (c_minus - c_plus) / denom, torch.zeros_like(c0)).clamp(-0.5, 0.5)

    c0 = corr[rows, py, px]
    dy = py.float() + refine(corr[rows, (py - 1) % h, px], c0, corr[rows, (py + 1) % h, px])
    dx = px.float() + refine(corr[rows, py, (px - 1) % w], c0, corr[rows, py, (px + 1) % w])
    dy = torch.where(dy >= h / 2, dy - h, dy)  # wrap to the signed shift
    dx = torch.where(dx >= w / 2, dx - w, dx)
    flat = (a.flatten(1).abs().amax(1) < eps) | (b.flatten(1).abs().amax(1) < eps)
    return torch.stack([dy, dx], 1).masked_fill(flat[:, None], 0.0)


def translate(x: Tensor, d: Tensor) -> Tensor:
    """``x`` ``[N, C, H, W]`` moved by ``d`` ``[N, 2]`` = (dy, dx) pixels, bilinear, borders repeated (a static
    background extends; a pan reveals the edge). ``d = 0`` returns ``x`` exactly."""
    n, _, h, w = x.shape
    d = d.to(torch.float32)
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2], theta[:, 1, 2] = -2 * d[:, 1] / w, -2 * d[:, 0] / h
    grid = F.affine_grid(theta, [n, x.shape[1], h, w], align_corners=False)
    moved = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    still = (d == 0).all(1)[:, None, None, None]
    return torch.where(still, x.float(), moved).to(x.dtype)
