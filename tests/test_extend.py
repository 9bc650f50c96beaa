"""Frame extrapolation as users reach it: `mav extend` on a given mp4, the library behind it, and the centroid /
PSNR scores of an extension against the real continuation (on synthetic videos with known answers)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_mav.commands.extend import main
from lightning_mav.extend import extend_frames, load_extender, read_clip
from lightning_mav.media import read_video, write_mp4
from lightning_mav.metrics import ExtrapolationScore, constant_velocity_guess, extension_errors
from lightning_mav.pipeline import GenerationSettings
from lightning_mav.stages.decoder import DecoderStage
from lightning_mav.stages.interpolation import InterpolationStage
from tests.helpers import TINY_CLIP, TINY_UNET, save_tiny_clip

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def moving_square(frames: int, *, size: int = 32, width: int | None = None, side: int = 6,
                  start: tuple[int, int] = (2, 4), step: tuple[int, int] = (2, 1)) -> torch.Tensor:
    """``[1, 3, F, size, width]`` in [-1, 1]: a red square on black moving ``step`` px (x, y) a frame."""
    width = width or size
    video = -torch.ones(1, 3, frames, size, width)
    for t in range(frames):
        x, y = start[0] + step[0] * t, start[1] + step[1] * t
        video[0, 0, t, y:y + side, x:x + side] = 1.0
    return video


# ----------------------------------------------------------------------------------------------------- the metric
def test_constant_velocity_has_zero_error_and_a_perfect_extension_scores_zero() -> None:
    target = moving_square(8)  # centroid moves (2, 1) px a frame, never reaching the border
    known = 4
    perfect = extension_errors(target, target, known)
    assert perfect["error"].shape == (1, 4) and perfect["real_object"].all() and perfect["pred_object"].all()
    np.testing.assert_allclose(perfect["error"], 0.0, atol=1e-9)
    np.testing.assert_allclose(perfect["constant_velocity"], 0.0, atol=1e-9)  # the guess is exact here

    shifted = target.clone()  # the extension 3 px to the right of the real object
    shifted[:, :, known:] = moving_square(8, start=(5, 4))[:, :, known:]
    errors = extension_errors(shifted, target, known)
    np.testing.assert_allclose(errors["error"], 3.0, atol=1e-9)

    score = ExtrapolationScore()
    score.update(target, target, known)
    score.update(shifted, target, known)
    result = {k: float(v) for k, v in score.compute().items()}
    assert result["centroid_error_px"] == pytest.approx(1.5)  # 8 frames compared: 4 at 0 px, 4 at 3 px
    assert result["constant_velocity_px"] == pytest.approx(0.0, abs=1e-9) and result["detected"] == 1.0
    # a perfect extension reaches the PSNR cap (100 dB); holding the last frame loses the moving square
    assert result["psnr"] > result["hold_last_psnr"] and math.isfinite(result["hold_last_psnr"])
    assert result["hold_last_psnr"] < 30


def test_a_vanished_object_counts_in_detected_not_in_the_error() -> None:
    target = moving_square(6)
    blank = target.clone()
    blank[:, :, 3:] = -1.0  # the extension lost the object
    score = ExtrapolationScore()
    score.update(blank, target, 3)
    result = score.compute()
    assert float(result["detected"]) == 0.0
    assert math.isnan(float(result["centroid_error_px"]))  # nothing comparable: evaluation says "not computed"
    guess = constant_velocity_guess(np.array([[[1.0, 2.0], [3.0, 3.0]]]), 2)
    np.testing.assert_allclose(guess, [[[5.0, 4.0], [7.0, 5.0]]])
    with pytest.raises(ValueError, match="known must be in"):
        extension_errors(target, target, 1)


def test_generation_settings_validate_extend() -> None:
    assert GenerationSettings(extend=3, extend_direction="both").extend == 3
    with pytest.raises(ValueError, match=r"^extend: frames to add must be >= 0, got -1$"):
        GenerationSettings(extend=-1)
    with pytest.raises(ValueError, match=r"^extend_direction: expected one of forward, backward, both"):
        GenerationSettings(extend_direction="sideways")
    with pytest.raises(ValueError, match=r"^extend: ↑F extends the video, but stop_after 'D_t'"):
        GenerationSettings(extend=2, stop_after="D_t")


# ----------------------------------------------------------------------------------------------------- mav extend
@pytest.fixture(scope="module")
def up_F(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny conditional ↑F (8-frame windows, 16 px, perturbed off its zero init) that records its CLIP's path,
    a D_t checkpoint (not ↑F), and a mp4 of a moving square at 32x48."""
    tmp = tmp_path_factory.mktemp("extend")
    clip = save_tiny_clip(tmp / "clip.ckpt", TINY_CLIP)
    stage = InterpolationStage(unet={**TINY_UNET, "temporal": True, "fps_cond": True}, clip_ckpt=clip,
                               image_size=16, num_frames=8, sample_steps=2).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # stand-in for training: the zero-initialised output would only repeat the blend
        for p in stage.unet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ckpt = tmp / "interp.ckpt"
    torch.save({"state_dict": stage.state_dict(), "hyper_parameters": dict(stage.hparams)}, ckpt)
    dt = DecoderStage(unet={**TINY_UNET, "temporal": True}, image_size=16)
    torch.save({"state_dict": dt.state_dict(), "hyper_parameters": dict(dt.hparams)}, tmp / "dt.ckpt")
    video = tmp / "in.mp4"
    write_mp4(moving_square(6, size=32, width=48, side=10, start=(10, 6))[0].transpose(0, 1), video, fps=12.0)
    return {"interp": ckpt, "dt": tmp / "dt.ckpt", "clip": Path(clip), "video": video, "tmp": tmp}


