"""The video chain D -> D_t -> ↑F: identity at init, clear errors for wrong parents, ↑F's masks, windows, training."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from lightning_mav.checkpoints import CheckpointError
from lightning_mav.nn.motion import phase_shift, translate
from lightning_mav.pipeline import load_stage
from lightning_mav.stages.decoder import DecoderStage
from lightning_mav.stages.interpolation import (
    BASELINES,
    InterpolationStage,
    extrapolation_mask,
    interpolation_mask,
    linear_blend,
    mask_condition,
    motion_blend,
    random_masks,
)
from lightning_mav.stages.superres import SuperResStage
from tests.helpers import TINY_UNET, fit

# Two levels with attention, so the temporal convolutions *and* the temporal attention are exercised.
D_UNET = {**TINY_UNET, "image_embed_dim": 8}
DT_UNET = {**D_UNET, "temporal": True, "fps_cond": True}


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def perturb(module: torch.nn.Module, names: str = "", scale: float = 0.05) -> None:
    """Stand-in for training: move every parameter whose name contains ``names`` off its init.

    Without it the zero-initialised output convolution makes every network output 0 and the identities trivial.
    """
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if names in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def save_stage(stage: pl.LightningModule, path: Path) -> str:
    """What a Lightning checkpoint holds for a stage (state_dict with the ``unet.`` prefix, hyperparameters)."""
    torch.save({"state_dict": stage.state_dict(), "hyper_parameters": dict(stage.hparams),
                "pytorch-lightning_version": pl.__version__}, path)
    return str(path)


def inputs(b: int = 2, f: int = 4, size: int = 16) -> dict:
    g = torch.Generator().manual_seed(2)
    return {"video": torch.randn(b, 3, f, size, size, generator=g), "t": torch.tensor([3, 700])[:b],
            "y_e": F.normalize(torch.randn(b, 8, generator=g), dim=-1), "fps": torch.tensor([2.0, 24.0])[:b]}


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A (perturbed) D, the D_t initialised from it and then perturbed, and their checkpoints."""
    tmp = tmp_path_factory.mktemp("chain")
    D = DecoderStage(unet=D_UNET, image_size=16).eval()
    perturb(D.unet)
    d_ckpt = save_stage(D, tmp / "d.ckpt")
    D_t = DecoderStage(unet=DT_UNET, image_size=16, init_from=d_ckpt).eval()
    trained_D_t = DecoderStage(unet=DT_UNET, image_size=16, init_from=d_ckpt).eval()
    perturb(trained_D_t.unet, "temporal")
    perturb(trained_D_t.unet, "fps_")
    return {"D": D, "d_ckpt": d_ckpt, "D_t": D_t, "trained_D_t": trained_D_t,
            "dt_ckpt": save_stage(trained_D_t, tmp / "dt.ckpt"), "tmp": tmp}


# ----------------------------------------------------------------------------------------------------- D -> D_t
def test_dt_from_d_is_d_on_every_frame_with_fps_conditioning(chain: dict) -> None:
    D, D_t, x = chain["D"], chain["D_t"], inputs()
    report = D_t.init_report
    assert report.ok and sorted(report.loaded) == sorted(D.unet.state_dict())
    assert report.new and all("temporal" in n or n.startswith("fps_") for n in report.new)
    assert any(n.startswith("fps_") for n in report.new)
    with torch.no_grad():
        video_out = D_t.unet(x["video"], x["t"], image_embed=x["y_e"], fps=x["fps"])
        per_frame = torch.stack([D.unet(x["video"][:, :, i], x["t"], image_embed=x["y_e"])
                                 for i in range(x["video"].shape[2])], dim=2)
    assert video_out.abs().max() > 0.1  # a real output, not the zero-init's zeros
    assert (video_out - per_frame).abs().max() <= 1e-5

    # the fps path is live: once its (zero-init) last layer moves, the frame rate changes the output
    trained = chain["trained_D_t"]
    with torch.no_grad():
        a = trained.unet(x["video"], x["t"], image_embed=x["y_e"], fps=x["fps"])
        b = trained.unet(x["video"], x["t"], image_embed=x["y_e"], fps=x["fps"] * 3)
    assert (a - b).abs().max() > 1e-4


