"""Scalar embeddings: diffusion timestep, noise-augmentation level and frame rate (fps).

All three are the same recipe (a fixed sinusoidal feature of a scalar followed by a small MLP), as in DDPM/ADM for
the timestep and as the paper suggests for the frame-rate conditioning of ``D_t`` (Make-A-Video §2.5).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["sinusoidal_embedding", "TimestepEmbedding", "FpsEmbedding"]


def sinusoidal_embedding(x: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Transformer-style sinusoidal features of a scalar per batch item.

    Args:
        x: ``[B]`` float (or int) values, e.g. diffusion steps in ``[0, 1000)`` or fps in ``[1, 30]``.
        dim: output width (odd widths get a zero pad column).
        max_period: the longest wavelength; the shortest is ``2*pi``.

    Returns:
        ``[B, dim]`` float32 ``[cos(x * w_i), sin(x * w_i)]`` with geometrically spaced ``w_i`` in ``(1/max_period, 1]``.
    """
    if x.ndim != 1:
        raise ValueError(f"sinusoidal_embedding expects a 1-D tensor [B], got shape {tuple(x.shape)}")
    half = dim // 2
    # float32 even under autocast: large timesteps times high frequencies lose the phase in bf16
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    args = x.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """``sinusoidal(x) -> Linear -> SiLU -> Linear``: a learned embedding of a scalar (timestep, noise level).

    Args:
        dim: width of the sinusoidal features.
        out_dim: width of the embedding (the U-Net's time-embedding width).
        zero_init: zero the last layer so that the embedding is exactly ``0`` at init; used for conditioning
            added to a pretrained network (fps for ``D_t``) so that the network is unchanged until trained.
    """

    def __init__(self, dim: int, out_dim: int, *, zero_init: bool = False) -> None:
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))
        if zero_init:
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B]`` -> ``[B, out_dim]`` (in the dtype of the MLP's weights)."""
        emb = sinusoidal_embedding(x, self.dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class FpsEmbedding(TimestepEmbedding):
    """Frame-rate conditioning of ``D_t`` (paper §2.5): ``sinusoidal(fps) -> MLP``, last layer zero-initialised.

    Added to the time embedding; being exactly zero at init, a ``D`` checkpoint loaded into ``D_t`` gives the
    same output whatever the fps until the fps layers are trained. The sinusoid's ``max_period`` is irrelevant
    for fps in ``[1, 30]``: frequencies span ``[1e-4, 1]`` rad per fps unit, enough to tell 1 fps from 30.
    """

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__(dim, out_dim, zero_init=True)
