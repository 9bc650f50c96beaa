"""Pseudo-3D layers of Make-A-Video (§2.3, §2.4): ``Conv_P3D`` and ``Attn_P3D``.

Each layer is a pretrained-able spatial layer (run on every frame independently) followed by a temporal layer
(run on every pixel independently, across frames) that is initialised to the identity, so that a text-to-image
``D`` loaded into ``D_t`` computes exactly the same frames until the temporal layers are trained.

Internal layout ("folded frames")
---------------------------------
Videos travel between layers as ``[(B F), C, H, W]``: the frames folded into the batch. Every spatial op
(Conv2D, per-frame GroupNorm, spatial attention) is then a native 2-D op with no copy, GroupNorm cannot mix
frames, and ``D_t`` restricted to one frame *is* ``D``. The temporal layers take ``num_frames`` to see the
frame axis. The public ``forward`` of each layer also accepts ``[B, C, F, H, W]`` (folded once on entry,
unfolded on exit) and ``[B, C, H, W]`` images (temporal part skipped). The code works for both the contiguous
(NCHW) and the ``channels_last`` memory format and keeps the format it is given.

Temporal convolution: one GEMM to the taps, then a shift-add
------------------------------------------------------------
``TemporalConv`` computes the three taps with one GEMM (a 1x1 conv in NCHW, a linear layer on the token view in
channels_last) and adds them shifted along frames. Both GEMM forms (this one and time-im2col, which concatenates the
frames ``f-1, f, f+1`` on channels for one 1x1 conv) beat ``Conv3d`` and ``Conv1d`` after a rearrange without leaving
the folded layout; between the two, memory decides: time-im2col keeps its ``3C``-channel input for the weight
gradient (three activation copies per temporal conv), the taps form keeps only ``x``. With the shift-add written as
one autograd function (``_ShiftAddTaps``: its backward writes the taps' gradient in one buffer, instead of three
zero-filled slice gradients) the taps form is also as fast or faster (docs/choices.md#conv_p3d-one-gemm-to-the-taps;
``python -m benchmarks.train_step --full --ablations`` re-measures it against time-im2col).

Padding: zero 'same' padding. Both zero and replicate padding give the exact identity at init (the off-centre
taps are exactly zero, so whatever is padded is multiplied by 0); zero padding is what both GEMM forms get for
free (the missing neighbour is simply not added), whereas replicate needs an explicit padded copy of the input.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .mixed_precision import GroupNorm32, attention

__all__ = [
    "Conv_P3D",
    "Attn_P3D",
    "TemporalConv",
    "SpatialAttention",
    "TemporalAttention",
    "RotaryEmbedding",
    "fold_frames",
    "unfold_frames",
    "is_channels_last",
]


# --------------------------------------------------------------------------------------------------- layout helpers
def is_channels_last(x: Tensor) -> bool:
    """True if a 4-D tensor is stored channels_last (and not also plain-contiguous, as for C == 1 or H == W == 1)."""
    return x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def fold_frames(x: Tensor, channels_last: bool = False) -> Tensor:
    """``[B, C, F, H, W] -> [(B F), C, H, W]`` (one copy), contiguous or channels_last."""
    b, c, f, h, w = x.shape
    if channels_last:
        # permute to [B, F, H, W, C] in one copy: that buffer *is* the channels_last [(B F), C, H, W] tensor
        return x.permute(0, 2, 3, 4, 1).reshape(b * f, h, w, c).permute(0, 3, 1, 2)
    return x.transpose(1, 2).reshape(b * f, c, h, w)


def unfold_frames(x: Tensor, num_frames: int) -> Tensor:
    """``[(B F), C, H, W] -> [B, C, F, H, W]`` (contiguous, one copy)."""
    n, c, h, w = x.shape
    return x.view(n // num_frames, num_frames, c, h, w).transpose(1, 2).contiguous()


def _tokens(x: Tensor) -> Tensor:
    """``[N, C, H, W] -> [N, H*W, C]`` tokens: a free view for channels_last, one copy for NCHW."""
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(n, h * w, c)


# ----------------------------------------------------------------------------------------------------- convolution
class TemporalConv(nn.Conv1d):
    """``Conv_1D`` of the paper: a 1-D convolution over frames, applied to every pixel, initialised to identity.

    Parameters are stored as an ``nn.Conv1d`` (``weight [C, C, k]``, ``bias [C]``), initialised with Dirac weights
    and zero bias, so that ``forward`` returns its input exactly. The computation runs on the folded layout
    (see module docstring for why not ``F.conv1d``).

    Args:
        channels: ``C`` (input and output).
        kernel_size: odd temporal kernel, 3 in the paper; zero 'same' padding.
    """

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        if kernel_size % 2 != 1:
            raise ValueError(f"temporal kernel_size must be odd for 'same' padding, got {kernel_size}")
        super().__init__(channels, channels, kernel_size, padding=kernel_size // 2)
        nn.init.dirac_(self.weight)
        nn.init.zeros_(self.bias)
        self.register_parameter("weight_low_fps", None)
        self.register_parameter("bias_low_fps", None)
        #: ``[B]`` per clip, set by ``UNet.forward`` with ``fps_mix``: 0 = the low-fps weights, 1 = ``weight``
        self.fps_mix: Tensor | None = None

    def add_low_fps_weights(self) -> None:
        """A second kernel for low frame rates (``UNet(fps_mix=...)``), identity at init like the first."""
        self.weight_low_fps = nn.Parameter(self.weight.detach().clone())
        self.bias_low_fps = nn.Parameter(self.bias.detach().clone())

    def forward(self, x: Tensor, num_frames: int) -> Tensor:  # type: ignore[override]
        """``x [(B F), C, H, W] -> [(B F), C, H, W]``, mixing each pixel's ``F`` frames; memory format kept.

        With low-fps weights, each clip's output is ``lerp(conv_low(x), conv(x), fps_mix)``.
        """
        high = self._conv(x, num_frames, self.weight, self.bias)
        if self.weight_low_fps is None:
            return high
        if self.fps_mix is None:
            raise RuntimeError("TemporalConv with low-fps weights needs fps_mix (set by UNet.forward)")
        low = self._conv(x, num_frames, self.weight_low_fps, self.bias_low_fps)
        mix = self.fps_mix.to(device=x.device, dtype=x.dtype).repeat_interleave(num_frames).view(-1, 1, 1, 1)
        return torch.lerp(low, high, mix)

    def _conv(self, x: Tensor, num_frames: int, weight_param: Tensor, bias_param: Tensor) -> Tensor:
        """The temporal convolution of ``x [(B F), C, H, W]`` with the given kernel ``[C, C, k]`` and bias."""
        n, c, h, w = x.shape
        b, f, k = n // num_frames, num_frames, self.kernel_size[0]
        # tap-major weight [k*C_out, C_in]: row j*C + o is output channel o of tap j
        weight = weight_param.permute(2, 0, 1).reshape(k * c, c)
        if is_channels_last(x):
            # one GEMM to the k taps on the [B, F, H*W, C] token view (a free view)
            taps = F.linear(x.permute(0, 2, 3, 1).reshape(b, f, h * w, c), weight).view(b, f, h * w, k, c)
            out = _ShiftAddTaps.apply(taps, bias_param.to(taps.dtype), 3)  # [B, F, H*W, C]
            return out.view(n, h, w, c).permute(0, 3, 1, 2)
        # NCHW: one 1x1 conv to the k taps, [(B F), k*C, H, W] = [B, F, k, C, H, W]
        taps = F.conv2d(x, weight[:, :, None, None]).view(b, f, k, c, h, w)
        out = _ShiftAddTaps.apply(taps, bias_param.to(taps.dtype).view(c, 1, 1), 2)  # [B, F, C, H, W]
        return out.view(n, c, h, w)


class _ShiftAddTaps(torch.autograd.Function):
    """``out[:, f] = bias + sum_j taps[:, f + j - k//2, tap j]`` (zero 'same' padding: missing frames add nothing).

    ``taps`` has frames on dim 1 and the ``k`` taps on dim ``tap_dim``; ``out`` is ``taps`` without the tap dim and
    ``bias`` broadcasts to it. Written by hand because autograd's version of the shifted slice-adds allocates a
    zero-filled gradient of the whole ``taps`` tensor per slice; this backward fills one buffer.
    """

    @staticmethod
    def forward(ctx, taps: Tensor, bias: Tensor, tap_dim: int) -> Tensor:  # type: ignore[override]
        k, f = taps.shape[tap_dim], taps.shape[1]
        centre = k // 2
        out = taps.select(tap_dim, centre) + bias
        for j in range(k):
            o = j - centre  # tap j of frame f reads frame f + o
            if o == 0 or abs(o) >= f:
                continue
            src = taps.select(tap_dim, j)
            if o < 0:
                out[:, -o:] += src[:, : f + o]
            else:
                out[:, : f - o] += src[:, o:]
        ctx.tap_dim, ctx.k, ctx.bias_shape = tap_dim, k, bias.shape
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        tap_dim, k, f = ctx.tap_dim, ctx.k, grad.shape[1]
        centre = k // 2
        shape = list(grad.shape)
        shape.insert(tap_dim, k)
        grad_taps = grad.new_empty(shape)
        for j in range(k):
            o, dst = j - centre, grad_taps.select(tap_dim, j)
            if o == 0:
                dst.copy_(grad)
            elif abs(o) >= f:
                dst.zero_()
            elif o < 0:  # frame f' = f + o fed out[f]: its gradient is grad[f' - o]; the last -o frames fed nothing
                dst[:, : f + o].copy_(grad[:, -o:])
                dst[:, f + o:].zero_()
            else:
                dst[:, o:].copy_(grad[:, : f - o])
                dst[:, :o].zero_()
        return grad_taps, grad.sum_to_size(ctx.bias_shape), None


class Conv_P3D(nn.Module):  # noqa: N801 - the paper's name
    """Pseudo-3D convolution: ``Conv_P3D(h) = Conv_1D(Conv_2D(h) ∘ T) ∘ T`` (paper §2.3).

    ``Conv_2D`` (``self.spatial``) runs on every frame; ``Conv_1D`` (``self.temporal``, identity at init) on every
    pixel across frames. With ``temporal=False`` no temporal parameters exist, so a 2-D checkpoint's keys are
    exactly this module's keys minus ``temporal.*``.

    Args:
        in_ch, out_ch: channels.
        kernel_size: spatial kernel (odd; 'same' padding).
        temporal: create the temporal convolution.
        stride: spatial stride (2 for downsampling; the frame axis is never strided).
        temporal_kernel_size: kernel of ``Conv_1D`` (3 in the paper).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, temporal: bool = True, *, stride: int = 1,
                 temporal_kernel_size: int = 3) -> None:
        super().__init__()
        self.spatial = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2)
        self.temporal = TemporalConv(out_ch, temporal_kernel_size) if temporal else None

    def forward_frames(self, x: Tensor, num_frames: int | None, time: bool = True) -> Tensor:
        """Folded layout: ``x [(B F), C_in, H, W] -> [(B F), C_out, H', W']``; ``num_frames=None`` for images."""
        x = self.spatial(x)
        if self.temporal is not None and num_frames is not None and time:
            x = self.temporal(x, num_frames)
        return x

    def forward(self, x: Tensor, time: bool = True) -> Tensor:
        """``[B, C_in, H, W] -> [B, C_out, H', W']`` (image, no temporal part) or
        ``[B, C_in, F, H, W] -> [B, C_out, F, H', W']``; ``time=False`` runs a video frame by frame."""
        if x.ndim == 4:
            return self.forward_frames(x, None)
        if x.ndim != 5:
            raise ValueError(f"Conv_P3D expects [B,C,H,W] or [B,C,F,H,W], got shape {tuple(x.shape)}")
        f = x.shape[2]
        return unfold_frames(self.forward_frames(fold_frames(x), f, time), f)


