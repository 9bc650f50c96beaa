"""SuperResStage: SR_l overfit and noise augmentation, SR_h crops and per-frame identical noise, SR_t from SR_l,
checkpoints, media."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_mav.checkpoints import CheckpointError
from lightning_mav.nn.unet import is_temporal_name
from lightning_mav.pipeline import load_stage
from lightning_mav.stages.base import trainable_names
from lightning_mav.stages.superres import SuperResStage, resize, window_starts, windowed_frames
from tests.helpers import TINY_UNET, fit_batches

UNET = {**TINY_UNET, "norm_groups": 8}
SR = {"lowres_size": 8, "highres_size": 16, "sample_steps": 3, "media_batch_size": 2, "warmup_steps": 0}

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def images(n: int = 4, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(n)) * 2 - 1


def unet_inputs(stage: SuperResStage) -> list[dict]:
    """Record what the stage feeds its U-Net."""
    seen: list[dict] = []
    stage.unet.register_forward_pre_hook(lambda m, args, kw: seen.append({"x": args[0], "t": args[1], **kw}),
                                         with_kwargs=True)
    return seen


@pytest.fixture(scope="module")
def sr_l_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An SR_l checkpoint written by a 2-step Lightning run (train/val on the text-image batch format)."""
    tmp = tmp_path_factory.mktemp("sr_l")
    stage = SuperResStage(unet=UNET, **SR)
    batch = {"image": images(), "caption": ["a red circle"] * 4, "key": list("abcd")}
    trainer = fit_batches(stage, [batch], steps=2, default_root_dir=tmp)
    assert {"train/loss", "val/loss"} <= set(trainer.callback_metrics)
    trainer.save_checkpoint(tmp / "sr_l.ckpt")
    return str(tmp / "sr_l.ckpt")


def test_sr_overfits_one_batch() -> None:
    stage = SuperResStage(unet=UNET, diffusion={"objective": "v"}, lr=3e-3, **SR)
    optimizer = stage.configure_optimizers()["optimizer"]
    batch = {"image": images()}
    stage.train()
    losses = []
    for _ in range(200):
        loss, _ = stage.compute_loss(batch, generator=torch.Generator().manual_seed(0))  # fixed t, noise, level
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if losses[-1] < losses[0] / 10:
            break
    assert losses[-1] < losses[0] / 10, losses[::10]


def test_training_conditions_on_the_noised_downsample() -> None:
    stage = SuperResStage(unet=UNET, lowres_noise_max=0.5, **SR)
    seen = unet_inputs(stage)
    hr = images(8, size=32)  # data at another size is resized to highres_size first
    stage.compute_loss({"image": hr}, generator=torch.Generator().manual_seed(0))
    x = seen[0]
    assert x["x"].shape == (8, 3, 16, 16) and x["lowres"].shape == (8, 3, 8, 8)
    levels = x["lowres_noise_level"]
    assert levels.shape == (8,) and (levels >= 0).all() and (levels <= 0.5 * 999).all() and levels.unique().numel() > 1
    # level 0 items see the clean downsample; the others a noised one
    clean = resize(resize(hr, 16), 8)
    for i, level in enumerate(levels):
        assert torch.allclose(x["lowres"][i], clean[i], atol=1e-6) == (level == 0)


def test_sr_h_trains_on_crops_of_the_highres() -> None:
    stage = SuperResStage(unet=UNET, lowres_size=8, highres_size=32, crop_size=16, sample_steps=2)
    seen = unet_inputs(stage)
    stage.compute_loss({"image": images(3, size=32)})
    assert seen[0]["x"].shape == (3, 3, 16, 16) and seen[0]["lowres"].shape == (3, 3, 4, 4)
    crops = stage.random_crop(torch.arange(2 * 32 * 32.0).view(2, 1, 32, 32), torch.Generator().manual_seed(0))
    assert crops.shape == (2, 1, 16, 16) and (crops[:, :, 1:] - crops[:, :, :-1] == 32).all()  # contiguous windows
    # sampling runs on the full image: 16 -> 64 at the 4x factor
    assert stage.sample(images(1, size=16), steps=2).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="crop_size"):
        SuperResStage(unet=UNET, lowres_size=8, highres_size=32, crop_size=18)


