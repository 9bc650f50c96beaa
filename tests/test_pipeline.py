"""MakeAVideoPipeline and `mav generate`: the whole chain on tiny checkpoints trained here (a few steps each)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from lightning_mav.checkpoints import CheckpointError
from lightning_mav.media import read_video
from lightning_mav.nn.mixed_precision import native_bf16
from lightning_mav.commands.generate import main
from lightning_mav.commands.options import parse_per_stage
from lightning_mav.networks import default_checkpoint, stage_name, train_command
from lightning_mav.pipeline import (
    CPU_FRAME_BATCH,
    MakeAVideoPipeline,
    frame_shared_noise,
    per_stage,
    stage_progress,
    stop_index,
)
from lightning_mav.stages.superres import SuperResStage
from tests.helpers import train_tiny_chain

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


# ----------------------------------------------------------------------------------------------------- pure parts
def test_frame_shared_noise_is_one_draw_per_video() -> None:
    noise = frame_shared_noise((2, 3, 5, 4, 4), generator=torch.Generator().manual_seed(0))
    assert noise.shape == (2, 3, 5, 4, 4)
    assert torch.equal(noise, noise[:, :, :1].expand_as(noise))  # every frame the same
    assert not torch.allclose(noise[0], noise[1])  # every video its own
    again = frame_shared_noise((2, 3, 5, 4, 4), generator=torch.Generator().manual_seed(0))
    assert torch.equal(noise, again)


def test_per_stage_options_and_names() -> None:
    assert [stage_name(n) for n in ("dt", "interp", "↑F", "sr_h", "prior", "D_t")] == ["D_t", "up_F", "up_F",
                                                                                      "SR_h", "P", "D_t"]
    with pytest.raises(ValueError, match="unknown stage 'SR_x'"):
        stage_name("SR_x")
    # D (the run folder "decoder") has a name of its own: loading it names the command that trains it
    assert stage_name("D") == stage_name("decoder") == "D"
    assert train_command("D") == "lightning fit --config experiments/decoder.yaml"
    assert parse_per_stage("7") == 7 and parse_per_stage(None) is None
    steps = parse_per_stage("20,dt=50,sr_h=10")
    assert steps == {"*": 20, "D_t": 50, "SR_h": 10}
    assert [per_stage(steps, s, 99) for s in ("P", "D_t", "SR_h")] == [20, 50, 10]
    assert per_stage({"interp": 2.5}, "up_F", 1.0) == 2.5 and per_stage({"interp": 2.5}, "P", 1.0) == 1.0
    # SR_l is no link of the chain, but `mav evaluate` samples it for its PSNR: its options can name it
    assert per_stage(parse_per_stage("sr_l=3"), "SR_l", 20) == 3 and per_stage({"SR_l": 3}, "SR_t", 20) == 20
    assert [stop_index(s) for s in (None, "dt", "↑F", "sr_h")] == [4, 1, 2, 4]
    for bad in ("prior", "sr_l"):
        with pytest.raises(ValueError, match=f"stop_after '{bad}': must be one of D_t, up_F, SR_t, SR_h"):
            stop_index(bad)
    assert default_checkpoint("runs", "up_F") == Path("runs/interp/checkpoints/last.ckpt")


# ----------------------------------------------------------------------------------------------------- tiny chain
@pytest.fixture(scope="module")
def runs(shapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/<stage>/checkpoints/last.ckpt for the whole chain: CLIP, P, D -> D_t -> ↑F, SR_l -> SR_t, SR_h.

    Sizes: D_t makes 8 px frames, SR_t takes them to 16 px and SR_h to 32 px.
    """
    return train_tiny_chain(shapes_root, tmp_path_factory.mktemp("runs"), steps=2, interp_frames=16,
                            sr_h=True)


def load(runs: Path, **overrides: str | None) -> MakeAVideoPipeline:
    paths = {"clip": "clip", "prior": "prior", "decoder": "dt", "interpolation": "interp", "sr_t": "sr_t",
             "sr_h": "sr_h"}
    kwargs = {k: str(runs / v / "checkpoints" / "last.ckpt") for k, v in paths.items()}
    return MakeAVideoPipeline.from_checkpoints(**{**kwargs, **overrides}, device="cpu")