def test_wrong_parent_checkpoints_are_clear_errors(chain: dict) -> None:
    tmp = chain["tmp"]
    sr = SuperResStage(unet={k: v for k, v in D_UNET.items() if k != "image_embed_dim"}, lowres_size=8,
                       highres_size=16)
    sr_ckpt = save_stage(sr, tmp / "sr.ckpt")
    # an SR checkpoint given to D_t: different input width, no image conditioning, low-res noise embedding
    with pytest.raises(CheckpointError, match=r"sr\.ckpt: not a parent of this network — missing .*image_embed"
                                              r".*unexpected .*lowres_noise_embed.*shape-mismatched .*conv_in"):
        DecoderStage(unet=DT_UNET, init_from=sr_ckpt)
    # ↑F accepts only its extra_in as new: a D checkpoint (no temporal layers) is refused, naming them
    with pytest.raises(CheckpointError, match=r"not a parent .* missing \d+ \[fps_embed.*only new extra"):
        InterpolationStage(unet=DT_UNET, init_from=chain["d_ckpt"])
    with pytest.raises(CheckpointError, match=r"checkpoint not found: .*nope\.ckpt"):
        InterpolationStage(unet=DT_UNET, init_from=str(tmp / "nope.ckpt"))


# ----------------------------------------------------------------------------------------------------- D_t -> ↑F
def test_up_F_at_init_is_D_t(chain: dict) -> None:
    D_t, x = chain["trained_D_t"], inputs(f=6)
    up_F = InterpolationStage(unet=DT_UNET, image_size=16, init_from=chain["dt_ckpt"]).eval()
    assert up_F.init_report.new == ["extra_in.weight"] and up_F.unet.extra_in.in_channels == 4
    known = random_masks(2, 6, (2,), 0.0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = D_t.unet(x["video"], x["t"], image_embed=x["y_e"], fps=x["fps"])
        fn = up_F.model_fn(x["y_e"], fps=x["fps"], frames=torch.randn_like(x["video"]), known=known)
        got = fn(x["video"], x["t"])
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_masks_and_condition_channels() -> None:
    assert interpolation_mask(16, 5).nonzero().flatten().tolist() == [0, 5, 10, 15]
    assert interpolation_mask(7, 3, offset=1).nonzero().flatten().tolist() == [1, 4]
    assert extrapolation_mask(5, 2, "forward").tolist() == [True, True, False, False, False]
    assert extrapolation_mask(5, 2, "backward").tolist() == [False, False, False, True, True]

    masks = random_masks(256, 16, (2, 5), 0.25, torch.Generator().manual_seed(0))
    counts = masks.sum(1)
    assert masks.shape == (256, 16) and (counts >= 1).all() and (counts <= 15).all()
    contiguous = [m for m in masks if m[0] != m[-1] and (m.int().diff().abs().sum() == 1)]  # prefix / suffix
    assert 30 < len(contiguous) < 100  # ~25% extrapolation (a few interpolation masks also look like that: none)
    strided = [m for m in masks if m.sum() >= 2 and len(set(m.nonzero().flatten().diff().tolist())) == 1
               and m.nonzero().flatten().diff()[0] in (2, 5)]
    assert len(strided) > 150

    video = torch.rand(2, 3, 4, 5, 5) * 2 - 1
    known = torch.tensor([[True, False, False, True], [False, True, False, False]])
    extra = mask_condition(video, known)
    assert extra.shape == (2, 4, 4, 5, 5)
    assert torch.equal(extra[0, :3, 0], video[0, :, 0]) and (extra[0, :3, 1] == 0).all()
    assert torch.equal(extra[:, 3, :, 0, 0], known.float())


def test_loss_counts_only_unknown_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    batch = {"video": torch.rand(2, 6, 3, 8, 8) * 2 - 1, "fps": torch.tensor([4.0, 8.0])}
    for loss_on_known, low, high in ((False, 0.5, 2.0), (True, 1e4, 1e7)):
        stage = InterpolationStage(unet={"dim": 8, "dim_mults": (1,), "num_res_blocks": 1, "attn_levels": ()},
                                   diffusion={"objective": "eps"}, skips=(2,), loss_on_known=loss_on_known)
        # a network that is exactly wrong (1000) on known frames and predicts 0 elsewhere (eps objective)
        monkeypatch.setattr(stage.unet, "forward", lambda x, t, extra=None, **kw: extra[:, 3:4].expand_as(x) * 1e3)
        loss, _ = stage.compute_loss(batch, generator=torch.Generator().manual_seed(0))
        assert low < loss.item() < high  # unknown only: ~E[eps^2] = 1; all frames: dominated by the 1000s


def test_media_shows_the_known_frames_the_samples_and_the_clips() -> None:
    stage = InterpolationStage(unet={"dim": 8, "dim_mults": (1,), "num_res_blocks": 1, "attn_levels": (),
                                     "fps_cond": True}, skips=(2, 3), sample_steps=1, media_batch_size=2).eval()
    video = torch.rand(3, 7, 3, 8, 8) * 2 - 1
    stage.set_media_batch({"video": video, "fps": torch.tensor([4.0, 8.0, 12.0])})
    media = stage.log_media()
    assert set(media) == {"samples", "known", "reference"}
    assert all(v.shape == (2, 3, 7, 8, 8) for v in media.values())
    clips = video[:2].transpose(1, 2)
    assert torch.equal(media["samples"][:, :, ::3], clips[:, :, ::3])  # every max(skips)-th frame given
    assert (media["known"][:, :, 1] == 0).all() and torch.equal(media["reference"], clips)


# ----------------------------------------------------------------------------------------------------- sampling
def spy_unet(stage: InterpolationStage) -> list[dict]:
    calls: list[dict] = []
    stage.unet.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append({"x": args[0].clone(), "t": args[1].clone(), **kwargs}), with_kwargs=True)
    return calls


