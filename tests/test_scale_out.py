"""The paper overlays under DDP as a user launches them (`python -m lightning_mav fit --config experiments/<stage>.yaml
--config experiments/paper/<stage>.yaml … --trainer.strategy ddp --trainer.devices 2`), on 2 CPU processes (gloo),
shrunk by one set of overrides (tests.helpers.paper_fit_args): each stage trains 20 steps, and a run resumed from
its step-10 checkpoint ends on the uninterrupted run's losses and weights. FSDP: Lightning refuses it on CPUs (its
exact error is asserted); through a test-only subclass that lifts the GPU check, D_t and D train on 2 CPU processes
and their checkpoints load in one.

D_t (joint image steps, every layer trained) is the case that broke: its image steps leave the temporal and fps
parameters without gradients, which plain DDP refuses. The stage asks DDP for find_unused_parameters exactly then
(StageBase.setup); every other overlay runs under plain DDP, which would stop at its second step on any unused
parameter. D_t's 20 DDP steps and its FSDP run are in the default test run; the resumes and the other stages are
`pytest -m slow`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from lightning_mav.trainer_cli import MAVCLI
from tests.helpers import (PAPER_PARENT, PAPER_STAGES, TINY_UNET_8, cli_env, every_n_steps_overlay, paper_fit_args,
                           read_events, run_ddp, save_open_clip_weights, single_thread)

STEPS, RESUME_AT = 20, 10
DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
       "--trainer.max_steps", str(STEPS), "--trainer.val_check_interval", str(RESUME_AT),
       "--trainer.log_every_n_steps", "1"]
# D_t as the issue tried it: joint image steps on half the steps, every layer trained
DT_JOINT = ["--model.init_args.joint_image_prob", "0.5", "--model.init_args.freeze_spatial", "false"]
FIND_UNUSED = "DDP: find_unused_parameters=True"


# ------------------------------------------------------------------------------------------------ exactness
def _image_step_under_ddp(rank: int, world_size: int) -> dict[str, Any]:
    """One D_t image step (temporal layers off) under DDP(find_unused_parameters=True) and an AdamW step."""
    from torch.nn.parallel import DistributedDataParallel

    from lightning_mav.nn.unet import UNet

    torch.manual_seed(0)  # the same initial weights on both ranks, as DDP broadcasts them
    unet = UNet(**{**TINY_UNET_8, "temporal": True, "fps_cond": True})
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    ddp = DistributedDataParallel(unet, find_unused_parameters=True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-2, weight_decay=0.1)
    torch.manual_seed(1 + rank)  # each rank its own batch
    out = ddp(torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), time=False)  # an image batch: no temporal layers
    (out - 1).square().mean().backward()
    optimizer.step()
    temporal = dict(unet.named_temporal_parameters())
    return {"temporal_grads": sum(p.grad is not None for p in temporal.values()),
            "temporal_moved": sum(not torch.equal(p, before[n]) for n, p in temporal.items()),
            "temporal_states": sum(p in optimizer.state for p in temporal.values()),
            "spatial_grads": sum(p.grad is not None for p in unet.spatial_parameters()),
            "spatial_moved": sum(not torch.equal(p, before[n]) for n, p in unet.named_parameters()
                                 if n not in temporal),
            "spatial": {n: p.detach().clone() for n, p in unet.named_parameters() if n not in temporal}}


def test_ddp_leaves_the_temporal_layers_of_an_image_step_as_one_process_does() -> None:
    """The premise of find_unused_parameters being exact: a parameter no rank used keeps grad None (AdamW then
    neither decays it nor moves its moments), unlike the zero gradient of a `+ 0 * p.sum()` graph."""
    ranks = run_ddp(_image_step_under_ddp)
    for r in ranks:
        assert r["temporal_grads"] == r["temporal_moved"] == r["temporal_states"] == 0
        assert r["spatial_grads"] == len(r["spatial"]) and r["spatial_moved"] > 0
    spatial = [r["spatial"] for r in ranks]  # the used parameters' gradients were averaged: the ranks agree
    for n, p in spatial[0].items():
        torch.testing.assert_close(spatial[1][n], p, rtol=0, atol=0)


@pytest.mark.parametrize(("unet", "joint", "strategy", "expected"), [
    ({"temporal": True, "fps_cond": True}, 0.5, "ddp", True),  # D_t with joint image steps: the flag
    ({"temporal": True, "fps_cond": True}, 0.0, "ddp", None),  # no image steps: plain DDP
    ({}, 0.5, "ddp", None),  # D has no temporal layers to leave unused
    ({"temporal": True, "fps_cond": True}, 0.5, "ddp_find_unused_parameters_false", False),  # the user's word wins
])
def test_the_stage_asks_ddp_for_unused_parameters_only_when_it_has_them(
        unet: dict[str, Any], joint: float, strategy: str, expected: bool | None) -> None:
    from lightning_mav.stages.decoder import DecoderStage

    stage = DecoderStage(unet={**TINY_UNET_8, **unet}, joint_image_prob=joint)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False, enable_progress_bar=False)
    stage.trainer = trainer
    stage.setup("fit")  # what Lightning calls on every rank before the strategy wraps the model
    assert trainer.strategy._ddp_kwargs.get("find_unused_parameters") is expected


# ------------------------------------------------------------------------------------------------ the overlays
@pytest.fixture(scope="module")
def scale_out_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the open_clip weights file of a random ``mav-tiny`` CLIP (P's and D's ``clip_ckpt``)."""
    root = tmp_path_factory.mktemp("scale_out")
    save_open_clip_weights(root / "open_clip_pytorch_model.bin")
    return root


