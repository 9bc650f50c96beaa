"""CLIPStage: trains C_x and the CLIP image encoder contrastively on text-image pairs (the offline default).

No pretrained CLIP can be downloaded here, so the chain starts by training one: ``mav-tiny`` on the Moving Shapes
text-image shards learns colour/shape/size words in minutes on a CPU. Any open_clip config (with local weights to
fine-tune from, ``pretrained=``) trains the same way. The resulting ``.ckpt`` is what the P and D stages take as
``clip_ckpt`` (read back by ``CLIP.from_checkpoint``, which rebuilds the architecture from ``model_name`` /
``model_cfg`` in the hyperparameters).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from open_clip import ClipLoss
from torch import Tensor

from lightning_mav.nn.clip import CLIP
from lightning_mav.stages.base import StageBase

MAX_LOGIT_SCALE = math.log(100)  # open_clip's training clamp on the learned temperature


class CLIPStage(StageBase):
    """Contrastive (InfoNCE, both directions) training of a CLIP.

    Batch: ``{"image": FloatTensor [B, 3, H, W] in [-1, 1], "caption": list[str], ...}``.

    Args:
        model_name: ``"mav-tiny"`` or an open_clip config name.
        model_cfg: explicit open_clip config dict (plain dict; overrides the name lookup).
        pretrained: optional LOCAL open_clip weights file to start from (fine-tuning).
        lr, weight_decay, betas, warmup_steps, lr_schedule, media_batch_size, media_seed: see :class:`StageBase`.
    """

    def __init__(
        self,
        model_name: str = "mav-tiny",
        model_cfg: dict[str, Any] | None = None,
        pretrained: str | None = None,
        lr: float = 5e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.98),
        warmup_steps: int = 100,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        media_batch_size: int = 4,
        media_seed: int = 0,
        nonfinite: Literal["stop", "skip"] = "stop",
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps,
                         lr_schedule=lr_schedule, media_batch_size=media_batch_size, media_seed=media_seed,
                         nonfinite=nonfinite)
        self.save_hyperparameters()
        self.clip = CLIP(model_name, pretrained=pretrained, model_cfg=model_cfg, freeze=False)
        self.loss_fn = ClipLoss()

    def compute_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> tuple[Tensor, int]:
        """Symmetric cross-entropy of the image-text similarity matrix ``[B, B]`` against its diagonal."""
        images, captions = batch["image"], list(batch["caption"])
        if "valid" in batch:  # drop evaluation padding (see datamodules.shards): it is nobody's positive pair
            keep = batch["valid"].bool().cpu()
            images, captions = images[keep.to(images.device)], [c for c, k in zip(captions, keep.tolist()) if k]
            if not captions:
                return images.sum() * 0.0, 0
        image = self.clip.encode_image(images)  # [B, D], unit norm
        text = self.clip.encode_text(self.clip.tokenize(captions))  # [B, D], unit norm
        return self.loss_fn(image, text, self.clip.model.logit_scale.exp()), image.shape[0]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        # As open_clip does after each step: temperature at most 100, so the logits cannot blow up.
        with torch.no_grad():
            self.clip.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # unlike the P/D stages, the CLIP *is* this stage's network: keep the clip.* tensors
        checkpoint["nonfinite_skipped"] = self.nonfinite_skipped

    def media_from_batch(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        return {}  # nothing to draw: CLIP produces embeddings