def test_extend_frames_keeps_the_given_frames_and_is_seeded(up_F: dict[str, Path]) -> None:
    stage = load_extender(up_F["interp"], device="cpu")  # the CLIP comes from the checkpoint's record
    assert stage.clip is not None and stage.conditional
    frames, fps = read_clip(up_F["video"], stage.image_size)
    assert frames.shape == (6, 3, 16, 16) and fps == pytest.approx(12.0)
    forward = extend_frames(stage, frames, 5, "forward", fps=fps, seed=0, dtype="fp32")
    assert forward.shape == (11, 3, 16, 16) and torch.equal(forward[:6], frames)  # windows: 4 known + 4, + 1
    assert torch.equal(forward, extend_frames(stage, frames, 5, "forward", fps=fps, seed=0, dtype="fp32"))
    assert not torch.equal(forward, extend_frames(stage, frames, 5, "forward", fps=fps, seed=1, dtype="fp32"))
    backward = extend_frames(stage, frames, 5, "backward", fps=fps, seed=0, dtype="fp32")
    assert backward.shape == (11, 3, 16, 16) and torch.equal(backward[5:], frames)
    both = extend_frames(stage, frames, 2, "both", fps=fps, seed=0, dtype="fp32")
    assert both.shape == (10, 3, 16, 16) and torch.equal(both[2:8], frames)


