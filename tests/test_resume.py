"""Resume and faults: `kill -9` + `--ckpt_path last` continues the uninterrupted run exactly, a kill while a
checkpoint is being written never leaves a torn last.ckpt, NaN/Inf losses stop (or skip) cleanly, and a fresh run
of a stage never resumes implicitly.

All runs are the real CLI (`experiments/sr_l.yaml` + base.yaml) at a tiny size on the shapes fixture, CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_mav.callbacks import AtomicCheckpointIO
from lightning_mav.trainer_cli import MAVCLI
from lightning_mav.stages.base import NonFiniteLossError
from lightning_mav.stages.superres import SuperResStage
from tests.helpers import EXPERIMENTS, TINY_UNET_8_NO_ATTN, cli_env, every_n_steps_overlay, read_events

pytestmark = pytest.mark.usefixtures("one_thread")


def sr_args(shapes_root: Path, overlay: Path, *extra: str, max_steps: int = 8) -> list[str]:
    return ["fit", "--config", str(EXPERIMENTS / "sr_l.yaml"), "--config", str(overlay),
            "--data.init_args.root", str(shapes_root), "--data.init_args.batch_size", "4",
            "--data.init_args.shuffle_buffer", "16", "--data.init_args.image_size", "32",
            "--model.init_args.unet", json.dumps(TINY_UNET_8_NO_ATTN), "--model.init_args.lowres_size", "16",
            "--model.init_args.highres_size", "32", "--model.init_args.sample_steps", "2",
            "--trainer.max_steps", str(max_steps), "--trainer.val_check_interval", "4",
            "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *extra]


def scalars(event_file: Path, tag: str) -> dict[int, float]:
    acc = read_events(event_file)
    return {e.step: e.value for e in acc.Scalars(tag)} if tag in acc.Tags()["scalars"] else {}


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


# A callback for the killed subprocess: at step `step`, the write of last.ckpt gets half its bytes on disk and then
# the process receives SIGKILL (what `kill -9` or the OOM killer does to a run mid-save).
KILLER = '''
import io, os, signal
import torch
from pytorch_lightning.callbacks import Callback

class KillDuringSave(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def setup(self, trainer, pl_module, stage) -> None:
        save = torch.save

        def torn_save(obj, f, *args, **kwargs):
            name = str(getattr(f, "name", f))
            if trainer.global_step >= self.step and "last.ckpt" in os.path.basename(name):
                buf = io.BytesIO()
                save(obj, buf, *args, **kwargs)
                data = buf.getvalue()
                if hasattr(f, "write"):
                    f.write(data[: len(data) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            return save(obj, f, *args, **kwargs)

        torch.save = torn_save
'''


# The shard DataModule saves the training stream's position (state_dict/load_state_dict), so a resumed run goes on
# with the very batches the uninterrupted run saw.
def test_kill_during_save_then_resume_continues_the_uninterrupted_run(
        shapes_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    overlay = every_n_steps_overlay(tmp_path / "sr_l.yaml", 2)
    # A: uninterrupted, 8 steps
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    MAVCLI(args=sr_args(shapes_root, overlay))
    run_a = tmp_path / "a" / "runs" / "sr_l"

    # B: the same run in a subprocess, SIGKILLed while writing last.ckpt at step 6 (checkpoints at 2 and 4 done).
    # $TMPDIR on another filesystem (tmpfs) is where a temp-file-then-move save degrades into a non-atomic copy.
    (tmp_path / "b").mkdir()
    (tmp_path / "helpers").mkdir()
    (tmp_path / "helpers" / "mav_killer.py").write_text(textwrap.dedent(KILLER))
    env = cli_env(tmp_path / "helpers")
    if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK):
        env["TMPDIR"] = "/dev/shm"
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_mav", *sr_args(shapes_root, overlay, "--trainer.callbacks+=mav_killer.KillDuringSave",
                                                         "--trainer.callbacks.init_args.step", "6")],
        cwd=tmp_path / "b", env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]
    run_b = tmp_path / "b" / "runs" / "sr_l"
    ckpt_dir = run_b / "checkpoints"
    assert list(ckpt_dir.glob(".last.ckpt.*.tmp")), "the kill should have hit the write of last.ckpt"
    last = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)  # intact, and safe to load
    assert last["global_step"] == 4
    events_b = set(run_b.glob("events.out.tfevents.*"))

    # C: resume the killed run
    monkeypatch.chdir(tmp_path / "b")
    cli = MAVCLI(args=sr_args(shapes_root, overlay, "--ckpt_path", "last"))
    assert Path(cli.trainer.ckpt_path).resolve() == (ckpt_dir / "last.ckpt").resolve()
    assert cli.trainer.global_step == 8
    assert not list(ckpt_dir.glob(".last.ckpt.*.tmp")), "the next save removes the killed writer's temp file"

    # the resumed losses are the uninterrupted run's: same data position, noise, optimizer and EMA state
    (events_c,) = set(run_b.glob("events.out.tfevents.*")) - events_b
    (events_a,) = run_a.glob("events.out.tfevents.*")
    loss_a, loss_c = scalars(events_a, "train/loss"), scalars(events_c, "train/loss")
    assert len(loss_a) == 8 and sorted(loss_c) == sorted(loss_a)[4:], (loss_a, loss_c)
    for step, value in loss_c.items():
        assert value == pytest.approx(loss_a[step], abs=1e-5, rel=1e-5), (step, loss_a, loss_c)
    val_a, val_c = scalars(events_a, "val/loss"), scalars(events_c, "val/loss")  # on the EMA weights
    assert val_c and all(val_c[s] == pytest.approx(val_a[s], abs=1e-5, rel=1e-5) for s in val_c)

    final_a, final_c = load(run_a / "checkpoints" / "last.ckpt"), load(ckpt_dir / "last.ckpt")
    for key in ("state_dict", "current_model_state"):  # EMA weights, raw weights
        for name, tensor in final_a[key].items():
            torch.testing.assert_close(final_c[key][name], tensor, atol=1e-5, rtol=1e-5)
    opt_a, opt_c = final_a["optimizer_states"][0]["state"], final_c["optimizer_states"][0]["state"]
    for i in opt_a:
        torch.testing.assert_close(opt_c[i]["exp_avg_sq"], opt_a[i]["exp_avg_sq"], atol=1e-7, rtol=1e-4)
    assert final_c["lr_schedulers"][0]["last_epoch"] == final_a["lr_schedulers"][0]["last_epoch"] == 8


def test_last_checkpoint_is_the_final_step_when_max_steps_is_off_the_interval(
        shapes_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # dt.yaml's case: 360 steps, last.ckpt every 100; Lightning's own ModelCheckpoint leaves last.ckpt at step 300
    overlay = every_n_steps_overlay(tmp_path / "sr_l.yaml", 4)
    monkeypatch.chdir(tmp_path)
    cli = MAVCLI(args=sr_args(shapes_root, overlay, max_steps=6))
    last = torch.load(tmp_path / "runs" / "sr_l" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 6
    # the EMA average (what children load) is the model's final state, and the training weights beside it were saved
    # before EMAWeightAveraging copied the average into the model at on_train_end (a resume needs both)
    final = cli.model.state_dict()
    assert all(torch.equal(v, final[k]) for k, v in last["state_dict"].items())
    assert any(not torch.equal(v, last["state_dict"][k]) for k, v in last["current_model_state"].items()
               if k.startswith("unet."))
    # and a resume to a larger max_steps continues from step 6
    cli = MAVCLI(args=sr_args(shapes_root, overlay, "--ckpt_path", "last", max_steps=7))
    assert cli.trainer.global_step == 7


def test_atomic_checkpoint_io_keeps_the_old_file_when_a_save_dies(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    io_ = AtomicCheckpointIO()
    target = tmp_path / "checkpoints" / "last.ckpt"
    io_.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, target)
    mode = target.stat().st_mode & 0o777
    save = torch.save

    def dying_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # interrupted mid-write

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        io_.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, target)
    monkeypatch.setattr(torch, "save", save)
    ckpt = torch.load(target, weights_only=True)
    assert ckpt["global_step"] == 1 and torch.equal(ckpt["w"], torch.ones(3))
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]  # no temp left behind
    io_.save_checkpoint({"global_step": 3}, target)
    assert torch.load(target, weights_only=True)["global_step"] == 3
    assert target.stat().st_mode & 0o777 == mode  # usual permissions, not mkstemp's 0600


class NaNAt(SuperResStage):
    """SR stage whose training loss is NaN at the given optimizer steps (the injected fault)."""

    def __init__(self, nan_steps: list[int], nonfinite: str = "stop", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.nan_steps, self.nonfinite = set(nan_steps), nonfinite

    def compute_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None):
        loss, n = super().compute_loss(batch, generator)
        if self.training and self.global_step in self.nan_steps:
            loss = loss * float("nan")
        return loss, n


def nan_args(shapes_root: Path, overlay: Path, nonfinite: str, nan_steps: list[int], max_steps: int) -> list[str]:
    args = sr_args(shapes_root, overlay, max_steps=max_steps)
    args += ["--model.class_path", f"{NaNAt.__module__}.NaNAt", "--model.init_args.nan_steps", json.dumps(nan_steps),
             "--model.init_args.nonfinite", nonfinite]
    return args


def test_nonfinite_stop_names_the_step_and_keeps_the_last_checkpoint(
        shapes_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    overlay = every_n_steps_overlay(tmp_path / "sr_l.yaml", 2)
    monkeypatch.chdir(tmp_path)
    # (validation at step 2: Lightning defers base.yaml's val/loss-monitoring ModelCheckpoint, last.ckpt included,
    # until the monitored value exists)
    with pytest.raises(NonFiniteLossError, match=r"non-finite train/loss \(nan\) at step 3 .*last good checkpoint"):
        MAVCLI(args=nan_args(shapes_root, overlay, "stop", [3], max_steps=6) + ["--trainer.val_check_interval", "2"])
    ckpt_dir = tmp_path / "runs" / "sr_l" / "checkpoints"
    last = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 2  # the last good periodic checkpoint, untouched
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    crash = load(ckpt_dir / "on_exception.ckpt")  # the state when it stopped: before the NaN step's update
    assert crash["global_step"] == 3 and all(torch.isfinite(v).all() for v in crash["state_dict"].values())

    # a fresh run of the stage starts from scratch (no implicit resume from on_exception.ckpt or last.ckpt) ...
    cli = MAVCLI(args=nan_args(shapes_root, overlay, "stop", [], max_steps=1))
    assert cli.trainer.ckpt_path is None and cli.trainer.global_step == 1
    assert not (ckpt_dir / "on_exception.ckpt").exists()  # a successful run clears the stale crash file
    # ... and --ckpt_path last is the periodic last.ckpt
    MAVCLI(args=nan_args(shapes_root, overlay, "stop", [], max_steps=4))
    cli = MAVCLI(args=nan_args(shapes_root, overlay, "stop", [], max_steps=5) + ["--ckpt_path", "last"])
    assert Path(cli.trainer.ckpt_path).name == "last.ckpt" and cli.trainer.global_step == 5


def test_nonfinite_skip_skips_the_update_and_counts_it(
        shapes_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    overlay = every_n_steps_overlay(tmp_path / "sr_l.yaml", 100)
    monkeypatch.chdir(tmp_path)
    seen: dict[int, dict[str, torch.Tensor]] = {}

    class Watch(NaNAt):  # the raw weights after every step, to see the skipped step change nothing
        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            seen[self.global_step] = {k: v.detach().clone() for k, v in self.unet.state_dict().items()}

    globals()["Watch"] = Watch  # importable by class path
    args = nan_args(shapes_root, overlay, "skip", [2, 4], max_steps=6)
    args[args.index(f"{NaNAt.__module__}.NaNAt")] = f"{NaNAt.__module__}.Watch"
    cli = MAVCLI(args=args)
    assert cli.trainer.global_step == 6 and cli.model.nonfinite_skipped == 2
    assert all(torch.isfinite(v).all() for v in cli.model.state_dict().values())
    # global_step counts the skipped steps too: the batch at step 2 ran when global_step was 2 and ended at 3
    for step in (3, 5):
        assert all(torch.equal(seen[step][k], seen[step - 1][k]) for k in seen[step]), f"step {step - 1} updated"
    assert any(not torch.equal(seen[2][k], seen[1][k]) for k in seen[2])  # a normal step does update
    (events,) = (tmp_path / "runs" / "sr_l").glob("events.out.tfevents.*")
    skipped = scalars(events, "train/nonfinite_skipped")
    assert max(skipped.values()) == 2 and min(skipped.values()) == 0
    assert all(v == v for v in scalars(events, "train/loss").values())  # no NaN logged as the loss
    assert torch.load(tmp_path / "runs" / "sr_l" / "checkpoints" / "last.ckpt",
                      weights_only=True)["nonfinite_skipped"] == 2
