"""DecoderStage: D on images (overfit, Lightning loop, checkpoints without CLIP, media) and D_t on video
(fps, init_from D, freeze_spatial, joint image steps, sampling equal to D per frame at init)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lightning_mav.nn.unet import is_temporal_name
from lightning_mav.stages.base import trainable_names
from lightning_mav.stages.decoder import DecoderStage
from tests.helpers import TINY_UNET, cpu_trainer, fit_batches, save_tiny_clip, tiny_clip_cfg

CLIP_CFG = tiny_clip_cfg(context_length=8)
UNET = {**TINY_UNET, "norm_groups": 8}
VIDEO_UNET = {**UNET, "temporal": True, "fps_cond": True}
FAST = {"image_size": 8, "sample_steps": 3, "media_batch_size": 2, "warmup_steps": 0}

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random tiny CLIP in the CLIPStage checkpoint format that ``CLIP.from_checkpoint`` reads."""
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip.ckpt", CLIP_CFG)


def images(n: int = 4, size: int = 8) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(n)) * 2 - 1


def video_batch(b: int = 2, f: int = 3, size: int = 8) -> dict:
    video = torch.rand(b, f, 3, size, size, generator=torch.Generator().manual_seed(7)) * 2 - 1
    return {"video": video, "fps": torch.tensor([4.0, 24.0])[:b], "caption": [""] * b,
            "key": [str(i) for i in range(b)]}