def test_interpolate_16_to_76_in_windows_keeping_known_frames(chain: dict) -> None:
    up_F = InterpolationStage(unet=DT_UNET, image_size=16, num_frames=16, init_from=chain["dt_ckpt"]).eval()
    calls = spy_unet(up_F)
    video, y_e = torch.rand(1, 3, 16, 16, 16) * 2 - 1, inputs(1)["y_e"]
    out = up_F.interpolate(video, 5, image_embed=y_e, fps=6.0, steps=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 3, 76, 16, 16)
    assert torch.equal(out[:, :, ::5], video)  # the given frames, exactly
    assert torch.isfinite(out).all() and (out[:, :, 1::5] != 0).any()
    # 5 windows of 16 frames (4 known at skip 5) in one batch, conditioned on the output rate 6·5 fps
    assert len(calls) == 2 and calls[0]["x"].shape == (5, 3, 16, 16, 16)
    assert torch.equal(calls[0]["extra"][:, 3, :, 0, 0], interpolation_mask(16, 5).float().expand(5, 16))
    assert torch.equal(calls[0]["fps"], torch.full((5,), 30.0))

    # any length works: 7 frames at skip 3 -> 19 frames, from a full window and one shifted back to the end
    calls.clear()
    out = up_F.interpolate(video[:, :, :7], 3, image_embed=y_e, steps=1)
    assert out.shape[2] == 19 and torch.equal(out[:, :, ::3], video[:, :, :7])
    assert calls[0]["x"].shape[:3] == (2, 3, 16)
    with pytest.raises(ValueError, match="skip 16 needs windows"):
        up_F.interpolate(video, 16, image_embed=y_e, steps=1)