def test_mav_extend_writes_the_longer_video(up_F: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    given, _ = read_clip(up_F["video"], 16)  # the input as ↑F sees it: centre 32x32, resized to 16 px
    for direction, kept in (("forward", slice(0, 6)), ("backward", slice(3, 9))):
        out = tmp_path / f"{direction}.mp4"
        written = main([str(up_F["video"]), "--frames", "3", "--direction", direction, "--out", str(out),
                        "--interp", str(up_F["interp"]), "--seed", "2", "--dtype", "fp32", "--device", "cpu",
                        "--no-progress"])
        assert written == [out, out.with_suffix(".gif")]
        assert capsys.readouterr().out.split() == [str(out), str(out.with_suffix(".gif"))]
        frames, fps = read_video(out)
        assert frames.shape == (9, 3, 16, 16) and fps == pytest.approx(12.0)
        # the given frames come back, up to the mp4's compression
        assert (frames[kept] - given).abs().mean() < 0.03, direction
    other = tmp_path / "fps.mp4"
    main([str(up_F["video"]), "--frames", "1", "--out", str(other), "--interp", str(up_F["interp"]),
          "--clip", str(up_F["clip"]), "--fps", "5", "--no-gif", "--dtype", "fp32", "--no-progress"])
    frames, fps = read_video(other)
    assert frames.shape[0] == 7 and fps == pytest.approx(5.0) and not other.with_suffix(".gif").exists()


def test_a_short_video_is_extended_with_a_warning(up_F: dict[str, Path], tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    short = tmp_path / "short.mp4"
    write_mp4(moving_square(2, size=16)[0].transpose(0, 1), short, fps=8.0)
    with caplog.at_level(logging.WARNING, logger="lightning_mav.extend"):
        main([str(short), "--frames", "2", "--out", str(tmp_path / "o.mp4"), "--interp", str(up_F["interp"]),
              "--no-gif", "--dtype", "fp32", "--no-progress"])
    assert [r.getMessage() for r in caplog.records] == [
        f"warning: {short} has 2 frame(s), fewer than ↑F's context of 4: the first window is conditioned on 2"]
    assert read_video(tmp_path / "o.mp4")[0].shape[0] == 4


def test_bad_input_is_one_line_naming_the_file(up_F: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video at all" * 4)
    interp = ["--interp", str(up_F["interp"]), "--no-progress"]
    cases = [
        ([str(tmp_path / "missing.mp4"), "--frames", "2", *interp], [f"{tmp_path / 'missing.mp4'}: no such video"]),
        ([str(corrupt), "--frames", "2", *interp], [f"{corrupt}: "]),
        ([str(up_F["video"]), "--frames", "0", *interp], ["--frames: frames to add must be > 0, got 0"]),
        ([str(up_F["video"]), "--frames", "2", "--interp", str(up_F["dt"])],
         [f"{up_F['dt']}: not a up_F checkpoint", "missing 1 [unet.extra_in"]),
        ([str(up_F["video"]), "--frames", "2", "--runs", str(tmp_path / "runs")],
         [f"checkpoint not found: {tmp_path / 'runs' / 'interp' / 'checkpoints' / 'last.ckpt'}",
          "experiments/interp.yaml"]),
        ([str(up_F["video"]), "--frames", "2", "--clip", str(up_F["dt"]), *interp], [f"{up_F['dt']}: not a CLIP"]),
    ]
    for argv, wanted in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), (argv, err)
        for piece in wanted:
            assert piece in err, (argv, err)


# ----------------------------------------------------------------------------------------------------- the reports
def test_reports_show_the_extended_clip(tmp_path: Path) -> None:
    from lightning_mav.demo import write_report as demo_report
    from lightning_mav.evaluation.extension import extension_section, write_extension_media
    from lightning_mav.evaluation.report import write_report as eval_report

    real = moving_square(8, size=16, side=4)[0]
    extended = real.clone()
    extended[:, 4:] = -1.0
    media = write_extension_media(tmp_path, {"real": real, "extended": extended, "known": 4, "fps": 30.0})
    assert media == {"sheet": str(tmp_path / "extension" / "sheet.png"), "known": 4, "frames": 8, "fps": 30.0,
                     "gif": str(tmp_path / "extension" / "real-vs-extended.gif")}
    sheet = np.asarray(Image.open(media["sheet"]))
    assert sheet.shape == (32, 8 * 16, 3)  # rows: real, extended; every frame
    assert (sheet[:16] == sheet[16:])[:, :4 * 16].all() and not (sheet[:16] == sheet[16:]).all()
    metrics = {"extend/centroid_error_px": {"value": 1.25, "about": "a"},
               "extend/constant_velocity_px": {"value": 2.5, "about": "b"},
               "extend/psnr": {"value": 20.0, "about": "c"}, "extend/hold_last_psnr": {"value": "not computed: x",
                                                                                   "about": "d"}}
    result = {"metrics": metrics, "extension": media, "videos": [],
              "run": {"prompts": 1, "videos_per_prompt": 1, "stages": ["P", "D_t", "up_F"], "dtype": "float32"}}
    section = extension_section(result, tmp_path)
    assert section[0] == "## Extension (↑F extrapolation)"
    assert "by 4 frames from their first 4 (30 fps): the object's centroid is 1.25 px" in section[2]
    assert "against 2.50 px for the constant-velocity guess" in section[2] and "not computed: x" in section[2]
    assert "![a real clip and ↑F's extension of its first 4 frames](extension/sheet.png)" in section
    assert extension_section({"metrics": metrics}, tmp_path) == []  # no example: no section
    for report in (eval_report(tmp_path, result).read_text(),
                   demo_report(tmp_path, [], result, seconds=1.0).read_text()):
        assert "\n".join(section) in report and "(extension/real-vs-extended.gif)" in report