@pytest.fixture(scope="module")
def d_ckpt(clip_ckpt: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A D checkpoint written by a (2-step) Lightning run."""
    tmp = tmp_path_factory.mktemp("d")
    stage = DecoderStage(unet=UNET, clip_ckpt=clip_ckpt, **FAST)
    trainer = fit_batches(stage, [{"image": images()}], steps=2, default_root_dir=tmp)
    path = tmp / "d.ckpt"
    trainer.save_checkpoint(path)
    return str(path)


def overfit(stage, batch: dict, max_steps: int = 200) -> tuple[float, float]:
    """Train on one batch with fixed noise/timesteps until the loss drops 10x; (first loss, last loss)."""
    optimizer = stage.configure_optimizers()["optimizer"]
    stage.train()
    first = last = None
    for _ in range(max_steps):
        loss, _ = stage.compute_loss(batch, generator=torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first, last = first or loss.item(), loss.item()
        if last < first / 10:
            break
    return first, last


# --------------------------------------------------------------------------------------------------- D (images)
@pytest.mark.parametrize("objective", ["eps", "v"])
def test_d_overfits_one_batch(clip_ckpt: str, objective: str) -> None:
    stage = DecoderStage(unet=UNET, diffusion={"objective": objective}, clip_ckpt=clip_ckpt, cond_drop_prob=0.0,
                         lr=3e-3, **FAST)
    first, last = overfit(stage, {"image": images()})
    assert last < first / 10, (first, last)


def test_d_lightning_loop_checkpoint_has_no_clip_and_reloads(clip_ckpt: str, d_ckpt: str, tmp_path: Path) -> None:
    ckpt = torch.load(d_ckpt, map_location="cpu", weights_only=True)  # plain hparams: no pickled classes
    assert ckpt["state_dict"] and not any(k.startswith("clip.") for k in ckpt["state_dict"])
    assert all(k.startswith("unet.") for k in ckpt["state_dict"])
    assert ckpt["hyper_parameters"]["clip_ckpt"] == clip_ckpt and ckpt["hyper_parameters"]["unet"]["dim"] == 16

    stage = DecoderStage.load_from_checkpoint(d_ckpt)
    assert stage.clip is not None and not any(p.requires_grad for p in stage.clip.parameters())
    for k, v in stage.state_dict().items():
        if k.startswith("unet."):
            assert torch.equal(v, ckpt["state_dict"][k]), k
    assert stage.hparams.image_size == 8 and stage.diffusion.clip_sample == 1.0

    # the loop logs the contract's keys, and the frozen CLIP stayed out of the optimizer
    trainer = fit_batches(stage, [{"image": images()}], steps=1, default_root_dir=tmp_path)
    assert {"train/loss", "val/loss"} <= set(trainer.callback_metrics)
    optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert optimized == {id(p) for p in stage.unet.parameters()}


def test_d_resumes_with_ema_weight_averaging(clip_ckpt: str, tmp_path: Path) -> None:
    """Lightning's EMA callback strictly reloads the raw weights on resume: the stripped clip.* keys must come back."""
    from lightning_mav.callbacks import EMAWeightAveraging

    stage = DecoderStage(unet=UNET, clip_ckpt=clip_ckpt, **FAST)
    trainer = fit_batches(stage, [{"image": images()}], steps=2, default_root_dir=tmp_path,
                          callbacks=[EMAWeightAveraging(decay=0.9)])
    trainer.save_checkpoint(tmp_path / "ema.ckpt")
    ckpt = torch.load(tmp_path / "ema.ckpt", map_location="cpu", weights_only=True)
    for key in ("state_dict", "current_model_state"):
        assert ckpt[key] and not any(k.startswith("clip.") for k in ckpt[key])
    resumed = DecoderStage(unet=UNET, clip_ckpt=clip_ckpt, **FAST)
    trainer = fit_batches(resumed, [{"image": images()}], steps=3, default_root_dir=tmp_path,
                          callbacks=[EMAWeightAveraging(decay=0.9)], ckpt_path=str(tmp_path / "ema.ckpt"))
    assert trainer.global_step == 3


def test_flops_per_batch_counts_the_real_step_for_throughput_monitor(clip_ckpt: str, tmp_path: Path) -> None:
    """flops_per_batch = forward + loss + backward of a training batch, forward of a validation batch: what
    ThroughputMonitor turns into flops_per_sec / MFU."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = {"image": images()}
    stage = DecoderStage(unet=UNET, clip_ckpt=clip_ckpt, **FAST)
    assert stage.flops_per_batch is None  # nothing counted yet
    fit_batches(stage, [batch], steps=2, default_root_dir=tmp_path)
    with FlopCounterMode(display=False) as train_count:
        loss, _ = stage.compute_loss(batch)
        loss.backward()
    with FlopCounterMode(display=False) as val_count, torch.no_grad():
        stage.compute_loss(batch, generator=torch.Generator().manual_seed(0))
    assert stage._flops == {"train": train_count.get_total_flops(), "val": val_count.get_total_flops()}
    assert stage._flops["train"] > 2 * stage._flops["val"] > 0  # backward costs about twice the forward
    assert stage.flops_per_batch == stage._flops["train"]  # outside validation: the training count


def test_d_media_hook_and_sampling_are_deterministic(clip_ckpt: str, tmp_path: Path) -> None:
    stage = DecoderStage(unet=UNET, clip_ckpt=clip_ckpt, **FAST)
    assert stage.log_media() == {}  # nothing kept before the first validation batch
    fit_batches(stage, [{"image": images()}], steps=1, default_root_dir=tmp_path)
    media = stage.log_media()
    assert set(media) == {"samples", "reference"} and media["samples"].shape == (2, 3, 8, 8)
    assert media["samples"].abs().max() <= 1 and torch.equal(media["samples"], stage.log_media()["samples"])

    embed = stage.embed(images(2))
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    seen: list[dict] = []
    hook = stage.unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    a = stage.sample(embed, steps=3, guidance_scale=2.0, generator=g())
    hook.remove()
    # guidance batches both branches: the embedding repeated, the second half dropped to the null embedding
    assert len(seen) == 3 and seen[0]["drop_cond"].tolist() == [False, False, True, True]
    torch.testing.assert_close(seen[0]["image_embed"], embed.repeat(2, 1))
    assert torch.equal(a, stage.sample(embed, steps=3, guidance_scale=2.0, generator=g()))
    assert stage.sample(embed, steps=3, sampler="dpm++", generator=g(), image_size=16).shape == (2, 3, 16, 16)


def test_d_needs_clip_for_conditioning(clip_ckpt: str) -> None:
    uncond = DecoderStage(unet=UNET, **FAST)  # no CLIP, no image_embed_dim: an unconditional U-Net
    loss, n = uncond.compute_loss({"image": images()})
    assert n == 4 and torch.isfinite(loss)
    assert uncond.sample(None, batch_size=2, steps=2).shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="image_embed_dim"):
        DecoderStage(unet={**UNET, "image_embed_dim": 8}, clip_ckpt=clip_ckpt, **FAST)
    cond = DecoderStage(unet={**UNET, "image_embed_dim": 16}, **FAST)
    with pytest.raises(ValueError, match="clip_ckpt"):
        cond.compute_loss({"image": images()})
    # precomputed embeddings (e.g. read from shards) need no CLIP
    loss, _ = cond.compute_loss({"image": images(), "image_embed": torch.randn(4, 16)})
    assert torch.isfinite(loss)


# --------------------------------------------------------------------------------------------------- D_t (video)
def test_dt_video_batch_trains_with_fps(clip_ckpt: str) -> None:
    stage = DecoderStage(unet=VIDEO_UNET, clip_ckpt=clip_ckpt, cond_frame="random", **FAST)
    seen: list[dict] = []
    stage.unet.register_forward_pre_hook(lambda m, args, kw: seen.append({"x": args[0].shape, **kw}), with_kwargs=True)
    with torch.no_grad():  # leave the zero init (output conv, residual branches, fps head) so gradients reach fps
        for p in stage.unet.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    stage.train()
    loss, n = stage.compute_loss(video_batch())
    loss.backward()
    assert n == 2 and seen[0]["x"] == (2, 3, 3, 8, 8) and seen[0]["time"] is True
    assert torch.equal(seen[0]["fps"], torch.tensor([4.0, 24.0]))
    # fps reaches the loss: its zero-initialised output layer gets a gradient, and so do the temporal layers
    assert stage.unet.fps_embed.mlp[-1].weight.grad.abs().sum() > 0
    temporal_grads = [p.grad for n, p in stage.unet.named_parameters() if "temporal" in n]
    assert temporal_grads and all(g is not None and g.any() for g in temporal_grads)


def test_cond_frame_choice(clip_ckpt: str) -> None:
    for cond_frame, expected in (("middle", [2, 2]), ("first", [0, 0])):
        stage = DecoderStage(unet=VIDEO_UNET, clip_ckpt=clip_ckpt, cond_frame=cond_frame, **FAST)
        assert stage.cond_frame_index(2, 5).tolist() == expected
    stage = DecoderStage(unet=VIDEO_UNET, clip_ckpt=clip_ckpt, cond_frame="random", **FAST)
    idx = stage.cond_frame_index(64, 5, torch.Generator().manual_seed(0))
    assert set(idx.tolist()) == {0, 1, 2, 3, 4}
    with pytest.raises(ValueError, match="cond_frame"):
        DecoderStage(unet=VIDEO_UNET, cond_frame="last", **FAST)


def test_joint_image_steps_run_images_with_time_off(clip_ckpt: str) -> None:
    stage = DecoderStage(unet=VIDEO_UNET, clip_ckpt=clip_ckpt, joint_image_prob=1.0, **FAST)
    seen: list[dict] = []
    stage.unet.register_forward_pre_hook(lambda m, args, kw: seen.append({"x": args[0].shape, **kw}), with_kwargs=True)
    stage.train()
    stage.compute_loss(video_batch())
    assert seen[-1]["x"] == (2, 3, 8, 8) and seen[-1]["time"] is False and seen[-1]["fps"] is None
    stage.eval()  # validation measures the video loss
    stage.compute_loss(video_batch(), generator=torch.Generator().manual_seed(0))
    assert seen[-1]["x"] == (2, 3, 3, 8, 8)
    # a plain image batch (e.g. from a second loader) on the video stage, and a dict of both: losses add
    loss, n = stage.compute_loss({"images": {"image": images()}, "videos": video_batch()})
    assert n == 6 and torch.isfinite(loss)


def test_dt_from_d_equals_d_per_frame_and_freezes_spatial(clip_ckpt: str, d_ckpt: str) -> None:
    d = DecoderStage.load_from_checkpoint(d_ckpt).eval()
    dt = DecoderStage(unet=VIDEO_UNET, clip_ckpt=clip_ckpt, init_from=d_ckpt, freeze_spatial=True, **FAST).eval()
    assert dt.init_report.path == d_ckpt
    report = dt.init_report
    assert report.ok and report.new and all(is_temporal_name(n) for n in report.new)
    assert len(report.loaded) == len(d.unet.state_dict())

    # at init D_t is D applied to each frame, whatever the fps, through the whole guided sampling loop
    embed = d.embed(images(2))
    noise = torch.randn(2, 3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    video = dt.sample(embed, num_frames=3, fps=torch.tensor([2.0, 30.0]), steps=3, guidance_scale=2.0, noise=noise)
    frames = d.sample(embed.repeat_interleave(3, 0), steps=3, guidance_scale=2.0,
                      noise=noise.transpose(1, 2).reshape(6, 3, 8, 8))
    torch.testing.assert_close(video.transpose(1, 2).reshape(6, 3, 8, 8), frames, atol=1e-5, rtol=0)

    # freeze_spatial: only temporal / fps parameters train, and only they move
    names = trainable_names(dt.unet)
    assert names and all(is_temporal_name(n) for n in names)
    assert len(names) == len([n for n, _ in dt.unet.named_parameters() if is_temporal_name(n)])
    before = {n: p.detach().clone() for n, p in dt.unet.named_parameters()}
    first, last = overfit(dt, video_batch(), max_steps=3)
    moved = {n for n, p in dt.unet.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= set(names)


def test_per_frame_below_finishes_dt_videos_frame_by_frame(clip_ckpt: str, d_ckpt: str) -> None:
    d = DecoderStage.load_from_checkpoint(d_ckpt).eval()
    dt = DecoderStage(unet=VIDEO_UNET, clip_ckpt=clip_ckpt, init_from=d_ckpt, **FAST).eval()
    with torch.no_grad():  # trained-looking temporal layers: D_t is no longer D per frame
        for n, p in dt.unet.named_parameters():
            if is_temporal_name(n):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.2)
    embed = d.embed(images(2))
    noise = torch.randn(2, 3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    fps = torch.tensor([2.0, 30.0])

    def sample(below: float, record: list | None = None) -> torch.Tensor:
        dt.per_frame_below = below
        forward = dt.unet.forward
        if record is not None:  # which steps ran the temporal layers (one batched guided call per step)
            dt.unet.forward = lambda *a, **k: record.append(k["time"]) or forward(*a, **k)
        try:
            return dt.sample(embed, num_frames=3, fps=fps, steps=3, guidance_scale=2.0, noise=noise)
        finally:
            dt.unet.forward = forward

    per_frame = d.sample(embed.repeat_interleave(3, 0), steps=3, guidance_scale=2.0,
                         noise=noise.transpose(1, 2).reshape(6, 3, 8, 8)).view(2, 3, 3, 8, 8).transpose(1, 2)
    # 3 trailing steps at t = 999, 666, 333: below 0.5 only the last runs frame by frame, below 1 all of them
    calls: list = []
    mixed = sample(0.5, calls)
    assert calls == [True, True, False]
    torch.testing.assert_close(sample(1.0), per_frame, atol=1e-5, rtol=0)
    video = sample(0.0)
    assert (video - per_frame).abs().max() > 1e-2 and (mixed - video).abs().max() > 1e-3
    assert (mixed - per_frame).abs().max() > 1e-3
    with pytest.raises(ValueError, match="per_frame_below must be a fraction of the noise schedule"):
        DecoderStage(unet=UNET, clip_ckpt=clip_ckpt, per_frame_below=1.5, **FAST)


def test_dt_inherits_the_architecture_and_its_checkpoint_is_self_contained(
        clip_ckpt: str, d_ckpt: str, tmp_path: Path) -> None:
    parent = tmp_path / "parent.ckpt"
    shutil.copy(d_ckpt, parent)
    # the child config lists only what changes (as experiments/dt.yaml does); the rest comes from D's hparams
    dt = DecoderStage(unet={"temporal": True, "fps_cond": True}, clip_ckpt=clip_ckpt, init_from=str(parent), **FAST)
    assert dt.hparams.unet == {**UNET, "image_embed_dim": 16, "temporal": True, "fps_cond": True}  # resolved
    assert dt.hparams.init_from is None and dt.hparams.parent_ckpt == str(parent)
    assert dt.init_report.ok and dt.diffusion.objective == "v"  # D's default, resolved into both hparams
    assert dt.hparams.diffusion == {"objective": "v", "min_snr_gamma": 5.0, "clip_sample": 1.0}

    trainer = fit_batches(dt, [video_batch()], steps=1, default_root_dir=tmp_path)
    trainer.save_checkpoint(tmp_path / "dt.ckpt")
    parent.unlink()  # loading a child never needs its parent
    reloaded = DecoderStage.load_from_checkpoint(tmp_path / "dt.ckpt")
    assert reloaded.unet.temporal and reloaded.unet.fps_cond
    assert all(torch.equal(v, dt.state_dict()[k]) for k, v in reloaded.state_dict().items())


def test_fused_adamw_except_under_fp16_loss_scaling_with_clipping() -> None:
    """Lightning refuses to clip the gradients of an optimizer that unscales them itself (fused, with GradScaler)."""
    stage = DecoderStage(unet=UNET, **FAST)
    trainer = cpu_trainer(gradient_clip_val=1.0)
    stage.trainer = trainer
    assert stage.configure_optimizers()["optimizer"].defaults["fused"]  # fp32 / bf16: no scaler
    trainer.precision_plugin.scaler = torch.amp.GradScaler("cpu")  # what 16-mixed sets up on a GPU
    optimizer = stage.configure_optimizers()["optimizer"]
    assert not optimizer.defaults["fused"] and optimizer.defaults["foreach"]
    trainer.gradient_clip_val = None
    assert stage.configure_optimizers()["optimizer"].defaults["fused"]  # no clipping: fused works with the scaler
