"""The experiment configs through the real CLI: every YAML (and paper overlay) parses, every stage runs a
fast_dev_run on the shapes fixture, the chain clip -> decoder -> dt -> interp (and sr_l -> sr_t) hands checkpoints
down through init_from, and bad configs stop before training with one line naming the key.

Everything runs in-process (`MAVCLI(args=...)`) under a temporary cwd, so `runs/` never lands in the repo; the
YAMLs' CPU-demo sizes are shrunk to tiny networks with command-line overrides.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lightning_mav.commands import main
from lightning_mav.trainer_cli import MAVCLI
from tests.helpers import EXPERIMENTS, TINY, paper_fit_args, save_open_clip_weights, single_thread

STAGES = ("clip", "prior", "decoder", "sr_l", "sr_h", "dt", "interp", "sr_t")
PARENT = {"dt": "decoder", "interp": "dt", "sr_t": "sr_l"}  # init_from in the stage YAMLs

pytestmark = pytest.mark.usefixtures("one_thread")


def fit_args(stage: str, shapes_root: Path, *extra: str) -> list[str]:
    """``fit`` of a stage YAML shrunk by ``TINY``, then ``extra`` (paper overlays: ``tests.helpers.paper_fit_args``)."""
    return ["fit", "--config", str(EXPERIMENTS / f"{stage}.yaml"), "--data.init_args.root", str(shapes_root),
            "--data.init_args.batch_size", "2", "--data.init_args.shuffle_buffer", "8",
            "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", *TINY[stage], *extra]


# ------------------------------------------------------------------------------------------------ configs parse
def printed_config(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    with pytest.raises(SystemExit) as exit_:
        MAVCLI(args=[*args, "--print_config"])
    assert exit_.value.code in (None, 0)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("config", sorted(p.name for p in EXPERIMENTS.glob("*.yaml") if p.name != "base.yaml"))
def test_every_stage_yaml_parses(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    subcommand = "test" if config == "eval.yaml" else "fit"
    cfg = printed_config([subcommand, "--config", str(EXPERIMENTS / config)], capsys)
    own = yaml.safe_load((EXPERIMENTS / config).read_text())
    assert cfg["model"]["class_path"] == own["model"]["class_path"]
    if "data" in own:  # the evaluation has none: its prompts are the module's own test data
        assert cfg["data"]["class_path"] == own["data"]["class_path"]
    for key, value in (own["model"].get("init_args") or {}).items():  # the YAML's values win over defaults
        printed = cfg["model"]["init_args"][key]
        if isinstance(value, dict) and key == "options":  # a dataclass: printed with all its fields
            printed = {k: printed[k] for k in value}
        assert printed == value, key
    if subcommand == "fit":  # base.yaml underneath: TensorBoard under runs/, seeded, EMA and checkpoints
        assert cfg["trainer"]["logger"]["init_args"]["save_dir"] == "runs" and cfg["seed_everything"] == 0
        kinds = {cb["class_path"].rsplit(".", 1)[-1] for cb in cfg["trainer"]["callbacks"]}
        assert {"ModelCheckpoint", "EMAWeightAveraging", "LearningRateMonitor", "MediaLogger"} <= kinds
        assert cfg["trainer"]["plugins"][0]["class_path"] == "lightning_mav.callbacks.AtomicCheckpointIO"


@pytest.mark.parametrize("overlay", sorted(p.name for p in (EXPERIMENTS / "paper").glob("*.yaml")))
def test_every_paper_overlay_parses_on_its_stage(overlay: str, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = printed_config(["fit", "--config", str(EXPERIMENTS / overlay), "--config",
                          str(EXPERIMENTS / "paper" / overlay)], capsys)
    own = yaml.safe_load((EXPERIMENTS / "paper" / overlay).read_text())
    assert cfg["trainer"]["precision"] == own["trainer"]["precision"] == "bf16-mixed"
    assert cfg["trainer"]["max_steps"] == own["trainer"]["max_steps"]
    for key, value in own["data"]["init_args"].items():
        assert cfg["data"]["init_args"][key] == value, key
    assert cfg["data"]["init_args"]["urls"] == "???"  # the user's shards: required, refused until given
    if overlay == "dt.yaml":  # the demo's D_t shares noise across frames (PYoCo); the paper's does not
        demo = printed_config(["fit", "--config", str(EXPERIMENTS / overlay)], capsys)
        assert demo["model"]["init_args"]["diffusion"]["frame_noise_share"] == 0.5
        assert cfg["model"]["init_args"]["diffusion"]["frame_noise_share"] == 0.0
    if overlay == "interp.yaml":  # the demo's ↑F (x0 from a motion-compensated blend) is the demo's; the paper's is not
        demo = printed_config(["fit", "--config", str(EXPERIMENTS / overlay)], capsys)["model"]["init_args"]
        assert (demo["baseline"], demo["start_at_blend"], demo["diffusion"]["min_snr_gamma"]) == ("motion", True, None)
        paper = cfg["model"]["init_args"]
        assert (paper["baseline"], paper["start_at_blend"], paper["diffusion"]) == ("linear", False, None)


# --------------------------------------------------------------------------------------------------- the chain
@pytest.fixture(scope="module")
def chain(shapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """clip -> decoder -> dt -> interp and sr_l -> sr_t, 2 steps each, with the YAMLs' own relative parent paths
    (runs/<parent>/checkpoints/last.ckpt) resolved under one temporary cwd."""
    root = tmp_path_factory.mktemp("chain")
    with single_thread(), pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        models = {}
        for stage in ("clip", "decoder", "dt", "interp", "sr_l", "sr_t"):
            cli = MAVCLI(args=fit_args(stage, shapes_root, "--trainer.max_steps", "2",
                                       "--trainer.val_check_interval", "2"))
            assert cli.trainer.global_step == 2
            models[stage] = cli.model
    yield {"root": root, "models": models}


@pytest.mark.parametrize("child", ["dt", "interp", "sr_t"])
def test_chain_children_start_from_their_parents(chain: dict[str, Any], child: str) -> None:
    root, model = chain["root"], chain["models"][child]
    parent_ckpt = root / "runs" / PARENT[child] / "checkpoints" / "last.ckpt"
    report = model.init_report
    assert report is not None and report.ok and Path(report.path) == Path("runs") / PARENT[child] / "checkpoints" / \
        "last.ckpt"
    assert report.loaded and report.new and report.source == "EMA state_dict"  # the parent's EMA weights
    new_kind = {"dt": ("temporal", "fps_"), "interp": ("extra_in",), "sr_t": ("temporal",)}[child]
    assert all(any(k in name for k in new_kind) for name in report.new), report.new
    # the child's own checkpoint is complete: loads with weights_only=True, needs no parent file, inherits the config
    ckpt = torch.load(root / "runs" / child / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert hp["init_from"] is None and hp["parent_ckpt"] == str(Path("runs") / PARENT[child] / "checkpoints" /
                                                               "last.ckpt")
    parent_hp = torch.load(parent_ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]
    assert hp["unet"]["dim"] == parent_hp["unet"]["dim"] == 8 and hp["unet"]["temporal"] is True
    assert ckpt["global_step"] == 2 and "current_model_state" in ckpt  # EMA run: raw weights kept apart


def test_chain_media_and_tensorboard_folders(chain: dict[str, Any]) -> None:
    runs = chain["root"] / "runs"
    for stage in ("clip", "decoder", "dt", "interp", "sr_l", "sr_t"):
        assert list((runs / stage).glob("events.out.tfevents.*")) and (runs / stage / "config.yaml").is_file()
    assert list((runs / "decoder" / "media").glob("*.png"))  # image stage: PNG
    for video_stage in ("dt", "interp", "sr_t"):  # video stages: mp4 + contact sheet
        assert list((runs / video_stage / "media").glob("*.mp4")) and list((runs / video_stage / "media").glob("*.png"))


# ---------------------------------------------------------------------------------------------- fast_dev_run
@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_runs_fast_dev_run(stage: str, chain: dict[str, Any], shapes_root: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    runs = chain["root"] / "runs"
    extra = ["--trainer.fast_dev_run", "1"]
    if stage in ("prior", "decoder", "dt", "interp"):
        extra += ["--model.init_args.clip_ckpt", str(runs / "clip" / "checkpoints" / "last.ckpt")]
    if stage in PARENT:
        extra += ["--model.init_args.init_from", str(runs / PARENT[stage] / "checkpoints" / "last.ckpt")]
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = MAVCLI(args=fit_args(stage, shapes_root, *extra))
    assert cli.trainer.global_step == 1 and cli.trainer.ckpt_path is None
    # the frozen CLIP's eval mode is by design: no "Found N module(s) in eval mode" warning for it
    assert not [str(w.message) for w in caught if "in eval mode" in str(w.message)]
    # a smoke test leaves nothing behind: no checkpoint (Lightning's ModelCheckpoint writes ./checkpoints/last.ckpt at
    # the end of a fast_dev_run unless the CLI drops it), no media in the cwd
    assert not list(tmp_path.rglob("*.ckpt")) and not (tmp_path / "media").exists()


def test_paper_overlays_run_with_an_open_clip_weights_file(shapes_root: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """P, D, D_t and ↑F under their paper overlays (widths shrunk by TINY) with a CLIP given as an open_clip weights
    file + its architecture: named once for P and once for D; D_t and ↑F inherit it through init_from."""
    from lightning_mav.nn.clip import CLIP

    weights = save_open_clip_weights(tmp_path / "open_clip_pytorch_model.bin")  # open_clip's own file format

    def run(stage: str, *extra: str) -> Any:
        return MAVCLI(args=paper_fit_args(stage, shapes_root, "--trainer.precision", "32-true", *extra,
                                          clip_weights=weights))

    monkeypatch.chdir(tmp_path)
    prior = run("prior", "--trainer.fast_dev_run", "1")
    decoder = run("decoder", "--trainer.max_steps", "1", "--trainer.val_check_interval", "1")
    dt = run("dt", "--trainer.max_steps", "1", "--trainer.val_check_interval", "1")
    interp = run("interp", "--trainer.fast_dev_run", "1")
    expected = CLIP.from_checkpoint(weights, model_name="mav-tiny").state_dict()
    for name, cli in (("prior", prior), ("decoder", decoder), ("dt", dt), ("interp", interp)):
        assert cli.trainer.global_step == 1, name
        assert cli.model.hparams.clip_ckpt == str(weights) and cli.model.hparams.clip_model == "mav-tiny", name
        got = cli.model.clip.state_dict()
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got), name
    saved = torch.load(tmp_path / "runs" / "dt" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["hyper_parameters"]["clip_ckpt"] == str(weights)  # so ↑F, D_t's child, inherits it in turn
    assert not any(k.startswith("clip.") for k in saved["state_dict"])  # the frozen CLIP stays out of checkpoints


def test_a_trainable_module_left_in_eval_mode_is_still_reported(
        chain: dict[str, Any], shapes_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clip_ckpt = chain["root"] / "runs" / "clip" / "checkpoints" / "last.ckpt"
    monkeypatch.chdir(tmp_path)
    args = fit_args("decoder", shapes_root, "--trainer.fast_dev_run", "1",
                    "--model.init_args.clip_ckpt", str(clip_ckpt))
    cli = MAVCLI(args=args[1:], run=False)  # no subcommand: the trainer is built, not run
    cli.model.unet.mid.eval()  # a user's mistake, not the frozen CLIP: Lightning must still say so
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.trainer.fit(cli.model, cli.datamodule)
    assert [str(w.message) for w in caught if "module(s) in eval mode" in str(w.message)]


def test_the_commands_drop_lightnings_advert_and_its_pytree_deprecation_only(
        shapes_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        main(fit_args("sr_l", shapes_root, "--trainer.fast_dev_run", "1"))
        warnings.warn("a warning of the run itself", UserWarning)
    assert "GPU available" in caplog.text  # Lightning's own info lines still print
    assert "💡 Tip" not in caplog.text and "litlogger" not in caplog.text
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "LeafSpec" in m]
    assert "a warning of the run itself" in messages


# -------------------------------------------------------------------------------------------------- bad configs
def bad_yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return str(path)


BAD = {
    "unknown key": (lambda t: ["--config", str(EXPERIMENTS / "decoder.yaml"), "--model.init_args.nosuch", "1"],
                    "error: model.init_args.nosuch: unknown key"),
    "unknown key in a YAML": (lambda t: ["--config", str(EXPERIMENTS / "decoder.yaml"), "--config",
                                         bad_yaml(t, "trainer:\n  max_stepz: 3\n")],
                              "error: trainer.max_stepz: unknown key"),
    "unknown network option": (lambda t: ["--config", str(EXPERIMENTS / "sr_l.yaml"), "--model.init_args.unet",
                                          '{"dimm": 8}'],
                               "error: model.init_args.unet.dimm: unknown key"),
    "wrong type": (lambda t: ["--config", str(EXPERIMENTS / "decoder.yaml"), "--trainer.max_steps", "many"],
                   "error: trainer.max_steps: expected int"),
    "wrong type in a YAML": (lambda t: ["--config", str(EXPERIMENTS / "decoder.yaml"), "--config",
                                        bad_yaml(t, "data:\n  init_args:\n    batch_size: lots\n")],
                             "error: data.init_args.batch_size: expected int"),
    "wrong type in a network config": (lambda t: ["--config", str(EXPERIMENTS / "sr_l.yaml"),
                                                  "--model.init_args.diffusion.min_snr_gamma", "abc"],
                                       "error: model.init_args.diffusion.min_snr_gamma: min_snr_gamma must be a "
                                       "number or null, got 'abc'"),
    "bad value in a network config": (lambda t: ["--config", str(EXPERIMENTS / "sr_l.yaml"),
                                                 "--model.init_args.diffusion.clip_sample", "-1"],
                                      "error: model.init_args.diffusion.clip_sample: clip_sample must be positive"),
    "missing required value": (lambda t: ["--config", str(EXPERIMENTS / "sr_l.yaml"), "--config",
                                          str(EXPERIMENTS / "paper" / "sr_l.yaml")],
                               "error: data.init_args.urls: missing required value"),
    "missing parent checkpoint": (lambda t: ["--config", str(EXPERIMENTS / "dt.yaml"), "--model.init_args.clip_ckpt",
                                             "null"],
                                  "error: model.init_args.init_from: checkpoint not found: "
                                  "runs/decoder/checkpoints/last.ckpt — run `lightning fit --config "
                                  "experiments/decoder.yaml` first"),
    "missing clip checkpoint": (lambda t: ["--config", str(EXPERIMENTS / "prior.yaml")],
                                "error: model.init_args.clip_ckpt: CLIP checkpoint not found: "
                                "runs/clip/checkpoints/last.ckpt — run `lightning fit --config experiments/clip.yaml` "
                                "first"),
    "config file does not exist": (lambda t: ["--config", str(EXPERIMENTS / "nosuch.yaml")],
                                   "error: config: "),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_fails_before_training_with_one_line(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    make_args, expected = BAD[case]
    args = make_args(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("Seed set")]
    assert len(lines) == 1 and lines[0].startswith(expected), err
    assert not (tmp_path / "runs").exists()  # nothing was built or trained


def test_null_for_one_key_of_a_network_config(shapes_root: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """`--model.init_args.diffusion.min_snr_gamma null` switches the weighting off (jsonargparse alone would hand the
    stage the text "None"), and what the stage saves is the real null."""
    monkeypatch.chdir(tmp_path)
    cli = MAVCLI(args=fit_args("sr_l", shapes_root, "--trainer.fast_dev_run", "1",
                               "--model.init_args.diffusion.min_snr_gamma", "null"))
    assert cli.model.diffusion.min_snr_gamma is None and cli.model.hparams.diffusion["min_snr_gamma"] is None
    assert cli.model.diffusion.clip_sample == 1.0  # the other defaults still filled in