def parent_checkpoint(stage: str, root: Path, shapes_root: Path) -> Path:
    """``root/runs/<stage>/checkpoints/last.ckpt``: one single-process step of the stage's paper overlay (and its
    parents'), what a child's ``init_from`` reads; made once per module."""
    ckpt = root / "runs" / stage / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        extra = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_steps", "1",
                 "--trainer.limit_val_batches", "0"]
        if stage in PAPER_PARENT:
            extra += ["--model.init_args.init_from",
                      str(parent_checkpoint(PAPER_PARENT[stage], root, shapes_root))]
        with single_thread(), pytest.MonkeyPatch.context() as mp:
            mp.chdir(root)
            MAVCLI(args=paper_fit_args(stage, shapes_root, *extra, clip_weights=root / "open_clip_pytorch_model.bin"))
    return ckpt


def launch(stage: str, cwd: Path, args: list[str]) -> str:
    """``python -m lightning_mav <args>`` in ``cwd``; its output (stdout + stderr)."""
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "lightning_mav", *args], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{stage}: exit {proc.returncode}\n{output[-5000:]}"
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in output
    return output


def losses(run: Path) -> dict[int, float]:
    """``train/loss`` by step over every event file of a run folder (rank 0 logs)."""
    values: dict[int, float] = {}
    for events in sorted(run.glob("events.out.tfevents.*")):
        values.update({e.step: e.value for e in read_events(events).Scalars("train/loss")})
    return values


def train_under_ddp(stage: str, root: Path, shapes_root: Path, tmp_path: Path, *extra: str) -> tuple[list[str], str]:
    """Train ``stage``'s paper overlay 20 steps under 2-process DDP in ``tmp_path/a`` (checkpoints kept every 10
    steps); its arguments and output."""
    overlay = every_n_steps_overlay(tmp_path / f"{stage}.yaml", RESUME_AT, keep=True, media=0)  # no media: faster
    args = paper_fit_args(stage, shapes_root, "--config", str(overlay), *DDP, *extra,
                          clip_weights=root / "open_clip_pytorch_model.bin")
    if stage in PAPER_PARENT:
        args += ["--model.init_args.init_from", str(parent_checkpoint(PAPER_PARENT[stage], root, shapes_root))]
    output = launch(stage, tmp_path / "a", args)
    assert sorted(losses(tmp_path / "a" / "runs" / stage)) == list(range(STEPS))
    return args, output


