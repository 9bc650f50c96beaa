"""Pseudo-3D layers: exact identity in time at init, real frame mixing once trained, image/time-off paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_mav.nn.embeddings import FpsEmbedding, TimestepEmbedding, sinusoidal_embedding
from lightning_mav.nn.p3d import (
    Attn_P3D,
    Conv_P3D,
    RotaryEmbedding,
    TemporalConv,
    fold_frames,
    is_channels_last,
    unfold_frames,
)

B, C, NF, H, W = 2, 16, 4, 8, 8


def _perturb(params, std: float = 0.2) -> None:
    """Move parameters off their (possibly zero / identity) init so the test is not trivial."""
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * std)


def _per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply an image function to each frame of ``[B, C, F, H, W]`` separately."""
    return torch.stack([fn(x[:, :, i]) for i in range(x.shape[2])], dim=2)


# ------------------------------------------------------------------------------------------------------- embeddings
def test_sinusoidal_embedding_values() -> None:
    e = sinusoidal_embedding(torch.tensor([0.0, 3.0]), 8)
    assert e.shape == (2, 8)
    assert torch.equal(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))  # cos(0)=1, sin(0)=0
    assert torch.allclose(e[1, 0], torch.cos(torch.tensor(3.0))) and torch.allclose(e[1, 4], torch.sin(torch.tensor(3.0)))
    assert sinusoidal_embedding(torch.tensor([1.0]), 7).shape == (1, 7)
    with pytest.raises(ValueError):
        sinusoidal_embedding(torch.zeros(2, 1), 8)


def test_fps_embedding_zero_init_then_learns() -> None:
    fps = FpsEmbedding(16, 32)
    assert torch.equal(fps(torch.tensor([1.0, 30.0])), torch.zeros(2, 32))
    _perturb(fps.mlp[-1].parameters())
    out = fps(torch.tensor([1.0, 30.0]))
    assert not torch.allclose(out[0], out[1])
    assert TimestepEmbedding(16, 32)(torch.tensor([5.0])).abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------- Conv_P3D
