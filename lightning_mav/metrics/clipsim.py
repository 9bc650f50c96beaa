"""CLIPSIM (Wu et al., GODIVA 2021): text-video similarity as the CLIP score of the frames, averaged.

For each video, the cosine similarity between the CLIP image embedding of every frame and the CLIP text
embedding of its prompt, averaged over frames; then averaged over videos. Make-A-Video reports 0.3049 on
MSR-VTT with ViT-B/32 on this raw-cosine scale; ``scale=100`` gives the x100 convention of some papers.
No clamping at zero (unlike torchmetrics' ``CLIPScore``), so the two scales differ only by the factor.

The CLIP model is the suite's ``lightning_mav.nn.clip.CLIP`` wrapper, which applies open_clip's
preprocessing to tensors (shortest side resized with the model's interpolation, centre crop, CLIP mean/std
normalisation) and loads weights from local files only: an open_clip config name (``"ViT-B-32"``) plus a
local weights path for real runs, or the suite's own CLIP (an instance, or a CLIPStage ``.ckpt``) on shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from lightning_mav.nn.clip import CLIP

__all__ = ["CLIPSIM"]


class CLIPSIM(Metric):
    """Mean over videos of the mean over frames of cos(CLIP image embedding, CLIP text embedding).

    Args:
        clip: a ``CLIP`` instance, or an open_clip config name (``"ViT-B-32"``, ``"mav-tiny"``) whose weights
            come from ``pretrained``.
        pretrained: local weights for a named model: open_clip weights (``.pt``/``.bin``/``.safetensors``) or
            a CLIPStage Lightning checkpoint (``.ckpt``). Required with a name: random CLIP weights would give a
            meaningless score. Never downloads; a missing file raises ``FileNotFoundError`` naming it.
        scale: multiplies the cosine (1 = the paper's 0.3049 scale, 100 = the x100 convention).
        frame_batch: frames encoded per CLIP forward pass (memory knob only).
        kwargs: ``torchmetrics.Metric`` options.

    ``update(videos [B, 3, F, H, W] (or images [B, 3, H, W]) in [-1, 1], prompts: list[str])``;
    ``compute()`` -> float64 scalar. States are a float64 sum of per-video scores and a count, summed over
    DDP ranks. The CLIP model is not a registered submodule (kept out of checkpoints and DDP broadcasts);
    it follows the inputs' device on ``update``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    score_sum: Tensor
    count: Tensor

    def __init__(
        self,
        clip: CLIP | str,
        pretrained: str | Path | None = None,
        *,
        scale: float = 1.0,
        frame_batch: int = 64,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(clip, str):
            if pretrained is None:
                raise ValueError(f"CLIPSIM with CLIP {clip!r} needs local weights: pass pretrained=PATH")
            pretrained = Path(pretrained).expanduser()
            if not pretrained.is_file():
                raise FileNotFoundError(f"CLIP weights not found at {pretrained} (CLIPSIM never downloads)")
            if pretrained.suffix == ".ckpt":
                clip = CLIP.from_checkpoint(pretrained)
            else:
                clip = CLIP(model_name=clip, pretrained=str(pretrained))
            clip.freeze()
        object.__setattr__(self, "_clip", clip)  # plain attribute: see the class docstring
        self.scale = float(scale)
        self.frame_batch = frame_batch
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @property
    def clip(self) -> CLIP:
        """The frozen CLIP model."""
        return self._clip

    @torch.no_grad()
    def video_scores(self, videos: Tensor, prompts: Sequence[str]) -> Tensor:
        """Per-video CLIPSIM (already multiplied by ``scale``): ``[B, 3, F, H, W]`` + B prompts -> ``[B]`` float64."""
        if videos.ndim == 4:
            videos = videos.unsqueeze(2)
        if videos.ndim != 5 or videos.shape[1] != 3:
            raise ValueError(f"expected videos [B, 3, F, H, W] or images [B, 3, H, W], got {tuple(videos.shape)}")
        if len(prompts) != videos.shape[0]:
            raise ValueError(f"{videos.shape[0]} videos but {len(prompts)} prompts")
        clip = self._clip.to(videos.device)
        was_training = clip.training
        clip.eval()  # a caller's CLIP instance may be in training mode; score without dropout
        b, _, f, h, w = videos.shape
        text = F.normalize(clip.encode_text(clip.tokenize(list(prompts))).float(), dim=-1)  # [B, D]
        frames = videos.transpose(1, 2).reshape(b * f, 3, h, w).float()
        image = torch.cat([clip.encode_image(chunk).float() for chunk in frames.split(self.frame_batch)])
        clip.train(was_training)
        image = F.normalize(image, dim=-1).view(b, f, -1)  # [B, F, D]
        cosine = (image * text[:, None]).sum(dim=-1)  # [B, F]
        return cosine.double().mean(dim=1) * self.scale

    def update(self, videos: Tensor, prompts: Sequence[str]) -> None:
        """Add a batch: ``videos [B, 3, F, H, W]`` in [-1, 1], ``prompts[i]`` the prompt of ``videos[i]``."""
        scores = self.video_scores(videos, prompts)
        self.score_sum += scores.sum().to(self.score_sum.device)
        self.count += scores.numel()

    def compute(self) -> Tensor:
        """Mean per-video CLIPSIM, a float64 scalar."""
        if self.count == 0:
            raise RuntimeError("CLIPSIM.compute() before any update()")
        return self.score_sum / self.count