@pytest.mark.parametrize("residual", [True, False])
def test_known_frames_are_written_back_into_x_t(chain: dict, residual: bool) -> None:
    up_F = InterpolationStage(unet=DT_UNET, image_size=16, init_from=chain["dt_ckpt"], residual=residual).eval()
    calls = spy_unet(up_F)
    video, y_e = torch.rand(1, 3, 6, 16, 16) * 2 - 1, inputs(1)["y_e"]
    known, noise = interpolation_mask(6, 5), torch.randn(1, 3, 6, 16, 16)
    out = up_F.sample(y_e, video=video, known=known, noise=noise, steps=3)
    assert torch.equal(out[:, :, known], video[:, :, known])
    # at every step the network sees the known frames at that step's noise level: the frames themselves, or with
    # residual their difference to the linear blend, which is 0 there
    modelled = torch.zeros_like(video) if residual else video
    for i, call in enumerate(calls):
        expected = up_F.diffusion.q_sample(modelled, call["t"], noise)
        torch.testing.assert_close(call["x"][:, :, known], expected[:, :, known])
        if i:  # (the first call sees the initial noise everywhere)
            assert not torch.allclose(call["x"][:, :, ~known], expected[:, :, ~known])


def test_residual_diffuses_the_difference_to_the_linear_blend(monkeypatch: pytest.MonkeyPatch) -> None:
    ramp = torch.arange(6.0).view(1, 1, 6, 1, 1).expand(2, 2, 6, 1, 1).clone()
    ramp[1] = ramp[1] ** 2
    known = torch.tensor([[False, True, False, False, True, False], [True, False, False, False, False, True]])
    blend = linear_blend(ramp, known)[:, 0, :, 0, 0]
    torch.testing.assert_close(blend[0], torch.tensor([1.0, 1.0, 2.0, 3.0, 4.0, 4.0]))  # nearest known at the ends
    torch.testing.assert_close(blend[1], torch.tensor([0.0, 5.0, 10.0, 15.0, 20.0, 25.0]))  # known ones unchanged
    assert not linear_blend(ramp, torch.zeros(2, 6, dtype=torch.bool)).any()
    # training target: the clip minus the blend of its known frames (so exactly 0 at the known ones)
    stage = InterpolationStage(unet={"dim": 8, "dim_mults": (1,), "num_res_blocks": 1, "attn_levels": ()},
                               image_size=8, num_frames=6, sample_steps=2)
    targets: list[torch.Tensor] = []
    original = stage.diffusion.loss
    monkeypatch.setattr(stage.diffusion, "loss", lambda fn, x0, **kw: targets.append(x0) or original(fn, x0, **kw))
    batch = {"video": torch.rand(2, 6, 3, 8, 8) * 2 - 1, "fps": torch.tensor([8.0, 8.0])}
    masks = random_masks(2, 6, stage.skips, stage.extrapolation_prob, torch.Generator().manual_seed(0))
    stage.compute_loss(batch, generator=torch.Generator().manual_seed(0))
    x0 = rearrange(batch["video"], "b f c h w -> b c f h w")
    torch.testing.assert_close(targets[0], x0 - linear_blend(x0, masks))


