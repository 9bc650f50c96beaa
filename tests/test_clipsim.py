"""CLIPSIM: the per-frame CLIP score averaged over frames and videos; local weights only; DDP exactness."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_mav.metrics import CLIPSIM
from lightning_mav.nn.clip import CLIP
from tests.helpers import run_ddp

PROMPTS = ["a small red circle moving", "a large blue square bouncing around", "a medium green triangle moving"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _clip(seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    return CLIP("mav-tiny")  # random weights: enough to check the arithmetic


def _clip_score(clip: CLIP, image: Tensor, prompt: str) -> float:
    """The CLIP score of one image ``[3, H, W]``, computed directly with the wrapper."""
    with torch.no_grad():
        y = F.normalize(clip.encode_image(image[None]), dim=-1)
        e = F.normalize(clip.encode_text(clip.tokenize([prompt])), dim=-1)
    return float((y * e).sum())


def test_repeated_frame_video_equals_the_frame_clip_score() -> None:
    clip = _clip()
    frame = torch.rand(3, 48, 48) * 2 - 1  # not CLIP's 64 px: the wrapper's open_clip preprocessing resizes
    video = frame[:, None].repeat(1, 5, 1, 1)  # [3, F=5, H, W]
    metric = CLIPSIM(clip)
    metric.update(video[None], PROMPTS[:1])
    expected = _clip_score(clip, frame, PROMPTS[0])
    assert float(metric.compute()) == pytest.approx(expected, abs=1e-6)
    scaled = CLIPSIM(clip, scale=100)
    scaled.update(video[None], PROMPTS[:1])
    assert float(scaled.compute()) == pytest.approx(100 * expected, abs=1e-4)


def test_mean_over_frames_then_over_videos() -> None:
    clip = _clip()
    videos = torch.rand(3, 3, 4, 64, 64) * 2 - 1
    per_video = [
        sum(_clip_score(clip, videos[i, :, t], PROMPTS[i]) for t in range(4)) / 4 for i in range(3)
    ]
    metric = CLIPSIM(clip, frame_batch=3)  # chunking must not change anything
    metric.update(videos[:2], PROMPTS[:2])
    metric.update(videos[2:], PROMPTS[2:])
    assert float(metric.compute()) == pytest.approx(sum(per_video) / 3, abs=1e-6)
    # Images are one-frame videos.
    images = CLIPSIM(clip)
    images.update(videos[:, :, 0], PROMPTS)
    expected = sum(_clip_score(clip, videos[i, :, 0], PROMPTS[i]) for i in range(3)) / 3
    assert float(images.compute()) == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="3 videos but 2 prompts"):
        metric.update(videos, PROMPTS[:2])


def test_named_model_with_local_weights(tmp_path: Path) -> None:
    clip = _clip(seed=1)
    weights = tmp_path / "mav_tiny.pt"
    torch.save(clip.model.state_dict(), weights)
    video = torch.rand(1, 3, 2, 64, 64) * 2 - 1
    by_instance, by_name = CLIPSIM(clip), CLIPSIM("mav-tiny", pretrained=weights)
    by_instance.update(video, PROMPTS[:1])
    by_name.update(video, PROMPTS[:1])
    assert float(by_name.compute()) == pytest.approx(float(by_instance.compute()), abs=1e-6)
    with pytest.raises(FileNotFoundError, match=f"CLIP weights not found at {tmp_path / 'missing.pt'}"):
        CLIPSIM("ViT-B-32", pretrained=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="needs local weights"):
        CLIPSIM("ViT-B-32")


def _ddp_worker(rank: int, world: int, weights: str, videos: Tensor) -> float:
    metric = CLIPSIM("mav-tiny", pretrained=weights)
    metric.update(videos[rank::world], PROMPTS[rank::world])
    return float(metric.compute())


def test_ddp_two_processes_match_one(tmp_path: Path) -> None:
    clip = _clip(seed=2)
    weights = tmp_path / "mav_tiny.pt"
    torch.save(clip.model.state_dict(), weights)
    videos = torch.rand(3, 3, 2, 64, 64) * 2 - 1  # 3 videos over 2 ranks: uneven shards
    single = CLIPSIM(clip)
    single.update(videos, PROMPTS)
    expected = float(single.compute())

    for result in run_ddp(_ddp_worker, str(weights), videos, world_size=2):
        assert result == pytest.approx(expected, abs=1e-6)


def test_trained_suite_clip_scores_a_caption_with_its_own_images_above_mismatched_captions(shapes_root: Path) -> None:
    """The protocol's sanity check: CLIPSIM with a trained CLIP prefers each held-out image's own caption."""
    from datamodules.text_image import TextImageDataModule
    from lightning_mav.stages.clip import CLIPStage
    from tests.helpers import TINY_CLIP_32, fit

    torch.manual_seed(0)
    stage = CLIPStage("tiny", model_cfg=TINY_CLIP_32, lr=2e-3, weight_decay=0.0, warmup_steps=0,
                      hard_negative_words=[["circle", "square", "triangle"]])
    fit(stage, TextImageDataModule(root=str(shapes_root), image_size=32, batch_size=16), steps=150,
        limit_val_batches=0)
    clip = stage.clip.eval()
    data = TextImageDataModule(root=str(shapes_root), image_size=32, batch_size=16)
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))
    keep = batch["valid"].bool()
    images, captions = batch["image"][keep], [c for c, k in zip(batch["caption"], keep.tolist()) if k]
    assert len(captions) >= 8 and len(set(captions)) > 1
    videos = images[:, :, None].expand(-1, -1, 2, -1, -1)  # each held-out image as a 2-frame still video
    mismatched = [captions[(i + 1) % len(captions)] for i in range(len(captions))]
    own, other = CLIPSIM(clip), CLIPSIM(clip)
    own.update(videos, captions)
    other.update(videos, mismatched)
    assert float(own.compute()) > float(other.compute()) + 0.01
