"""InterpolationStage: ↑F, the masked frame interpolation / extrapolation network of Make-A-Video (§2.6).

↑F *is* D_t fine-tuned: the same U-Net, conditioned on the CLIP image embedding and the frame rate, with 4 more
input channels: the RGB of the frames that are known (zeros at the others) and a binary mask saying which frames
are known. Those channels enter through the U-Net's own zero-initialised ``extra_in`` convolution, so a D_t
checkpoint loads with only the ``extra_in*`` tensors new (``init_from``) and ↑F at init computes exactly D_t.

Training (unlabeled video, like D_t): every clip gets a random mask of known frames,

    interpolation   keep every k-th frame (k drawn from ``skips``, random phase): 0 . . . . 5 . . . . 10 ...
    extrapolation   keep a prefix (the network extends forwards) or a suffix (backwards) of random length

and the diffusion loss is taken on the *unknown* frames only (``loss_on_known=False``, the default): at sampling
the known frames are written back into ``x_t`` at every step (noised to the step's level, exactly how they look in
training) and into the result, so the network's output there is never used. Counting them would reward a copy task
(trivial given the clean frame in the extra channels) and, with 15 of 16 frames known in a long extrapolation mask,
would dilute the gradient of the frames that matter (docs/choices.md#f-loss-on-the-unknown-frames-only).

``residual=True`` (the default) diffuses the difference between the clip and the linear blend of its known frames
(:func:`linear_blend`), as the SR stages diffuse the detail over bicubic upsampling: the network adds what the blend
gets wrong (an object that moves instead of cross-fading) instead of redrawing the frame, and the known frames are
exactly 0 in that space: a briefly trained ↑F scores far better on held-out frames than one that diffuses the frames
(docs/choices.md#f-residual-over-the-linear-blend). ``baseline="motion"`` blends the known frames after moving them
along their translation (:func:`motion_blend`), so an object in constant motion is already where it belongs
(docs/choices.md#f-motion-compensated-baseline). ``residual=False`` diffuses the frames themselves (then ↑F at init
is D_t).

Inference: :meth:`InterpolationStage.interpolate` takes ``F`` frames to ``(F - 1)·skip + 1`` (16 -> 76 at the paper's
skip 5) by tiling it with windows of the trained length that start and end on known frames (a 16-frame window holds 4
known frames at skip 5, and 16 frames make exactly 5 such windows); :meth:`InterpolationStage.extend` adds frames
after or before a video, a window at a time, each window conditioned on the last (first) frames made so far.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from einops import rearrange
from torch import Tensor

from lightning_mav.checkpoints import NEW_EXTRA_IN
from lightning_mav.diffusion import repeat_to_batch
from lightning_mav.nn.motion import phase_shift, translate
from lightning_mav.stages.decoder import DecoderStage

EXTRA_IN_CHANNELS = 4  # RGB of the known frames + the known-frame mask


# ----------------------------------------------------------------------------------------------------- masks
def interpolation_mask(frames: int, skip: int, offset: int = 0) -> Tensor:
    """Known frames ``[F]`` bool: every ``skip``-th frame from ``offset``."""
    known = torch.zeros(frames, dtype=torch.bool)
    known[offset::skip] = True
    return known


def extrapolation_mask(frames: int, num_known: int, direction: Literal["forward", "backward"]) -> Tensor:
    """Known frames ``[F]`` bool: the first ``num_known`` (to extend forwards) or the last (backwards)."""
    known = torch.zeros(frames, dtype=torch.bool)
    known[:num_known] = True
    return known if direction == "forward" else known.flip(0)


def random_masks(batch: int, frames: int, skips: Sequence[int], extrapolation_prob: float,
                 generator: torch.Generator | None = None) -> Tensor:
    """One random training mask per clip, ``[B, F]`` bool (True = known).

    Interpolation (probability ``1 - extrapolation_prob``): ``k`` uniform in ``skips`` (those that leave at least
    two known frames), phase uniform in ``[0, k)``. Extrapolation: a prefix or suffix of ``1 .. F-1`` frames.
    """
    usable = [k for k in skips if k < frames] or [max(frames - 1, 1)]
    masks = []
    for _ in range(batch):
        u = torch.rand(3, generator=generator).tolist()  # kind, size, phase/direction
        if u[0] < extrapolation_prob:
            num_known = 1 + int(u[1] * (frames - 1))
            masks.append(extrapolation_mask(frames, num_known, "forward" if u[2] < 0.5 else "backward"))
        else:
            k = usable[int(u[1] * len(usable))]
            masks.append(interpolation_mask(frames, k, min(int(u[2] * k), frames - 1 - k)))  # >= 2 known
    return torch.stack(masks)


def mask_condition(video: Tensor, known: Tensor) -> Tensor:
    """↑F's 4 extra input channels ``[B, 4, F, H, W]``: RGB of the known frames (0 elsewhere) and the mask.

    Args:
        video: ``[B, 3, F, H, W]`` (its unknown frames are ignored).
        known: ``[B, F]`` bool.
    """
    m = known[:, None, :, None, None].to(video.dtype)  # [B, 1, F, 1, 1]
    return torch.cat([video * m, m.expand(-1, 1, -1, *video.shape[-2:])], dim=1)


def _neighbours(known: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For every frame of ``known [B, F]`` bool: the nearest known frame before it and after it (a known frame is
    its own; the one known neighbour on both sides beyond the first / last known frame) and the blend weight of the
    one after, each ``[B, F]``."""
    b, f = known.shape
    pos = torch.arange(f, device=known.device, dtype=torch.float32).expand(b, f)
    prev = torch.where(known, pos, torch.full_like(pos, -1.0)).cummax(dim=1).values  # -1: none before
    nxt = torch.where(known, pos, torch.full_like(pos, float(f))).flip(1).cummin(dim=1).values.flip(1)  # f: none after
    prev, nxt = torch.where(prev < 0, nxt, prev), torch.where(nxt >= f, prev, nxt)
    weight = torch.where(nxt > prev, (pos - prev) / (nxt - prev).clamp_min(1), torch.zeros_like(pos))
    return prev.clamp(0, f - 1).long(), nxt.clamp(0, f - 1).long(), weight