def test_sampling_noise_is_given_per_frame_and_deterministic() -> None:
    stage = SuperResStage(unet=UNET, **SR).eval()
    with torch.no_grad():  # a non-trivial network (zero-init output would make every sample equal the noise path)
        for p in stage.unet.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    frames = images(3, size=8)
    seen = unet_inputs(stage)
    # SR_h: the pipeline gives the same initial noise to every frame; the stage must use exactly that
    noise = torch.randn(1, 3, 16, 16).expand(3, -1, -1, -1)
    out = stage.sample(frames, noise=noise, noise_level=0.0, steps=2)
    assert out.shape == (3, 3, 16, 16)
    assert torch.equal(seen[0]["x"], noise) and torch.equal(seen[0]["lowres"], frames)  # level 0: clean input
    assert torch.equal(seen[0]["lowres_noise_level"], torch.zeros(3))
    other = stage.sample(frames, noise=torch.randn(3, 3, 16, 16), noise_level=0.0, steps=2)
    assert not torch.allclose(out, other)
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    a = stage.sample(frames, generator=g(), steps=2)
    assert torch.equal(a, stage.sample(frames, generator=g(), steps=2))
    assert torch.equal(seen[-1]["lowres_noise_level"], torch.full((3,), round(0.1 * 999.0)))  # default sample level


def test_checkpoint_reload_and_media(sr_l_ckpt: str) -> None:
    ckpt = torch.load(sr_l_ckpt, map_location="cpu", weights_only=True)
    assert all(k.startswith("unet.") for k in ckpt["state_dict"])
    stage = SuperResStage.load_from_checkpoint(sr_l_ckpt)
    assert stage.factor == 2 and stage.hparams.lowres_noise_sample == 0.1
    assert all(torch.equal(v, ckpt["state_dict"][k]) for k, v in stage.state_dict().items())
    stage.set_media_batch({"image": images(3)})
    media = stage.log_media()
    assert {k: tuple(v.shape) for k, v in media.items()} == {
        "samples": (2, 3, 16, 16), "lowres": (2, 3, 16, 16), "target": (2, 3, 16, 16)}


def test_sr_t_from_sr_l_on_video(sr_l_ckpt: str) -> None:
    stage = SuperResStage(unet={"temporal": True}, init_from=sr_l_ckpt, freeze_spatial=True, **SR)  # as sr_t.yaml
    assert stage.init_report.ok and all(is_temporal_name(n) for n in stage.init_report.new)
    assert stage.hparams.unet == {**UNET, "temporal": True} and stage.hparams.init_from is None
    names = trainable_names(stage)
    assert names and all(is_temporal_name(n.removeprefix("unet.")) for n in names)
    seen = unet_inputs(stage)
    video = torch.rand(2, 3, 3, 16, 16) * 2 - 1  # [B, F, 3, H, W]
    loss, n = stage.compute_loss({"video": video, "fps": torch.tensor([8.0, 8.0])})
    loss.backward()
    assert n == 2 and seen[0]["x"].shape == (2, 3, 3, 16, 16) and seen[0]["lowres"].shape == (2, 3, 3, 8, 8)
    assert stage.sample(torch.rand(1, 3, 3, 8, 8) * 2 - 1, steps=2).shape == (1, 3, 3, 16, 16)

    # at init SR_t is SR_l on every frame
    sr_l = SuperResStage.load_from_checkpoint(sr_l_ckpt).eval()
    x, low = torch.randn(1, 3, 3, 16, 16), torch.randn(1, 3, 3, 8, 8)
    t, level = torch.tensor([300]), torch.tensor([100.0])
    with torch.no_grad():
        video_out = stage.eval().unet(x, t, lowres=low, lowres_noise_level=level)
        frame_out = sr_l.unet(x[0].transpose(0, 1), t.expand(3), lowres=low[0].transpose(0, 1),
                              lowres_noise_level=level.expand(3))
    torch.testing.assert_close(video_out[0].transpose(0, 1), frame_out, atol=1e-5, rtol=0)


