"""Shared fixtures: a small Moving Shapes dataset generated once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real shards in both layouts (text-image pairs and unlabeled mp4 videos), 32 px, a few seconds to write."""
    from datamodules.shapes import generate

    out = tmp_path_factory.mktemp("shapes")
    return Path(generate(out, num_images=64, num_videos=16, num_val_images=16, num_val_videos=8,
                         image_size=32, video_size=32, seed=0))


# A tiny CLIP / U-Net for the whole-chain tests (pipeline, evaluation): seconds per stage on a CPU.
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_UNET = {"dim": 16, "dim_mults": (1, 2), "num_res_blocks": 1, "attn_levels": (1,), "heads": 2, "dim_head": 8}


def train_tiny_chain(shapes_root: Path, root: Path, *, steps: int, interp_frames: int, sr_h: bool) -> Path:
    """``root/<stage>/checkpoints/last.ckpt`` for clip, prior, decoder -> dt -> interp, sr_l -> sr_t (and sr_h),
    each from ``steps`` real Lightning steps on ``shapes_root``: where ``mav generate`` / ``mav evaluate`` look.

    Sizes: D_t makes 8 px frames, ↑F interpolates them to ``interp_frames``, SR_t takes them to 16 px, SR_h to 32.
    """
    import pytorch_lightning as pl

    from datamodules.text_image import TextImageDataModule
    from datamodules.video import VideoDataModule
    from lightning_mav.stages.clip import CLIPStage
    from lightning_mav.stages.decoder import DecoderStage
    from lightning_mav.stages.interpolation import InterpolationStage
    from lightning_mav.stages.prior import PriorStage
    from lightning_mav.stages.superres import SuperResStage

    fast = {"sample_steps": 2, "warmup_steps": 0, "lr": 1e-3}
    pl.seed_everything(0, verbose=False)

    def fit(stage: pl.LightningModule, data: pl.LightningDataModule, name: str) -> str:
        trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        trainer.fit(stage, datamodule=data)
        path = root / name / "checkpoints" / "last.ckpt"
        path.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(path)
        return str(path)

    def images(size: int) -> TextImageDataModule:
        return TextImageDataModule(root=str(shapes_root), image_size=size, batch_size=4)

    def videos(size: int, frames: int) -> VideoDataModule:
        return VideoDataModule(root=str(shapes_root), num_frames=frames, video_size=size, fps_min=8, fps_max=24,
                               batch_size=2)

    clip = fit(CLIPStage("tiny", model_cfg=TINY_CLIP, warmup_steps=0), images(16), "clip")
    fit(PriorStage(clip, dim=32, depth=1, heads=2, dim_head=16, **fast), images(16), "prior")
    d = fit(DecoderStage(unet=TINY_UNET, clip_ckpt=clip, image_size=8, **fast), images(8), "decoder")
    dt = fit(DecoderStage(unet={"temporal": True, "fps_cond": True}, clip_ckpt=clip, init_from=d, image_size=8,
                          **fast), videos(8, 4), "dt")
    fit(InterpolationStage(clip_ckpt=clip, init_from=dt, image_size=8, num_frames=interp_frames, **fast),
        videos(8, interp_frames), "interp")
    sr_l = fit(SuperResStage(unet=TINY_UNET, lowres_size=8, highres_size=16, **fast), images(16), "sr_l")
    fit(SuperResStage(unet={"temporal": True}, init_from=sr_l, lowres_size=8, highres_size=16, **fast),
        videos(16, 4), "sr_t")
    if sr_h:
        fit(SuperResStage(unet=TINY_UNET, lowres_size=16, highres_size=32, **fast), images(32), "sr_h")
    return root