@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("channels_last", [False, True])
def test_temporal_conv_matches_conv1d(kernel_size: int, channels_last: bool) -> None:
    """The folded-layout implementation is a zero-padded 'same' Conv1d over frames, in both memory formats."""
    tc = TemporalConv(C, kernel_size)
    _perturb(tc.parameters())
    x = torch.randn(B, C, NF, H, W)
    out = tc(fold_frames(x, channels_last), NF)
    assert is_channels_last(out) == channels_last  # layout kept, no hidden conversions
    seq = x.permute(0, 3, 4, 1, 2).reshape(B * H * W, C, NF)
    ref = F.conv1d(seq, tc.weight, tc.bias, padding=kernel_size // 2).view(B, H, W, C, NF).permute(0, 3, 4, 1, 2)
    torch.testing.assert_close(unfold_frames(out, NF), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_p3d_identity_in_time_at_init(channels_last: bool) -> None:
    conv = Conv_P3D(C, 24)
    assert torch.equal(conv.temporal.weight[:, :, 1], torch.eye(24)) and not conv.temporal.bias.any()
    x = torch.randn(B, C, NF, H, W)
    ref = _per_frame(conv.spatial, x)
    assert (conv(x) - ref).abs().max() <= 1e-5
    folded = conv.forward_frames(fold_frames(x, channels_last), NF)
    assert (unfold_frames(folded, NF) - ref).abs().max() <= 1e-5


def test_conv_p3d_mixes_frames_after_training_and_time_off() -> None:
    conv = Conv_P3D(C, C)
    _perturb(conv.temporal.parameters())
    x = torch.randn(B, C, NF, H, W)
    x2 = x.clone()
    x2[:, :, 0] += torch.randn(B, C, H, W)  # change frame 0 only
    y, y2 = conv(x), conv(x2)
    assert (y2[:, :, 1] - y[:, :, 1]).abs().max() > 1e-3  # its neighbour sees it
    assert torch.equal(y2[:, :, 3], y[:, :, 3])  # kernel 3: frame 3 is out of reach
    # time=False: frame by frame even with trained temporal weights
    assert (conv(x, time=False) - _per_frame(conv.spatial, x)).abs().max() <= 1e-5
    # images: temporal part skipped
    img = torch.randn(B, C, H, W)
    assert torch.equal(conv(img), conv.spatial(img))


def test_conv_p3d_spatial_only_has_no_temporal_params_and_strides_space_only() -> None:
    conv2d = Conv_P3D(C, 24, temporal=False)
    conv3d = Conv_P3D(C, 24, stride=2)
    assert not any("temporal" in n for n, _ in conv2d.named_parameters())
    assert set(conv3d.state_dict()) - set(conv2d.state_dict()) == {"temporal.weight", "temporal.bias"}
    assert conv3d(torch.randn(B, C, NF, H, W)).shape == (B, 24, NF, H // 2, W // 2)
    with pytest.raises(ValueError):
        conv3d(torch.randn(C, H, W))


# ---------------------------------------------------------------------------------------------------------- Attn_P3D
def _attn() -> Attn_P3D:
    attn = Attn_P3D(C, heads=2, dim_head=8, context_dim=12)
    _perturb(attn.spatial.parameters())  # spatial to_out is zero-init: make the spatial part non-trivial
    return attn


@pytest.mark.parametrize("channels_last", [False, True])
def test_attn_p3d_identity_in_time_at_init(channels_last: bool) -> None:
    attn = _attn()
    x, ctx = torch.randn(B, C, NF, H, W), torch.randn(B, 5, 12)
    mask = torch.tensor([[True] * 5, [True, True, False, True, False]])
    ref = _per_frame(lambda f: attn(f, ctx, mask), x)
    assert (ref - x).abs().max() > 1e-2  # the spatial attention does something
    assert (attn(x, ctx, mask) - ref).abs().max() <= 1e-5
    folded = attn.forward_frames(fold_frames(x, channels_last), NF, ctx, mask)
    assert is_channels_last(folded) == channels_last
    assert (unfold_frames(folded, NF) - ref).abs().max() <= 1e-5


def test_attn_p3d_mixes_frames_after_training_and_time_off() -> None:
    attn = _attn()
    _perturb(attn.temporal.parameters())
    x, ctx = torch.randn(B, C, NF, H, W), torch.randn(B, 5, 12)
    x2 = x.clone()
    x2[:, :, 0] += torch.randn(B, C, H, W)  # random: a constant shift would vanish in LayerNorm
    y, y2 = attn(x, ctx), attn(x2, ctx)
    assert (y2[:, :, NF - 1] - y[:, :, NF - 1]).abs().max() > 1e-3  # attention reaches every frame
    assert (attn(x, ctx, time=False) - _per_frame(lambda f: attn(f, ctx), x)).abs().max() <= 1e-5
    img = torch.randn(B, C, H, W)
    assert attn(img, ctx).shape == img.shape


def test_attn_p3d_context_mask_and_context_effect() -> None:
    attn = _attn()
    x, ctx = torch.randn(B, C, NF, H, W), torch.randn(B, 5, 12)
    mask = torch.tensor([[True, True, True, False, False]] * B)
    ctx2 = ctx.clone()
    ctx2[:, 3:] = 100.0  # only masked-out tokens change
    torch.testing.assert_close(attn(x, ctx, mask), attn(x, ctx2, mask))
    assert (attn(x, ctx) - attn(x, ctx2)).abs().max() > 1e-3  # unmasked, they do matter
    assert not any("temporal" in n for n, _ in Attn_P3D(C, 2, 8, temporal=False).named_parameters())


def test_rotary_is_relative() -> None:
    """q·k after RoPE depends only on the frame distance: shift invariance of the temporal scores."""
    rope = RotaryEmbedding(8, max_frames=4)
    q, k = torch.randn(8).expand(10, 8), torch.randn(8).expand(10, 8)
    rq, rk = rope(q), rope(k)  # 10 > max_frames: table computed on the fly
    torch.testing.assert_close((rq[2] * rk[0]).sum(), (rq[9] * rk[7]).sum())
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))


def test_layers_are_trainable_end_to_end() -> None:
    """Gradients reach both the spatial and the (identity-initialised) temporal parameters."""
    model = nn.ModuleDict({"conv": Conv_P3D(C, C), "attn": _attn()})
    x = torch.randn(B, C, NF, H, W)
    model["attn"](model["conv"](x), torch.randn(B, 5, 12)).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    assert model["attn"].temporal.to_out.weight.grad.abs().sum() > 0
    assert model["conv"].temporal.weight.grad.abs().sum() > 0
