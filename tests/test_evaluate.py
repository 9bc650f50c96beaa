"""Evaluation runs (`mav evaluate`, `lightning test --config experiments/eval.yaml`) on tiny checkpoints made here."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

import lightning_mav.evaluation as ev
from lightning_mav.commands.evaluate import main as evaluate_command
from lightning_mav.evaluation.prompts import is_shapes_prompt
from lightning_mav.evaluation.real_data import RealData, item_noise, real_batches, score_real_data
from lightning_mav.evaluation.samples import load_sample, plan_samples, sample_name
from lightning_mav.evaluation.scores import NO_I3D
from lightning_mav.media import read_video
from lightning_mav.metrics import CLIPSIM, TemporalCoherence, parse_prompt
from lightning_mav.metrics.c3d import C3D
from lightning_mav.metrics.intervals import wilson_interval
from lightning_mav.nn.clip import CLIP
from lightning_mav.nn.mixed_precision import native_bf16
from lightning_mav.pipeline import GenerationSettings
from lightning_mav.trainer_cli import EXPERIMENTS, MAVCLI
from tests.helpers import CLASSES, save_torchscript, train_tiny_chain

EXPECTED = {
    "shapes/color", "shapes/shape", "shapes/size", "shapes/all",
    "shapes/D_per_frame/color", "shapes/D_per_frame/shape", "shapes/D_per_frame/size",
    "coherence/D_t", "coherence/D_t/smoothness", "coherence/D_t/background",
    "coherence/D_per_frame", "coherence/D_per_frame/smoothness", "coherence/gain", "coherence/up_F",
    "coherence/real", "motion/D_t/speed", "motion/real/speed", "motion/speed_ratio",
    "clipsim/suite_clip", "fvd", "is", "interp/psnr", "interp/linear_blend_psnr", "interp/gain",
    *(f"sr/{s}/{m}" for s in ("SR_l", "SR_t", "SR_h") for m in ("psnr", "bicubic_psnr", "gain")),
    *(f"extend/{m}" for m in ("centroid_error_px", "constant_velocity_px", "gain_px", "detected", "psnr",
                              "hold_last_psnr")),
}


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def runs(shapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """clip, prior, decoder -> dt -> interp, sr_l -> sr_t; no sr_h (so it must read "not trained").

    D_t makes 8 px frames, ↑F interpolates them, SR_t takes them to 16 px.
    """
    return train_tiny_chain(shapes_root, tmp_path_factory.mktemp("runs"), steps=1, interp_frames=11,
                            sr_h=False)


class _FakeI3D(nn.Module):
    """Stands in for StyleGAN-V's TorchScript I3D (same call): 400 features of 20x20 pooled frames."""

    def forward(self, x: Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False) -> Tensor:
        return F.adaptive_avg_pool3d(x.float(), (1, 20, 20)).mean(dim=1).flatten(1)


@pytest.fixture(scope="module")
def i3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_torchscript(_FakeI3D(), tmp_path_factory.mktemp("i3d") / "i3d_torchscript.pt")


@pytest.fixture(scope="module")
def c3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init C3D in StyleGAN-V's file format (TorchScript, ``c3d_ucf101.pt``)."""
    return save_torchscript(C3D(), tmp_path_factory.mktemp("c3d") / "c3d_ucf101.pt")


# ----------------------------------------------------------------------------------------------------- prompts
def test_prompt_sources(shapes_root: Path, tmp_path: Path) -> None:
    shapes = ev.load_prompts(data=shapes_root)  # default: <data>/eval/prompts.jsonl
    assert len(shapes) == 24 and all(is_shapes_prompt(p) for p in shapes)
    subset = ev.load_prompts(data=shapes_root, num_prompts=8, seed=1)
    assert len(subset) == 8 and subset == [p for p in shapes if p in subset]  # file order kept
    assert len({parse_prompt(p).shape for p in subset}) > 1  # not every k-th line (one shape)
    assert subset == ev.load_prompts(data=shapes_root, num_prompts=8, seed=1)

    txt = tmp_path / "p.txt"
    txt.write_text("a red circle\n\n# comment\na blue square\n")
    assert ev.load_prompts(txt) == ["a red circle", "a blue square"]
    classes = tmp_path / "classInd.txt"
    classes.write_text("1 ApplyEyeMakeup\n2 Basketball\n3 playing_guitar\n")
    assert ev.load_prompts(classes=classes) == ["apply eye makeup", "basketball", "playing guitar"]
    assert ev.load_prompts(classes=classes, template="a video of a person {class}")[1] == \
        "a video of a person basketball"
    captions = ev.load_prompts(str(shapes_root / "images" / "val-*.tar"), num_prompts=3)
    assert len(captions) == 3 and all(is_shapes_prompt(c) for c in captions)
    assert not is_shapes_prompt("a video of a person basketball")