def _frames_at(video: Tensor, index: Tensor) -> Tensor:
    """``video [B, C, F, H, W]`` gathered at frame ``index [B, F]``."""
    b, c, f, h, w = video.shape
    return torch.gather(video, 2, index[:, None, :, None, None].expand(b, c, f, h, w))


def linear_blend(video: Tensor, known: Tensor) -> Tensor:
    """Every frame of ``video [B, C, F, H, W]`` as the linear blend of the nearest known frames before and after it
    (the nearest known frame alone beyond the first / last one; zeros for a clip without known frames). Known frames
    come back unchanged. ``known [B, F]`` bool."""
    prev, nxt, weight = _neighbours(known)
    weight = weight[:, None, :, None, None].to(video.dtype)
    blend = (1 - weight) * _frames_at(video, prev) + weight * _frames_at(video, nxt)
    return blend * known.any(dim=1)[:, None, None, None, None].to(video.dtype)


def motion_blend(video: Tensor, known: Tensor) -> Tensor:
    """:func:`linear_blend` with motion compensation: the known frames before and after an unknown one are moved
    along the translation between them (:func:`lightning_mav.nn.motion.phase_shift`) to where it carries them at
    that frame, then blended. An object moving at constant velocity lands where it is, as one object, where the
    linear blend cross-fades two half-strength copies (docs/choices.md#f-motion-compensated-baseline). Beyond the
    first / last known frame it holds that frame, as the linear blend does. ``video [B, C, F, H, W]``, ``known
    [B, F]`` bool."""
    prev, nxt, weight = _neighbours(known)
    before, after = _frames_at(video, prev), _frames_at(video, nxt)
    flat = lambda x: rearrange(x, "b c f h w -> (b f) c h w")  # noqa: E731
    with torch.autocast(video.device.type, enabled=False):  # FFTs and grid sampling in fp32
        d = phase_shift(flat(before), flat(after))  # [(B F), 2]: prev -> next known frame
        a = rearrange(weight, "b f -> (b f) 1").float()
        moved = ((1 - a[:, :, None, None]) * translate(flat(before).float(), a * d)
                 + a[:, :, None, None] * translate(flat(after).float(), -(1 - a) * d))
    blend = rearrange(moved, "(b f) c h w -> b c f h w", b=video.shape[0]).to(video.dtype)
    blend = torch.where(known[:, None, :, None, None], video, blend)
    return blend * known.any(dim=1)[:, None, None, None, None].to(video.dtype)