def check_resume(stage: str, args: list[str], tmp_path: Path) -> None:
    """Resume ``train_under_ddp``'s run from its step-10 checkpoint (``--ckpt_path last`` in ``tmp_path/b``); assert
    the resumed losses of steps 10-19 and final weights are the uninterrupted run's."""
    run_a, run_b = tmp_path / "a" / "runs" / stage, tmp_path / "b" / "runs" / stage
    (run_b / "checkpoints").mkdir(parents=True)
    shutil.copy(run_a / "checkpoints" / f"step={RESUME_AT}.ckpt", run_b / "checkpoints" / "last.ckpt")
    launch(stage, tmp_path / "b", [*args, "--ckpt_path", "last"])

    loss_a, loss_b = losses(run_a), losses(run_b)
    assert sorted(loss_b) == list(range(RESUME_AT, STEPS)), loss_b
    # the first resumed step is bitwise the uninterrupted one (same weights, optimizer, data and noise); later steps
    # are bitwise for P, D and D_t, while SR_l's, SR_t's and ↑F's drift from the last bits (measured: up to 1e-5)
    assert loss_b[RESUME_AT] == loss_a[RESUME_AT], (stage, loss_a, loss_b)
    for step, value in loss_b.items():
        assert value == pytest.approx(loss_a[step], rel=1e-3, abs=1e-6), (stage, step, loss_a, loss_b)
    final_a, final_b, at_resume = (torch.load(path, map_location="cpu", weights_only=True) for path in (
        run_a / "checkpoints" / "last.ckpt", run_b / "checkpoints" / "last.ckpt",
        run_a / "checkpoints" / f"step={RESUME_AT}.ckpt"))
    assert final_a["global_step"] == final_b["global_step"] == STEPS
    for key in ("state_dict", "current_model_state"):  # EMA weights (what children load), training weights
        assert final_a[key].keys() == final_b[key].keys()
        # within 1% of how far steps 10-19 moved the weights (measured: 3e-8 apart for P, D and D_t, 1e-4 for the
        # SR stages and ↑F): a resume that lost the optimizer, EMA or data state would be off by the steps' own size
        off = torch.stack([(final_b[key][n].float() - t.float()).norm() for n, t in final_a[key].items()]).norm()
        moved = torch.stack([(t.float() - at_resume[key][n].float()).norm() for n, t in final_a[key].items()]).norm()
        assert moved > 0 and off <= 0.01 * moved, (stage, key, off, moved)


def image_steps(steps: range, prob: float) -> list[int]:
    """The steps D_t trains on images (DecoderStage._video_inputs: one coin per step, seeded by the step)."""
    return [s for s in steps if torch.rand(1, generator=torch.Generator().manual_seed(s)).item() < prob]


def test_dt_paper_overlay_with_joint_image_steps_trains_under_ddp(scale_out_root: Path, shapes_root: Path,
                                                                   tmp_path: Path) -> None:
    """The issue's case, which stopped after its first step: 20 steps, image steps among them."""
    assert 0 < len(image_steps(range(STEPS - 1), 0.5)) < STEPS - 1  # both kinds of steps, an image step not last
    start = time.perf_counter()
    _, output = train_under_ddp("dt", scale_out_root, shapes_root, tmp_path, *DT_JOINT)
    assert FIND_UNUSED in output and "the joint image steps (joint_image_prob=0.5)" in output
    print(f"dt under DDP: {time.perf_counter() - start:.1f} s")