def test_prompt_items_pad_for_ranks_without_repeating_samples() -> None:
    items = ev.prompt_items(["a", "b", "c"], videos_per_prompt=2, world_size=4)
    assert len(items) == 8
    assert [i["index"] for i in items if i["valid"]] == [0, 1, 2, 3, 4, 5]
    assert [i["prompt"] for i in items[:6]] == ["a", "a", "b", "b", "c", "c"]
    assert sum(not i["valid"] for i in items) == 2


def test_plan_seeds_batches_by_first_index() -> None:
    plan = plan_samples(["a", "b", "c"], videos_per_prompt=1, batch_size=2, seed=10)
    assert [[(s.index, s.prompt, s.seed, s.position) for s in b] for b in plan] == [
        [(0, "a", 10, 0), (1, "b", 10, 1)], [(2, "c", 12, 0)]]


# ----------------------------------------------------------------------------------------------------- the ablation
def test_item_noise_is_per_key_and_drawn_like_the_stage() -> None:
    from lightning_mav.diffusion import Diffusion

    shape = (3, 8, 16, 16)
    both = item_noise(["a", "b"], shape, seed=0, stream="up_F")
    assert torch.equal(both[1], item_noise(["b"], shape, seed=0, stream="up_F")[0])  # batching does not matter
    assert torch.equal(item_noise(["a"], shape, seed=0, stream="up_F", diffusion=Diffusion())[0], both[0])
    mixed = item_noise([str(i) for i in range(8)], shape, seed=0, stream="up_F",
                          diffusion=Diffusion(frame_noise_share=0.5))  # as a D_t / ↑F trained with shared noise
    per_pixel = mixed.permute(0, 1, 3, 4, 2).reshape(-1, 8)
    assert abs(torch.corrcoef(per_pixel.T)[0, 1:].mean().item() - 0.5) < 0.05
    assert abs(torch.corrcoef(both.permute(0, 1, 3, 4, 2).reshape(-1, 8).T)[0, 1:].mean().item()) < 0.05


def test_d_per_frame_treats_every_frame_alone(runs: Path) -> None:
    chain = ev.load_chain(runs, device="cpu")
    y_e = F.normalize(torch.randn(1, 16), dim=-1)
    noise = torch.randn(1, 3, 4, 8, 8)
    a = ev.sample_per_frame(chain.pipe, y_e, num_frames=4, seed=0, steps=2, noise=noise)
    changed = noise.clone()
    changed[:, :, 0] = torch.randn(1, 3, 8, 8)
    b = ev.sample_per_frame(chain.pipe, y_e, num_frames=4, seed=0, steps=2, noise=changed)
    assert a.shape == (1, 3, 4, 8, 8)
    assert not torch.allclose(a[:, :, 0], b[:, :, 0])
    torch.testing.assert_close(a[:, :, 1:], b[:, :, 1:])  # no temporal layer: other frames do not see frame 0


def test_generate_batch_returns_what_the_pipeline_makes_and_its_intermediates(runs: Path) -> None:
    pipe = ev.load_chain(runs, device="cpu").pipe
    settings = GenerationSettings(num_frames=4, steps=1)
    made = ev.generate_batch(pipe, ["a red circle moving", "a blue square"], seed=3, settings=settings)
    assert made.final == "SR_t" and made.fps == pytest.approx(30.0)
    assert {k: tuple(v.shape) for k, v in made.frames.items()} == {
        "D_t": (2, 3, 4, 8, 8), "up_F": (2, 3, 16, 8, 8), "SR_t": (2, 3, 16, 16, 16), "D_per_frame": (2, 3, 4, 8, 8)}
    same = pipe(["a red circle moving", "a blue square"], num_frames=4, steps=1, seed=3, progress=False)
    torch.testing.assert_close(made.frames["SR_t"], same.transpose(1, 2))  # exactly `mav generate`'s video
    d_t = pipe(["a red circle moving", "a blue square"], num_frames=4, steps=1, seed=3, stop_after="D_t",
               progress=False)
    torch.testing.assert_close(made.frames["D_t"], d_t.transpose(1, 2))
    torch.testing.assert_close(made.frames["up_F"][:, :, ::5], made.frames["D_t"])  # ↑F keeps D_t's frames
    assert "sample" not in vars(pipe.D_t) and "interpolate" not in vars(pipe.up_F)  # the recorder is gone