BASELINES = {"linear": linear_blend, "motion": motion_blend}


def write_back(x: Tensor, known_frames: Tensor, known: Tensor) -> Tensor:
    """``x`` ``[B, C, F, H, W]`` with the known frames replaced by ``known_frames`` (same shape); ``known [B, F]``."""
    return torch.where(known[:, None, :, None, None], known_frames.to(x.dtype), x)


# ----------------------------------------------------------------------------------------------------- stage
class InterpolationStage(DecoderStage):
    """↑F: D_t with 4 extra input channels, trained on random interpolation / extrapolation masks.

    Args:
        unet: :class:`lightning_mav.nn.unet.UNet` kwargs of the parent D_t (``temporal`` defaults to True,
            ``extra_in_channels`` is forced to 4).
        init_from: a D_t checkpoint; only the new ``extra_in*`` tensors may be absent from it.
        num_frames: the window length the network is trained on (the data's ``num_frames``); ``interpolate`` and
            ``extend`` process longer videos in windows of this length.
        skips: frame skips ``k`` of the interpolation masks (paper: 5). Several teach one network every factor.
        extrapolation_prob: fraction of masks that keep a prefix or suffix instead.
        loss_on_known: also count the known frames in the loss (see the module docstring for why not).
        residual: diffuse the difference to the ``baseline`` blend of the known frames instead of the frames
            themselves, as the SR stages do over bicubic upsampling: the network only adds what the blend gets
            wrong, and its known frames are exactly 0.
        baseline: the blend ``residual`` diffuses over: ``"linear"`` (:func:`linear_blend`, a cross-fade) or
            ``"motion"`` (:func:`motion_blend`: the known frames moved along their translation before blending;
            docs/choices.md#f-motion-compensated-baseline).
        guidance_scale: default guidance of :meth:`sample`; the known frames already pin the content, so 1
            (no guidance, half the compute) is the default.
        start_at_blend: zero the output convolution's 2-D part after loading D_t. With ``residual`` and the x0
            objective (``diffusion: {objective: x0}``) ↑F then starts as exactly the ``baseline`` blend, and training
            only adds the corrections that lower the loss; D_t's output layer predicts v of whole frames, which
            means nothing in the residual space (docs/choices.md#f-x0-objective-starting-at-the-blend).
        options: D_t's (``clip_ckpt``, ``init_from``, ``freeze_spatial``: only the new ``extra_in`` convolution,
            ``sample_steps``, ...) and the shared ones: see :class:`lightning_mav.stages.decoder.DecoderStage`.
    """

    new_param_patterns = NEW_EXTRA_IN
    legacy_hparams = {"residual": False}  # saved before residual diffusion existed: it diffused the frames

    def __init__(
        self,
        unet: dict[str, Any] | None = None,
        num_frames: int = 16,
        skips: Sequence[int] = (2, 3, 4, 5),
        extrapolation_prob: float = 0.25,
        loss_on_known: bool = False,
        residual: bool = True,
        guidance_scale: float = 1.0,
        start_at_blend: bool = False,
        baseline: Literal["linear", "motion"] = "linear",
        **options: Any,
    ) -> None:
        if baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {sorted(BASELINES)}, got {baseline!r}")
        if not skips or min(skips) < 1:
            raise ValueError(f"skips must be positive frame skips, got {skips!r}")
        if not 0.0 <= extrapolation_prob <= 1.0:
            raise ValueError(f"extrapolation_prob must be in [0, 1], got {extrapolation_prob}")
        if options.pop("joint_image_prob", 0.0):  # in hparams as DecoderStage saves them; ↑F has no image steps
            raise ValueError("joint_image_prob: ↑F trains on video only (its masks need frames), leave it 0")
        unet = {"temporal": True, **(unet or {}), "extra_in_channels": EXTRA_IN_CHANNELS}
        super().__init__(unet=unet, joint_image_prob=0.0, guidance_scale=guidance_scale, **options)
        self.num_frames, self.skips = num_frames, tuple(int(k) for k in skips)
        self.extrapolation_prob, self.loss_on_known, self.residual = extrapolation_prob, loss_on_known, residual
        self.blend = BASELINES[baseline]  # [B, C, F, H, W], known [B, F] -> the frames ``residual`` diffuses over
        if start_at_blend:
            if not residual or self.diffusion.objective != "x0":
                raise ValueError(f"start_at_blend needs residual: true and diffusion objective x0 (a zero output is "
                                 f"the blend only then), got residual {residual}, "
                                 f"objective {self.diffusion.objective!r}")
            with torch.no_grad():  # a checkpoint loaded afterwards (resume, load_stage) brings its own weights
                self.unet.out_conv.spatial.weight.zero_()
                self.unet.out_conv.spatial.bias.zero_()
                if self.unet.out_conv.temporal is not None:  # keep its weight: zeroing both would block the gradient
                    self.unet.out_conv.temporal.bias.zero_()

    # ------------------------------------------------------------------ the network with its conditioning
    def model_fn(self, image_embed: Tensor | None, *, fps: Tensor | None = None, drop: Tensor | None = None,
                 time: bool = True, frames: Tensor | None = None, known: Tensor | None = None,
                 known_noise: Tensor | None = None, known_x0: Tensor | None = None):
        """``(x_t, t, drop_cond=None) -> output``: the U-Net with y_e, fps and the known frames bound.

        Args:
            frames: ``[B, 3, F, H, W]``, the known frames' pixels (anything at unknown frames).
            known: ``[B, F]`` bool.
            known_noise: sampling only: ``[B, 3, F, H, W]`` noise with which the known frames are written back into
                ``x_t`` at the step's noise level before every call, as they appear in training.
            known_x0: what the diffusion models at the known frames (default ``frames``; zeros with ``residual``).
        """
        known_x0 = frames if known_x0 is None else known_x0
        extra = mask_condition(frames, known)

        def fn(x_t: Tensor, t: Tensor, drop_cond: bool | Tensor | None = None) -> Tensor:
            b = x_t.shape[0]  # 2B under batched guidance: repeat the conditioning
            if known_noise is not None:
                noised = self.diffusion.q_sample(repeat_to_batch(known_x0, b), t, repeat_to_batch(known_noise, b))
                x_t = write_back(x_t, noised, repeat_to_batch(known, b))
            d = drop if drop_cond is None else torch.as_tensor(drop_cond, device=x_t.device).expand(b)
            return self.unet(x_t, t, image_embed=repeat_to_batch(image_embed, b), fps=repeat_to_batch(fps, b),
                             extra=repeat_to_batch(extra, b).to(x_t.dtype),
                             drop_cond=d if image_embed is not None else None, time=time, **self.text_inputs(b))
        return fn

    # ------------------------------------------------------------------ training
    def compute_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> tuple[Tensor, int]:
        video = batch["video"]  # [B, F, 3, H, W]
        b, f = video.shape[:2]
        x0 = rearrange(video, "b f c h w -> b c f h w")
        known = random_masks(b, f, self.skips, self.extrapolation_prob, generator).to(video.device)
        idx = self.cond_frame_index(b, f, generator).to(video.device)
        image_embed = self.frame_embed(video, idx, batch)
        fps = batch["fps"].float().to(video.device) if self.fps_cond and "fps" in batch else None
        drop = None
        if image_embed is not None and self.training:
            drop = torch.rand(b, generator=generator).to(video.device) < self.cond_drop_prob
        weights = None if self.loss_on_known else (~known)[:, None, :, None, None].float()  # [B, 1, F, 1, 1]
        fn = self.model_fn(image_embed, fps=fps, drop=drop, frames=x0, known=known)
        target = x0 - self.blend(x0, known) if self.residual else x0
        return self.diffusion.loss(fn, target, weights=weights, generator=generator), b

    # ------------------------------------------------------------------ sampling
    def _conditioning(self, video: Tensor, image_embed: Tensor | None, fps: float | Tensor | None):
        """(y_e ``[B, D]`` or None, fps ``[B]`` or None) for a video ``[B, 3, F, H, W]`` on this device."""
        b = video.shape[0]
        if self.conditional:
            if image_embed is None:  # the paper's pipeline passes P's y_e; alone, embed the middle frame
                image_embed = self.embed(video[:, :, video.shape[2] // 2])
            image_embed = self.as_embed(image_embed)
        else:
            image_embed = None
        if fps is not None and self.fps_cond:
            fps = torch.as_tensor(fps, dtype=torch.float32, device=self.device).expand(b)
        else:
            fps = None
        return image_embed, fps

    @torch.no_grad()
    def sample(
        self,
        image_embed: Tensor | None,
        *,
        video: Tensor,
        known: Tensor,
        fps: float | Tensor | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        sampler: str | None = None,
        noise: Tensor | None = None,
        progress: bool = False,
    ) -> Tensor:
        """Fill the unknown frames of one window.

        Args:
            image_embed: ``y_e [B, D]`` (None: CLIP of the middle frame when the U-Net is conditioned).
            video: ``[B, 3, F, H, W]`` in [-1, 1]; only the known frames are read.
            known: ``[B, F]`` or ``[F]`` bool.
            fps: frame rate of ``video`` (float or ``[B]``), for the fps conditioning.
            noise: initial noise ``[B, 3, F, H, W]`` (default: drawn from ``generator``); also the noise with which
                the known frames are written back at every step.
        Returns:
            ``[B, 3, F, H, W]`` with the known frames exactly as given.
        """
        video = video.float().to(self.device)
        b, f = video.shape[0], video.shape[2]
        known = known.to(self.device).expand(b, f)
        image_embed, fps = self._conditioning(video, image_embed, fps)
        if noise is None:
            noise = self.diffusion.noise(video.shape, generator=generator, device=self.device)
        noise = noise.to(self.device, torch.float32)
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        base = self.blend(video, known) if self.residual else None
        fn = self.model_fn(image_embed, fps=fps, frames=video, known=known, known_noise=noise,
                           known_x0=None if base is None else video - base)
        out = self.diffusion.sample(fn, noise=noise, steps=steps or self.sample_steps, sampler=sampler or self.sampler,
                                    guidance_scale=scale if image_embed is not None else 1.0,
                                    generator=generator, progress=progress, device=self.device)
        out = out.float() if base is None else (out.float() + base).clamp(-1, 1)
        return write_back(out, video, known)

    @torch.no_grad()
    def interpolate(
        self,
        video: Tensor,
        skip: int = 5,
        *,
        image_embed: Tensor | None = None,
        fps: float | Tensor | None = None,
        window: int | None = None,
        **sample_kwargs: Any,
    ) -> Tensor:
        """Insert ``skip - 1`` frames between every pair of frames: ``[B, 3, F, H, W] -> [B, 3, (F-1)·skip+1, H, W]``.

        The dense video is cut into windows of ``m = (window - 1) // skip`` intervals (``m·skip + 1`` frames) that
        start and end on known frames; neighbouring windows share their boundary frame, and when the intervals do
        not divide evenly the last window is shifted back to end on the last frame (its overlap with the previous
        window is left to the previous window). All windows of all videos are sampled as one batch.

        Args:
            video: ``[B, 3, F, H, W]`` in [-1, 1], e.g. D_t's 16 frames (-> 76 at skip 5).
            skip: the frame-rate factor; needs ``skip <= window - 1``.
            image_embed: ``y_e [B, D]`` the video was made from (else CLIP of its middle frame).
            fps: frame rate of the input ``video``; the network is conditioned on the output rate ``fps·skip``.
            window: frames per window (default: the trained ``num_frames``).
            sample_kwargs: ``steps``, ``guidance_scale``, ``generator``, ``sampler``, ``progress`` of :meth:`sample`.
        """
        b, c, f, h, w = video.shape
        window = window or self.num_frames
        if skip == 1 or f < 2:
            return video
        if not 1 <= skip <= window - 1:
            raise ValueError(f"skip {skip} needs windows of at least {skip + 1} frames (window={window})")
        video = video.float().to(self.device)
        image_embed, _ = self._conditioning(video, image_embed, None)
        intervals, m = f - 1, min((window - 1) // skip, f - 1)
        starts = [min(s, intervals - m) for s in range(0, intervals, m)]  # in intervals; the last one shifted back
        length = m * skip + 1
        dense = video.new_zeros(b, c, intervals * skip + 1, h, w)
        dense[:, :, ::skip] = video
        known = interpolation_mask(length, skip).to(self.device)
        windows = torch.stack([dense[:, :, s * skip: s * skip + length] for s in starts], dim=1)  # [B, n, C, L, H, W]
        n = len(starts)
        out_fps = None if fps is None else (torch.as_tensor(fps, dtype=torch.float32) * skip).expand(b)
        filled = self.sample(
            repeat_interleave(image_embed, n), video=rearrange(windows, "b n c l h w -> (b n) c l h w"),
            known=known, fps=repeat_interleave(out_fps, n), **sample_kwargs)
        filled = rearrange(filled, "(b n) c l h w -> b n c l h w", n=n)
        done = 0  # intervals written so far
        for i, s in enumerate(starts):
            first = max(s, done)
            dense[:, :, first * skip: (s + m) * skip + 1] = filled[:, i, :, (first - s) * skip:]
            done = s + m
        dense[:, :, ::skip] = video  # the given frames, exactly
        return dense

    @torch.no_grad()
    def extend(
        self,
        video: Tensor,
        n: int,
        direction: Literal["forward", "backward"] = "forward",
        *,
        image_embed: Tensor | None = None,
        fps: float | Tensor | None = None,
        context: int | None = None,
        window: int | None = None,
        **sample_kwargs: Any,
    ) -> Tensor:
        """Add ``n`` frames after (``"forward"``) or before (``"backward"``) a video: ``[B,3,F,H,W] -> [B,3,F+n,H,W]``.

        Each window holds ``context`` frames of the video so far (default half a window) as its known prefix
        (suffix) and generates the rest; windows repeat until ``n`` frames exist.

        Args:
            fps: frame rate of ``video`` (and of the new frames).
            sample_kwargs: see :meth:`interpolate`.
        """
        if direction not in ("forward", "backward"):
            raise ValueError(f"direction must be 'forward' or 'backward', got {direction!r}")
        window = window or self.num_frames
        context = min(context or max(window // 2, 1), window - 1)
        out = video.float().to(self.device)
        image_embed, _ = self._conditioning(out, image_embed, None)
        made = 0
        while made < n:
            ctx = min(context, out.shape[2])
            new = min(window - ctx, n - made)
            blank = out.new_zeros(*out.shape[:2], new, *out.shape[-2:])
            if direction == "forward":
                win = torch.cat([out[:, :, -ctx:], blank], dim=2)
                filled = self.sample(image_embed, video=win, known=extrapolation_mask(ctx + new, ctx, "forward"),
                                     fps=fps, **sample_kwargs)
                out = torch.cat([out, filled[:, :, ctx:]], dim=2)
            else:
                win = torch.cat([blank, out[:, :, :ctx]], dim=2)
                filled = self.sample(image_embed, video=win, known=extrapolation_mask(ctx + new, ctx, "backward"),
                                     fps=fps, **sample_kwargs)
                out = torch.cat([filled[:, :, :new], out], dim=2)
            made += new
        return out

    def media_from_batch(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The kept clips with every ``max(skips)``-th frame known, filled in, next to the clips themselves."""
        video = rearrange(batch["video"], "b f c h w -> b c f h w")
        b, _, f = video.shape[:3]
        known = interpolation_mask(f, min(max(self.skips), f - 1)).to(video.device)
        idx = self.cond_frame_index(b, f, self.media_generator()).to(video.device)
        image_embed = self.frame_embed(batch["video"], idx, batch)
        samples = self.sample(image_embed, video=video, known=known, fps=batch.get("fps"),
                              generator=self.media_generator())
        return {"samples": samples, "known": mask_condition(video, known.expand(b, f))[:, :3], "reference": video}


def repeat_interleave(x: Tensor | None, n: int) -> Tensor | None:
    """``[B, ...] -> [(B n), ...]`` (each row ``n`` times in a row, matching ``(b n)`` windows); None stays None."""
    return None if x is None else x.repeat_interleave(n, dim=0)