def test_generate_writes_a_76_frame_mp4_and_gif(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "video" / "out.mp4"
    written = main(["a red circle moving", "--out", str(out), "--runs", str(runs), "--steps", "2", "--seed", "3",
                    "--fps", "6", "--no-progress"])
    assert written == [out, out.with_suffix(".gif")]
    assert capsys.readouterr().out.split() == [str(out), str(out.with_suffix(".gif"))]
    frames, fps = read_video(out)
    assert frames.shape == (76, 3, 32, 32)  # 16 frames -> ↑F 76 -> SR_t 16 px -> SR_h 32 px
    assert fps == pytest.approx(30.0)  # D_t's 6 fps times ↑F's factor 5
    with Image.open(out.with_suffix(".gif")) as gif:
        assert gif.n_frames == 76 and gif.size == (32, 32)


def test_generate_extend_adds_frames_after_up_F(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "extended.mp4"
    main(["a red circle moving", "--out", str(out), "--runs", str(runs), "--steps", "2", "--num-frames", "4",
          "--skip", "3", "--extend", "2", "--no-gif", "--no-progress"])
    frames, fps = read_video(out)
    assert frames.shape == (12, 3, 32, 32) and fps == pytest.approx(18.0)  # 4 -> ↑F 10 -> +2, then SR_t, SR_h

    # The interpolated frames are those of a run without --extend; the new ones come before / after them.
    pipe = load(runs, sr_t=None, sr_h=None)
    plain = pipe("a red circle", num_frames=4, skip=3, steps=1, seed=5, progress=False)
    assert plain.shape == (1, 10, 3, 8, 8)
    after = pipe("a red circle", num_frames=4, skip=3, steps=1, seed=5, extend=3, progress=False)
    before = pipe("a red circle", num_frames=4, skip=3, steps=1, seed=5, extend=3, extend_direction="backward",
                  progress=False)
    both = pipe("a red circle", num_frames=4, skip=3, steps=1, seed=5, extend=2, extend_direction="both",
                progress=False)
    assert after.shape[1] == before.shape[1] == 13 and both.shape[1] == 14 and pipe.last_fps == 18.0
    assert torch.equal(after[:, :10], plain) and torch.equal(before[:, 3:], plain) and torch.equal(both[:, 2:12], plain)

    with pytest.raises(ValueError, match=r"extend: ↑F extends the video, but this run has no ↑F"):
        load(runs, interpolation=None, sr_t=None, sr_h=None)("a red circle", num_frames=4, steps=1, extend=2)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["a red circle", "--runs", str(runs), "--interp", "none", "--extend", "2"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--extend 2: ↑F extends the video, but --interp is none" in err
    with pytest.raises(SystemExit):
        main(["a red circle", "--runs", str(runs), "--extend", "-1"])
    assert capsys.readouterr().err.strip() == "error: extend: frames to add must be >= 0, got -1"


def test_stage_progress_ticks_without_touching_the_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    import tqdm.auto

    ticks = []

    def update(self, n: int = 1) -> bool:  # tqdm's update returns True whenever it redraws the bar
        ticks.append(n)
        return True

    monkeypatch.setattr(tqdm.auto.tqdm, "update", update)
    net, x = torch.nn.Linear(3, 2), torch.randn(4, 3)
    with stage_progress(net, "D_t", total=3):
        outs = [net(x) for _ in range(3)]
    assert ticks == [1, 1, 1]
    assert all(torch.equal(o, net(x)) for o in outs)  # the tensors, never the bar's return value
    net(x)
    assert len(ticks) == 3  # the hook is gone after the stage


def test_pipeline_stages_attributes_stop_after_and_seed(runs: Path, capsys: pytest.CaptureFixture) -> None:
    pipe = load(runs, sr_h=None)
    assert list(pipe.stages) == ["P", "D_t", "up_F", "SR_t"] and pipe.C_x is pipe.P.clip
    assert pipe.dtype == (torch.bfloat16 if native_bf16("cpu") else torch.float32)  # auto: bf16 where native
    a = pipe("a blue square", num_frames=4, steps=1, seed=1, stop_after="D_t", progress=True)
    assert a.shape == (1, 4, 3, 8, 8) and pipe.last_fps == 6.0
    assert a.min() >= -1 and a.max() <= 1
    bars = capsys.readouterr().err
    assert "P:" in bars and "D_t:" in bars and "↑F" not in bars  # one bar per stage that ran
    b = pipe("a blue square", num_frames=4, steps=1, seed=1, stop_after="dt", progress=False)
    assert torch.equal(a, b)  # same seed, same frames
    c = pipe("a blue square", num_frames=4, steps=1, seed=2, stop_after="D_t", progress=False)
    assert not torch.equal(a, c)
    video = pipe(["a blue square", "a red circle"], num_frames=4, skip=3, steps=1, progress=False)
    assert video.shape == (2, 10, 3, 16, 16) and pipe.last_fps == 18.0  # ↑F x3, SR_t x2, no SR_h


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])  # the deterministic ones; the demo's sr_h.yaml: dpm++
def test_sr_h_starts_every_frame_from_the_same_noise(runs: Path, monkeypatch: pytest.MonkeyPatch,
                                                     sampler: str) -> None:
    pipe = load(runs, interpolation=None, sr_t=None)  # D_t's 8 px frames straight into SR_h (x2)
    pipe.SR_h.sampler = sampler
    calls: list[dict] = []
    sample = SuperResStage.sample

    def spy(self: SuperResStage, lowres: torch.Tensor, **kwargs):
        calls.append({"lowres": lowres, **kwargs})
        return sample(self, lowres, **kwargs)

    monkeypatch.setattr(SuperResStage, "sample", spy)
    frames = pipe(["a blue square", "a red circle"], num_frames=4, steps=2, seed=0, frame_batch=3, progress=False)
    assert frames.shape == (2, 4, 3, 16, 16)
    noise = torch.cat([c["noise"] for c in calls]).view(2, 4, 3, 16, 16)  # frames were folded as (b f)
    lowres_noise = torch.cat([c["lowres_noise"] for c in calls]).view(2, 4, 3, 8, 8)
    assert [c["noise"].shape[0] for c in calls] == [3, 3, 2]  # chunks of frame_batch, noise sliced along
    for x in (noise, lowres_noise):
        assert torch.equal(x, x[:, :1].expand_as(x))  # identical for every frame of a video ...
        assert not torch.allclose(x[0, 0], x[1, 0])  # ... and not across videos
    assert all(c["sampler"] == sampler for c in calls)  # deterministic: that noise is the only randomness
    lowres = torch.cat([c["lowres"] for c in calls]).view(2, 4, 3, 8, 8)
    assert not torch.equal(lowres[:, 0], lowres[:, 1])  # the frames themselves differ

    # The CPU's default chunks (CPU_FRAME_BATCH) and one call for all 8 frames make the same frames.
    calls.clear()
    default = pipe(["a blue square", "a red circle"], num_frames=4, steps=2, seed=0, progress=False)
    assert [c["noise"].shape[0] for c in calls] == [CPU_FRAME_BATCH, 8 - CPU_FRAME_BATCH]
    whole = pipe(["a blue square", "a red circle"], num_frames=4, steps=2, seed=0, frame_batch=8, progress=False)
    torch.testing.assert_close(default, whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(default, frames, rtol=0, atol=1e-5)

    # so equal low-res frames come out equal, and differing ones differ
    still = torch.rand(1, 3, 1, 8, 8).repeat(1, 1, 3, 1, 1) * 2 - 1
    still[:, :, 2] = -still[:, :, 2]
    up = pipe.super_resolve_frames(still, steps=2, seed=0)
    assert up.shape == (1, 3, 3, 16, 16)
    torch.testing.assert_close(up[:, :, 0], up[:, :, 1], rtol=0, atol=1e-5)
    assert (up[:, :, 0] - up[:, :, 2]).abs().max() > 0.1


def test_wrong_or_missing_checkpoints_are_one_line_errors(runs: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    sr_h = str(runs / "sr_h" / "checkpoints" / "last.ckpt")
    with pytest.raises(CheckpointError, match=r"sr_h/checkpoints/last.ckpt: not a D_t checkpoint"):
        load(runs, decoder=sr_h)
    with pytest.raises(CheckpointError, match=r"a D \(image decoder\) checkpoint, not D_t.*experiments/dt.yaml"):
        load(runs, decoder=str(runs / "decoder" / "checkpoints" / "last.ckpt"))
    with pytest.raises(CheckpointError, match=r"an ↑F checkpoint .*, not D_t"):
        load(runs, decoder=str(runs / "interp" / "checkpoints" / "last.ckpt"))
    with pytest.raises(CheckpointError, match=r"not SR_t: it has no temporal layers.*experiments/sr_t.yaml"):
        load(runs, sr_t=str(runs / "sr_l" / "checkpoints" / "last.ckpt"))

    with pytest.raises(SystemExit):  # no runs/clip is fine (P's own CLIP); no runs/prior is not
        main(["a red circle moving", "--runs", str(tmp_path / "empty"), "--out", str(tmp_path / "x.mp4")])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{tmp_path / 'empty' / 'prior' / 'checkpoints' / 'last.ckpt'}" in err
    assert "`lightning fit --config experiments/prior.yaml`" in err
    with pytest.raises(SystemExit):  # a CLIP given but missing is an error
        main(["a red circle moving", "--runs", str(runs), "--clip", str(tmp_path / "clip.ckpt")])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "clip.ckpt" in err and "`lightning fit --config experiments/clip.yaml`" in err

    with pytest.raises(SystemExit):
        main(["a red circle", "--runs", str(runs), "--interp", str(tmp_path / "nope.ckpt")])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope.ckpt" in err and "experiments/interp.yaml" in err
    assert "--interp none" in err


def test_sr_t_frame_windows_from_the_pipeline_and_generate(runs: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    pipe = load(runs, sr_h=None)
    frames_seen: list[int] = []
    pipe.SR_t.unet.register_forward_pre_hook(lambda m, args: frames_seen.append(args[0].shape[2]))
    whole = pipe("a blue square", num_frames=4, skip=3, steps=1, seed=0, progress=False)  # 10 frames
    assert frames_seen == [10]
    frames_seen.clear()
    same = pipe("a blue square", num_frames=4, skip=3, steps=1, seed=0, sr_t_chunk=10, progress=False)
    assert torch.equal(same, whole) and frames_seen == [10]  # a window as long as the clip: the same call
    frames_seen.clear()
    chunked = pipe("a blue square", num_frames=4, skip=3, steps=1, seed=0, sr_t_chunk=4, sr_t_overlap=1,
                   progress=False)
    assert frames_seen == [4, 4, 4] and chunked.shape == whole.shape  # windows at frames 0, 3, 6
    with pytest.raises(SystemExit):  # checked before any checkpoint loads
        main(["a red circle", "--runs", str(runs), "--sr-t-chunk", "4", "--sr-t-overlap", "4"])
    err = capsys.readouterr().err.strip()
    assert err == "error: --sr-t-overlap must be below --sr-t-chunk (4), got 4"


def test_sr_h_frames_per_call_bound_the_pixels_on_an_accelerator() -> None:
    """All 76 frames of a 768² SR_h in one GPU call would need ~217 GiB: 8 such frames per call; small videos go
    in one call; the CPU keeps its 4."""
    from lightning_mav.pipeline import CPU_FRAME_BATCH, sr_h_frame_batch

    cuda = torch.device("cuda")
    assert sr_h_frame_batch(cuda, 768, 768) == 8
    assert sr_h_frame_batch(cuda, 128, 128) >= 76
    assert sr_h_frame_batch(cuda, 4096, 4096) == 1
    assert sr_h_frame_batch(torch.device("cpu"), 768, 768) == CPU_FRAME_BATCH