def test_real_data_scores_do_not_depend_on_batching(runs: Path, shapes_root: Path) -> None:
    """Each real clip's noise comes from its key, so batches (and DDP ranks) do not change the PSNR scores."""
    chain = ev.load_chain(runs, device="cpu", dtype="fp32")  # bf16 kernels round differently per batch shape
    settings = GenerationSettings(num_frames=4, steps=1)
    scores = []
    for batch_size in (1, 3):
        metrics = ev.EvalMetrics(chain.pipe.C_x)
        real = RealData(videos=str(shapes_root / "videos" / "val-*.tar"),
                           images=str(shapes_root / "images" / "val-*.tar"), clips=3, batch_size=batch_size)
        assert score_real_data(chain, metrics, real, settings, seed=0) == {}
        scores.append({k: v["value"] for k, v in metrics.results(chain.missing).items()
                       if k.startswith(("interp/", "sr/SR_l", "sr/SR_t"))})
    assert len(scores[0]) == 9 + 4 + 2 * 5 and all(math.isfinite(v) for v in scores[0].values())  # PSNR, ↑F objects, SR edges
    assert scores[0] == pytest.approx(scores[1], rel=1e-5)


def test_extension_scores_do_not_depend_on_batching(runs: Path, shapes_root: Path) -> None:
    """↑F extending real clips: one window (each clip's noise from its key) or several (a generator per key)."""
    from lightning_mav.evaluation.real_data import extension_lengths, score_extension

    chain = ev.load_chain(runs, device="cpu", dtype="fp32")
    assert extension_lengths(chain.pipe.up_F.num_frames) == (5, 6)  # 11-frame window: half known, the rest new
    for extend in (0, 8):  # 8 > 6: two windows
        settings = GenerationSettings(num_frames=4, steps=1, extend=extend)
        scores, examples = [], []
        for batch_size in (1, 3):
            metrics = ev.EvalMetrics(chain.pipe.C_x)
            real = RealData(videos=str(shapes_root / "videos" / "val-*.tar"),
                            images=str(shapes_root / "images" / "val-*.tar"), clips=3, batch_size=batch_size)
            examples.append(score_extension(chain.pipe, metrics.extension, real, settings, seed=0))
            scores.append({k: v["value"] for k, v in metrics.extension_results(None).items()})
        assert len(scores[0]) == 6 and all(isinstance(v, float) for v in scores[0].values()), scores[0]
        assert scores[0] == pytest.approx(scores[1], rel=1e-5)
        example = examples[0]
        assert example["known"] == 5 and example["extended"].shape == example["real"].shape == (3, 5 + (extend or 6),
                                                                                                 8, 8)
        assert torch.equal(example["extended"][:, :5], example["real"][:, :5])  # the known frames, exactly
        assert scores[0]["extend/gain_px"] == pytest.approx(scores[0]["extend/constant_velocity_px"]
                                                            - scores[0]["extend/centroid_error_px"])


# ----------------------------------------------------------------------------------------------------- evaluate()
# scores of objects that 8 px frames may not hold (no background pixel 2 px away from them, no half-opaque object)
MAY_BE_EMPTY = {f"objects/{w}/background_std" for w in ("D_t", "final", "real")} | {
    "interp/centroid_error", "interp/blend_centroid_error", "ghosts/up_F"}


