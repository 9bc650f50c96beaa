"""SuperResStage: SR_l (64 -> 256), SR_h (256 -> 768, trained on crops) and, with a temporal U-Net, SR_t.

The U-Net sees the noisy high-resolution sample with the low-resolution image upsampled and concatenated
(``lowres_cond=True``). The low-resolution input is *noise-augmented* (Imagen / Cascaded Diffusion): in training it
is forward-diffused to a random level in ``[0, lowres_noise_max]`` and the level is given to the U-Net, so at
sampling time the network tolerates the artefacts of the stage below, which is then noised to the fixed
``lowres_noise_sample``.

``residual=True`` (the default) diffuses the *residual* over bicubic upsampling, ``x0 - bicubic(lowres)``, not the
high-res image itself (as SRDiff, Li et al. 2022): the network only has to add the detail the interpolation
misses, so an undertrained or briefly fine-tuned SR stage degrades gracefully towards bicubic instead of
re-drawing the whole image (docs/choices.md#sr-stages-residual-over-bicubic). The upsampled base is the clean
low-res input, the U-Net still sees the noise-augmented one.
A child (``init_from``) keeps its parent's choice unless it sets its own.

SR_h is the paper's frame-wise super-resolution: trained on images (random ``crop_size`` crops of the high-res
image, the low-res made by downsampling the crop, so the 768-px network trains at crop cost) and applied per frame
with the *same* initial noise for every frame, which the pipeline passes as ``sample(..., noise=...)``.
SR_t: ``unet.temporal=True``, ``init_from`` an SR_l checkpoint, video batches.

Frame windows (SR_t at paper size: 76 frames at 256², sampling only): with ``frame_chunk = W`` below the clip's ``F``
frames, every *network call* of the sampler runs on windows of ``W`` frames overlapping by ``chunk_overlap = O``
(:func:`windowed_frames`) and the windows' outputs are cross-faded linearly over each overlap, so the activations,
what bounds memory, scale with ``W`` instead of ``F``. The sampler itself keeps one state over all ``F`` frames
(one scheduler, one ``x_t``): chunking the calls, not the whole sampling loop, keeps the windows' samples from
drifting apart in their overlaps from step to step. It is an approximation: the temporal convolutions (kernel 3,
stacked, so a receptive field of tens of frames) and the temporal attention (over all frames of a clip) see only
the ``W`` frames of a window, so a chunked call differs from the unchunked one, most at the windows' edges; RoPE
being relative, a window's frames attend to each other exactly as they would in the whole clip. ``W >= F`` (or
None, the default) is the unchunked call itself, bit for bit. Measured differences: benchmarks/RESULTS.md
("SR_t frame windows"). Images (SR_l, SR_h) are unaffected: SR_h bounds its memory by frames per call instead
(``MakeAVideoPipeline(frame_batch=...)``).

Karlo's imported SR_l (``mav import karlo``) is two networks of one architecture: ``unet`` for every sampling step
but the last and ``unet_last`` (``last_step_unet: true``) for the final one, Karlo's "improved SR" split; its U-Net
has no noise-level input (``unet.lowres_noise_cond: false``), so the low-res input is never noise-augmented.

Batches: ``{"image": [B, 3, H, W]}`` (the high-res target; e.g. the text-image batches, captions unused) or
``{"video": [B, F, 3, H, W]}``; both are resized to ``highres_size`` when the data has another size.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from lightning_mav.diffusion import Diffusion, repeat_to_batch
from lightning_mav.nn.unet import UNet
from lightning_mav.stages.base import StageBase, resolve_pixel_diffusion


def window_starts(num_frames: int, window: int, overlap: int) -> list[int]:
    """First frame of each window of ``window`` frames, consecutive ones overlapping by ``overlap`` (the last one
    ends at ``num_frames`` and may overlap its neighbour by more)."""
    if window >= num_frames:
        return [0]
    stride = window - overlap
    starts = list(range(0, num_frames - window, stride))
    return starts + [num_frames - window]


def windowed_frames(fn: Any, x: Tensor, window: int, overlap: int) -> Tensor:
    """``fn`` on overlapping frame windows of a video, cross-faded: ``fn(x [B, C, F, H, W], start, stop) -> [B, C',
    stop - start, H, W]`` (``fn`` slices its own conditioning) -> ``[B, C', F, H, W]``.

    Each window's output is weighted per frame by a linear ramp ``1/(O+1), ..., O/(O+1)`` up over the ``O`` frames it
    shares with the window before and down over those it shares with the next, 1 elsewhere; the sum is divided by
    the summed weights (1 wherever two windows overlap by exactly ``O``). ``window >= F`` calls ``fn`` once on all
    frames and returns its output untouched.
    """
    f = x.shape[2]
    if window >= f:
        return fn(x, 0, f)
    if not 0 <= overlap < window:
        raise ValueError(f"chunk_overlap must be in [0, frame_chunk - 1] = [0, {window - 1}], got {overlap}")
    starts = window_starts(f, window, overlap)
    ramp = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
    total = weights = dtype = None
    for i, start in enumerate(starts):
        out = fn(x[:, :, start:start + window], start, start + window)
        w = torch.ones(window)
        if i > 0 and overlap:
            w[:overlap] = ramp
        if i < len(starts) - 1 and overlap:
            w[window - overlap:] = ramp.flip(0)
        w = w.to(out.device).view(1, 1, window, 1, 1)
        if total is None:
            dtype = out.dtype
            total = out.new_zeros(out.shape[:2] + (f,) + out.shape[3:], dtype=torch.float32)
            weights = torch.zeros(f, device=out.device).view(1, 1, f, 1, 1)
        total[:, :, start:start + window] += w * out.float()
        weights[:, :, start:start + window] += w
        del out  # one window's activations alive at a time
    return (total / weights).to(dtype)


def check_chunking(frame_chunk: int | None, chunk_overlap: int) -> None:
    """One-line errors for bad ``frame_chunk`` / ``chunk_overlap`` (SuperResStage options and sample arguments)."""
    if frame_chunk is not None and (isinstance(frame_chunk, bool) or not isinstance(frame_chunk, int)
                                    or frame_chunk < 1):
        raise ValueError(f"frame_chunk must be a positive integer or null, got {frame_chunk!r}")
    if isinstance(chunk_overlap, bool) or not isinstance(chunk_overlap, int) or chunk_overlap < 0:
        raise ValueError(f"chunk_overlap must be an integer >= 0, got {chunk_overlap!r}")
    if frame_chunk is not None and chunk_overlap >= frame_chunk:
        raise ValueError(f"chunk_overlap must be below frame_chunk ({frame_chunk}), got {chunk_overlap}")


def resize(x: Tensor, size: int | tuple[int, int], mode: str = "bilinear") -> Tensor:
    """Resize the last two dims of an image ``[B, C, H, W]`` or video ``[B, C, F, H, W]`` (antialiased down)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    frames = rearrange(x, "b c f h w -> (b f) c h w") if x.dim() == 5 else x
    kwargs = {"antialias": True, "align_corners": False} if mode in ("bilinear", "bicubic") else {}
    out = F.interpolate(frames.float(), size=size, mode=mode, **kwargs).to(x.dtype)
    return rearrange(out, "(b f) c h w -> b c f h w", b=x.shape[0]) if x.dim() == 5 else out


class SuperResStage(StageBase):
    """SR_l / SR_h / SR_t with noise-augmented low-resolution conditioning.

    Args:
        unet: :class:`lightning_mav.nn.unet.UNet` kwargs (``lowres_cond`` is forced on); with ``init_from`` only
            the changes to the parent's (SR_t: ``temporal=True``).
        diffusion: :class:`lightning_mav.diffusion.Diffusion` kwargs (defaults ``objective: v``, ``min_snr_gamma: 5``,
            ``clip_sample: 1.0``;
            see :func:`lightning_mav.stages.base.resolve_pixel_diffusion`); with ``init_from``, changes to the parent's.
        lowres_size: side of the conditioning image (64 for SR_l, 256 for SR_h at paper scale).
        highres_size: side of the output (256 for SR_l, 768 for SR_h).
        crop_size: train on random ``crop_size`` crops of the high-res image (SR_h); None trains on full images.
            Must keep the ``highres_size / lowres_size`` ratio integral on the crop.
        lowres_noise_max: training draws the augmentation level uniformly from ``[0, lowres_noise_max]``.
        lowres_noise_sample: fixed augmentation level at sampling time.
        residual: diffuse ``x0 - bicubic(lowres)`` instead of ``x0`` (see the module docstring); None: the parent's
            setting with ``init_from`` (False for a parent saved without one), else True.
        init_from: parent checkpoint (SR_l for SR_t); only new temporal tensors may be absent from it. Cleared
            from the saved hyperparameters once loaded (see :meth:`StageBase.init_network`).
        freeze_spatial: train only the new (temporal) parameters.
        sample_steps, sampler: defaults of :meth:`sample`.
        final_denoise: one more network call at this timestep after the sampler's last step (see
            :meth:`lightning_mav.diffusion.Diffusion.sample`): removes the grain a briefly trained SR stage leaves
            on flat areas (docs/choices.md#sr-stages-final-denoising-step). None: off (the class default).
        frame_chunk, chunk_overlap: defaults of :meth:`sample` for videos (SR_t): each network call of the sampler
            on windows of ``frame_chunk`` frames overlapping by ``chunk_overlap``, cross-faded (see the module
            docstring: bounds memory, approximates the whole-clip call); None (the default): all frames at once.
        last_step_unet: a second U-Net of the same architecture, ``unet_last``, runs the final sampling step (at
            ``t = 0``; Karlo's SR). It is not trained by this stage (its loss trains ``unet``) and a child
            (``init_from``) starts from ``unet`` alone.
        options: the options every stage shares (lr, weight_decay, betas, warmup_steps, lr_schedule,
            media_batch_size, media_seed, nonfinite): see :class:`StageBase`.
    """

    legacy_hparams = {"residual": False}  # saved before residual diffusion existed: it diffused the image itself

    def __init__(
        self,
        unet: dict[str, Any] | None = None,
        diffusion: dict[str, Any] | None = None,
        lowres_size: int = 64,
        highres_size: int = 256,
        crop_size: int | None = None,
        lowres_noise_max: float = 0.5,
        lowres_noise_sample: float = 0.1,
        residual: bool | None = None,
        init_from: str | None = None,
        freeze_spatial: bool = False,
        sample_steps: int = 50,
        sampler: Literal["ddim", "ddpm", "dpm++", "unclip"] = "ddim",
        last_step_unet: bool = False,
        final_denoise: int | None = None,
        frame_chunk: int | None = None,
        chunk_overlap: int = 4,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.save_hyperparameters()
        check_chunking(frame_chunk, chunk_overlap)
        if highres_size % lowres_size:
            raise ValueError(f"highres_size {highres_size} must be a multiple of lowres_size {lowres_size}")
        self.factor = highres_size // lowres_size
        if crop_size is not None and (crop_size > highres_size or crop_size % self.factor):
            raise ValueError(f"crop_size {crop_size} must be <= highres_size and a multiple of {self.factor}")
        configs = self.inherit_configs(init_from, unet=unet, diffusion=diffusion)
        if residual is None:
            residual = bool(self.parent_hparams.get("residual", False)) if init_from is not None else True
        self.residual = residual
        self.hparams["residual"] = residual  # resolved, so this stage's children inherit what it trained with
        self.unet = UNet(**{**configs["unet"], "lowres_cond": True})
        self.unet_last = UNet(**{**configs["unet"], "lowres_cond": True}).requires_grad_(False) \
            if last_step_unet else None
        self.noise_aug = self.unet.lowres_noise_cond  # a U-Net without the level input gets the clean low-res image
        self.diffusion = Diffusion(**resolve_pixel_diffusion(configs["diffusion"]))
        self.diffusion.check_final_denoise(final_denoise)  # a bad config fails before training
        self.lowres_size, self.highres_size, self.crop_size = lowres_size, highres_size, crop_size
        self.lowres_noise_max, self.lowres_noise_sample = lowres_noise_max, lowres_noise_sample
        self.sample_steps, self.sampler, self.final_denoise = sample_steps, sampler, final_denoise
        self.frame_chunk, self.chunk_overlap = frame_chunk, chunk_overlap
        self.init_network(self.unet, init_from)
        if freeze_spatial:
            self.freeze_except_new(self.unet)

    # ------------------------------------------------------------------ data
    def highres(self, batch: dict[str, Any]) -> Tensor:
        """The high-res target ``[B, 3, H, W]`` / ``[B, 3, F, H, W]`` at ``highres_size``."""
        x = rearrange(batch["video"], "b f c h w -> b c f h w") if "video" in batch else batch["image"]
        return resize(x, self.highres_size)

    def random_crop(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One random ``crop_size`` window per sample (the same for all frames of a video)."""
        c, (h, w) = self.crop_size, x.shape[-2:]
        tops = torch.randint(0, h - c + 1, (x.shape[0],), generator=generator).tolist()
        lefts = torch.randint(0, w - c + 1, (x.shape[0],), generator=generator).tolist()
        return torch.stack([x[i, ..., t:t + c, l:l + c] for i, (t, l) in enumerate(zip(tops, lefts))])

    def lowres_of(self, highres: Tensor) -> Tensor:
        """Downsample by the SR factor: what the stage below would have produced (ideally)."""
        h, w = highres.shape[-2:]
        return resize(highres, (h // self.factor, w // self.factor))

    def base(self, lowres: Tensor, size: tuple[int, int]) -> Tensor | None:
        """What the diffusion adds to: bicubic upsampling of the clean ``lowres`` to ``size`` (None unless
        ``residual``)."""
        return resize(lowres, size, mode="bicubic").clamp(-1, 1) if self.residual else None

    # ------------------------------------------------------------------ training
    def model_fn(self, lowres: Tensor, level: Tensor, time: bool = True, sampling: bool = False,
                 frame_chunk: int | None = None, chunk_overlap: int = 0):
        """``(x_t, t, drop_cond=None) -> output``: the U-Net with the (noised) low-res image bound.

        SR has no classifier-free guidance; ``drop_cond`` is accepted for the sampler's signature and ignored.
        ``sampling``: the final step (``t = 0``) goes to ``unet_last`` when the stage has one.
        ``frame_chunk``: a video ``x_t [B, C, F, H, W]`` goes through the U-Net in windows of that many frames
        overlapping by ``chunk_overlap``, cross-faded (:func:`windowed_frames`); None or ``>= F``: one call.
        """
        def fn(x_t: Tensor, t: Tensor, drop_cond: bool | Tensor | None = None) -> Tensor:
            b = x_t.shape[0]
            last = sampling and self.unet_last is not None and bool((t == 0).all())
            unet = self.unet_last if last else self.unet
            cond, lr_level = repeat_to_batch(lowres, b), repeat_to_batch(level, b)
            if frame_chunk is None or x_t.dim() != 5 or frame_chunk >= x_t.shape[2]:
                return unet(x_t, t, lowres=cond, lowres_noise_level=lr_level, time=time)
            return windowed_frames(lambda x, start, stop: unet(x, t, lowres=cond[:, :, start:stop],
                                                               lowres_noise_level=lr_level, time=time),
                                   x_t, frame_chunk, chunk_overlap)
        return fn

    def augment(self, clean: Tensor, level: float | Tensor, *, noise: Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(the low-res input the U-Net sees, its noise level ``[B]``): noise-augmented, or clean at level 0 for a
        U-Net without the level input."""
        if not self.noise_aug:
            return clean, torch.zeros(clean.shape[0], device=clean.device)
        return self.diffusion.noise_lowres(clean, level, noise=noise, generator=generator)

    def compute_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> tuple[Tensor, int]:
        x0 = self.highres(batch)
        if self.crop_size is not None and self.crop_size < self.highres_size:
            x0 = self.random_crop(x0, generator)
        b = x0.shape[0]
        levels = torch.rand(b, generator=generator).to(self.device) * self.lowres_noise_max
        clean = self.lowres_of(x0)
        base = self.base(clean, x0.shape[-2:])
        lowres, level = self.augment(clean, levels, generator=generator)
        target = x0 if base is None else x0 - base
        loss = self.diffusion.loss(self.model_fn(lowres, level), target, generator=generator)
        return loss, b

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        lowres: Tensor,
        *,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        noise_level: float | None = None,
        lowres_noise: Tensor | None = None,
        sampler: str | None = None,
        frame_chunk: int | None = None,
        chunk_overlap: int | None = None,
        progress: bool = False,
    ) -> Tensor:
        """Low-res ``[B, 3, h, w]`` / ``[B, 3, F, h, w]`` in [-1, 1] -> high-res with sides ``factor·h, factor·w``.

        Args:
            noise: initial noise of the high-res sample (SR_h: the same noise for every frame, e.g.
                ``torch.randn(1, 3, H, W).expand(F, -1, -1, -1)`` for frames batched as images).
            noise_level: augmentation level of the low-res input (default ``lowres_noise_sample``).
            lowres_noise: the augmentation noise itself (shape of ``lowres``), e.g. also identical per frame.
            frame_chunk, chunk_overlap: a video's network calls on overlapping frame windows (default: the stage's;
                see the module docstring); ``frame_chunk >= F`` is the unchunked sample exactly.
        """
        frame_chunk = self.frame_chunk if frame_chunk is None else frame_chunk
        chunk_overlap = self.chunk_overlap if chunk_overlap is None else chunk_overlap
        check_chunking(frame_chunk, chunk_overlap)
        clean = lowres.float().to(self.device)
        level = self.lowres_noise_sample if noise_level is None else noise_level
        lowres, level = self.augment(clean, level, noise=lowres_noise, generator=generator)
        shape = (*lowres.shape[:-2], lowres.shape[-2] * self.factor, lowres.shape[-1] * self.factor)
        model_fn = self.model_fn(lowres, level, sampling=True, frame_chunk=frame_chunk, chunk_overlap=chunk_overlap)
        out = self.diffusion.sample(model_fn, shape,
                                    steps=steps or self.sample_steps,
                                    sampler=sampler or self.sampler, generator=generator, noise=noise,
                                    progress=progress, device=self.device, final_denoise=self.final_denoise)
        base = self.base(clean, shape[-2:])
        return out if base is None else (out + base).clamp(-1, 1)

    def media_from_batch(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Super-resolved samples of the kept items' downsampled versions, next to the low-res input and target."""
        target = self.highres(batch)
        lowres = self.lowres_of(target)
        samples = self.sample(lowres, generator=self.media_generator())
        return {"samples": samples, "lowres": resize(lowres, self.highres_size, mode="nearest"), "target": target}
