"""What a run leaves in TensorBoard, read back from the event files: losses, learning rate, gradient norm,
throughput, data skip counts (with a corrupt sample in the shards), sample images for an image stage and sample
*videos* for a video stage (an actual encoded GIF in the event file: TensorBoard's add_video silently writes nothing
when moviepy is missing), plus the local PNG / mp4 copies under runs/<stage>/media/.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from lightning_mav import media
from lightning_mav.trainer_cli import MAVCLI
from tests.helpers import EXPERIMENTS, TINY_UNET_8, TINY_UNET_8_NO_ATTN, read_events, shard_with_a_corrupt_sample

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")


def monitors_overlay(path: Path) -> Path:
    """base.yaml's callbacks (copied, not restated) with media every 2 steps and a 2-batch throughput window."""
    callbacks = yaml.safe_load((EXPERIMENTS / "base.yaml").read_text())["trainer"]["callbacks"]
    for cb in callbacks:
        name = cb["class_path"].rsplit(".", 1)[-1]
        if name == "MediaLogger":
            cb["init_args"]["every_n_steps"] = 2
        if name == "ThroughputMonitor":
            cb["init_args"]["window_size"] = 2
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    return path


def test_image_stage_scalars_skips_and_images(shapes_root: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    shard = shard_with_a_corrupt_sample(shapes_root, tmp_path / "shards" / "train-000000.tar")
    overlay = monitors_overlay(tmp_path / "overlay" / "sr_l.yaml")
    monkeypatch.chdir(tmp_path)
    MAVCLI(args=["fit", "--config", str(EXPERIMENTS / "sr_l.yaml"), "--config", str(overlay), *QUIET,
                 "--data.init_args.urls", str(shard), "--data.init_args.val_urls",
                 str(shapes_root / "images" / "val-{000000..000007}.tar"), "--data.init_args.batch_size", "4",
                 "--data.init_args.shuffle_buffer", "4", "--data.init_args.image_size", "32",
                 "--model.init_args.unet", json.dumps(TINY_UNET_8_NO_ATTN), "--model.init_args.lowres_size", "16",
                 "--model.init_args.highres_size", "32", "--model.init_args.sample_steps", "2",
                 "--trainer.max_steps", "4", "--trainer.val_check_interval", "2"])
    run = tmp_path / "runs" / "sr_l"
    acc = read_events(run)
    tags = set(acc.Tags()["scalars"])

    def values(tag: str) -> list[float]:
        return [e.value for e in acc.Scalars(tag)]

    assert len(values("train/loss")) == 4 and len(values("val/loss")) == 2
    assert all(v > 0 for v in values("train/grad_norm"))
    lr_tags = [t for t in tags if t.startswith("lr-AdamW")]  # LearningRateMonitor, one per parameter group
    lr = yaml.safe_load((EXPERIMENTS / "sr_l.yaml").read_text())["model"]["init_args"]["lr"]
    assert lr_tags and all(values(t)[-1] == pytest.approx(lr) for t in lr_tags)
    # ThroughputMonitor (window of 2; one device: the per-device rates, items = frames)
    assert values("train/device/samples_per_sec") and values("train/device/items_per_sec")
    assert values("train/samples")[-1] == 16
    assert all(v > 0 for v in values("train/device/flops_per_sec"))  # the stage's counted flops_per_batch
    skipped = {t: values(t)[-1] for t in tags if t.startswith("data/skipped/")}
    assert skipped.get("data/skipped/decode_error", 0) >= 1, skipped
    assert {"samples/samples", "samples/lowres", "samples/target"} <= set(acc.Tags()["images"])
    image = acc.Images("samples/samples")[-1]
    assert image.encoded_image_string.startswith(b"\x89PNG") and image.step == 4
    pngs = sorted((run / "media").glob("samples_step*.png"))
    assert pngs and Image.open(pngs[-1]).size[1] >= 32


def test_video_stage_writes_videos(shapes_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    overlay = monitors_overlay(tmp_path / "overlay" / "dt.yaml")
    monkeypatch.chdir(tmp_path)
    unet = {**TINY_UNET_8, "temporal": True, "fps_cond": True}
    MAVCLI(args=["fit", "--config", str(EXPERIMENTS / "dt.yaml"), "--config", str(overlay), *QUIET,
                 "--data.init_args.root", str(shapes_root), "--data.init_args.batch_size", "2",
                 "--data.init_args.shuffle_buffer", "4", "--data.init_args.num_frames", "4",
                 "--data.init_args.video_size", "32", "--model.init_args.init_from", "null",
                 "--model.init_args.clip_ckpt", "null", "--model.init_args.unet", json.dumps(unet),
                 "--model.init_args.sample_steps", "2", "--trainer.max_steps", "2",
                 "--trainer.val_check_interval", "2"])
    run = tmp_path / "runs" / "dt"
    acc = read_events(run)
    assert {"samples/samples", "samples/reference"} <= set(acc.Tags()["images"])
    video = acc.Images("samples/samples")[-1]
    assert video.encoded_image_string.startswith(b"GIF8"), "add_video wrote no video (is moviepy importable?)"
    gif = Image.open(io.BytesIO(video.encoded_image_string))
    assert gif.n_frames == 4 and (video.width, video.height) == gif.size
    mp4s = sorted((run / "media").glob("samples_step*.mp4"))
    assert mp4s and list((run / "media").glob("samples_step*.png"))  # + the contact sheet
    frames, fps = media.read_video(mp4s[-1])
    assert frames.shape[0] == 4 and frames.shape[1] == 3 and fps > 0