def test_evaluate_writes_metrics_videos_and_reuses_samples(runs: Path, shapes_root: Path, i3d: Path, c3d: Path,
                                                           tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "eval"
    result = ev.evaluate(runs=runs, data=shapes_root, out=out, num_prompts=2, num_frames=4, quick=True, i3d=i3d,
                         c3d=c3d, is_splits=2, progress=False, fps_pair_prompts=1)

    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"] == result["metrics"]
    metrics = result["metrics"]
    assert EXPECTED <= set(metrics)
    for name, entry in metrics.items():
        assert entry["about"], name
        if name.startswith("sr/SR_h/"):
            assert entry["value"].startswith("not trained: no ") and "experiments/sr_h.yaml" in entry["value"]
        elif isinstance(entry["value"], str):  # 8 px frames: objects too small for some scores
            assert name in MAY_BE_EMPTY and entry["value"] == "not computed: no samples", (name, entry)
        else:
            assert isinstance(entry["value"], float) and math.isfinite(entry["value"]), (name, entry)
    assert 0 <= metrics["shapes/all"]["value"] <= 1 and 0 <= metrics["coherence/D_t"]["value"] <= 1
    for name in ("shapes/all", "objects/final/one_object", "interp/blend_ghost_rate", "motion/fps_order"):
        low, high = metrics[name]["interval"]  # rates: Wilson over the videos / clips / prompts
        assert 0 <= low <= metrics[name]["value"] <= high <= 1, name
    assert metrics["objects/final/one_object"]["interval"] == pytest.approx(
        list(wilson_interval(2 * metrics["objects/final/one_object"]["value"], 2)))  # 2 videos
    assert result["fps_pair"][0]["prompt"] == result["videos"][0]["prompt"]
    assert Path(result["fps_pair"][0]["sheet"]).is_file()
    report = (out / "report.md").read_text()
    assert "## fps conditioning" in report and "| objects/final/one_object | " in report
    assert "suite's own CLIP (tiny" in metrics["clipsim/suite_clip"]["about"]
    assert "torchscript:i3d_torchscript.pt" in metrics["fvd"]["about"]
    assert "torchscript:c3d_ucf101.pt" in metrics["is"]["about"] and 1 <= metrics["is"]["value"] <= 101
    assert metrics["fvd/num_generated"]["value"] == 2.0
    assert result["run"]["generated"] == 2 and result["run"]["reused"] == 0
    assert result["run"]["stages"] == ["P", "D_t", "up_F", "SR_t"]

    assert len(result["videos"]) == 2
    for video in result["videos"]:
        mp4, gif = (Path(f) for f in video["files"])
        frames, fps = read_video(mp4)
        assert frames.shape == (16, 3, 16, 16)  # 4 frames -> ↑F x5 -> 16, SR_t 8 -> 16 px
        assert fps == pytest.approx(30.0)
        with Image.open(gif) as image:
            assert image.n_frames == 16
        with Image.open(video["sheet"]) as sheet:
            assert sheet.size == (8 * 16, 16)  # one row of 8 frames
        assert Path(video["ablation_sheet"]).is_file()
    samples = sorted((out / "samples").glob("*.pt"))
    stored = torch.load(samples[0], weights_only=True)
    assert {k: tuple(v.shape) for k, v in stored["frames"].items()} == {
        "D_t": (4, 3, 8, 8), "up_F": (16, 3, 8, 8), "SR_t": (16, 3, 16, 16), "D_per_frame": (4, 3, 8, 8)}
    assert stored["frames"]["SR_t"].dtype == torch.uint8
    assert (out / "tb").is_dir() and any((out / "tb").iterdir())
    # ↑F extending a real clip: 5 of 11 frames known (half its window), 6 made, shown in the report
    assert result["extension"]["known"] == 5 and result["extension"]["frames"] == 11
    with Image.open(result["extension"]["sheet"]) as sheet:
        assert sheet.size == (11 * 8, 2 * 8)  # every frame; rows: real, extended
    with Image.open(result["extension"]["gif"]) as gif:
        assert gif.n_frames == 11 and gif.size == (2 * 8, 8)
    report = (out / "report.md").read_text()
    assert "## Extension (↑F extrapolation)" in report and "](extension/sheet.png)" in report
    # Motion's reference: the real validation clips (quick: 2) at D_t's frame count, default fps (6) and size.
    real = TemporalCoherence()
    for clips, _, _ in real_batches(str(shapes_root / "videos" / "val-*.tar"), "videos", size=8, limit=2,
                                       num_frames=4, fps=6.0):
        real.update(clips)
    real_scores = real.compute()
    assert float(real_scores["speed"]) > 0
    assert metrics["motion/real/speed"]["value"] == pytest.approx(float(real_scores["speed"]))
    assert metrics["coherence/real"]["value"] == pytest.approx(float(real_scores["coherence"]))
    assert metrics["motion/speed_ratio"]["value"] == pytest.approx(
        metrics["motion/D_t/speed"]["value"] / metrics["motion/real/speed"]["value"])

    # Run again through `mav evaluate`: every sample is reused, nothing generated or rewritten.
    files = [*samples, *(out / "videos").iterdir(), *(out / "sheets").iterdir()]
    mtimes = {f: f.stat().st_mtime_ns for f in files}

    def no_generation(*args, **kwargs):
        raise AssertionError("a stored sample was generated again")

    monkeypatch.setattr(ev, "generate_batch", no_generation)
    again = evaluate_command(["--runs", str(runs), "--data", str(shapes_root), "--out", str(out), "--num-prompts", "2",
                     "--num-frames", "4", "--quick", "--no-progress"])
    assert again["run"]["reused"] == 2 and again["run"]["generated"] == 0
    assert {f: f.stat().st_mtime_ns for f in files} == mtimes
    assert again["metrics"]["fvd"]["value"] == NO_I3D == "not computed: no I3D weights (--i3d PATH)"
    for name in ("shapes/all", "coherence/D_t", "coherence/D_per_frame", "clipsim/suite_clip", "interp/psnr"):
        assert again["metrics"][name]["value"] == metrics[name]["value"], name  # same samples, same seeds
    printed = capsys.readouterr().out
    assert "coherence/D_per_frame" in printed and str(out / "metrics.json") in printed

    # Another seed is another sample: regenerated, not reused, and its media rewritten.
    monkeypatch.undo()
    third = ev.evaluate(runs=runs, data=shapes_root, out=out, num_prompts=2, num_frames=4, quick=True, seed=1,
                        progress=False)
    assert third["run"]["generated"] == 2 and third["run"]["reused"] == 0
    for video in third["videos"]:
        mp4 = Path(video["files"][0])
        assert mp4.stat().st_mtime_ns != mtimes.get(mp4)
    # Another compute dtype is another sample too (auto: bf16 on CPUs with bf16 instructions, fp32 elsewhere).
    assert third["run"]["dtype"] == ("bfloat16" if native_bf16("cpu") else "float32")
    other = "fp32" if third["run"]["dtype"] == "bfloat16" else "bf16"
    fourth = ev.evaluate(runs=runs, data=shapes_root, out=out, num_prompts=2, num_frames=4, quick=True, seed=1,
                         progress=False, dtype=other)
    assert fourth["run"]["generated"] == 2 and fourth["run"]["dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[other]


def test_evaluate_flags_are_the_options_fields() -> None:
    from dataclasses import fields

    from lightning_mav.commands.evaluate import build_parser

    parser = build_parser()
    flags = {a.dest for a in parser._actions} - {"help"}
    assert flags == {f.name for f in fields(ev.EvalOptions)}  # one flag per option, nothing defined twice
    args = parser.parse_args(["--stats-cache", "none", "--steps", "D_t=3,8", "--no-progress", "--num-prompts", "5"])
    assert args.stats_cache is None and args.steps == {"D_t": 3, "*": 8} and args.progress is False
    assert args.num_prompts == 5 and args.fps == 6.0 and args.template == "{class}"


def test_missing_required_stage_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        evaluate_command(["--runs", str(tmp_path / "empty"), "--out", str(tmp_path / "eval"), "--quick"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lightning fit --config experiments/prior.yaml" in err
    with pytest.raises(SystemExit) as exit_info:  # a bad per-stage value fails before anything is loaded
        evaluate_command(["--runs", str(tmp_path / "empty"), "--steps", "SR_x=3"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "argument --steps: unknown stage 'SR_x': use one of clip, P, D, SR_l, SR_h, D_t, up_F, SR_t "
        "(or clip, prior, decoder, sr_l, sr_h, dt, interp, sr_t)")


def test_generation_processes_make_the_samples_one_process_makes(runs: Path, shapes_root: Path,
                                                                 tmp_path: Path) -> None:
    common = dict(runs=runs, data=shapes_root, num_prompts=3, num_frames=4, steps=1, batch_size=1, eval_clips=2,
                  dtype="fp32", progress=False)
    one = ev.evaluate(out=tmp_path / "one", **common)
    two = ev.evaluate(out=tmp_path / "two", processes=2, **common)  # batches 0, 2 here; 1 in a spawned process
    assert two["run"]["generated"] == 3 and two["metrics"] == one["metrics"]
    for name in ("00000.pt", "00001.pt", "00002.pt"):
        a, b = (load_sample(tmp_path / run / "samples" / name) for run in ("one", "two"))
        assert a["key"] == b["key"] and a["frames"].keys() == b["frames"].keys()
        assert all(torch.equal(a["frames"][k], b["frames"][k]) for k in a["frames"]), name
    again = ev.evaluate(out=tmp_path / "two", processes=2, **common)  # a restart reuses every sample
    assert again["run"]["generated"] == 0 and again["run"]["reused"] == 3


# ----------------------------------------------------------------------------------------------------- protocols
def test_ucf101_protocol_end_to_end(runs: Path, ucf101: tuple[Path, dict], i3d: Path, c3d: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    class_ind = tmp_path / "classInd.txt"
    class_ind.write_text("".join(f"{i} {name}\n" for i, name in enumerate(CLASSES, 1)))
    args = ["--protocol", "ucf101", "--runs", str(runs), "--classes", str(class_ind), "--num-videos", "4",
            "--i3d", str(i3d), "--c3d", str(c3d), "--is-splits", "2", "--real-videos", str(ucf101[0]),
            "--fvd-videos", "5",
            "--num-frames", "4", "--steps", "1", "--batch-size", "2", "--out", str(tmp_path / "eval"),
            "--stats-cache", str(tmp_path / "stats"), "--dtype", "fp32", "--no-progress"]
    result = evaluate_command(args)
    metrics, run = result["metrics"], result["run"]
    # 4 videos over 3 classes, the class names as prompts (the first class twice)
    prompts = sorted(load_sample(f)["prompt"] for f in (tmp_path / "eval" / "samples").glob("*.pt"))
    assert prompts == ["blue square", "green triangle", "red circle", "red circle"]
    assert metrics["fvd/num_real"]["value"] == 5 and metrics["fvd/num_generated"]["value"] == 4
    assert math.isfinite(metrics["fvd"]["value"]) and 1 <= metrics["is"]["value"] <= 101
    rows = {(r["metric"], r["setting"]): r for r in result["paper"]}
    assert set(rows) == {("fvd", "zero-shot"), ("is", "zero-shot"), ("fvd", "fine-tuned"), ("is", "fine-tuned")}
    assert rows["fvd", "zero-shot"]["paper"] == 367.23 and rows["is", "zero-shot"]["paper"] == 33.0
    assert rows["fvd", "zero-shot"]["ours"] == metrics["fvd"]["value"] and rows["is", "zero-shot"]["our_videos"] == 4
    assert rows["is", "zero-shot"]["our_scorer"] == "C3D c3d_ucf101.pt"
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "## Against the paper" in report and "| fvd | zero-shot |" in report and "| 367.23 |" in report
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["paper"] == result["paper"]
    assert run["generated"] == 4 and "sr/SR_t/psnr" in metrics  # video-shard scores: skipped, with the reason
    assert "UCF-101 folder" in metrics["interp/psnr"]["value"]
    (cached,) = (tmp_path / "stats").glob("fvd_real_*.pt")

    # A rerun reads no real video (the statistics come from the cache) and generates nothing: the same scores.
    def no_real_videos(*args: object, **kwargs: object) -> Iterator[tuple[Tensor, list[str]]]:
        raise AssertionError("real UCF-101 clips read although their statistics are cached")
        yield  # a generator, as the real one: only reading a clip fails

    monkeypatch.setattr("lightning_mav.evaluation.real_data.ucf101_real_clips", no_real_videos)
    again = evaluate_command(args)
    assert again["run"]["generated"] == 0 and again["metrics"]["fvd"] == metrics["fvd"]
    assert again["metrics"]["is"] == metrics["is"]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        evaluate_command(["--protocol", "ucf101", "--runs", str(runs)])
    assert capsys.readouterr().err.strip() == \
        "error: classes: --protocol ucf101 needs UCF-101's classInd.txt (--classes FILE)"


def test_msrvtt_protocol_clipsim_with_its_own_clip(runs: Path, shapes_root: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    captions = tmp_path / "test_videodatainfo.json"
    captions.write_text(json.dumps({
        "videos": [{"video_id": "video0", "split": "train"}, {"video_id": "video7010", "split": "test"},
                   {"video_id": "video7011", "split": "test"}],
        "sentences": [{"video_id": "video7010", "caption": "a red circle moving"},
                      {"video_id": "video0", "caption": "a train caption"},
                      {"video_id": "video7011", "caption": "a blue square sliding"},
                      {"video_id": "video7010", "caption": "a small red circle"}]}))
    weights = tmp_path / "mav_tiny.pt"
    torch.save(CLIP("mav-tiny").model.state_dict(), weights)  # open_clip's file format: the model's state dict
    result = ev.evaluate(protocol="msrvtt", prompts=str(captions), clipsim_model="mav-tiny",
                         clipsim_weights=str(weights), runs=runs, data=shapes_root, out=tmp_path / "eval",
                         num_frames=4, steps=1, dtype="fp32", progress=False)
    samples = [load_sample(f) for f in sorted((tmp_path / "eval" / "samples").glob("*.pt"))]
    assert [s["prompt"] for s in samples] == ["a red circle moving", "a blue square sliding", "a small red circle"]
    # CLIPSIM on the paper's scale: that CLIP on the stored final frames, nothing of the suite's C_x
    direct = CLIPSIM(CLIP.from_checkpoint(weights, model_name="mav-tiny"))
    direct.update(torch.stack([s["frames"][s["final"]].float() / 127.5 - 1 for s in samples]).transpose(1, 2),
                  [s["prompt"] for s in samples])
    ours = result["metrics"]["clipsim/mav-tiny"]["value"]
    assert ours == pytest.approx(float(direct.compute()), abs=1e-6)
    assert ours != pytest.approx(result["metrics"]["clipsim/suite_clip"]["value"], abs=1e-6)
    (row,) = result["paper"]
    assert row["metric"] == "clipsim" and row["paper"] == 0.3049 and row["ours"] == ours
    assert row["our_scorer"] == "CLIP mav-tiny (mav_tiny.pt)" and row["paper_videos"] == 59_794
    with pytest.raises(SystemExit):
        evaluate_command(["--protocol", "msrvtt", "--prompts", str(captions), "--clipsim-model", "ViT-B-32"])
    assert capsys.readouterr().err.strip().endswith(
        "clipsim_model, clipsim_weights: give both (an open_clip name and its local weights file)")


# ----------------------------------------------------------------------------------------------------- lightning test
def test_lightning_test_with_eval_yaml(runs: Path, shapes_root: Path, tmp_path: Path) -> None:
    cli = MAVCLI(args=[
        "test", "--config", str(EXPERIMENTS / "eval.yaml"),
        "--model.init_args.options.runs", str(runs), "--model.init_args.options.data", str(shapes_root),
        "--model.init_args.options.num_frames", "4", "--model.init_args.options.steps", "1",
        "--model.init_args.options.eval_clips", "2", "--model.init_args.options.num_prompts", "3",
        "--model.init_args.options.batch_size", "2",
        "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.accelerator", "cpu",
        "--trainer.devices", "1", "--trainer.enable_progress_bar", "false",
    ])
    logged = cli.trainer.callback_metrics
    for name in ("shapes/color", "coherence/D_t", "coherence/D_per_frame", "coherence/up_F", "clipsim/suite_clip",
                 "interp/psnr", "sr/SR_l/gain", "sr/SR_t/psnr"):
        assert name in logged and math.isfinite(float(logged[name])), name
    assert "fvd" not in logged  # no I3D weights given
    run_dir = tmp_path / "eval"
    saved = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    assert saved["fvd"]["value"] == NO_I3D and saved["sr/SR_h/psnr"]["value"].startswith("not trained")
    assert sorted(p.name for p in (run_dir / "videos").glob("*.mp4")) == [
        f"{sample_name(i, p)}.mp4" for i, p in enumerate(ev.load_prompts(data=shapes_root, num_prompts=3))]
    assert any(run_dir.glob("events.out.tfevents*"))  # the TensorBoard scalars
    assert math.isfinite(float(logged["extend/psnr"])) and (run_dir / "extension" / "sheet.png").is_file()
    assert "](extension/sheet.png)" in (run_dir / "report.md").read_text()  # ↑F extending a real clip

    # Same prompts, batches and seeds as `mav evaluate`: the same videos, so the same scores.
    direct = ev.evaluate(runs=runs, data=shapes_root, out=tmp_path / "direct", num_prompts=3, num_frames=4, steps=1,
                         batch_size=2, eval_clips=2, progress=False)
    for name in ("shapes/all", "coherence/D_t", "coherence/D_per_frame", "coherence/up_F", "clipsim/suite_clip"):
        assert float(logged[name]) == pytest.approx(direct["metrics"][name]["value"], rel=1e-5, abs=1e-6), name