@pytest.mark.parametrize("baseline", ["linear", "motion"])
def test_start_at_blend_samples_the_baseline_from_a_trained_D_t(chain: dict, baseline: str) -> None:
    """x0 objective + ``start_at_blend``: the trained D_t's output layer is zeroed, so ↑F's sample at init is exactly
    the baseline blend of the known frames, whatever the noise; the v-objective ↑F from the same D_t is not."""
    video = torch.rand(2, 3, 6, 16, 16) * 2 - 1
    known = interpolation_mask(6, 5)
    blend = BASELINES[baseline](video, known.expand(2, 6))
    y_e = inputs()["y_e"]
    x0_diffusion = {"objective": "x0"}
    up_F = InterpolationStage(unet=DT_UNET, image_size=16, init_from=chain["dt_ckpt"], diffusion=x0_diffusion,
                              start_at_blend=True, sample_steps=3, baseline=baseline).eval()
    assert up_F.unet.out_conv.temporal.weight.abs().sum() > 0  # kept: the spatial part's gradient flows through it
    for seed in (0, 1):
        out = up_F.sample(y_e, video=video, known=known, fps=8.0, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(out, blend.clamp(-1, 1), rtol=0, atol=1e-6)
    plain = InterpolationStage(unet=DT_UNET, image_size=16, init_from=chain["dt_ckpt"], sample_steps=3).eval()
    out = plain.sample(y_e, video=video, known=known, fps=8.0, generator=torch.Generator().manual_seed(0))
    assert (out - blend).abs().max() > 0.05


def moving_square(frames: int, step: tuple[int, int], start: tuple[int, int] = (4, 4), size: int = 32,
                  side: int = 6) -> Tensor:
    """A red square on gray moving ``step`` = (dy, dx) pixels per frame: ``[1, 3, frames, size, size]`` in [-1, 1]."""
    video = torch.full((1, 3, frames, size, size), -0.2)
    for t in range(frames):
        y, x = start[0] + step[0] * t, start[1] + step[1] * t
        video[0, :, t, y:y + side, x:x + side] = torch.tensor([1.0, -1.0, -1.0])[:, None, None]
    return video


def test_motion_blend_puts_a_moving_object_where_it_is() -> None:
    """A square moving (1, 2) px per frame, every 5th frame known: the motion-compensated blend is the real in-between
    frame (one object), the linear blend two half-strength copies; known frames come back exactly, frames past the
    last known one hold it, and with no motion the two blends agree."""
    video = moving_square(13, (1, 2))
    known = interpolation_mask(13, 5)[None]  # frames 0, 5, 10
    moved, faded = motion_blend(video, known), linear_blend(video, known)
    torch.testing.assert_close(moved[:, :, :11], video[:, :, :11], rtol=0, atol=1e-5)
    assert (faded[:, :, 2] - video[:, :, 2]).abs().max() > 0.5
    torch.testing.assert_close(moved[:, :, known[0]], video[:, :, known[0]], rtol=0, atol=0)
    torch.testing.assert_close(moved[:, :, 11:], video[:, :, 10:11].expand(-1, -1, 2, -1, -1), rtol=0, atol=0)
    still = video[:, :, :1].expand(-1, -1, 13, -1, -1) + 0.1 * torch.rand(1, 3, 1, 32, 32)
    torch.testing.assert_close(motion_blend(still, known), linear_blend(still, known), rtol=0, atol=1e-5)
    assert not motion_blend(video, torch.zeros_like(known)).any()


def test_phase_shift_finds_the_translation_between_two_frames() -> None:
    """Integer and half-pixel translations of a square are recovered (sign: ``translate(a, d)`` is ``b``); a flat
    frame has no translation."""
    a = moving_square(1, (0, 0), start=(10, 7))[:, :, 0]
    for d in ([3.0, -2.0], [-7.0, 4.0], [0.0, 0.0], [1.5, -0.5]):
        shift = torch.tensor([d])
        found = phase_shift(a, translate(a, shift))
        torch.testing.assert_close(found, shift, rtol=0, atol=0.05 if 0.5 in map(abs, d) else 1e-4)
    assert not phase_shift(torch.zeros(1, 3, 8, 8), a[:, :, :8, :8]).any()


def test_baseline_must_be_known() -> None:
    with pytest.raises(ValueError, match=r"^baseline must be one of \['linear', 'motion'\], got 'flow'$"):
        InterpolationStage(unet=DT_UNET, image_size=16, baseline="flow")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({}, "objective 'v'"), ({"diffusion": {"objective": "x0"}, "residual": False}, "residual False")])
def test_start_at_blend_needs_the_x0_objective_and_residual(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"^start_at_blend needs residual: true and diffusion objective x0 .*{message}"):
        InterpolationStage(unet=DT_UNET, image_size=16, start_at_blend=True, **kwargs)


