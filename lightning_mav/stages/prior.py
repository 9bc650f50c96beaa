"""PriorStage: trains P, the diffusion prior from text (``e_x``, ``x̂``) to the CLIP image embedding ``y_e``.

Trained on text-image pairs with a frozen CLIP (``clip_ckpt``, usually a CLIPStage checkpoint) that supplies
``e_x``, the text hidden states and the target ``y_e``. The CLIP weights are not saved in this stage's checkpoints
(StageBase strips ``clip.*``); they are reloaded from ``clip_ckpt`` when the stage is rebuilt.

Precomputed targets: when a batch carries ``"image_embed"`` (FloatTensor ``[B, D]``, decoded from an
``image_embed.npy`` entry of each shard sample, CLIP image embedding of the same CLIP), it is used instead of
encoding ``"image"``, which the batch may then omit. It is L2-normalised here either way.

Scale: the CLIP embeddings are unit vectors; the diffusion runs on ``sqrt(D) · y_e`` so each component has roughly
unit variance, like the Gaussian noise it is mixed with (as in DALL·E 2 implementations). ``sample`` returns unit
vectors again.
"""

from __future__ import annotations

import math
from typing import Any

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
        sample_steps, guidance_scale: defaults of :meth:`sample`.
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
        timesteps: int = 1000,
        schedule: str = "cosine",
        objective: str = "x0",
        cond_drop_prob: float = 0.2,
        sample_steps: int = 64,
        guidance_scale: float = 2.0,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.save_hyperparameters()
        clip: CLIP = self.load_clip(clip_ckpt, clip_model)
        self.prior = Prior(clip.embed_dim, clip.text_width, max_text_len=clip.context_length, dim=dim, depth=depth,
                           heads=heads, dim_head=dim_head, dropout=dropout)
        self.diffusion = Diffusion(timesteps, schedule, objective)  # no clipping: embeddings are unbounded
        self.scale = math.sqrt(clip.embed_dim)
        self.cond_drop_prob, self.sample_steps, self.guidance_scale = cond_drop_prob, sample_steps, guidance_scale

    # ------------------------------------------------------------------ conditioning
    def encode_text(self, captions: list[str]) -> dict[str, Tensor]:
        """Frozen C_x: ``{"text_embed": e_x [B, D], "text_hidden": [B, L, W], "text_mask": [B, L] bool}``."""
        e_x, hidden, mask = self.clip.encode_text_hidden(self.clip.tokenize(captions))
        return {"text_embed": e_x, "text_hidden": hidden, "text_mask": mask}

    def image_embed(self, batch: dict[str, Any]) -> Tensor:
        """Target ``y_e [B, D]`` (unit norm): the precomputed ``image_embed`` if present, else CLIP(image)."""
        if "image_embed" in batch:
            return F.normalize(batch["image_embed"].float().to(self.device), dim=-1)
        return self.clip.encode_image(batch["image"])

    def model_fn(self, cond: dict[str, Tensor], drop: Tensor | None = None):
        """``(y_t, t, drop_cond=None) -> prediction``: P with its text conditioning bound.

        ``drop_cond`` from the sampler is a bool or a ``[2B]`` tensor on a doubled batch (batched guidance); in
        training ``drop`` ``[B]`` is fixed up front.
        """
        def fn(y_t: Tensor, t: Tensor, drop_cond: bool | Tensor | None = None) -> Tensor:
            b = y_t.shape[0]
            d = drop if drop_cond is None else torch.as_tensor(drop_cond, device=y_t.device).expand(b)
            c = {k: repeat_to_batch(v, b) for k, v in cond.items()}
            return self.prior(y_t, t, **c, drop_cond=d)
        return fn

    # ------------------------------------------------------------------ training
    def compute_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> tuple[Tensor, int]:
        cond = self.encode_text(batch["caption"])
        y_e = self.image_embed(batch) * self.scale
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
        sampler: str = "ddim",
    ) -> Tensor:
        """Text -> ``y_e [B, D]`` (unit norm), classifier-free guided. Same ``generator`` seed, same result."""
        cond = self.encode_text(prompts)
        scaled = self.diffusion.sample(
            self.model_fn(cond), (len(prompts), self.clip.embed_dim),
            steps=steps or self.sample_steps, sampler=sampler,
            guidance_scale=self.guidance_scale if guidance_scale is None else guidance_scale,
            generator=generator, device=self.device,
        )
        return F.normalize(scaled, dim=-1)

    def media_from_batch(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        return {}  # P produces embeddings, not pictures; D's stage draws them