def test_wrong_parent_checkpoint_fails_clearly(sr_l_ckpt: str, tmp_path: Path) -> None:
    # an SR checkpoint is not a parent of D_t (no lowres input there; different conv_in)
    from lightning_mav.stages.decoder import DecoderStage

    with pytest.raises(CheckpointError, match="not a parent"):
        DecoderStage(unet={**UNET, "temporal": True}, init_from=sr_l_ckpt, image_size=8)
    with pytest.raises(CheckpointError, match="not found"):
        SuperResStage(unet=UNET, init_from=str(tmp_path / "missing.ckpt"), **SR)


def test_residual_diffuses_the_detail_over_bicubic(sr_l_ckpt: str, tmp_path: Path) -> None:
    hr = images(4, size=16)
    lowres = resize(hr, 8)
    bicubic = resize(lowres, 16, mode="bicubic").clamp(-1, 1)
    for residual in (True, False):
        stage = SuperResStage(unet=UNET, residual=residual, **SR)
        targets: list[torch.Tensor] = []

        def loss(fn, x0, _seen=targets, _loss=stage.diffusion.loss, **kw):
            _seen.append(x0)
            return _loss(fn, x0, **kw)

        stage.diffusion.loss = loss
        stage.compute_loss({"image": hr}, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(targets[0], hr - bicubic if residual else hr, atol=1e-6)
        # sampling adds the diffused residual back onto the upsampled input: a zero residual gives bicubic
        stage.diffusion.sample = lambda fn, shape, **kw: torch.zeros(shape)
        out = stage.sample(lowres, steps=1)
        assert torch.allclose(out, bicubic if residual else torch.zeros_like(out), atol=1e-6)
    assert SuperResStage(unet=UNET, **SR).residual  # the default
    # a child keeps its parent's parameterisation unless it sets its own; a parent saved without one had none
    assert SuperResStage(unet={"temporal": True}, init_from=sr_l_ckpt, **SR).residual
    ckpt = torch.load(sr_l_ckpt, map_location="cpu", weights_only=True)
    for name, hparams in (("plain", {**ckpt["hyper_parameters"], "residual": False}),
                          ("legacy", {k: v for k, v in ckpt["hyper_parameters"].items() if k != "residual"})):
        torch.save({**ckpt, "hyper_parameters": hparams}, tmp_path / f"{name}.ckpt")
        child = SuperResStage(unet={"temporal": True}, init_from=str(tmp_path / f"{name}.ckpt"), **SR)
        assert not child.residual and child.hparams.residual is False
    forced = SuperResStage(unet={"temporal": True}, init_from=str(tmp_path / "plain.ckpt"), residual=True, **SR)
    assert forced.residual and SuperResStage.load_from_checkpoint(sr_l_ckpt).residual
    # inference (the pipeline) samples a checkpoint the way it was trained, a legacy one without the residual
    assert load_stage(SuperResStage, sr_l_ckpt, stage="SR_h").residual
    assert not load_stage(SuperResStage, tmp_path / "legacy.ckpt", stage="SR_h").residual
    # and so do Lightning's own loaders (load_from_checkpoint; resume calls the same on_load_checkpoint)
    legacy = SuperResStage.load_from_checkpoint(tmp_path / "legacy.ckpt")
    assert not legacy.residual and legacy.hparams.residual is False


def test_windowed_frames_cross_fade_covers_every_frame_once() -> None:
    x = torch.randn(2, 3, 11, 4, 4)
    calls: list[tuple[int, int]] = []

    def per_frame(v: torch.Tensor, start: int, stop: int) -> torch.Tensor:  # frame-local: windows cannot change it
        calls.append((start, stop))
        return v * 2 + 1

    for window, overlap in ((4, 0), (4, 1), (5, 2), (6, 5), (11, 3), (20, 3)):
        calls.clear()
        out = windowed_frames(per_frame, x, window, overlap)
        torch.testing.assert_close(out, x * 2 + 1, rtol=0, atol=1e-6)  # the blend weights sum to 1 on every frame
        assert calls[0][0] == 0 and calls[-1][1] == 11 and all(b - a == min(window, 11) for a, b in calls)
        assert all(prev[1] - nxt[0] >= overlap for prev, nxt in zip(calls, calls[1:]))
    assert window_starts(11, 4, 1) == [0, 3, 6, 7] and window_starts(76, 16, 4) == [0, 12, 24, 36, 48, 60]
    # a window's output reaches its neighbour's frames only through the linear cross-fade
    index = torch.arange(8.0).view(1, 1, 8, 1, 1)
    out = windowed_frames(lambda v, a, b: torch.full_like(v, float(a)), index, 5, 2)  # window 0 says 0, window 3 says 3
    assert out.flatten().tolist() == pytest.approx([0, 0, 0, 1, 2, 3, 3, 3])
    with pytest.raises(ValueError, match="chunk_overlap must be in"):
        windowed_frames(per_frame, x, 4, 4)


def test_sr_t_samples_in_overlapping_frame_windows(sr_l_ckpt: str) -> None:
    stage = SuperResStage(unet={"temporal": True}, init_from=sr_l_ckpt, **SR).eval()
    with torch.no_grad():  # temporal layers that are not the identity, so a window changes the result
        for name, p in stage.unet.named_parameters():
            if is_temporal_name(name):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    low = torch.rand(1, 3, 10, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    seen = unet_inputs(stage)
    whole = stage.sample(low, generator=g(), steps=2)
    assert [s["x"].shape[2] for s in seen] == [10, 10]
    # a window as long as the clip is the unchunked call itself
    assert torch.equal(stage.sample(low, generator=g(), steps=2, frame_chunk=10), whole)
    assert torch.equal(stage.sample(low, generator=g(), steps=2, frame_chunk=32), whole)
    seen.clear()
    chunked = stage.sample(low, generator=g(), steps=2, frame_chunk=4, chunk_overlap=2)
    assert [s["x"].shape[2] for s in seen] == [4] * 8  # 4 windows (starts 0, 2, 4, 6) per step, one state
    assert torch.equal(seen[0]["lowres"][:, :, 2:], seen[1]["lowres"][:, :, :2])  # each window its own low-res frames
    diff = (chunked - whole).abs()
    assert 0 < diff.max() < 0.5 and diff.mean() < 0.05  # an approximation of the whole-clip call, not a new video
    stage.frame_chunk, stage.chunk_overlap = 4, 2  # the stage's defaults are what sample() uses
    assert torch.equal(stage.sample(low, generator=g(), steps=2), chunked)
    with pytest.raises(ValueError, match="chunk_overlap must be below frame_chunk"):
        stage.sample(low, steps=1, frame_chunk=4, chunk_overlap=4)
    with pytest.raises(ValueError, match="frame_chunk must be a positive integer"):
        SuperResStage(unet=UNET, frame_chunk=0, **SR)


def test_final_denoise_runs_the_unet_once_more_at_its_timestep() -> None:
    """``final_denoise: k`` (docs/choices.md#sr-stages-final-denoising-step): the sampler's steps, then one U-Net
    call at t = k on the result, and the residual x0 it implies over bicubic."""
    stage = SuperResStage(unet=UNET, final_denoise=10, **SR).eval()
    with torch.no_grad():
        for p in stage.unet.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    seen = unet_inputs(stage)
    frames, noise = images(2, size=8), torch.randn(2, 3, 16, 16)
    out = stage.sample(frames, noise=noise, noise_level=0.0)
    assert [int(call["t"][0]) for call in seen][-1] == 10 and len(seen) == SR["sample_steps"] + 1
    fn, t = stage.model_fn(frames, torch.zeros(2), sampling=True), torch.full((2,), 10)
    with torch.no_grad():
        residual = stage.diffusion.sample(fn, noise=noise, steps=SR["sample_steps"], sampler=stage.sampler)
        x0 = stage.diffusion.predict_x0(residual, t, fn(residual, t)).clamp(-1, 1)
    torch.testing.assert_close(out, (x0 + stage.base(frames, (16, 16))).clamp(-1, 1))


def test_final_denoise_out_of_range_fails_at_construction() -> None:
    with pytest.raises(ValueError, match=r"^final_denoise must be a timestep in \[0, 1000\) or null, got 1000$"):
        SuperResStage(unet=UNET, final_denoise=1000, **SR)