def test_a_checkpoint_saved_before_residual_loads_as_not_residual(chain: dict, tmp_path: Path) -> None:
    up_F = InterpolationStage(unet=DT_UNET, image_size=16, init_from=chain["dt_ckpt"])
    assert load_stage(InterpolationStage, save_stage(up_F, tmp_path / "new.ckpt"), stage="up_F").residual
    up_F.hparams.pop("residual")
    legacy = save_stage(up_F, tmp_path / "legacy.ckpt")
    assert not load_stage(InterpolationStage, legacy, stage="up_F").residual
    # Lightning's loader too: load_from_checkpoint (and a resume) go through on_load_checkpoint
    assert InterpolationStage.load_from_checkpoint(tmp_path / "new.ckpt").residual
    loaded = InterpolationStage.load_from_checkpoint(legacy)
    assert not loaded.residual and loaded.hparams.residual is False


def test_extend_forwards_and_backwards(chain: dict) -> None:
    up_F = InterpolationStage(unet=DT_UNET, image_size=16, num_frames=8, init_from=chain["dt_ckpt"]).eval()
    video, y_e = torch.rand(1, 3, 5, 16, 16) * 2 - 1, inputs(1)["y_e"]
    forward = up_F.extend(video, 7, "forward", image_embed=y_e, fps=8.0, steps=1)  # windows: 4 known + 4, then + 3
    assert forward.shape[2] == 12 and torch.equal(forward[:, :, :5], video)
    backward = up_F.extend(video, 7, "backward", image_embed=y_e, fps=8.0, steps=1)
    assert backward.shape[2] == 12 and torch.equal(backward[:, :, -5:], video)
    assert not torch.equal(forward[:, :, 5:], backward[:, :, :7])


# ----------------------------------------------------------------------------------------------------- training
def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    return (10 * torch.log10(4 / F.mse_loss(a, b))).item()


def test_up_F_learns_to_interpolate_shapes_clips(shapes_root: Path) -> None:
    """A couple of hundred steps on Moving Shapes clips (12 px, 5 frames, every 2nd known): on held-out clips the
    in-between frames beat repeating the nearest known frame, and the known frames come back untouched."""
    from datamodules.video import VideoDataModule
    from lightning_mav.callbacks import EMAWeightAveraging

    pl.seed_everything(0, verbose=False)
    # low frame rates (2-5 fps) move the shapes far between frames: repeating a frame is then clearly wrong
    data = VideoDataModule(root=str(shapes_root), num_frames=5, video_size=12, fps_min=2, fps_max=5, batch_size=8)
    data.setup("fit")
    train = list(itertools.islice(iter(data.train_dataloader()), 16))  # decoded once, reshuffled every epoch
    val = next(iter(data.val_dataloader()))
    assert val["valid"].all()
    stage = InterpolationStage(unet={"dim": 24, "dim_mults": (1,), "num_res_blocks": 1, "attn_levels": (),
                                     "mid_attn": False, "fps_cond": True},
                               # evaluated below at t = T-1, the step Min-SNR weighting trains least: off here
                               diffusion={"objective": "x0", "min_snr_gamma": None}, image_size=12, num_frames=5,
                               skips=(2,), extrapolation_prob=0.0, lr=5e-3)
    # EMA (as in the experiments) smooths the last steps of a short run at a high learning rate
    fit(stage, torch.utils.data.DataLoader(train, batch_size=None, shuffle=True), steps=200, limit_val_batches=0,
        callbacks=[EMAWeightAveraging(decay=0.95)])
    stage.eval()

    video = rearrange(val["video"], "b f c h w -> b c f h w")  # [8, 3, 5, 12, 12]
    known = video[:, :, ::2]
    # one DDIM step from pure noise: the network's x0 estimate, the minimum-MSE interpolation (what PSNR rewards)
    out = stage.interpolate(known, 2, fps=val["fps"] / 2, steps=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[:, :, ::2], known)
    new = torch.arange(5) % 2 == 1
    nearest = known[:, :, torch.arange(5) // 2]  # frame 2i+1 repeats frame 2i
    model_psnr, repeat_psnr = psnr(out[:, :, new], video[:, :, new]), psnr(nearest[:, :, new], video[:, :, new])
    # observed: 20.0 vs 19.1 dB (seeds 1, 2: 18.5 vs 17.6, 18.8 vs 17.3)
    assert model_psnr > repeat_psnr + 0.25, (model_psnr, repeat_psnr)
