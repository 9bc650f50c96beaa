"""CLIPStage: trains C_x and the CLIP image encoder contrastively on text-image pairs (the offline default).

No pretrained CLIP can be downloaded here, so the chain starts by training one: ``mav-tiny`` on the Moving Shapes
text-image shards learns colour/shape/size words in minutes on a CPU; ``mav-tiny-rn`` with ``hard_negative_words``
(the demo's ``experiments/clip.yaml``) learns the shape words far better. Any open_clip config (with local weights
to fine-tune from, ``pretrained=``) trains the same way. The resulting ``.ckpt`` is what the P and D stages take as
``clip_ckpt`` (read back by ``CLIP.from_checkpoint``, which rebuilds the architecture from ``model_name`` /
``model_cfg`` in the hyperparameters).
"""

from __future__ import annotations

import contextlib
import math
import random
import re
from typing import Any

import torch
import torch.nn.functional as F
from open_clip import ClipLoss
from torch import Tensor

from lightning_mav.nn.clip import CLIP
from lightning_mav.nn.mixed_precision import CPUAttentionFP32, cpu_autocast
from lightning_mav.stages.base import StageBase, step_seed

MAX_LOGIT_SCALE = math.log(100)  # open_clip's training clamp on the learned temperature


class CLIPStage(StageBase):
    """Contrastive (InfoNCE, both directions) training of a CLIP.

    Batch: ``{"image": FloatTensor [B, 3, H, W] in [-1, 1], "caption": list[str], ...}``.

    Args:
        model_name: ``"mav-tiny"``, ``"mav-tiny-rn"`` or an open_clip config name.
        model_cfg: explicit open_clip config dict (plain dict; overrides the name lookup).
        pretrained: optional LOCAL open_clip weights file to start from (fine-tuning).
        hard_negative_words: groups of words that exclude each other in a caption (``[[circle, square, triangle]]``).
            Each caption holding one gets a hard negative, the same caption with that word swapped for another of
            its group, as one more text every image is contrasted with (NegCLIP, Yuksekgonul et al. 2023). A random
            batch seldom holds two images that differ only in such a word, so without this CLIP learns the word late
            and its image embedding carries little of it, and what y_e lacks, D cannot draw.
        options: the options every stage shares (lr, weight_decay, betas, warmup_steps, lr_schedule,
            media_batch_size, media_seed, nonfinite): see :class:`StageBase`.
    """

    optimizer_defaults = {"lr": 5e-4, "weight_decay": 0.1, "betas": (0.9, 0.98), "warmup_steps": 100}

    def __init__(
        self,
        model_name: str = "mav-tiny",
        model_cfg: dict[str, Any] | None = None,
        pretrained: str | None = None,
        hard_negative_words: list[list[str]] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.save_hyperparameters()
        self.clip = CLIP(model_name, pretrained=pretrained, model_cfg=model_cfg, freeze=False)
        self.loss_fn = ClipLoss()
        self.word_groups: dict[str, list[str]] = {}  # lower-cased word -> the other words of its group
        for group in hard_negative_words or []:
            words = [str(w).lower() for w in group]
            if len(set(words)) < 2 or any(not re.fullmatch(r"\w+", w) for w in words):
                raise ValueError(f"hard_negative_words: each group needs two or more distinct single words, got {group}")
            for w in words:
                if w in self.word_groups:
                    raise ValueError(f"hard_negative_words: {w!r} is in more than one group")
                self.word_groups[w] = [o for o in dict.fromkeys(words) if o != w]

    def compute_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> tuple[Tensor, int]:
        """Symmetric cross-entropy of the image-text similarity matrix ``[B, B]`` against its diagonal."""
        images, captions = batch["image"], list(batch["caption"])
        if "valid" in batch:  # drop evaluation padding (see datamodules.shards): it is nobody's positive pair
            keep = batch["valid"].bool().cpu()
            images, captions = images[keep.to(images.device)], [c for c, k in zip(captions, keep.tolist()) if k]
            if not captions:
                return images.sum() * 0.0, 0
        negatives = self.hard_negatives(captions, generator)
        # open_clip's attention in fp32 under CPU bf16 autocast, where its bf16 backward is slow (nn/mixed_precision)
        with CPUAttentionFP32() if cpu_autocast(images.device) else contextlib.nullcontext():
            image = self.clip.encode_image(images)  # [B, D], unit norm
            text = self.clip.encode_text(self.clip.tokenize(captions + negatives))  # [B + K, D], unit norm
        scale, b = self.clip.model.logit_scale.exp(), image.shape[0]
        if not negatives:
            return self.loss_fn(image, text, scale), b
        # image -> text over the B captions and the K negatives; text -> image over the B images, as in NegCLIP
        logits = scale * image @ text.T  # [B, B + K]
        target = torch.arange(b, device=image.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :b].T, target)) / 2, b

    def hard_negatives(self, captions: list[str], generator: torch.Generator | None = None) -> list[str]:
        """Word-swapped copies of the captions that hold a ``hard_negative_words`` word (the others get none).

        Which word and what replaces it is drawn from ``generator`` or, in training, from a seed of the step and the
        captions, so a resumed run sees the same negatives.
        """
        if not self.word_groups:
            return []
        seed = (int(torch.randint(0, 2**62, (1,), generator=generator)) if generator is not None
                else step_seed("hard_negatives", self.global_step, *captions))
        rng, negatives = random.Random(seed), []
        for caption in captions:
            spots = [m for m in re.finditer(r"\w+", caption) if m.group().lower() in self.word_groups]
            if spots:
                m = rng.choice(spots)
                swap = rng.choice(self.word_groups[m.group().lower()])
                swap = swap.capitalize() if m.group()[0].isupper() else swap
                negatives.append(caption[:m.start()] + swap + caption[m.end():])
        return negatives

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