# ------------------------------------------------------------------------------------------------------- attention
class RotaryEmbedding(nn.Module):
    """Rotary position encoding (RoPE) over frames for the temporal attention; no parameters.

    Why RoPE: it is relative (what matters between frames is their distance, also after ``↑F`` or for clips longer
    than in training), it touches only ``q``/``k`` so the zero-initialised output projection still makes the
    layer exactly the identity, and it has no weights to add to a ``D`` checkpoint.

    Args:
        dim_head: per-head width (even).
        max_frames: frames whose cos/sin table is precomputed (non-persistent buffer); longer clips compute theirs.
        theta: RoPE base.
    """

    def __init__(self, dim_head: int, max_frames: int = 128, theta: float = 10000.0) -> None:
        super().__init__()
        if dim_head % 2:
            raise ValueError(f"RoPE needs an even dim_head, got {dim_head}")
        self.dim_head, self.theta = dim_head, theta
        self.register_buffer("cos_sin", self._table(max_frames, torch.device("cpu")), persistent=False)

    def _table(self, n: int, device: torch.device) -> Tensor:
        inv_freq = self.theta ** (-torch.arange(0, self.dim_head, 2, device=device, dtype=torch.float32)
                                  / self.dim_head)
        angles = torch.arange(n, device=device, dtype=torch.float32)[:, None] * inv_freq[None]  # [n, d/2]
        return torch.stack([angles.cos(), angles.sin()])  # [2, n, d/2]

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., F, d]`` -> rotated ``x`` (same shape and dtype)."""
        f = x.shape[-2]
        table = self.cos_sin if f <= self.cos_sin.shape[1] and self.cos_sin.dtype == torch.float32 \
            else self._table(f, x.device)
        cos, sin = table[:, :f].to(x.dtype).unbind(0)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class SpatialAttention(nn.Module):
    """``Attn_2D``: per-frame self-attention whose keys/values also include the conditioning tokens.

    This is GLIDE/unCLIP's decoder attention (the decoder Make-A-Video builds on): the ``H*W`` tokens of one
    frame attend jointly to themselves and to the ``L`` context tokens (CLIP image-embedding tokens and text
    hidden states) in one softmax, i.e. self-attention plus cross-attention in a single
    ``scaled_dot_product_attention`` call. Pre-LayerNorm, residual, output projection zero-initialised (as in
    ADM/GLIDE) so a fresh block starts as the identity.

    Args:
        dim: channels ``C``.
        heads, dim_head: attention heads and per-head width (inner width ``heads * dim_head``).
        context_dim: width ``Dc`` of the conditioning tokens, or ``None`` for self-attention only.
        norm: ``"layer"``: LayerNorm on the tokens; ``"group"``: GroupNorm (``norm_groups`` groups, reduced to
            ``gcd(norm_groups, C)``, eps 1e-5) on the frame ``[(B F), C, H, W]``, as diffusers'
            ``Attention(norm_num_groups=...)`` of unCLIP/Karlo.
        norm_groups: GroupNorm groups for ``norm="group"``.
        bias: biases on the ``q``/``k``/``v`` projections (``to_qkv`` and ``to_context_kv``), as diffusers'.
    """

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32, context_dim: int | None = None, *,
                 norm: Literal["layer", "group"] = "layer", norm_groups: int = 32, bias: bool = False) -> None:
        super().__init__()
        if norm not in ("layer", "group"):
            raise ValueError(f"SpatialAttention norm must be one of ('layer', 'group'), got {norm!r}")
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.norm = nn.LayerNorm(dim) if norm == "layer" else GroupNorm32(math.gcd(norm_groups, dim), dim)
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=bias)
        self.to_context_kv = nn.Linear(context_dim, 2 * inner, bias=bias) if context_dim else None
        self.to_out = nn.Linear(inner, dim)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def forward(self, x: Tensor, num_frames: int | None, context: Tensor | None = None,
                context_mask: Tensor | None = None) -> Tensor:
        """Folded layout.

        Args:
            x: ``[(B F), C, H, W]`` (``F = 1`` and ``num_frames=None`` for images).
            num_frames: ``F`` or ``None``; the context is shared by the ``F`` frames of a video.
            context: ``[B, L, Dc]`` conditioning tokens (ignored if the layer has no ``context_dim``).
            context_mask: ``[B, L]`` bool, True = attend; ``None`` = all tokens valid (faster, no mask).

        Returns:
            ``[(B F), C, H, W]`` in the memory format of ``x``.
        """
        n, c, h, w = x.shape
        f = num_frames or 1
        b, hd, d = n // f, self.heads, self.dim_head
        # GroupNorm normalises the frame before the token view, LayerNorm each token after it
        tokens = _tokens(self.norm(x)) if isinstance(self.norm, nn.GroupNorm) else self.norm(_tokens(x))
        q, k, v = self.to_qkv(tokens).view(n, h * w, 3, hd, d).permute(2, 0, 3, 1, 4)
        mask = None
        if context is not None and self.to_context_kv is not None:
            ck, cv = self.to_context_kv(context).view(b, -1, 2, hd, d).permute(2, 0, 3, 1, 4)  # [B, hd, L, d]
            length = ck.shape[2]
            # every frame of a video sees the same context: broadcast it over F inside the concatenation
            k = torch.cat([k.view(b, f, hd, h * w, d), ck[:, None].expand(b, f, hd, length, d)], 3)
            v = torch.cat([v.view(b, f, hd, h * w, d), cv[:, None].expand(b, f, hd, length, d)], 3)
            k, v = k.view(n, hd, h * w + length, d), v.view(n, hd, h * w + length, d)
            if context_mask is not None:
                full = torch.cat([context_mask.new_ones(b, h * w), context_mask.bool()], 1)  # own tokens: valid
                mask = full[:, None].expand(b, f, h * w + length).reshape(n, 1, 1, h * w + length)
        out = attention(q, k, v, attn_mask=mask)  # [N, hd, HW, d]
        out = self.to_out(out.transpose(1, 2).reshape(n, h * w, hd * d))
        # residual in x's layout; the token view is channels_last-strided, a free view either way
        return x + out.view(n, h, w, c).permute(0, 3, 1, 2)


class TemporalAttention(nn.Module):
    """``Attn_1D``: self-attention over the ``F`` frames of every pixel, identity at init.

    Pre-LayerNorm, RoPE on ``q``/``k`` as the temporal position encoding, and a zero-initialised output
    projection inside the residual: at init the layer returns ``x + 0``, exactly ``x``. Nothing else (no token
    shift, no gating) so that this identity holds bit for bit.

    Args:
        dim: channels ``C``.
        heads, dim_head: attention heads and per-head width.
        max_frames: see ``RotaryEmbedding``.
    """

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32, max_frames: int = 128) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.rotary = RotaryEmbedding(dim_head, max_frames)
        self.to_out = nn.Linear(inner, dim)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def forward(self, x: Tensor, num_frames: int) -> Tensor:
        """``x [(B F), C, H, W] -> [(B F), C, H, W]`` (memory format kept)."""
        n, c, h, w = x.shape
        f, hd, d = num_frames, self.heads, self.dim_head
        b = n // f
        # one copy into per-pixel sequences [(B H W), F, C]: as fast as strided SDPA on the token view, and it
        # works for both memory formats (docs/choices.md#conv_p3d-one-gemm-to-the-taps)
        seq = x.view(b, f, c, h * w).permute(0, 3, 1, 2).reshape(b * h * w, f, c)
        q, k, v = self.to_qkv(self.norm(seq)).view(b * h * w, f, 3, hd, d).permute(2, 0, 3, 1, 4)
        q, k = self.rotary(q), self.rotary(k)
        out = attention(q, k, v)  # [(B H W), hd, F, d]
        out = self.to_out(out.transpose(1, 2).reshape(b * h * w, f, hd * d))
        # residual on the [B, F, C, H, W] view of x; the sum keeps x's memory format so the view back is free
        y = x.view(b, f, c, h, w) + out.view(b, h, w, f, c).permute(0, 3, 4, 1, 2)
        return y.reshape(n, c, h, w)  # a view: the sum took x's layout, in which (B F) merge


class Attn_P3D(nn.Module):  # noqa: N801 - the paper's name
    """Pseudo-3D attention: ``unflatten(Attn_1D(Attn_2D(flatten(h)) ∘ T) ∘ T)`` (paper §2.4).

    ``self.spatial`` (``SpatialAttention``) attends within each frame (plus the conditioning tokens);
    ``self.temporal`` (``TemporalAttention``, exactly identity at init) attends across frames per pixel.
    With ``temporal=False`` no temporal parameters exist.

    Args:
        dim: channels ``C``.
        heads, dim_head: attention heads and per-head width (both parts).
        context_dim: width of the conditioning tokens for the spatial part, or ``None``.
        temporal: create the temporal attention.
        max_frames: see ``RotaryEmbedding`` (not a hard limit).
        norm, norm_groups, bias: the spatial part's normalisation and ``q``/``k``/``v`` biases (see
            ``SpatialAttention``); the temporal part keeps its LayerNorm and bias-free projections.
    """

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32, context_dim: int | None = None,
                 temporal: bool = True, max_frames: int = 128, *, norm: Literal["layer", "group"] = "layer",
                 norm_groups: int = 32, bias: bool = False) -> None:
        super().__init__()
        self.spatial = SpatialAttention(dim, heads, dim_head, context_dim, norm=norm, norm_groups=norm_groups,
                                        bias=bias)
        self.temporal = TemporalAttention(dim, heads, dim_head, max_frames) if temporal else None

    def forward_frames(self, x: Tensor, num_frames: int | None, context: Tensor | None = None,
                       context_mask: Tensor | None = None, time: bool = True) -> Tensor:
        """Folded layout ``[(B F), C, H, W]``; ``context [B, L, Dc]``, ``context_mask [B, L]`` bool."""
        x = self.spatial(x, num_frames, context, context_mask)
        if self.temporal is not None and num_frames is not None and time:
            x = self.temporal(x, num_frames)
        return x

    def forward(self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None,
                time: bool = True) -> Tensor:
        """``[B, C, H, W]`` (image: spatial only) or ``[B, C, F, H, W]`` -> same shape.

        ``context [B, L, Dc]`` is shared by all frames; ``context_mask [B, L]`` bool (True = attend);
        ``time=False`` runs a video frame by frame (temporal part off).
        """
        if x.ndim == 4:
            return self.forward_frames(x, None, context, context_mask)
        if x.ndim != 5:
            raise ValueError(f"Attn_P3D expects [B,C,H,W] or [B,C,F,H,W], got shape {tuple(x.shape)}")
        f = x.shape[2]
        return unfold_frames(self.forward_frames(fold_frames(x), f, context, context_mask, time), f)
