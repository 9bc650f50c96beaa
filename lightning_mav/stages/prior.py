"""PriorStage: trains P, the diffusion prior from text (``e_x``, ``x̂``) to the CLIP image embedding ``y_e``.

Trained on text-image pairs with a frozen CLIP (``clip_ckpt``, usually a CLIPStage checkpoint) that supplies
``e_x``, the text hidden states and the target ``y_e``. The CLIP weights are not saved in this stage's checkpoints
(StageBase strips ``clip.*``); they are reloaded from ``clip_ckpt`` when the stage is rebuilt.

Precomputed embeddings (``mav embed``, ``data.init_args.embeds``): when a batch carries ``"image_embed"``
(FloatTensor ``[B, D]``, the same CLIP's raw image embedding), it is used instead of encoding ``"image"``, which the
batch may then omit; with ``"text_embed"``, ``"text_hidden"``, ``"text_mask"`` (``mav embed --text``) the captions are
not encoded either. Raw embeddings are L2-normalised here for ``embed_space: unit``. ``clip_image_tower: false`` /
``clip_text_tower: false`` then load the CLIP without those towers (sampling from the checkpoint loads them again).

Scale (``embed_space: unit``, the default): the CLIP embeddings are unit vectors; the diffusion runs on
``sqrt(D) · y_e`` so each component has roughly unit variance, like the Gaussian noise it is mixed with (as in
DALL·E 2 implementations). ``sample`` returns unit vectors again. ``embed_space: raw`` is unCLIP / Karlo's: the CLIP's
unnormalised text and image projections, the diffusion running on ``(y_e - mean) / std`` with the per-dimension
statistics the prior carries (``clip_mean``, ``clip_std``; an imported Karlo prior), and ``sample`` returning raw
embeddings for a decoder trained on those.

Classifier-free guidance: the unconditional branch is the prior's learned null (``text_null: learned``) or, for a
prior without one (``text_null: none``, Karlo's), the CLIP encoding of the empty caption ``""``, which is also what a
dropped caption becomes in training.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_mav.diffusion import Diffusion, repeat_to_batch
from lightning_mav.nn.clip import CLIP
from lightning_mav.nn.prior import Prior
from lightning_mav.stages.base import StageBase


class PriorStage(StageBase):
    """P with its diffusion training and classifier-free guided sampling.

    Batch: ``{"image": [B, 3, H, W] in [-1, 1] (or "image_embed": [B, D]), "caption": list[str], ...}``.

    Args:
        clip_ckpt: the frozen CLIP: a CLIPStage ``.ckpt``, or open_clip weights together with ``clip_model``.
        clip_model: open_clip config name when ``clip_ckpt`` is an open_clip weights file.
        dim, depth, heads, dim_head, dropout: the prior transformer (:class:`lightning_mav.nn.prior.Prior`).
        timesteps, schedule, objective: the diffusion (x0, DALL·E 2's choice, by default).
        cond_drop_prob: probability of training a sample unconditionally (classifier-free guidance).
        sample_steps, guidance_scale, sampler: defaults of :meth:`sample`.
        clip_image_tower, clip_text_tower: False: free that CLIP tower after loading, for training on precomputed
            embeddings (a batch without them is then an error); ``pipeline.load_stage`` always loads both.
        options: the options every stage shares (lr, weight_decay, betas, warmup_steps, lr_schedule,
            media_batch_size, media_seed, nonfinite): see :class:`StageBase`.
    """

    optimizer_defaults = {"lr": 3e-4, "weight_decay": 0.01, "betas": (0.9, 0.99), "warmup_steps": 100}

    def __init__(
        self,
        clip_ckpt: str,
        clip_model: str | None = None,
        dim: int = 256,
        depth: int = 4,
        heads: int = 4,
        dim_head: int = 64,
        dropout: float = 0.0,
        qkv_bias: bool = False,
        text_null: Literal["learned", "none"] = "learned",
        embed_space: Literal["unit", "raw"] = "unit",
        timesteps: int = 1000,
        schedule: str = "cosine",
        objective: str = "x0",
        clip_sample: float | None = None,
        cond_drop_prob: float = 0.2,
        sample_steps: int = 64,
        guidance_scale: float = 2.0,
        sampler: Literal["ddim", "ddpm", "dpm++", "unclip"] = "ddim",
        clip_image_tower: bool = True,
        clip_text_tower: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.save_hyperparameters()
        if embed_space not in ("unit", "raw"):
            raise ValueError(f"embed_space must be 'unit' or 'raw', got {embed_space!r}")
        if not clip_text_tower and text_null == "none":
            raise ValueError("clip_text_tower: false needs text_null: learned (text_null: none encodes the empty "
                             "caption with the text tower in every step)")
        clip: CLIP = self.load_clip(clip_ckpt, clip_model)
        if not clip_image_tower:
            clip.drop_image_tower()  # the targets y_e come precomputed (mav embed): free the tower's memory
        if not clip_text_tower:
            clip.drop_text_tower()  # so do e_x and the hidden states (mav embed --text)
        self.prior = Prior(clip.embed_dim, clip.text_width, max_text_len=clip.context_length, dim=dim, depth=depth,
                           heads=heads, dim_head=dim_head, dropout=dropout, qkv_bias=qkv_bias, text_null=text_null,
                           embed_stats=embed_space == "raw")
        # no clipping by default: unit embeddings scaled by sqrt(D) are unbounded
        self.diffusion = Diffusion(timesteps, schedule, objective, clip_sample=clip_sample)
        self.embed_space, self.text_null = embed_space, text_null
        self.scale = math.sqrt(clip.embed_dim)
        self.cond_drop_prob, self.sample_steps, self.guidance_scale = cond_drop_prob, sample_steps, guidance_scale
        self.sampler = sampler

    # ------------------------------------------------------------------ conditioning
    def encode_text(self, captions: list[str]) -> dict[str, Tensor]:
        """Frozen C_x: ``{"text_embed": e_x [B, D], "text_hidden": [B, L, W], "text_mask": [B, L] bool}``."""
        e_x, hidden, mask = self.clip.encode_text_hidden(self.clip.tokenize(captions),
                                                         normalize=self.embed_space == "unit")
        return {"text_embed": e_x, "text_hidden": hidden, "text_mask": mask}

    def text_cond(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """:meth:`encode_text` of the batch's captions, or its precomputed ``text_embed [B, D]`` (raw; normalised
        here for ``unit``), ``text_hidden [B, L, W]`` and ``text_mask [B, L]`` (``mav embed --text``)."""
        if "text_embed" not in batch:
            if not self.clip.has_text_tower:
                raise ValueError("PriorStage: clip_text_tower is false but the batch has no precomputed 'text_embed': "
                                 "write the companions with `mav embed --text` (data.init_args.embeds)")
            return self.encode_text(batch["caption"])
        e_x = batch["text_embed"].float().to(self.device)
        return {"text_embed": F.normalize(e_x, dim=-1) if self.embed_space == "unit" else e_x,
                "text_hidden": batch["text_hidden"].float().to(self.device),
                "text_mask": batch["text_mask"].bool().to(self.device)}

    def image_embed(self, batch: dict[str, Any]) -> Tensor:
        """Target ``y_e [B, D]`` in ``embed_space``: the precomputed ``image_embed`` if present, else CLIP(image)."""
        unit = self.embed_space == "unit"
        if "image_embed" in batch:
            y_e = batch["image_embed"].float().to(self.device)
            return F.normalize(y_e, dim=-1) if unit else y_e
        if not self.clip.has_image_tower:
            raise ValueError("PriorStage: clip_image_tower is false but the batch has no precomputed 'image_embed': "
                             "set data.init_args.embeds to a `mav embed` folder")
        return self.clip.encode_image(batch["image"], normalize=unit)

    def to_diffusion(self, y_e: Tensor) -> Tensor:
        """``y_e [B, D]`` -> the space the diffusion runs in (``sqrt(D)·y_e``, or standardised for ``raw``)."""
        return y_e * self.scale if self.embed_space == "unit" else self.prior.normalize(y_e)

    def from_diffusion(self, y: Tensor) -> Tensor:
        """Inverse of :meth:`to_diffusion`, back to a unit or raw CLIP image embedding ``[B, D]``."""
        return F.normalize(y, dim=-1) if self.embed_space == "unit" else self.prior.unnormalize(y)

    def model_fn(self, cond: dict[str, Tensor], drop: Tensor | None = None):
        """``(y_t, t, drop_cond=None) -> prediction``: P with its text conditioning bound.

        ``drop_cond`` from the sampler is a bool or a ``[2B]`` tensor on a doubled batch (batched guidance); in
        training ``drop`` ``[B]`` is fixed up front. Without a learned null (``text_null: none``) a dropped item
        gets the empty caption's encoding instead.
        """
        empty = self.encode_text([""]) if self.text_null == "none" else None

        def fn(y_t: Tensor, t: Tensor, drop_cond: bool | Tensor | None = None) -> Tensor:
            b = y_t.shape[0]
            d = drop if drop_cond is None else torch.as_tensor(drop_cond, device=y_t.device).expand(b)
            c = {k: repeat_to_batch(v, b) for k, v in cond.items()}
            if empty is None:
                return self.prior(y_t, t, **c, drop_cond=d)
            if d is not None:
                c = {k: torch.where(d.view(-1, *[1] * (v.dim() - 1)), empty[k], v) for k, v in c.items()}
            return self.prior(y_t, t, **c)
        return fn

    # ------------------------------------------------------------------ training
    def compute_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> tuple[Tensor, int]:
        cond = self.text_cond(batch)
        y_e = self.to_diffusion(self.image_embed(batch))
        b = y_e.shape[0]
        drop = torch.rand(b, generator=generator).to(self.device) < self.cond_drop_prob
        # Evaluation padding (valid == False, see datamodules.shards) must not count in the loss.
        valid = batch.get("valid")
        weights = None if valid is None else valid.to(self.device).float()
        loss = self.diffusion.loss(self.model_fn(cond, drop), y_e, weights=weights, generator=generator)
        return loss, b if valid is None else int(valid.sum())

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        sampler: str | None = None,
    ) -> Tensor:
        """Text -> ``y_e [B, D]`` (unit norm, or raw for ``embed_space: raw``), classifier-free guided.
        Same ``generator`` seed, same result."""
        cond = self.encode_text(prompts)
        y = self.diffusion.sample(
            self.model_fn(cond), (len(prompts), self.clip.embed_dim),
            steps=steps or self.sample_steps, sampler=sampler or self.sampler,
            guidance_scale=self.guidance_scale if guidance_scale is None else guidance_scale,
            generator=generator, device=self.device,
        )
        return self.from_diffusion(y)

    def media_from_batch(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        return {}  # P produces embeddings, not pictures; D's stage draws them
