"""The one U-Net behind ``D``, ``D_t``, ``↑F``, ``SR_l``, ``SR_t`` and ``SR_h``.

An ADM/unCLIP-style U-Net (residual blocks with scale-shift timestep conditioning, attention at chosen
resolutions, skip connections) whose every 3x3 convolution is a ``Conv_P3D`` and every attention an
``Attn_P3D``. ``temporal=False`` builds the text-to-image network (``D``, ``SR_l``, ``SR_h``) with no temporal
parameters at all; ``temporal=True`` builds ``D_t`` / ``↑F`` / ``SR_t``, whose extra parameters are exactly the
ones named ``*temporal*`` (and ``fps_*`` with ``fps_cond``, ``extra_in*`` with ``extra_in_channels``), all
initialised so that the network computes, on a video, exactly ``D`` applied to each frame.

Conditioning (unCLIP, paper §2.1): timestep embedding; the CLIP image embedding ``y_e`` is projected into the time
embedding and into ``num_image_tokens`` extra context tokens; optional text hidden states are more context
tokens; ``drop_cond`` swaps in learned null conditioning for classifier-free guidance. SR networks concatenate
the (upsampled) low-resolution input and embed its noise-augmentation level. ``D_t`` adds an fps embedding
(§2.5), ``↑F`` extra input channels (masked frames + mask, §2.6).

Options whose defaults are the network above also express unCLIP as Karlo (kakaobrain/karlo-v1-alpha) ships it in
diffusers' layout: resampling res blocks (``resample``), additive time conditioning (``time_cond``), GroupNorm and
biased projections in the attention (``attn_norm``, ``attn_bias``), ``heads=None`` with a fixed ``dim_head``, the
CLIP text embedding in the time embedding (``text_embed_dim``), no learned null text (``text_null``), a LayerNorm on
the text tokens only (``context_norm``), and super-resolution without a noise-level embedding and with an
antialiased bicubic resize (``lowres_noise_cond``, ``lowres_resize``); ``lightning_mav.karlo.unet`` converts the
weights.

Layout: videos are folded to ``[(B F), C, H, W]`` once on entry (see ``p3d``); GroupNorm therefore normalises
each frame on its own, and only the temporal layers look across frames.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .embeddings import FpsEmbedding, TimestepEmbedding
from .mixed_precision import GroupNorm32
from .p3d import Attn_P3D, Conv_P3D, TemporalConv, fold_frames, is_channels_last, unfold_frames

__all__ = ["UNet", "ResBlock", "count_parameters", "is_temporal_name"]


def is_temporal_name(name: str) -> bool:
    """True for parameters that ``D_t`` adds to ``D``: names containing ``temporal`` or starting with ``fps_``."""
    return "temporal" in name or name.startswith("fps_")


def count_parameters(module: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of scalar parameters of ``module`` (only those with ``requires_grad`` if ``trainable_only``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _group_norm(channels: int, groups: int) -> GroupNorm32:
    # gcd keeps small test widths (16, 24, ...) valid while using 32 groups at real widths
    return GroupNorm32(math.gcd(groups, channels), channels)


class ResBlock(nn.Module):
    """Pseudo-3D ADM residual block.

    ``GN -> SiLU -> Conv_P3D -> GN * (1 + scale) + shift -> SiLU -> Dropout -> Conv_P3D (zero-init)`` plus a
    1x1 skip when the width changes. ``scale, shift`` come from the time embedding (ADM's scale-shift norm, also
    unCLIP's). GroupNorm runs on folded frames, so it never mixes frames.

    Args:
        in_ch, out_ch: channels.
        emb_dim: width of the (SiLU-activated) time embedding.
        dropout: dropout before the second conv.
        temporal: build the temporal convs.
        norm_groups: GroupNorm groups (reduced to ``gcd(norm_groups, ch)``).
        time_cond: ``"scale_shift"`` as above; ``"add"``: ``GN(Conv_P3D(...) + proj(emb))`` instead of the
            scale-shift (diffusers' ``time_embedding_norm="default"``; ``emb_proj`` then has ``out_ch`` outputs).
        resample: ``None``; ``"down"`` / ``"up"``: after ``GN -> SiLU``, average-pool 2x2 / nearest ×2 both the
            hidden path and the skip input, then continue (diffusers' ``ResnetBlock2D(down=True / up=True)``,
            BigGAN's resampling residual block). The frame axis is never resampled.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, *, dropout: float = 0.0, temporal: bool = False,
                 norm_groups: int = 32, time_cond: Literal["scale_shift", "add"] = "scale_shift",
                 resample: Literal["down", "up"] | None = None) -> None:
        super().__init__()
        if time_cond not in ("scale_shift", "add"):
            raise ValueError(f"ResBlock time_cond must be one of ('scale_shift', 'add'), got {time_cond!r}")
        if resample not in (None, "down", "up"):
            raise ValueError(f"ResBlock resample must be one of (None, 'down', 'up'), got {resample!r}")
        self.time_cond, self.resample = time_cond, resample
        self.norm1 = _group_norm(in_ch, norm_groups)
        self.conv1 = Conv_P3D(in_ch, out_ch, 3, temporal)
        self.emb_proj = nn.Linear(emb_dim, (2 if time_cond == "scale_shift" else 1) * out_ch)
        self.norm2 = _group_norm(out_ch, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv_P3D(out_ch, out_ch, 3, temporal)
        nn.init.zeros_(self.conv2.spatial.weight)  # ADM: each residual branch starts at 0
        nn.init.zeros_(self.conv2.spatial.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor, num_frames: int | None, time: bool = True) -> Tensor:
        """``x [(B F), C_in, H, W]``, ``emb [B, emb_dim]`` (already SiLU-ed) -> ``[(B F), C_out, H', W']``
        (``H' = H/2`` with ``resample="down"``, ``2H`` with ``"up"``)."""
        h = F.silu(self.norm1(x))
        if self.resample == "down":
            x, h = F.avg_pool2d(x, 2), F.avg_pool2d(h, 2)
            h = self.conv1.forward_frames(h, num_frames, time)
        elif self.resample == "up":
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            h = _upsample_conv(self.conv1, h, num_frames, time)
        else:
            h = self.conv1.forward_frames(h, num_frames, time)
        emb_out = self.emb_proj(emb)
        if num_frames is not None:  # the same conditioning for every frame of a clip
            emb_out = emb_out.repeat_interleave(num_frames, dim=0)
        if self.time_cond == "add":
            h = self.norm2(h + emb_out[:, :, None, None])
        else:
            scale, shift = emb_out[:, :, None, None].chunk(2, dim=1)
            h = torch.addcmul(shift, self.norm2(h), 1 + scale)
        h = self.conv2.forward_frames(self.dropout(F.silu(h)), num_frames, time)
        return self.skip(x) + h


class Downsample(nn.Module):
    """Spatial ×½ (stride-2 ``Conv_P3D``); the frame axis is never resampled."""

    def __init__(self, ch: int, temporal: bool) -> None:
        super().__init__()
        self.conv = Conv_P3D(ch, ch, 3, temporal, stride=2)

    def forward(self, x: Tensor, num_frames: int | None, time: bool = True) -> Tensor:
        """``[(B F), C, H, W] -> [(B F), C, H/2, W/2]``."""
        return self.conv.forward_frames(x, num_frames, time)


class Upsample(nn.Module):
    """Spatial ×2 (nearest, per frame) followed by a ``Conv_P3D``.

    The spatial conv is computed without materialising the upsampled frames ("sub-pixel" form): after a nearest
    ×2, each of the four output phases ``(a, b)`` (row ``2i+a``, column ``2j+b``) sees only a 2x2 neighbourhood
    of the low-resolution input, through a 2x2 kernel made of sums of the 3x3 kernel's taps. One conv with those
    ``4 * C_out`` 2x2 kernels on the low-resolution frames then does the work in 16 instead of 36 multiply-adds per
    low-resolution pixel and channel pair (2.25x fewer FLOPs), the same function up to float rounding, the same
    parameters (``conv.spatial`` stays a 3x3 ``nn.Conv2d``); faster except at the smallest sizes
    (docs/choices.md#upsample-sub-pixel-form; ``python -m benchmarks.train_step --full --ablations``).
    """

    def __init__(self, ch: int, temporal: bool) -> None:
        super().__init__()
        self.conv = Conv_P3D(ch, ch, 3, temporal)

    def forward(self, x: Tensor, num_frames: int | None, time: bool = True) -> Tensor:
        """``[(B F), C, H, W] -> [(B F), C, 2H, 2W]``."""
        return _upsample_conv(self.conv, x, num_frames, time)


def _upsample_conv(conv: Conv_P3D, x: Tensor, num_frames: int | None, time: bool) -> Tensor:
    """``conv(nearest_upsample_x2(x))`` on folded frames, the 3x3 spatial conv in the sub-pixel form (``Upsample``)."""
    spatial = conv.spatial
    if spatial.kernel_size != (3, 3) or spatial.stride != (1, 1) or spatial.padding != (1, 1):
        h = spatial(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    else:
        h = upsample_conv3x3(x, spatial.weight, spatial.bias)
    if conv.temporal is not None and num_frames is not None and time:
        h = conv.temporal(h, num_frames)
    return h


def _subpixel_kernels(weight: Tensor) -> Tensor:
    """3x3 kernel ``[O, I, 3, 3]`` -> the four phase kernels ``[(a b O), I, 2, 2]`` of nearest-×2-then-conv.

    Along one axis, output phase 0 (even rows ``2i``) reads input rows ``i-1, i`` with taps ``(w0, w1 + w2)`` and
    phase 1 (odd rows ``2i+1``) rows ``i, i+1`` with ``(w0 + w1, w2)``; the 2-D kernels are the products of both axes.
    """
    rows = (torch.stack([weight[:, :, 0], weight[:, :, 1] + weight[:, :, 2]], 2),   # [O, I, 2, 3], phase a=0
            torch.stack([weight[:, :, 0] + weight[:, :, 1], weight[:, :, 2]], 2))   # phase a=1
    kernels = []
    for r in rows:
        kernels.append(torch.stack([r[..., 0], r[..., 1] + r[..., 2]], -1))  # phase b=0
        kernels.append(torch.stack([r[..., 0] + r[..., 1], r[..., 2]], -1))  # phase b=1
    return torch.cat(kernels, 0)


def upsample_conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``conv2d(nearest_upsample_x2(x), weight, bias, padding=1)`` computed at the input resolution.

    ``x [N, I, H, W]``, ``weight [O, I, 3, 3]`` -> ``[N, O, 2H, 2W]`` (memory format of ``x``).
    """
    n, _, h, w = x.shape
    o = weight.shape[0]
    # on the zero-padded input, phase (a, b) of output pixel (i, j) is the 2x2 conv at position (i + a, j + b)
    y = F.conv2d(F.pad(x, (1, 1, 1, 1)), _subpixel_kernels(weight), None if bias is None else bias.repeat(4))
    return _InterleavePhases.apply(y.view(n, 2, 2, o, h + 1, w + 1), is_channels_last(x))


class _InterleavePhases(torch.autograd.Function):
    """``y [N, 2, 2, O, H+1, W+1]`` (phase ``(a, b)`` valid on ``[a:a+H, b:b+W]``) -> ``[N, O, 2H, 2W]``.

    By hand because autograd would back-propagate each of the four strided slices into its own zero-filled copy of
    ``y``; here forward and backward are four strided copies each.
    """

    @staticmethod
    def forward(ctx, y: Tensor, channels_last: bool) -> Tensor:  # type: ignore[override]
        n, _, _, o, h1, w1 = y.shape
        h, w = h1 - 1, w1 - 1
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        out = torch.empty(n, o, 2 * h, 2 * w, dtype=y.dtype, device=y.device, memory_format=fmt)
        for a in (0, 1):
            for b in (0, 1):
                out[:, :, a::2, b::2] = y[:, a, b, :, a:a + h, b:b + w]
        ctx.y_shape = y.shape
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        n, _, _, o, h1, w1 = ctx.y_shape
        h, w = h1 - 1, w1 - 1
        grad_y = grad.new_zeros(ctx.y_shape)  # the unused border row/column of each phase gets 0
        for a in (0, 1):
            for b in (0, 1):
                grad_y[:, a, b, :, a:a + h, b:b + w] = grad[:, :, a::2, b::2]
        return grad_y, None


class Block(nn.ModuleList):
    """A unit of the U-Net (res block [+ attention] or a resampler); the granularity of gradient checkpointing."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None, context_mask: Tensor | None,  # type: ignore[override]
                num_frames: int | None, time: bool) -> Tensor:
        """``x [(B F), C, H, W]``, ``emb [B, E]``, ``context [B, L, Dc]``, ``context_mask [B, L]``."""
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, num_frames, time)
            elif isinstance(layer, Attn_P3D):
                x = layer.forward_frames(x, num_frames, context, context_mask, time)
            else:
                x = layer(x, num_frames, time)
        return x


class UNet(nn.Module):
    """Pseudo-3D U-Net for images ``[B, C, H, W]`` and videos ``[B, C, F, H, W]``.

    Args:
        in_channels, out_channels: image channels in / predicted channels out.
        dim: base width; level ``i`` has ``dim * dim_mults[i]`` channels.
        dim_mults: width multipliers, one per resolution level (each level but the last halves H, W).
        num_res_blocks: residual blocks per level on the way down (``+1`` on the way up, as in ADM).
        attn_levels: indices into ``dim_mults`` of the levels whose res blocks are followed by ``Attn_P3D``.
        mid_attn: attention in the middle block.
        heads, dim_head: attention heads and per-head width (inner width ``heads * dim_head``), spatial and
            temporal attention alike. ``heads=None``: each attention layer of ``C`` channels has ``C // dim_head``
            heads (unCLIP/Karlo: ``dim_head=64``); ``dim_head=None``: ``C // heads`` wide heads.
        attn_norm: ``"layer"``: LayerNorm on the spatial attention's tokens; ``"group"``: GroupNorm (``norm_groups``,
            eps 1e-5) on the frame, as diffusers' unCLIP/Karlo attention (``Attention(norm_num_groups=...)``).
        attn_bias: biases on the spatial attention's ``q``/``k``/``v`` projections (own and context tokens).
        image_embed_dim: width ``D`` of the CLIP image embedding ``y_e``, or ``None`` (no image conditioning).
        num_image_tokens: ``K``, the context tokens projected from ``y_e`` (unCLIP uses 4).
        image_embed_scale: multiplies ``y_e`` (and its learned null) before the projections; ``"unit_rms"``:
            by ``D**0.5``. An L2-normalised ``y_e`` has entries of RMS ``D**-0.5`` (0.09 at D = 128), which the
            projections, initialised for unit-RMS inputs, barely pass on; with ``"unit_rms"`` the demo's D draws
            the embedding's shape far more often (docs/choices.md#d-image_embed_scale-unit_rms). 1.0 = as
            given (the default, which every checkpoint saved without the key was trained with).
        text_dim: width of the text hidden states used as context tokens, or ``None``.
        text_embed_dim: width of a pooled text embedding (``text_embed``, the CLIP text embedding ``e_x``) projected
            by ``text_embed_proj`` into the time embedding (unCLIP/Karlo's ``embedding_proj``), or ``None``. Not
            touched by ``drop_cond``.
        text_null: ``"learned"``: ``drop_cond`` (and ``text_hidden=None``) uses the learned ``null_text_hidden``
            token; ``"none"``: no such parameter, ``drop_cond`` leaves the text inputs alone (the caller passes the
            empty caption's encoding, as Karlo does) and ``text_hidden=None`` means no text context.
        cond_dim: width of the context tokens (default: the time-embedding width ``4 * dim``).
        context_norm: ``"all"``: the LayerNorm ``context_norm`` normalises every context token; ``"text"``: only
            the projected text hidden states, not the image tokens (Karlo's ``text_encoder_hidden_states_norm``).
        lowres_cond: super-resolution: concatenate the upsampled low-res input (and embed its noise level).
        lowres_channels: channels of the low-res input (default ``in_channels``).
        lowres_noise_cond: with ``lowres_cond``, embed ``lowres_noise_level`` (``lowres_noise_embed``); False: no
            such embedding (Karlo's super-resolution networks).
        lowres_resize: how ``lowres`` is resized to ``x``'s size: ``"bilinear"``, or ``"bicubic"`` with
            antialiasing as Karlo's pipeline (``F.interpolate(mode="bicubic", align_corners=False,
            antialias=True)``; antialias changes upsampling too: PyTorch's antialiased kernel is PIL's, ``a=-0.5``).
        extra_in_channels: extra input channels (``↑F``: masked frames + mask) through the zero-init ``extra_in``.
        fps_cond: add the fps embedding (``D_t``); its parameters are named ``fps_*``.
        temporal: build the temporal layers (``D_t``, ``↑F``, ``SR_t``); ``False`` for ``D``, ``SR_l``, ``SR_h``.
        fps_mix: ``(fps_low, fps_high)``: every temporal convolution gets a second kernel for low frame rates
            (``TemporalConv.add_low_fps_weights``), and each clip uses ``lerp(low, high, a)`` of the two outputs with
            ``a`` = log(fps) placed linearly between log(fps_low) (0) and log(fps_high) (1), clamped; no fps: 0.5.
            The dependence on the frame rate is built in, so each clip's gradient goes to its regime's kernel; the
            fps embedding alone is not learned in a few hundred steps (docs/choices.md#d_t-fps_mix). None: the
            paper's D_t.
        dropout: dropout in the res blocks.
        checkpointing: recompute each block in the backward pass (``torch.utils.checkpoint``) to save memory.
        channels_last: keep activations in ``channels_last`` memory format. It makes the attention token
            views free and the temporal conv a plain GEMM, but CPU GroupNorm is slower in it and the 3x3 convs
            are equal: a wash on one thread, faster steps with the 2 threads of the demo's CPU and its small
            U-Nets, so the demo's D and SR YAMLs turn it on (children inherit it; docs/choices.md#channels_last).
            Off by default; unmeasured on GPU (cuDNN prefers NHWC).
        norm_groups: GroupNorm groups.
        max_frames: see ``p3d.RotaryEmbedding`` (not a hard limit).
        resample: ``"conv"``: strided-conv ``Downsample`` and nearest-then-conv ``Upsample``; ``"resblock"``: the
            resamplers are ``ResBlock``s that pool / upsample inside (diffusers' ``ResnetBlock2D(down/up=True)``,
            unCLIP/Karlo), in the same ``Block`` positions.
        time_cond: how the res blocks take the time embedding: ``"scale_shift"`` (ADM's scale-shift norm) or
            ``"add"`` (added after the first conv, diffusers' ``time_embedding_norm="default"``).
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        dim: int = 64,
        dim_mults: Sequence[int] = (1, 2, 4),
        num_res_blocks: int = 2,
        attn_levels: Sequence[int] = (2,),
        mid_attn: bool = True,
        heads: int | None = 4,
        dim_head: int | None = 32,
        image_embed_dim: int | None = None,
        num_image_tokens: int = 4,
        image_embed_scale: float | Literal["unit_rms"] = 1.0,
        text_dim: int | None = None,
        cond_dim: int | None = None,
        lowres_cond: bool = False,
        lowres_channels: int | None = None,
        extra_in_channels: int = 0,
        fps_cond: bool = False,
        fps_mix: Sequence[float] | None = None,
        temporal: bool = False,
        dropout: float = 0.0,
        checkpointing: bool = False,
        channels_last: bool = False,
        norm_groups: int = 32,
        max_frames: int = 128,
        resample: Literal["conv", "resblock"] = "conv",
        time_cond: Literal["scale_shift", "add"] = "scale_shift",
        attn_norm: Literal["layer", "group"] = "layer",
        attn_bias: bool = False,
        text_embed_dim: int | None = None,
        text_null: Literal["learned", "none"] = "learned",
        context_norm: Literal["all", "text"] = "all",
        lowres_noise_cond: bool = True,
        lowres_resize: Literal["bilinear", "bicubic"] = "bilinear",
    ) -> None:
        super().__init__()
        dim_mults, attn_levels = tuple(dim_mults), tuple(attn_levels)
        if any(not 0 <= lvl < len(dim_mults) for lvl in attn_levels):
            raise ValueError(f"attn_levels {attn_levels} must index dim_mults {dim_mults}")
        for name, value, allowed in (("resample", resample, ("conv", "resblock")),
                                     ("time_cond", time_cond, ("scale_shift", "add")),
                                     ("attn_norm", attn_norm, ("layer", "group")),
                                     ("text_null", text_null, ("learned", "none")),
                                     ("context_norm", context_norm, ("all", "text")),
                                     ("lowres_resize", lowres_resize, ("bilinear", "bicubic"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        for name, value in (("heads", heads), ("dim_head", dim_head)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if heads is None and dim_head is None:
            raise ValueError("heads and dim_head cannot both be None: give one and the other is channels // it")
        self.text_null, self.context_norm_mode, self.lowres_resize = text_null, context_norm, lowres_resize
        self.text_embed_dim = text_embed_dim
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_levels = len(dim_mults)
        self.temporal, self.fps_cond, self.lowres_cond = temporal, fps_cond, lowres_cond
        self.image_embed_dim, self.text_dim = image_embed_dim, text_dim
        self.num_image_tokens = num_image_tokens if image_embed_dim else 0
        if image_embed_scale == "unit_rms":
            image_embed_scale = (image_embed_dim or 1) ** 0.5
        if isinstance(image_embed_scale, str) or not image_embed_scale > 0:
            raise ValueError(f"image_embed_scale must be a positive number or 'unit_rms', got {image_embed_scale!r}")
        self.image_embed_scale = float(image_embed_scale)
        self.extra_in_channels = extra_in_channels
        self.checkpointing, self.channels_last = checkpointing, channels_last
        time_dim = 4 * dim
        self.cond_dim = cond_dim or time_dim

        # ---- embeddings added to the time embedding
        self.time_embed = TimestepEmbedding(dim, time_dim)
        self.lowres_noise_cond = lowres_cond and lowres_noise_cond
        if lowres_cond:
            self.lowres_channels = lowres_channels or in_channels
        if self.lowres_noise_cond:
            self.lowres_noise_embed = TimestepEmbedding(dim, time_dim)
        if fps_cond:
            self.fps_embed = FpsEmbedding(dim, time_dim)  # zero-init last layer: D_t == D at init whatever the fps
        if text_embed_dim:
            self.text_embed_proj = nn.Linear(text_embed_dim, time_dim)

        # ---- context tokens (unCLIP): K tokens from y_e, then text hidden states; learned nulls for CFG
        context_dim = None
        if image_embed_dim:
            self.image_embed_proj = nn.Linear(image_embed_dim, time_dim)
            if self.num_image_tokens:
                self.image_tokens_proj = nn.Linear(image_embed_dim, self.num_image_tokens * self.cond_dim)
            # unit expected norm, like an L2-normalised CLIP embedding
            self.null_image_embed = nn.Parameter(torch.randn(image_embed_dim) * image_embed_dim ** -0.5)
        if text_dim:
            self.text_proj = nn.Linear(text_dim, self.cond_dim)
            if text_null == "learned":
                self.null_text_hidden = nn.Parameter(torch.randn(text_dim))  # ~ a LayerNorm-ed hidden state
        if self.num_image_tokens or text_dim:
            context_dim = self.cond_dim
            if context_norm == "all" or text_dim:
                self.context_norm = nn.LayerNorm(self.cond_dim)

        # ---- input
        in_total = in_channels + (self.lowres_channels if lowres_cond else 0)
        self.conv_in = Conv_P3D(in_total, dim, 3, temporal)
        if extra_in_channels:
            # zero-init and bias-free: output exactly 0 at init, and extra=None is exactly extra=zeros
            self.extra_in = nn.Conv2d(extra_in_channels, dim, 3, padding=1, bias=False)
            nn.init.zeros_(self.extra_in.weight)

        def res(i: int, o: int, resample_: Literal["down", "up"] | None = None) -> ResBlock:
            return ResBlock(i, o, time_dim, dropout=dropout, temporal=temporal, norm_groups=norm_groups,
                            time_cond=time_cond, resample=resample_)

        def attn(ch: int) -> Attn_P3D:
            n_heads = heads if heads is not None else ch // dim_head
            width = dim_head if dim_head is not None else ch // heads
            if n_heads < 1 or width < 1:
                raise ValueError(f"attention on {ch} channels with heads={heads}, dim_head={dim_head} has no head")
            return Attn_P3D(ch, n_heads, width, context_dim, temporal, max_frames, norm=attn_norm,
                            norm_groups=norm_groups, bias=attn_bias)

        def downsample(ch: int) -> nn.Module:
            return Downsample(ch, temporal) if resample == "conv" else res(ch, ch, "down")

        def upsample(ch: int) -> nn.Module:
            return Upsample(ch, temporal) if resample == "conv" else res(ch, ch, "up")

        # ---- down path (ADM layout: every block output is a skip)
        self.down = nn.ModuleList()
        skips, ch = [dim], dim
        for level, mult in enumerate(dim_mults):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, dim * mult)]
                ch = dim * mult
                if level in attn_levels:
                    layers.append(attn(ch))
                self.down.append(Block(layers))
                skips.append(ch)
            if level != len(dim_mults) - 1:
                self.down.append(Block([downsample(ch)]))
                skips.append(ch)

        self.mid = Block([res(ch, ch), *([attn(ch)] if mid_attn else []), res(ch, ch)])

        # ---- up path
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(dim_mults))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skips.pop(), dim * mult)]
                ch = dim * mult
                if level in attn_levels:
                    layers.append(attn(ch))
                if level != 0 and i == num_res_blocks:
                    layers.append(upsample(ch))
                self.up.append(Block(layers))

        # ---- output
        self.out_norm = _group_norm(ch, norm_groups)
        self.out_conv = Conv_P3D(ch, out_channels, 3, temporal)
        nn.init.zeros_(self.out_conv.spatial.weight)  # ADM: predict 0 at init
        nn.init.zeros_(self.out_conv.spatial.bias)
        self.fps_mix: tuple[float, float] | None = None
        self._fps_convs: tuple[TemporalConv, ...] = ()
        if fps_mix is not None:
            low, high = (float(v) for v in fps_mix)
            if not temporal or not 0 < low < high:
                raise ValueError(f"fps_mix needs temporal: true and 0 < fps_low < fps_high, got {list(fps_mix)}")
            self.fps_mix = (low, high)
            self._fps_convs = tuple(m for m in self.modules() if isinstance(m, TemporalConv))
            for conv in self._fps_convs:
                conv.add_low_fps_weights()

    # ------------------------------------------------------------------------------------------ parameter groups
    def named_temporal_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Parameters ``D_t`` adds to ``D`` (names containing ``temporal`` or starting with ``fps_``)."""
        return ((n, p) for n, p in self.named_parameters() if is_temporal_name(n))

    def temporal_parameters(self) -> Iterator[nn.Parameter]:
        """The temporal layers and fps embedding: what ``D_t`` trains when the spatial layers are frozen."""
        return (p for _, p in self.named_temporal_parameters())

    def spatial_parameters(self) -> Iterator[nn.Parameter]:
        """Every other parameter (the text-to-image network, incl. ``extra_in``); with ``temporal_parameters``
        a partition of ``parameters()``."""
        return (p for n, p in self.named_parameters() if not is_temporal_name(n))

    def freeze_spatial(self, frozen: bool = True) -> None:
        """Set ``requires_grad = not frozen`` on the spatial parameters (paper: train only the new layers)."""
        for p in self.spatial_parameters():
            p.requires_grad_(not frozen)

    def parameter_counts(self) -> dict[str, int]:
        """``{"total", "spatial", "temporal", "trainable"}`` scalar parameter counts."""
        temporal = sum(p.numel() for p in self.temporal_parameters())
        total = count_parameters(self)
        return {"total": total, "spatial": total - temporal, "temporal": temporal,
                "trainable": count_parameters(self, trainable_only=True)}

    # --------------------------------------------------------------------------------------------- conditioning
    def _context(self, b: int, image_embed: Tensor | None, text_hidden: Tensor | None, text_mask: Tensor | None,
                 drop: Tensor | None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Returns ``(image embedding term [B, E] or None, context [B, L', Dc] or None, mask [B, L'] or None)``."""
        tokens: list[Tensor] = []
        emb_term = mask = None
        if self.image_embed_dim:
            null = self.null_image_embed[None].expand(b, -1)
            if image_embed is None:
                image_embed = null  # unconditional == dropped
            else:
                image_embed = image_embed.to(null.dtype)
                if drop is not None:
                    image_embed = torch.where(drop[:, None], null, image_embed)
            if self.image_embed_scale != 1.0:
                image_embed = image_embed * self.image_embed_scale
            emb_term = self.image_embed_proj(image_embed)
            if self.num_image_tokens:
                tokens.append(self.image_tokens_proj(image_embed).view(b, self.num_image_tokens, self.cond_dim))
        if self.text_dim and self.text_null == "none":
            if text_hidden is not None:  # no null token: drop_cond leaves the text alone (the caller's choice)
                text = self.text_proj(text_hidden.to(self.text_proj.weight.dtype))
                tokens.append(self.context_norm(text) if self.context_norm_mode == "text" else text)
                if text_mask is not None:
                    mask = torch.cat([text_mask.new_ones(b, self.num_image_tokens, dtype=torch.bool),
                                      text_mask.bool()], dim=1)
        elif self.text_dim:
            null = self.null_text_hidden.view(1, 1, -1)
            if text_hidden is None:
                text_hidden, text_mask = null.expand(b, 1, -1), None  # unconditional: one null token
            else:
                text_hidden = text_hidden.to(null.dtype)
                if drop is not None:
                    # a dropped caption becomes exactly the unconditional context: one null token (the first,
                    # the rest masked out; L unmasked copies would weigh L times more in the joint softmax)
                    text_hidden = torch.where(drop[:, None, None], null, text_hidden)
                    first = torch.zeros_like(text_hidden[..., 0], dtype=torch.bool)
                    first[:, 0] = True
                    keep = text_mask.bool() if text_mask is not None else torch.ones_like(first)
                    text_mask = torch.where(drop[:, None], first, keep)
            text = self.text_proj(text_hidden)
            tokens.append(self.context_norm(text) if self.context_norm_mode == "text" else text)
            if text_mask is not None:
                mask = torch.cat([text_mask.new_ones(b, self.num_image_tokens, dtype=torch.bool),
                                  text_mask.bool()], dim=1)
        if not tokens:
            return emb_term, None, None
        context = torch.cat(tokens, dim=1)
        if self.context_norm_mode == "all":
            context = self.context_norm(context)
        return emb_term, context, mask

    def _to_layout(self, x: Tensor) -> tuple[Tensor, int | None]:
        """``[B, C, H, W]`` or ``[B, C, F, H, W]`` -> (``[(B F), C, H, W]`` in the working memory format, F)."""
        if x.ndim == 5:
            return fold_frames(x, self.channels_last), x.shape[2]
        if x.ndim != 4:
            raise ValueError(f"expected [B,C,H,W] or [B,C,F,H,W], got shape {tuple(x.shape)}")
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format), None

    # -------------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        x: Tensor,
        t: Tensor,
        *,
        image_embed: Tensor | None = None,
        text_hidden: Tensor | None = None,
        text_mask: Tensor | None = None,
        text_embed: Tensor | None = None,
        lowres: Tensor | None = None,
        lowres_noise_level: Tensor | None = None,
        fps: Tensor | None = None,
        extra: Tensor | None = None,
        drop_cond: Tensor | None = None,
        time: bool = True,
    ) -> Tensor:
        """Predict the diffusion target for noisy ``x``.

        Args:
            x: ``[B, C_in, H, W]`` image or ``[B, C_in, F, H, W]`` video (H, W divisible by
                ``2 ** (len(dim_mults) - 1)``).
            t: ``[B]`` diffusion step (float or int, the scheduler's scale, e.g. ``[0, 1000)``).
            image_embed: ``[B, image_embed_dim]`` CLIP image embedding ``y_e``; ``None`` = the null embedding.
            text_hidden: ``[B, L, text_dim]`` text hidden states; ``None`` = the null text token (no text context
                with ``text_null="none"``).
            text_mask: ``[B, L]`` bool, True = real token.
            text_embed: ``[B, text_embed_dim]`` pooled CLIP text embedding added (projected) to the time embedding
                (used with ``text_embed_dim``; ``None`` = no term; not affected by ``drop_cond``).
            lowres: ``[B, C_lr, h, w]`` / ``[B, C_lr, F, h, w]`` low-res input (required with ``lowres_cond``);
                resized per frame to ``x``'s ``H, W`` (``lowres_resize``) and concatenated to ``x``.
            lowres_noise_level: ``[B]`` noise-augmentation level of ``lowres`` on the timestep scale
                (``None`` = 0; used with ``lowres_noise_cond``).
            fps: ``[B]`` frame rate (used with ``fps_cond``; ``None`` = no fps term).
            extra: ``[B, extra_in_channels, (F,) H, W]`` (``↑F``: masked frames and mask); ``None`` = zeros.
            drop_cond: ``[B]`` bool; True replaces that item's image embedding and text by the learned nulls
                (classifier-free guidance; with ``text_null="none"`` only the image embedding).
            time: False runs a video frame by frame (all temporal layers off).

        Returns:
            ``[B, out_channels, H, W]`` or ``[B, out_channels, F, H, W]`` (contiguous).
        """
        b = x.shape[0]
        h, num_frames = self._to_layout(x)
        if self.lowres_cond:
            if lowres is None:
                raise ValueError("this UNet has lowres_cond=True: pass lowres")
            lr, lr_frames = self._to_layout(lowres.to(h.dtype))
            if lr_frames != num_frames:
                raise ValueError(f"lowres {tuple(lowres.shape)} and x {tuple(x.shape)} differ in frames")
            if lr.shape[-2:] != h.shape[-2:] and self.lowres_resize == "bicubic":
                lr = F.interpolate(lr, size=h.shape[-2:], mode="bicubic", align_corners=False, antialias=True)
            elif lr.shape[-2:] != h.shape[-2:]:
                lr = F.interpolate(lr, size=h.shape[-2:], mode="bilinear", align_corners=False)
            h = torch.cat([h, lr], dim=1)

        emb = self.time_embed(t.to(h.device).reshape(b))
        if self.lowres_noise_cond:
            level = lowres_noise_level if lowres_noise_level is not None else torch.zeros(b, device=h.device)
            emb = emb + self.lowres_noise_embed(level.to(h.device).reshape(b))
        if self.fps_cond and fps is not None:
            emb = emb + self.fps_embed(fps.to(h.device).reshape(b))
        if self.fps_mix is not None:
            low, high = self.fps_mix
            mix = torch.full((b,), 0.5, device=h.device) if fps is None else \
                ((fps.to(h.device).float().reshape(b).log() - math.log(low)) / math.log(high / low)).clamp(0, 1)
            for conv in self._fps_convs:
                conv.fps_mix = mix
        if self.text_embed_dim and text_embed is not None:
            emb = emb + self.text_embed_proj(text_embed.to(device=h.device, dtype=self.text_embed_proj.weight.dtype))
        drop = drop_cond.to(device=h.device, dtype=torch.bool).reshape(b) if drop_cond is not None else None
        emb_term, context, context_mask = self._context(b, image_embed, text_hidden, text_mask, drop)
        if emb_term is not None:
            emb = emb + emb_term
        emb = F.silu(emb)  # every res block's emb_proj starts with SiLU (ADM): do it once

        h = self.conv_in.forward_frames(h, num_frames, time)
        if self.extra_in_channels and extra is not None:
            e, e_frames = self._to_layout(extra.to(h.dtype))
            if e_frames != num_frames:
                raise ValueError(f"extra {tuple(extra.shape)} and x {tuple(x.shape)} differ in frames")
            h = h + self.extra_in(e)

        skips = [h]
        for block in self.down:
            h = self._run(block, h, emb, context, context_mask, num_frames, time)
            skips.append(h)
        h = self._run(self.mid, h, emb, context, context_mask, num_frames, time)
        for block in self.up:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, context, context_mask, num_frames, time)
        h = self.out_conv.forward_frames(F.silu(self.out_norm(h)), num_frames, time)
        if num_frames is None:
            return h.contiguous()
        return unfold_frames(h, num_frames)

    def _run(self, block: Block, h: Tensor, emb: Tensor, context: Tensor | None, mask: Tensor | None,
             num_frames: int | None, time: bool) -> Tensor:
        if self.checkpointing and self.training and torch.is_grad_enabled():
            # non-reentrant: works with keyword/None inputs and frozen (no-grad) spatial weights
            return checkpoint(block, h, emb, context, mask, num_frames, time, use_reentrant=False)
        return block(h, emb, context, mask, num_frames, time)