@pytest.mark.slow
@pytest.mark.parametrize("stage", PAPER_STAGES)
def test_paper_overlay_trains_and_resumes_under_ddp(stage: str, scale_out_root: Path, shapes_root: Path,
                                                    tmp_path: Path) -> None:
    # plain DDP (no unused-parameter search) but for D_t's joint image steps: a parameter left without a gradient
    # would stop the run at its next step
    start = time.perf_counter()
    args, output = train_under_ddp(stage, scale_out_root, shapes_root, tmp_path, *(DT_JOINT if stage == "dt" else ()))
    assert (FIND_UNUSED in output) is (stage == "dt")
    check_resume(stage, args, tmp_path)
    print(f"{stage}: 2 DDP runs in {time.perf_counter() - start:.1f} s")


# ------------------------------------------------------------------------------------------------ FSDP
def test_fsdp_on_cpus_stops_with_lightnings_own_error(scale_out_root: Path, shapes_root: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`--trainer.strategy fsdp` on CPUs: Lightning refuses it before anything is built, in one line."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        MAVCLI(args=paper_fit_args("decoder", shapes_root, "--trainer.strategy", "fsdp", "--trainer.accelerator",
                                   "cpu", "--trainer.devices", "2",
                                   clip_weights=scale_out_root / "open_clip_pytorch_model.bin"))
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: trainer.strategy: The strategy `fsdp` requires a GPU accelerator, but received `accelerator='cpu'`. "
        "Please set `accelerator='cuda'`, `accelerator='gpu'`, or pass a `CUDAAccelerator()` instance to use FSDP.")


@pytest.mark.parametrize("stage", ["dt", pytest.param("decoder", marks=pytest.mark.slow)])
def test_fsdp_trains_on_two_cpu_processes_and_its_checkpoint_loads_in_one(
        stage: str, scale_out_root: Path, shapes_root: Path, tmp_path: Path) -> None:
    """FSDP as `--trainer.strategy fsdp` sets it up on GPUs, run on 2 CPU processes through tests.helpers'
    CPUFSDPStrategy: the U-Net sharded per Block, the CLIP left whole; the full-state-dict checkpoint of rank 0
    loads in one process for the pipeline."""
    from lightning_mav.pipeline import load_stage
    from lightning_mav.stages.decoder import DecoderStage

    start = time.perf_counter()
    args = paper_fit_args(stage, shapes_root, "--trainer.strategy", '{"class_path": "tests.helpers.CPUFSDPStrategy"}',
                          "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.max_steps", "4",
                          "--trainer.val_check_interval", "4", "--trainer.log_every_n_steps", "1",
                          *(DT_JOINT if stage == "dt" else ()),
                          clip_weights=scale_out_root / "open_clip_pytorch_model.bin")
    if stage in PAPER_PARENT:
        args += ["--model.init_args.init_from", str(parent_checkpoint(PAPER_PARENT[stage], scale_out_root,
                                                                      shapes_root))]
    output = launch(stage, tmp_path, args)
    blocks = 8  # TINY_UNET_8: 3 down (a res block, the downsampler, a res block), the middle, 4 up; D_t inherits it
    assert f"FSDP: each of the {blocks} blocks an FSDP unit, the frozen CLIP left whole (ignored_modules)" in output
    assert "EMAWeightAveraging is off under FSDP" in output and "MediaLogger: no samples under FSDP" in output
    run = tmp_path / "runs" / stage
    assert len(losses(run)) == 4
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4 and not any(k.startswith("clip.") for k in ckpt["state_dict"])
    loaded = load_stage(DecoderStage, run / "checkpoints" / "last.ckpt", stage=stage)
    state = loaded.state_dict()
    for name, tensor in ckpt["state_dict"].items():  # whole tensors (not rank 0's shards), as trained
        assert state[name].shape == tensor.shape, name
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0)
    assert loaded.unet.temporal is (stage == "dt")
    print(f"FSDP {stage}: {time.perf_counter() - start:.1f} s")
