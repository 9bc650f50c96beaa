"""DecoderStage: D (CLIP image embedding -> 64x64 image) and, with a temporal U-Net, D_t (-> 16 frames).

D is trained on images, conditioned on the frozen CLIP embedding of the image itself (unCLIP's decoder). D_t is the
same stage with ``unet.temporal=True`` (and ``fps_cond=True``), started from a D checkpoint through ``init_from``
and fine-tuned on *unlabeled* video: the conditioning is the CLIP embedding of one frame of the clip, so no caption
is ever needed. Classifier-free guidance: the embedding is replaced by the U-Net's learned null conditioning with
probability ``cond_drop_prob``.

A decoder whose U-Net also reads text (unCLIP's, e.g. Karlo's imported D: ``unet.text_dim`` / ``text_embed_dim``,
``text_null: none``) gets the CLIP encoding of the empty caption ``""`` for it, in training and in sampling: unlabeled
video has no caption, and the empty caption is how unCLIP trained its decoder without one (it dropped captions to
``""``, which its pipeline also feeds the unconditional branch), so D_t starts from what D does with no text
(docs/choices.md#karlo-d_t-without-captions).

Batches
    ``{"image": [B, 3, H, W]}``                        D (or image steps of D_t: temporal layers skipped)
    ``{"video": [B, F, 3, H, W], "fps": [B]}``         D_t (rearranged to ``[B, 3, F, H, W]``)
    ``{"image_embed": [B, D], ...}``                   optional precomputed CLIP embedding of the conditioning
    ``{"frame_embed": [B, F, D], ...}``                optional precomputed embedding of every frame (``mav embed``)
    ``{"images": {...}, "videos": {...}}``             a dict of such batches (Lightning's CombinedLoader): losses add
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from lightning_mav.diffusion import Diffusion, repeat_to_batch
from lightning_mav.nn.unet import UNet
from lightning_mav.stages.base import StageBase, resolve_pixel_diffusion


class DecoderStage(StageBase):
    """D / D_t with its diffusion training and guided sampling.

    Args:
        unet: :class:`lightning_mav.nn.unet.UNet` kwargs; ``image_embed_dim`` defaults to the CLIP's embedding
            size. With ``init_from`` only the changes to the parent's (D_t: ``temporal=True, fps_cond=True``).
        diffusion: :class:`lightning_mav.diffusion.Diffusion` kwargs (defaults ``objective: v``, ``min_snr_gamma: 5``,
            ``clip_sample: 1.0``;
            see :func:`lightning_mav.stages.base.resolve_pixel_diffusion`);
            with ``init_from``, changes to the parent's.
        clip_ckpt: frozen CLIP giving the conditioning ``y_e``: a CLIPStage ``.ckpt``, or an open_clip weights file
            with ``clip_model``. Unset with ``init_from``: the parent's (a chain names its CLIP once); unset without:
            an unconditional U-Net (``image_embed_dim`` unset) or precomputed ``image_embed`` in every batch.
        clip_model: the open_clip architecture of a weights file ``clip_ckpt`` (``ViT-L-14``, ``ViT-H-14``, ...).
        embed_space: ``"unit"``: the U-Net sees L2-normalised CLIP image embeddings (the suite's D); ``"raw"``: the
            CLIP's unnormalised projections, as unCLIP / Karlo's decoder was trained (and its prior samples).
            With ``init_from``, the parent's unless set.
        image_size: side of the generated frames (sampling; training uses the data's size).
        cond_drop_prob: probability of dropping the conditioning in training (classifier-free guidance).
        cond_frame: which frame's embedding conditions a video: ``"middle"``, ``"first"`` or ``"random"``
            (from the batch's ``frame_embed`` when the data carries precomputed ones).
        joint_image_prob: probability that a video training step instead trains on images (one frame per clip,
            its own embedding, temporal layers off), which keeps D_t's per-frame quality anchored to D.
        init_from: parent checkpoint (D for D_t); only new temporal/fps tensors may be absent from it. Cleared
            from the saved hyperparameters once loaded (see :meth:`StageBase.init_network`).
        freeze_spatial: train only the new (temporal, fps) parameters.
        sample_steps, sampler, guidance_scale: defaults of :meth:`sample` and of the media samples.
        per_frame_below: D_t's videos: below this fraction of the noise schedule (timestep ``t < per_frame_below *
            T``) the sampler denoises every frame on its own, temporal layers and fps off, so that the temporal
            layers lay out a coherent video and D's spatial layers finish each frame. 0 (the paper): never. For
            a briefly trained D_t, whose temporal convolutions blur the shapes D draws
            (docs/choices.md#d_t-per_frame_below).
        clip_image_tower: False: load the CLIP without its image tower (freed after loading), for training on
            precomputed embeddings (``mav embed``, ``data.init_args.embeds``); a batch without them is then an error.
            Sampling from a checkpoint (``pipeline.load_stage``) needs no CLIP here.
        options: the options every stage shares (lr, weight_decay, betas, warmup_steps, lr_schedule,
            media_batch_size, media_seed, nonfinite): see :class:`StageBase`.
    """

    def __init__(
        self,
        unet: dict[str, Any] | None = None,
        diffusion: dict[str, Any] | None = None,
        clip_ckpt: str | None = None,
        clip_model: str | None = None,
        embed_space: Literal["unit", "raw"] | None = None,
        image_size: int = 64,
        cond_drop_prob: float = 0.1,
        cond_frame: Literal["middle", "first", "random"] = "middle",
        joint_image_prob: float = 0.0,
        init_from: str | None = None,
        freeze_spatial: bool = False,
        sample_steps: int = 50,
        sampler: Literal["ddim", "ddpm", "dpm++", "unclip"] = "ddim",
        guidance_scale: float = 3.0,
        per_frame_below: float = 0.0,
        clip_image_tower: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.save_hyperparameters()
        if not 0.0 <= per_frame_below <= 1.0:
            raise ValueError(f"per_frame_below must be a fraction of the noise schedule in [0, 1], "
                             f"got {per_frame_below}")
        if cond_frame not in ("middle", "first", "random"):
            raise ValueError(f"cond_frame must be 'middle', 'first' or 'random', got {cond_frame!r}")
        configs = self.inherit_configs(init_from, unet=unet, diffusion=diffusion)
        embed_space = embed_space or self.parent_hparams.get("embed_space") or "unit"
        if embed_space not in ("unit", "raw"):
            raise ValueError(f"embed_space must be 'unit' or 'raw', got {embed_space!r}")
        self.embed_space = self.hparams["embed_space"] = embed_space  # resolved: children inherit it
        clip = self.load_clip(*self.inherit_clip(clip_ckpt, clip_model))
        self.clip_image_tower = clip_image_tower
        if clip is not None and not clip_image_tower:
            clip.drop_image_tower()  # every batch brings its y_e (mav embed): free the tower's memory
        unet_kwargs = configs["unet"]  # the same dict as hparams.unet: the resolved image_embed_dim is saved too
        if clip is not None:
            unet_kwargs.setdefault("image_embed_dim", clip.embed_dim)
            if unet_kwargs["image_embed_dim"] != clip.embed_dim:
                raise ValueError(f"unet.image_embed_dim={unet_kwargs['image_embed_dim']} but the CLIP at "
                                 f"{self.hparams.clip_ckpt} embeds to {clip.embed_dim}")
        self.unet = UNet(**unet_kwargs)
        self.conditional = bool(unet_kwargs.get("image_embed_dim"))
        self.text_conditional = bool(unet_kwargs.get("text_dim") or unet_kwargs.get("text_embed_dim"))
        if self.text_conditional and unet_kwargs.get("text_null", "learned") != "none":
            raise ValueError("unet.text_dim / text_embed_dim: a text-conditioned decoder here reads the empty "
                             "caption (no captions in video); set unet.text_null: none")
        self._empty_caption: dict[str, Tensor] | None = None
        self.fps_cond = bool(unet_kwargs.get("fps_cond", False))
        self.diffusion = Diffusion(**resolve_pixel_diffusion(configs["diffusion"]))
        self.image_size, self.cond_frame, self.cond_drop_prob = image_size, cond_frame, cond_drop_prob
        self.joint_image_prob, self.sample_steps = joint_image_prob, sample_steps
        self.sampler, self.guidance_scale, self.per_frame_below = sampler, guidance_scale, per_frame_below
        self.init_network(self.unet, init_from)
        if freeze_spatial:
            self.freeze_except_new(self.unet)

    # ------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def embed(self, images: Tensor, batch: dict[str, Any] | None = None) -> Tensor | None:
        """``y_e [B, D]`` of ``images [B, 3, H, W]`` (frozen CLIP), or the batch's precomputed ``image_embed``."""
        if not self.conditional:
            return None
        if batch is not None and "image_embed" in batch:
            return self.as_embed(batch["image_embed"])
        if self.clip is not None and not self.clip.has_image_tower:
            raise ValueError(f"{type(self).__name__}: clip_image_tower is false but the batch has no precomputed "
                             f"'image_embed' / 'frame_embed': set data.init_args.embeds to a `mav embed` folder")
        if self.clip is None:
            raise ValueError("DecoderStage: the U-Net is conditioned (image_embed_dim) but there is no CLIP "
                             "(clip_ckpt) and the batch has no precomputed 'image_embed'")
        return self.clip.encode_image(images, normalize=self.embed_space == "unit")

    def frame_embed(self, video: Tensor, idx: Tensor, batch: dict[str, Any]) -> Tensor | None:
        """``y_e [B, D]`` of frame ``idx [B]`` of each clip ``video [B, F, 3, H, W]``: the batch's precomputed
        ``frame_embed [B, F, D]`` (``mav embed``) at ``idx`` when present, else :meth:`embed` of those frames."""
        if self.conditional and "frame_embed" in batch and "image_embed" not in batch:
            embeds = batch["frame_embed"]
            return self.as_embed(embeds[torch.arange(embeds.shape[0], device=embeds.device), idx.to(embeds.device)])
        return self.embed(video[torch.arange(video.shape[0], device=video.device), idx], batch)

    def as_embed(self, image_embed: Tensor) -> Tensor:
        """A CLIP image embedding ``[B, D]`` in this decoder's ``embed_space`` (float32, on this device)."""
        image_embed = image_embed.float().to(self.device)
        return F.normalize(image_embed, dim=-1) if self.embed_space == "unit" else image_embed

    def text_inputs(self, batch: int) -> dict[str, Tensor]:
        """The U-Net's text inputs for ``batch`` caption-free items: the empty caption's CLIP encoding
        (``text_embed [B, D]``, ``text_hidden [B, L, W]``, ``text_mask [B, L]``), or ``{}`` for a U-Net without text."""
        if not self.text_conditional:
            return {}
        if self._empty_caption is None or self._empty_caption["text_hidden"].device != self.device:
            if self.clip is None:
                raise ValueError("DecoderStage: the U-Net reads text but there is no CLIP (clip_ckpt) to encode "
                                 "the empty caption with")
            e_x, hidden, mask = self.clip.encode_text_hidden(self.clip.tokenize([""]), normalize=False)
            self._empty_caption = {"text_embed": e_x.float(), "text_hidden": hidden.float(), "text_mask": mask}
        inputs = {"text_embed": self._empty_caption["text_embed"], "text_hidden": self._empty_caption["text_hidden"],
                  "text_mask": self._empty_caption["text_mask"]}
        keep = {"text_embed": self.unet.text_embed_dim, "text_hidden": self.unet.text_dim,
                "text_mask": self.unet.text_dim}
        return {k: v.expand(batch, *v.shape[1:]) for k, v in inputs.items() if keep[k]}

    def cond_frame_index(self, batch: int, frames: int, generator: torch.Generator | None = None) -> Tensor:
        """Index ``[B]`` of the frame whose embedding conditions each clip."""
        if self.cond_frame == "random":
            return torch.randint(0, frames, (batch,), generator=generator)
        return torch.full((batch,), frames // 2 if self.cond_frame == "middle" else 0, dtype=torch.long)

    def model_fn(self, image_embed: Tensor | None, *, fps: Tensor | None = None, drop: Tensor | None = None,
                 time: bool = True):
        """``(x_t, t, drop_cond=None) -> output``: the U-Net with its conditioning bound.

        In sampling ``drop_cond`` is a bool, or a bool ``[2B]`` on a doubled batch (batched guidance): the
        conditioning is repeated to the batch. In training ``drop`` ``[B]`` is fixed up front.
        """
        def fn(x_t: Tensor, t: Tensor, drop_cond: bool | Tensor | None = None) -> Tensor:
            b = x_t.shape[0]
            d = drop if drop_cond is None else torch.as_tensor(drop_cond, device=x_t.device).expand(b)
            return self.unet(x_t, t, image_embed=repeat_to_batch(image_embed, b), fps=repeat_to_batch(fps, b),
                             drop_cond=d if image_embed is not None else None, time=time, **self.text_inputs(b))
        return fn

    # ------------------------------------------------------------------ training
    def compute_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> tuple[Tensor, int]:
        if batch and all(isinstance(v, dict) for v in batch.values()):  # several loaders at once: losses add
            parts = [self.compute_loss(b, generator) for b in batch.values()]
            return sum(loss for loss, _ in parts), sum(n for _, n in parts)
        if "video" in batch:
            x0, image_embed, fps, time = self._video_inputs(batch, generator)
        else:
            x0, time, fps = batch["image"], True, None
            image_embed = self.embed(x0, batch)
        b = x0.shape[0]
        drop = None
        if image_embed is not None and self.training:
            drop = torch.rand(b, generator=generator).to(self.device) < self.cond_drop_prob
        loss = self.diffusion.loss(self.model_fn(image_embed, fps=fps, drop=drop, time=time), x0, generator=generator)
        return loss, b

    def _video_inputs(self, batch: dict[str, Any], generator: torch.Generator | None):
        """(x0 ``[B,3,F,H,W]`` or an image batch ``[B,3,H,W]``, y_e ``[B,D]``, fps ``[B]``, time) of a video batch."""
        video = batch["video"]  # [B, F, 3, H, W]
        b, f = video.shape[:2]
        idx = self.cond_frame_index(b, f, generator).to(video.device)
        frame = video[torch.arange(b, device=video.device), idx]  # [B, 3, H, W]
        image_embed = self.frame_embed(video, idx, batch)
        # joint image steps: one decision per step, seeded by the step so every DDP rank runs the same graph
        # (image steps leave the temporal/fps parameters unused: see unused_parameters_reason)
        coin = torch.rand(1, generator=torch.Generator().manual_seed(int(self.global_step))).item()
        if self.training and coin < self.joint_image_prob:
            return frame, image_embed, None, False
        fps = batch.get("fps") if self.fps_cond else None
        fps = fps.float() if fps is not None else None
        return rearrange(video, "b f c h w -> b c f h w"), image_embed, fps, True

    def unused_parameters_reason(self) -> str | None:
        """D_t's joint image steps run the U-Net without its temporal layers and fps embedding: while those train
        (``freeze_spatial: false`` or not), DDP must find them unused on such steps (:meth:`StageBase.setup`)."""
        if self.joint_image_prob <= 0:
            return None
        unused = [n for n, p in self.unet.named_temporal_parameters() if p.requires_grad]
        if not unused:
            return None
        return (f"the joint image steps (joint_image_prob={self.joint_image_prob}) leave the {len(unused)} temporal "
                f"and fps parameters of D_t without gradients")

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        image_embed: Tensor | None,
        *,
        num_frames: int | None = None,
        fps: float | Tensor | None = None,
        batch_size: int | None = None,
        image_size: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        sampler: str | None = None,
        noise: Tensor | None = None,
        progress: bool = False,
        per_frame: bool = False,
    ) -> Tensor:
        """``y_e [B, D]`` -> images ``[B, 3, H, W]`` or, with ``num_frames``, videos ``[B, 3, F, H, W]`` in [-1, 1].

        ``fps`` (float or ``[B]``) conditions D_t's frame rate; ``batch_size`` only for an unconditional U-Net;
        ``noise`` ``[B, 3, (F,) H, W]`` replaces the seeded initial noise. Defaults come from the hyperparameters.
        ``per_frame``: every frame on its own at every step (temporal layers and fps off: D's spatial network),
        the paper's ablation of D_t against D applied frame by frame.
        """
        if image_embed is not None:
            image_embed = self.as_embed(image_embed)
            batch_size = image_embed.shape[0]
        elif self.conditional:
            raise ValueError("this decoder is conditioned on CLIP image embeddings: pass image_embed [B, D]")
        size = image_size or self.image_size
        shape = (batch_size, 3, size, size) if num_frames is None else (batch_size, 3, num_frames, size, size)
        if fps is not None and self.fps_cond and not per_frame:
            fps = torch.as_tensor(fps, dtype=torch.float32, device=self.device).expand(batch_size)
        else:
            fps = None
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        model = self.model_fn(image_embed, fps=fps, time=not per_frame)
        if num_frames is not None and self.per_frame_below > 0 and not per_frame:
            model = _switch_below(self.per_frame_below * self.diffusion.timesteps,
                                  self.model_fn(image_embed, time=False), model)
        return self.diffusion.sample(
            model, shape, steps=steps or self.sample_steps,
            sampler=sampler or self.sampler, guidance_scale=scale if self.conditional else 1.0,
            generator=generator, noise=noise, progress=progress, device=self.device,
        )

    def media_from_batch(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Samples from the embeddings of the kept validation items next to the items themselves."""
        if batch and all(isinstance(v, dict) for v in batch.values()):
            return {f"{k}/{n}": v for k, b in batch.items() for n, v in self.media_from_batch(b).items()}
        if "video" in batch:
            video = batch["video"]
            b, f = video.shape[:2]
            idx = self.cond_frame_index(b, f, self.media_generator()).to(video.device)
            fps = batch.get("fps")
            samples = self.sample(self.frame_embed(video, idx, batch), num_frames=f, fps=fps, batch_size=b,
                                  image_size=video.shape[-1], generator=self.media_generator())
            return {"samples": samples, "reference": rearrange(video, "b f c h w -> b c f h w")}
        image = batch["image"]
        samples = self.sample(self.embed(image, batch), batch_size=image.shape[0], image_size=image.shape[-1],
                              generator=self.media_generator())
        return {"samples": samples, "reference": image}


def _switch_below(t_switch: float, low: Callable[..., Tensor], high: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """The model function that calls ``low`` at timesteps ``t < t_switch`` and ``high`` at the others."""
    def fn(x_t: Tensor, t: Tensor, drop_cond: bool | Tensor | None = None) -> Tensor:
        return (low if bool((t < t_switch).all()) else high)(x_t, t, drop_cond)
    return fn
